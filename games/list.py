"""List the games: roles, Playpen split (training / held-out / test game) and instance counts.

    python -m games.list [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from games import registry, split
from games.core import GameError


def table(seed: int = 0) -> list[dict]:
    rows = []
    for name in split.TRAINING_GAMES + split.HELD_OUT_GAMES + [
            g for g in registry.names() if split.set_of(g) == "test"]:
        spec = registry.get(name)
        counts = {s: len(registry.instances(name, s, seed)) for s in registry.SPLITS}
        rows.append({"game": name, "set": split.set_of(name),
                     "roles": list(spec.roles), **counts})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m games.list", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    try:
        rows = table(args.seed)
    except GameError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'game':<28} {'set':<9} {'train':>6} {'valid':>6} {'test':>6}  roles")
    for r in rows:
        print(f"{r['game']:<28} {r['set']:<9} {r['train']:>6} {r['validation']:>6} {r['test']:>6}  "
              f"{', '.join(r['roles'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
