"""A rollout call's prefill: one prefill padded to the longest prompt against the sampler's split
prefill (halves or quarters of the rows, longest first, each padded to its own length bucket).

    python -m benchmarks.prefill                          # the embedded model, CPU
    python -m benchmarks.prefill --lengths=300,300,900,900 --new_tokens=32

The default prompt lengths are those of the first learner turn of an evaluation of the seven
training games (4 test-split instances each, SmolLM2's chat template): 28 prompts of 223 to 452
tokens, which a batch of 32 pads to 512. Random token ids of those lengths are sampled from (the
time does not depend on the ids). Each variant is timed on a whole `generate` call (`--new_tokens`
sampled tokens) and on one with a single new token (about the prefill alone), alternated, the best
of `--repeats` after a compiling call. Prints a table and a final JSON line with the seconds,
the tokens each variant prefills, and `split_speedup` (the whole call's time unsplit over split).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np

from benchmarks.decode_attention import _positive_ints
from models import registry
from models.errors import ModelError
from models.sampler import Sampler, _round_up

FIRST_TURN_LENGTHS = "223,224,225,226,235,235,235,236,250,250,250,250,278,278,279,280,287,287,287," \
                     "289,362,362,363,364,445,449,449,452"


def chunks(sampler: Sampler, lengths: list) -> list:
    """The sampler's prefill chunks for prompts of these lengths, its batch bucket's padding rows
    included."""
    batch = _round_up(len(lengths), sampler.batch_buckets, 1)   # the sampler's own batch bucket
    return sampler.prefill_chunks(sorted(lengths, reverse=True) + [0] * (batch - len(lengths)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a name or path")
    p.add_argument("--lengths", default=FIRST_TURN_LENGTHS, help="comma-separated prompt lengths")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    lengths = _positive_ints(p, "--lengths", args.lengths)
    for flag in ("new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    try:
        model = registry.load(args.model)
    except (ModelError, OSError) as e:
        p.error(f"--model: {e}")
    pad = model.tokenizer.eos_id if model.tokenizer.eos_id is not None else 0
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in lengths]
    variants = {"whole": Sampler(model.config, pad_id=pad, split_prefill=False),
                "split": Sampler(model.config, pad_id=pad)}
    times = {v: {"call": [], "prefill": []} for v in variants}
    outs = {}

    def call(s, n):
        t = time.perf_counter()
        out = s.generate(model.params, prompts, max_new_tokens=n, temperature=0)
        return time.perf_counter() - t, out

    for name, s in variants.items():   # compile
        call(s, args.new_tokens)
        call(s, 1)
    for _ in range(args.repeats):
        for name, s in variants.items():
            t, outs[name] = call(s, args.new_tokens)
            times[name]["call"].append(t)
            times[name]["prefill"].append(call(s, 1)[0])
    if not np.array_equal(outs["whole"].tokens, outs["split"].tokens):
        raise SystemExit("the split and the whole prefill sampled different tokens")
    summary = {"model": args.model, "device": jax.devices()[0].platform, "prompts": len(lengths),
               "new_tokens": args.new_tokens, "repeats": args.repeats, "variants": {}}
    print(f"\n{len(lengths)} prompts of {min(lengths)}-{max(lengths)} tokens, {args.new_tokens} new "
          f"tokens (greedy), {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
          f"best of {args.repeats}\n")
    print("| prefill | tokens prefilled | generate s | one new token s |")
    print("|---|---|---|---|")
    for name, s in variants.items():
        plan = chunks(s, lengths)
        r = {"tokens_prefilled": sum(size * plen for _, size, plen in plan), "chunks": plan,
             "call_seconds": min(times[name]["call"]), "prefill_seconds": min(times[name]["prefill"])}
        summary["variants"][name] = r
        print(f"| {name} | {r['tokens_prefilled']} | {r['call_seconds']:.2f} | {r['prefill_seconds']:.2f} |")
    summary["split_speedup"] = summary["variants"]["whole"]["call_seconds"] / summary["variants"]["split"][
        "call_seconds"]
    summary["prefill_speedup"] = summary["variants"]["whole"]["prefill_seconds"] / summary["variants"][
        "split"]["prefill_seconds"]
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
