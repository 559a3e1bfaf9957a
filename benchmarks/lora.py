"""Full fine-tuning vs LoRA vs QLoRA: memory held, train-step temporaries and train-step time.

    python -m benchmarks.lora                       # embedded SmolLM2-135M-Instruct, f32, CPU
    python -m benchmarks.lora --preset=llama-3.2-1b --dtype=bfloat16 --size=8x1024   # one GPU

Each mode runs the GRPO train step of `train.step` with the loss of `train.grpo` (configs/grpo.py:
beta 0.04, so a forward of the frozen reference too) on the same ROWSxSEQ random rows, compiled
ahead of time once and timed as the best of `--repeats` calls:

- full: every weight trained; the state holds params + AdamW moments, the reference is a copy.
- lora: adapters of rank `--rank` on every projection (`models/lora.py`); the state holds the
  adapters and their moments; the float base is frozen and is also the reference.
- qlora-int8 / qlora-int4: the same adapters on a base whose projections are held as int8 per
  channel or 4-bit blocks of 32 (`models/quant.py`), dequantized before each matmul.

"held" is the bytes of every array the step keeps between calls (base, reference, state);
"temporaries" is XLA's temp buffer size of the compiled step (`memory_analysis`); peak = held +
temporaries. Ratios are against full fine-tuning in the same run. "estimate" is what `tpu.memory`
computes for the same model, batch, dtype and devices (its persistent bytes plus its train-step
peak), set beside the peak so that the estimator can be checked on each machine; on a GPU or TPU the
JSON line also carries the device allocator's peak over the whole process (`device_peak`: run one
mode per process to read it per mode). Then the per-chip estimate of `tpu.memory` for Llama-3.1-8B
on a TPU v5e-8 (fsdp 8, micro-batch 8 x 1024, sampler 64 x (896 + 128)) for each mode. The last
line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.train_step import BenchmarkError, grpo_config, random_rows, timed_calls
from models import llama, lora, quant, registry
from models.config import preset
from playpen_jax import buffers
from playpen_jax import sharding as shd
from train import grpo
from train import step as train_step

MODES = ("full", "lora", "qlora-int8", "qlora-int4")
MB = 2 ** 20


def run_mode(mode: str, cfg, params, batch, c, rank: int, repeats: int, mesh, block: int = 32) -> dict:
    optimizer = train_step.make_optimizer(c.optimizer, 1000)
    loss_fn = grpo.make_loss_fn(cfg, c, int(c.rollout.max_new_tokens))
    params = jax.device_put(params, train_step.param_shardings(cfg, mesh))
    if mode == "full":
        param_sh = train_step.param_shardings(cfg, mesh)
        trained = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=param_sh)(params)
        base, extra = params, {"ref_params": params}
    else:
        spec = lora.LoraSpec.parse(rank, 2.0 * rank, "all")
        base = params if mode == "lora" else jax.jit(
            lambda p: quant.quantize_params(p, mode.split("-")[1], block=block))(params)
        param_sh = shd.tree_shardings(lora.param_axes(cfg, spec), lora.param_shapes(cfg, spec), mesh)
        trained = jax.jit(lambda: lora.init(cfg, spec, jax.random.PRNGKey(0), cfg.jnp_param_dtype),
                          out_shardings=param_sh)()
        loss_fn = lora.adapted_loss(loss_fn, spec)
        extra = {"ref_params": base, "lora_base": base}
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trained)
    shardings = train_step.state_shardings(param_sh, optimizer, abstract, mesh)
    state = train_step.init_state(trained, optimizer, shardings)
    fn = train_step.make_train_step(loss_fn, optimizer, shardings)
    device_batch = buffers.to_device(batch, mesh)
    compiled = fn.lower(state, device_batch, extra).compile()
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
    held = {"base": quant.nbytes(base), "reference": quant.nbytes(params) if mode == "full" else 0,
            "trained": quant.nbytes(state["params"]), "optimizer": quant.nbytes(state["opt_state"])}
    metrics = {}

    def call():
        nonlocal state, metrics
        state, metrics = compiled(state, device_batch, extra)
        jax.block_until_ready((state, metrics))

    times = timed_calls(call, repeats)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{mode}: non-finite loss {loss}")
    if mode == "full":   # the trained copy is the state's; `base` is the loaded params
        held["base"] = 0
    out = {"held": sum(held.values()), "temporaries": temp, "seconds": min(times), **held}
    out["peak"] = out["held"] + temp
    return out


def _estimate(model, mode: str, rank: int, **kw) -> dict:
    """tpu.memory's estimate for `mode` (LoRA / QLoRA settings from the mode's name)."""
    from tpu import memory

    if mode != "full":
        kw.update(lora_rank=rank, quantize="none" if mode == "lora" else mode.split("-")[1])
    return memory.estimate(model, **kw)


def estimate_here(cfg, mode: str, rank: int, rows: int, seq: int, block: int) -> int:
    """tpu.memory's bytes per device for this run: the step's persistent arrays and its peak, with
    the batch split over every device as the benchmark's mesh splits it."""
    n = len(jax.devices())
    est = _estimate(cfg, mode, rank, chips=n, data=n, fsdp=1, param_dtype=cfg.param_dtype,
                    dtype=cfg.dtype, micro_batch_rows=rows, seq_len=seq, block=block)
    return est["persistent"] + est["train_peak"]


