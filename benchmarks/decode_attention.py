"""One decode step's attention over the KV cache: ours (`llama._attention` as the sampler's decode
calls it) vs torch's `scaled_dot_product_attention`, same shapes, same values.

    python -m benchmarks.decode_attention                   # SmolLM2-135M's heads, CPU, f32
    python -m benchmarks.decode_attention --preset=llama-3.2-1b --batches=1,32 --slots=512,2048

A decode step of a batch of B rows attends one query per row to S cache slots in every layer: per
(row, KV head) a [G x Dh] by [Dh x S] product, a softmax, and a [G x S] by [S x Dh] product (G query
heads share a KV head). That is little arithmetic on a lot of cache, so the rate that matters is
the cache's bytes read per second. Ours is timed with the decode's own layout (keys [B, K, Dh, S],
values [B, K, S, Dh], f32) and the XLA options the sampler compiles its decode with; torch's with
its [B, K, S, Dh] keys and values. "read rate" is a jitted sum over the same cache bytes (what the
device reads at when it only reads). One layer's cache is read over and over, so on a CPU a cache of
a few tens of MB stays in its caches, where a decode step's 30 layers would come from memory: the
rates compare ours with torch, not with the memory's bandwidth. Prints a markdown table and a
final JSON line with the per-shape times, `vs_torch` (torch's time over ours, best over the shapes;
above 1: ours faster), `vs_torch_min` and the cache GB/s.
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.train_step import timed_calls
from models import llama, sampler
from models.config import preset
from models.errors import ConfigError


def median_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    return float(np.median(timed_calls(fn, repeats)))


def case(b: int, s: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0) -> dict:
    """Random q [B, 1, H, Dh], keys [B, K, Dh, S], values [B, K, S, Dh] and a mask [B, 1, S] that
    leaves out the first slots of odd rows (left padding), as numpy f32 / bool arrays."""
    rng = np.random.default_rng(seed)
    mask = np.ones((b, 1, s), bool)
    mask[1::2, :, : s // 4] = False
    return {"q": rng.standard_normal((b, 1, heads, head_dim), np.float32),
            "k": rng.standard_normal((b, kv_heads, head_dim, s), np.float32),
            "v": rng.standard_normal((b, kv_heads, s, head_dim), np.float32),
            "mask": mask}


def ours(c: dict, options: dict, repeats: int) -> tuple[float, np.ndarray]:
    fn = jax.jit(lambda q, k, v, m: llama._attention(q, k, v, m, slots_last=True))
    args = [jnp.asarray(c[x]) for x in ("q", "k", "v", "mask")]
    compiled = fn.lower(*args).compile(compiler_options=options or None)
    out = np.asarray(compiled(*args))
    return median_time(lambda: compiled(*args).block_until_ready(), repeats), out


def read_rate(c: dict, repeats: int) -> float:
    """Bytes per second of a jitted sum over the keys and values."""
    k, v = jnp.asarray(c["k"]), jnp.asarray(c["v"])
    fn = jax.jit(lambda k, v: k.sum() + v.sum())
    return (k.nbytes + v.nbytes) / median_time(lambda: fn(k, v).block_until_ready(), repeats)


def torch_sdpa(c: dict, repeats: int) -> tuple[float, np.ndarray]:
    import torch

    q = torch.from_numpy(c["q"]).transpose(1, 2)                   # [B, H, 1, Dh]
    k = torch.from_numpy(np.ascontiguousarray(np.swapaxes(c["k"], -1, -2)))   # [B, K, S, Dh]
    v = torch.from_numpy(c["v"])
    mask = torch.from_numpy(c["mask"])[:, None]                    # [B, 1, 1, S]

    def run():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                    enable_gqa=True)
    out = run().transpose(1, 2).numpy()                            # [B, 1, H, Dh]
    return median_time(run, repeats), out


def _positive_ints(p: argparse.ArgumentParser, flag: str, text: str) -> list:
    """A comma-separated list of positive integers, or the parser's error naming the flag."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        p.error(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="smollm2-135m", help="the model shape whose heads to use")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--slots", default="256,1024", help="comma-separated cache lengths")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no_torch", action="store_true", help="skip the torch peer")
    args = p.parse_args(argv)
    try:
        cfg = preset(args.preset)
    except ConfigError as e:
        p.error(str(e))
    batches, slots = _positive_ints(p, "--batches", args.batches), _positive_ints(p, "--slots", args.slots)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    device = jax.devices()[0]
    rows, summary = [], {"preset": args.preset, "device": device.platform, "layers": cfg.num_layers,
                         "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                         "shapes": {}}
    for b in batches:
        options = sampler.default_xla_options(b) if device.platform == "cpu" else {}
        for s in slots:
            c = case(b, s, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
            cache_bytes = c["k"].nbytes + c["v"].nbytes
            t_ours, out = ours(c, options, args.repeats)
            r = {"batch": b, "slots": s, "ours_ms": t_ours * 1e3, "ours_gb_s": cache_bytes / t_ours / 1e9,
                 "read_gb_s": read_rate(c, args.repeats) / 1e9, "step_ms": t_ours * 1e3 * cfg.num_layers}
            if not args.no_torch and device.platform == "cpu":
                t_torch, ref = torch_sdpa(c, args.repeats)
                err = float(np.abs(out - ref).max())
                if not err < 1e-4:
                    raise SystemExit(f"batch {b}, {s} slots: ours and torch differ by {err:.3g}")
                r.update(torch_ms=t_torch * 1e3, torch_gb_s=cache_bytes / t_torch / 1e9,
                         vs_torch=t_torch / t_ours, max_abs_diff=err)
            rows.append(r)
            summary["shapes"][f"{b}x{s}"] = r
            print(f"batch {b}, {s} slots: ours {r['ours_ms']:.3f} ms"
                  + (f", torch {r['torch_ms']:.3f} ms" if "torch_ms" in r else ""), flush=True)
    print(f"\n{args.preset} heads ({cfg.num_heads} query, {cfg.num_kv_heads} KV, head dim {cfg.head_dim}), "
          f"float32, {device.device_kind} ({platform.processor() or platform.machine()}), "
          f"median of {args.repeats}, one layer\n")
    print("| batch | slots | cache MB | ours ms | ours GB/s | read rate GB/s | torch sdpa ms | torch GB/s "
          "| torch / ours | ours x layers ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mb = r["ours_gb_s"] * r["ours_ms"]
        torch_cols = (f"{r['torch_ms']:.3f} | {r['torch_gb_s']:.1f} | {r['vs_torch']:.2f}"
                      if "torch_ms" in r else "- | - | -")
        print(f"| {r['batch']} | {r['slots']} | {mb:.1f} | {r['ours_ms']:.3f} | {r['ours_gb_s']:.1f} | "
              f"{r['read_gb_s']:.1f} | {torch_cols} | {r['step_ms']:.1f} |")
    ratios = [r["vs_torch"] for r in rows if "vs_torch" in r]
    summary["vs_torch"] = max(ratios) if ratios else None
    summary["vs_torch_min"] = min(ratios) if ratios else None
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
