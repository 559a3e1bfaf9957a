"""Generated tokens/s of the batched sampler, side by side with transformers and llama.cpp.

    python -m benchmarks.sampler                      # embedded SmolLM2-135M-Instruct, f32, CPU
    python -m benchmarks.sampler --preset=llama-3.2-1b --dtype=bfloat16 --batches=1,8,32,64
    python -m benchmarks.sampler --matmul_dtype=bfloat16   # f32 activations, bf16 weight matmuls
    python -m benchmarks.sampler --cache_dtype=bfloat16    # f32 activations, bf16 KV cache

Every engine decodes greedily exactly `--new_tokens` tokens (EOS ignored) after the same chat
prompt, repeated `batch` times; time includes prefill. Peers: transformers `generate` (torch, same
weights, KV cache on) and, for the embedded model, llama.cpp through llama-cpp-python on the Q4_1
GGUF at batch 1 (its Python API decodes one sequence at a time). Either is skipped, with a note,
when not installed (`pip install .[bench]`).

Also printed: the compute roof (a measured large matmul's FLOP/s over the model's FLOPs per
token) and the fraction of it reached, and the batch-1 bound: bytes of weights read per step over
measured memory bandwidth. The last line is JSON with `vs_transformers`, `vs_llamacpp` (best ratios
over the batch sizes; llama.cpp's batch-1 speed is the denominator) and `roof_fraction`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.forward import matmul_roof, model_flops_per_token
from models import llama, loader, lora, quant, registry
from models.config import preset
from models.sampler import Sampler

PROMPT = [{"role": "user", "content": "Tell me a long story about a dragon who learns to play chess."}]


def memory_bandwidth(on_gpu: bool) -> float:
    """Bytes/s the memory delivers: the larger of a large copy's rate (read + write counted) and a
    large sum's (read only, as a decode step mostly reads), best of five each. On the host, NumPy
    (XLA's elementwise CPU loops are slower than the memory system). Both are microbenchmarks: a
    decode step can read its weights faster still (BENCHMARKS.md, Llama-3.1-8B on an H200)."""
    if not on_gpu:
        a = np.ones((1 << 28) // 4, np.float32)
        b = np.empty_like(a)
        copy = 2 * a.nbytes / min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
        read = a.nbytes / min(_timed(lambda: a.sum()) for _ in range(5))
        return max(copy, read)
    a = jnp.ones(((1 << 30) // 4,), jnp.float32)
    rates = []
    for fn, traffic in ((lambda x: x * 1.0001, 2), (jnp.sum, 1)):
        f = jax.jit(fn)
        f(a).block_until_ready()
        rates.append(traffic * a.nbytes / min(_timed(lambda: f(a).block_until_ready()) for _ in range(5)))
    return max(rates)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default=None, help="random weights of a preset shape")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--matmul_dtype", default="", choices=("", "float32", "bfloat16"),
                   help="ours runs the weight matmuls in this dtype (f32 accumulation), from a copy "
                        "of the weights in it; activations stay --dtype (default: --dtype)")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--peer_batches", default="1,8,32", help="batches to time transformers at")
    p.add_argument("--no_transformers", action="store_true")
    p.add_argument("--lora_rank", type=int, default=0,
                   help="ours decodes through LoRA adapters of this rank on every projection, unmerged")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                   help="ours holds the projections quantized (a QLoRA base), dequantized per matmul")
    p.add_argument("--cache_block", type=int, default=None,
                   help="ours grows its KV cache this many slots at a time; 0: full length at once "
                        "(default: the sampler's, 32 on CPU and 0 elsewhere)")
    p.add_argument("--unstack_layers", default="", choices=("", "true", "false"),
                   help="ours decodes from per-layer fused weights (default: the sampler's, "
                        "true on CPU and GPU)")
    p.add_argument("--cache_dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="ours stores its KV cache in this dtype (auto: the activation dtype)")
    p.add_argument("--xla_options", default=None,
                   help="ours compiles its decode with these XLA options, as JSON, e.g. "
                        "'{\"xla_cpu_experimental_ynn_fusion_type\": \"\"}'; '{}': none "
                        "(default: the sampler's, which depend on the CPU and the batch)")
    args = p.parse_args(argv)
    xla_options = None
    if args.xla_options is not None:
        try:
            xla_options = json.loads(args.xla_options)
        except json.JSONDecodeError as e:
            p.error(f"--xla_options is not JSON: {e}")
        if not isinstance(xla_options, dict):
            p.error(f"--xla_options must be a JSON object, got {args.xla_options}")
    if args.cache_block is not None and args.cache_block < 0:
        p.error(f"--cache_block must be >= 0, got {args.cache_block}")
    on_gpu = jax.default_backend() == "gpu"
    n_new = args.new_tokens

    if args.preset:
        cfg = preset(args.preset, param_dtype=args.dtype, dtype=args.dtype,
                     matmul_dtype=args.matmul_dtype or None)
        params = llama.init(cfg, jax.random.PRNGKey(0))
        prompt = list(np.random.default_rng(0).integers(100, 1000, 40))
        name, gguf_path = f"{args.preset} (random weights)", None
    else:
        model = registry.load(registry.DEFAULT_MODEL, param_dtype=args.dtype, dtype=args.dtype,
                              matmul_dtype=args.matmul_dtype or None)
        cfg, params, name = model.config, model.params, registry.DEFAULT_MODEL
        prompt = model.tokenizer.encode_chat(PROMPT, add_generation_prompt=True).ids
        gguf_path = model.path
    batches = [int(b) for b in args.batches.split(",")]
    ours = params   # the peers get the plain float weights
    if args.quantize != "none":
        ours = jax.jit(lambda p: quant.quantize_params(p, args.quantize))(params)
    if args.lora_rank:
        spec = lora.LoraSpec.parse(args.lora_rank, 2.0 * args.lora_rank, "all")
        ad = lora.init(cfg, spec, jax.random.PRNGKey(1), cfg.jnp_param_dtype)
        ad = {t: {"a": x["a"], "b": (0.01 * jax.random.normal(jax.random.PRNGKey(2), x["b"].shape)).astype(
            x["b"].dtype)} for t, x in ad.items()}
        ours = lora.attach(ours, ad, spec)
    variant = ([f"{args.quantize} base"] if args.quantize != "none" else []) + (
        [f"LoRA rank {args.lora_rank} unmerged"] if args.lora_rank else [])
    if cfg.mixed_matmuls:
        variant.append(f"{args.matmul_dtype} weight matmuls")
    if args.cache_block is not None:
        variant.append(f"cache_block={args.cache_block}")
    if args.unstack_layers:
        variant.append(f"unstack_layers={args.unstack_layers}")
    if xla_options is not None:
        variant.append(f"xla_options={json.dumps(xla_options)}")
    if args.cache_dtype != "auto":
        variant.append(f"{args.cache_dtype} KV cache")
    if variant:
        name += f" [ours: {', '.join(variant)}]"
    peer_batches = [int(b) for b in args.peer_batches.split(",")]

    roof = matmul_roof(cfg.jnp_matmul_dtype, 8192 if on_gpu else 2048)
    bandwidth = memory_bandwidth(on_gpu)
    flops_tok = model_flops_per_token(cfg, len(prompt) + n_new // 2)
    weight_bytes = quant.nbytes(llama.matmul_weights(ours, cfg))   # what a decode step reads

    notes, hf = [], None
    if not args.no_transformers:
        try:
            import torch
            import transformers
        except ImportError:
            notes.append("transformers not installed: peer skipped")
        else:
            torch.set_num_threads(os.cpu_count() or 1)
            dev = "cuda" if on_gpu else "cpu"
            with tempfile.TemporaryDirectory() as tmp:
                loader.save_hf(params, cfg, tmp)
                tdt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
                hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=tdt).eval().to(dev)

    # Each batch size times ours and then the peer back to back, so that drift in a shared
    # machine's speed affects both sides of a ratio alike.
    sampler = Sampler(cfg, pad_id=0, cache_block=args.cache_block,
                      unstack_layers={"": None, "true": True, "false": False}[args.unstack_layers],
                      xla_options=xla_options, cache_dtype=args.cache_dtype)
    rows = {}
    for b in batches:
        run = lambda: sampler.generate(ours, [prompt] * b, max_new_tokens=n_new,  # noqa: E731
                                       temperature=0)
        run()  # compile
        rows[b] = {"ours": b * n_new / min(_timed(run) for _ in range(2))}
        if hf is not None and b in peer_batches:
            ids = torch.tensor([prompt] * b, device=dev)
            kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
                      max_new_tokens=n_new, min_new_tokens=n_new)

            def gen(kw=kw, ids=ids):
                with torch.inference_mode():
                    hf.generate(ids, **kw)
                if on_gpu:
                    torch.cuda.synchronize()

            gen({**kw, "max_new_tokens": 4, "min_new_tokens": 4})
            rows[b]["transformers"] = b * n_new / _timed(gen)
    hf = None  # free the peer before llama.cpp loads

    llamacpp = None
    if gguf_path and not on_gpu:
        try:
            from llama_cpp import Llama
        except ImportError:
            notes.append("llama-cpp-python not installed: peer skipped")
        else:
            llm = Llama(model_path=gguf_path, n_ctx=len(prompt) + n_new + 8,
                        n_threads=os.cpu_count() or 1, n_batch=len(prompt) + 8, verbose=False)

            def decode():
                for n, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), 1):
                    if n == n_new:
                        break

            decode()
            llamacpp = n_new / min(_timed(decode) for _ in range(2))

    roof_tok = roof / flops_tok
    print(f"\n{name}, {args.dtype}, {jax.devices()[0].device_kind} "
          f"({platform.machine()}, {os.cpu_count()} cores), {n_new} new tokens, prompt "
          f"{len(prompt)} tokens")
    print(f"matmul roof {roof / 1e9:.1f} GFLOP/s = {roof_tok:.0f} tok/s at "
          f"{flops_tok / 1e9:.3f} GFLOP/token; memory bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"batch-1 bound {bandwidth / weight_bytes:.1f} steps/s ({weight_bytes / 1e6:.0f} MB of "
          f"weights per step)")
    if llamacpp:
        print(f"llama.cpp (Q4_1 GGUF) batch 1: {llamacpp:.1f} tok/s")
    print("\n| batch | ours tok/s | transformers tok/s | ours / transformers | ours / llama.cpp b1 "
          "| % of roof |")
    print("|---|---|---|---|---|---|")
    for b, r in rows.items():
        if "ours" not in r:
            continue
        t = r.get("transformers")
        print(f"| {b} | {r['ours']:.1f} | {t:.1f} | {r['ours'] / t:.2f} |" if t else
              f"| {b} | {r['ours']:.1f} | - | - |", end="")
        print(f" {r['ours'] / llamacpp:.2f} |" if llamacpp else " - |",
              f"{100 * r['ours'] / roof_tok:.1f}% |")
    for n in notes:
        print("note:", n)
    summary = {
        "model": name, "dtype": args.dtype, "device": jax.devices()[0].device_kind,
        "new_tokens": n_new, "tokens_per_s": {str(b): r for b, r in rows.items()},
        "roof_fraction": max(r["ours"] / roof_tok for r in rows.values() if "ours" in r),
        "batch1_bound_steps_per_s": bandwidth / weight_bytes,
        "decode_xla_options": {str(b): sampler.decode_options(b) for b in rows},
    }
    ratios = [r["ours"] / r["transformers"] for r in rows.values() if "transformers" in r
              and "ours" in r]
    if ratios:
        summary["vs_transformers"] = max(ratios)
    if llamacpp:
        summary["llamacpp_b1_tokens_per_s"] = llamacpp
        summary["vs_llamacpp"] = max(r["ours"] for r in rows.values() if "ours" in r) / llamacpp
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