def device_peak() -> Optional[int]:
    """The device allocator's peak bytes in this process (None where the backend keeps no count,
    as on the CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def estimate_8b(mode: str, rank: int) -> dict:
    return _estimate("llama-3.1-8b", mode, rank, chips=8, fsdp=8, param_dtype="bfloat16",
                     micro_batch_rows=8, seq_len=1024, rollout_batch=64, prompt_len=896,
                     new_tokens=128)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="random weights of a preset shape (default: the "
                   "embedded model)")
    p.add_argument("--model", default=registry.DEFAULT_MODEL, help="a model name or path (default: "
                   "%(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--size", default="4x256", help="ROWSxSEQ of the batch (default: %(default)s)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block", type=int, default=32, help="int4 block length (default: %(default)s)")
    p.add_argument("--modes", default=",".join(MODES))
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    rows, _, seq = a.size.partition("x")
    if bad or not modes or not (rows.isdigit() and seq.isdigit()) or a.rank < 1 or a.repeats < 1:
        raise BenchmarkError(f"need --modes from {', '.join(MODES)}, --size ROWSxSEQ, --rank >= 1, "
                             f"--repeats >= 1; got {a.modes!r}, {a.size!r}, {a.rank}, {a.repeats}")
    rows, seq = int(rows), int(seq)
    if a.preset:
        cfg = preset(a.preset, param_dtype=a.dtype, dtype=a.dtype)
        params, name = llama.init(cfg, jax.random.PRNGKey(0)), f"{a.preset} (random weights)"
    else:
        model = registry.load(a.model, param_dtype=a.dtype, dtype=a.dtype)
        cfg, params, name = model.config, model.params, a.model
    c = grpo_config()
    seqs = random_rows(rows, seq, cfg.vocab_size, np.random.default_rng(0))
    mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    batch = buffers.pack(seqs, micro_batch=rows, max_len=seq, length=seq, weight_by="tokens",
                         rows_multiple=buffers.rows_multiple(mesh))
    results = {m: run_mode(m, cfg, params, batch, c, a.rank, a.repeats, mesh, a.block) for m in modes}
    for m, r in results.items():
        r["estimate"] = estimate_here(cfg, m, a.rank, rows, seq, a.block)
    estimates = {m: estimate_8b(m, a.rank) for m in modes}

    print(f"\n{name}, {a.dtype}, {jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} "
          f"cores), GRPO step on {rows}x{seq} tokens, LoRA rank {a.rank} on every projection")
    print("\n| mode | base MB | reference MB | trained MB | optimizer MB | held MB | step temporaries MB "
          "| peak MB | estimate MB | step s | peak / full | time / full |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    full = results.get("full")
    for m, r in results.items():
        ratio = (f"{r['peak'] / full['peak']:.2f} | {r['seconds'] / full['seconds']:.2f}" if full
                 else "- | -")
        print(f"| {m} | {r['base'] / MB:.1f} | {r['reference'] / MB:.1f} | {r['trained'] / MB:.1f} | "
              f"{r['optimizer'] / MB:.1f} | {r['held'] / MB:.1f} | {r['temporaries'] / MB:.1f} | "
              f"{r['peak'] / MB:.1f} | {r['estimate'] / MB:.1f} | {r['seconds']:.3f} | {ratio} |")
    gib = 2 ** 30
    print("\nLlama-3.1-8B on a TPU v5e-8 (16 GiB per chip), fsdp 8, bf16, micro-batch 8 x 1024, sampler "
          "64 x (896 + 128), computed by tpu.memory (GiB per chip):\n")
    print("| mode | params | adapters | optimizer | reference | gradients | train peak | total |")
    print("|---|---|---|---|---|---|---|---|")
    for m, e in estimates.items():
        print(f"| {m} | {e['params'] / gib:.2f} | {e['adapters'] / gib:.2f} | {e['optimizer'] / gib:.2f} | "
              f"{e['reference'] / gib:.2f} | {e['gradients'] / gib:.2f} | {e['train_peak'] / gib:.2f} | "
              f"{e['total'] / gib:.2f} |")
    summary = {"model": name, "dtype": a.dtype, "device": jax.devices()[0].device_kind, "size": a.size,
               "rank": a.rank, "results": results, "device_peak": device_peak(),
               "v5e8_total_gib": {m: e["total"] / gib for m, e in estimates.items()}}
    if full:
        summary["peak_vs_full"] = {m: r["peak"] / full["peak"] for m, r in results.items()}
        summary["time_vs_full"] = {m: r["seconds"] / full["seconds"] for m, r in results.items()}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
