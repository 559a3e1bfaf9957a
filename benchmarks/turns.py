"""Dialogue games played with and without the prefix cache: each turn's prompt is the whole chat so
far, and with `models.sampler.PrefixCache` a turn prefills only what its prompt adds to the chat's
kept KV cache.

    python -m benchmarks.turns --model=runs/.../sft/hf      # a model that plays past its first turn
    python -m benchmarks.turns --games=wordle,taboo --limit=4 --temperature=1

The model plays every role of `--limit` instances of each game (`--split`), all episodes batched
together as `games.eval` plays them, with the prefix cache ("cached") and prefilling every prompt
whole ("whole"), alternated: a first round of each compiles its sampler's executables (timed
apart), then `--repeats` timed rounds, as the steps of a training run reuse them. A model that
breaks the answer format at its first turn (as the base SmolLM2-135M-Instruct does in every core
game) ends its episodes there and leaves nothing to reuse: measure a fine-tuned one. Prints a
table and a final JSON line with the seconds, the prompt tokens of the learner's turns and how
many were prefilled, the sampler executables compiled, `speedup` (whole over cached, timed rounds)
and `same_replies` (whether every round of both variants played the same replies).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from games import eval as game_eval
from games import registry as game_registry
from games.core import GameError
from games.env import BatchedGameEnv
from models import registry
from models.errors import ModelError
from playpen_jax.rollout import ModelPolicy, play


def play_once(policy, episodes, learner_roles) -> dict:
    env = BatchedGameEnv(iter(episodes), batch_size=len(episodes), learner_roles=learner_roles,
                         partner=None, seed=0)
    t = time.perf_counter()
    finished = play(env, policy)
    seconds = time.perf_counter() - t
    replies, prompt_tokens, turns = {}, 0, 0
    for f, traces in finished:
        replies[f.episode_id] = [t.reply for t in f.turns if t.learner]
        for trace in traces:
            if trace is not None:
                prompt_tokens += len(trace.prompt_ids)
                turns += 1
    reused = policy.prefix_cache.reused_tokens if policy.prefix_cache is not None else 0
    if policy.prefix_cache is not None:
        policy.prefix_cache.reused_tokens = 0
    return {"seconds": round(seconds, 2), "episodes": len(finished), "turns": turns,
            "prompt_tokens": prompt_tokens, "tokens_prefilled": prompt_tokens - reused,
            "compiles": policy.sampler.compile_count, "replies": replies}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a name or path")
    p.add_argument("--games", default="train", help="all, train, heldout, or a comma-separated list")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--limit", type=int, default=4, help="instances per game")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--batch_size", type=int, default=32, help="prompts per sampler call")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    for flag in ("limit", "max_new_tokens", "batch_size", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    try:
        games = game_registry.resolve_names(args.games)
        episodes = game_eval.episodes_for(games, args.split, 0, args.limit)
        learner_roles = game_eval.parse_roles("all", games)
    except GameError as e:
        p.error(f"--games: {e}")
    try:
        model = registry.load(args.model)
    except (ModelError, OSError) as e:
        p.error(f"--model: {e}")
    # one policy (and sampler) per variant for all rounds: the first round compiles the executables
    # (its time is reported apart), the later ones reuse them, as the steps of a training run do
    policies = {name: ModelPolicy(model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  seed=0, batch_size=args.batch_size, prefix_cache=name == "cached")
                for name in ("whole", "cached")}
    runs: dict = {"whole": [], "cached": []}
    for _ in range(1 + args.repeats):
        for name, policy in policies.items():
            runs[name].append(play_once(policy, [(ep, k) for k, ep in enumerate(episodes)], learner_roles))
    timed = {name: r[1:] for name, r in runs.items()}
    same = all(r["replies"] == runs["whole"][0]["replies"] for rs in runs.values() for r in rs)
    summary = {"benchmark": "turns", "model": args.model, "games": games, "split": args.split,
               "limit": args.limit, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
               "machine": platform.processor() or platform.machine(), "variants": {}}
    print(f"{len(episodes)} episodes of {len(games)} games, {args.max_new_tokens} new tokens a turn, "
          f"temperature {args.temperature}")
    print("| variant | seconds (best) | first round s | turns | prompt tokens | prefilled | prefilled % | "
          "executables |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in timed.items():
        best = min(rs, key=lambda r: r["seconds"])
        row = {k: v for k, v in best.items() if k != "replies"}
        row["compile_round_seconds"] = runs[name][0]["seconds"]
        row["timed_seconds"] = [r["seconds"] for r in timed[name]]
        summary["variants"][name] = row
        share = 100 * best["tokens_prefilled"] / max(1, best["prompt_tokens"])
        print(f"| {name} | {best['seconds']:.1f} | {row['compile_round_seconds']:.1f} | {best['turns']} | "
              f"{best['prompt_tokens']} | {best['tokens_prefilled']} | {share:.0f}% | {best['compiles']} |")
    w, c = summary["variants"]["whole"], summary["variants"]["cached"]
    summary["speedup"] = round(w["seconds"] / c["seconds"], 3)
    summary["prefilled_fraction"] = round(c["tokens_prefilled"] / max(1, c["prompt_tokens"]), 3)
    summary["same_replies"] = same
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
