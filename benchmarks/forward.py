"""Full-sequence forward (prefill) throughput: our jitted forward vs transformers, same weights.

    python -m benchmarks.forward                          # embedded SmolLM2-135M, f32, CPU
    python -m benchmarks.forward --preset=llama-3.2-1b --dtype=bfloat16 --shapes=8x1024,32x512

Both run in this process on the same device kind (torch on CUDA when JAX sees a GPU). Prints a
markdown table and a final JSON line: tokens/s of each, `vs_transformers` (best ratio over the
shapes), and `roof_fraction`: achieved model FLOP/s over a measured large-matmul FLOP/s.
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

from models import llama, loader, registry
from models.config import preset


def model_flops_per_token(cfg, seq: int) -> float:
    """Forward FLOPs per token: 2 x matmul params, plus causal attention scores and mixing."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    proj = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f
    attn = 2 * cfg.num_heads * cfg.head_dim * seq / 2  # QK^T and PV, causal half
    return 2 * L * (proj + attn) + 2 * d * cfg.vocab_size


def timeit(fn, repeats: int) -> float:
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_roof(dtype, n: int) -> float:
    """FLOP/s of an n x n x n matmul with `dtype` inputs (accumulated in float32)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    return 2 * n ** 3 / timeit(lambda: f(a).block_until_ready(), 5)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="a name or path (default: the embedded model)")
    p.add_argument("--preset", default=None, help="random weights of a preset shape instead")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--shapes", default="1x128,4x256,16x128", help="BATCHxSEQ list")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_peer", action="store_true", help="skip transformers")
    args = p.parse_args(argv)

    if args.preset:
        cfg = preset(args.preset, param_dtype=args.dtype, dtype=args.dtype)
        params = llama.init(cfg, jax.random.PRNGKey(0))
        name = f"{args.preset} (random weights)"
    else:
        model = registry.load(args.model or registry.DEFAULT_MODEL, param_dtype=args.dtype,
                              dtype=args.dtype)
        cfg, params, name = model.config, model.params, args.model or registry.DEFAULT_MODEL
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    roof = matmul_roof(cfg.jnp_dtype, 8192 if on_gpu else 2048)

    peer = None
    if not args.no_peer:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        with tempfile.TemporaryDirectory() as tmp:
            loader.save_hf(params, cfg, tmp)
            tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
            peer = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=tdtype).eval()
        tdev = "cuda" if on_gpu else "cpu"
        peer = peer.to(tdev)

    fwd = jax.jit(lambda p, t: llama.forward(p, t, config=cfg)[0])
    rows, parity = [], {}
    for b, t in shapes:
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t))
        tok = jnp.asarray(tokens)
        ours_s = timeit(lambda: fwd(params, tok).block_until_ready(), args.repeats)
        row = {"batch": b, "seq": t, "ours_tok_s": b * t / ours_s,
               "ours_roof_fraction": model_flops_per_token(cfg, t) * b * t / ours_s / roof}
        if peer is not None:
            import torch

            tt = torch.tensor(tokens, device=peer.device)

            def run_peer():
                with torch.inference_mode():
                    peer(input_ids=tt, use_cache=False, logits_to_keep=0)
                if on_gpu:
                    torch.cuda.synchronize()

            peer_s = timeit(run_peer, args.repeats)
            row["transformers_tok_s"] = b * t / peer_s
            row["ratio"] = peer_s / ours_s
            if not parity:  # same weights, same tokens: the logits must agree
                with torch.inference_mode():
                    ref = peer(input_ids=tt[:2, :64], use_cache=False).logits.float().cpu().numpy()
                ours = np.asarray(fwd(params, tok[:2, :64]))
                parity["max_abs_diff"] = float(np.abs(ours - ref).max())
                parity["max_abs_logit"] = float(np.abs(ref).max())
        rows.append(row)

    print(f"\n{name}, {args.dtype}, {device.device_kind} ({platform.processor() or platform.machine()}), "
          f"matmul roof {roof / 1e9:.1f} GFLOP/s\n")
    print("| batch x seq | ours tok/s | transformers tok/s | ours / transformers | ours % of roof |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']}x{r['seq']} | {r['ours_tok_s']:.0f} | "
              f"{r.get('transformers_tok_s', float('nan')):.0f} | {r.get('ratio', float('nan')):.2f} | "
              f"{100 * r['ours_roof_fraction']:.1f}% |")
    summary = {"model": name, "dtype": args.dtype, "device": device.device_kind,
               "roof_gflops": roof / 1e9, "rows": rows,
               "roof_fraction": max(r["ours_roof_fraction"] for r in rows), "parity": parity}
    if peer is not None:
        summary["vs_transformers"] = max(r["ratio"] for r in rows)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
