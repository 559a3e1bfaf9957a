"""Reference game: the Instruction Giver describes a target grid that it sees beside two distractor
grids; the Instruction Follower sees the three grids in another order and must say which one the
expression refers to. One exchange per episode, rules as clembench defines them.

* Player 1 must answer "Expression: <one line>", Player 2 "Answer: first|second|third" (or 1/2/3);
  the instance's `player_{1,2}_response_pattern` regexes decide (case-insensitive). In "strict" mode
  nothing may follow the first line (the pattern's `remainder` group must be empty).
* A reply that does not match aborts the episode (logged as "invalid format"). Player 1's whole
  reply replaces `TARGET_EXPRESSION` in Player 2's prompt.
* Success when Player 2's label is one of `target_grid_name`; Main Score = 100 * success.

Grids are 5x5, "X" for a filled cell and "□" for an empty one. Our grids come from our own pools
(glyph fonts in games/resources/referencegame/glyphs.json, line patterns and random grids made
here); every grid is assigned to a split by `split_of` on its canonical text, and the two
distractors of a target are its nearest grids (fewest differing cells) of the same category and
split.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from games.core import GameError, GameMaster, Message, PlayerFn
from games.registry import GameSpec, split_of

GAME = "referencegame"
SIZE = 5
FILLED = "X"
EMPTY = "□"
EMPTY_CHARS = ("□", "▢")
FULL = (1 << SIZE * SIZE) - 1
ORDINALS = ("first", "second", "third")
EXPERIMENTS = ("letter_grids", "number_grids", "line_grids_rows", "line_grids_columns", "random_grids")
# Targets per experiment; each target is played with the target in each of the three positions.
TARGETS_PER_EXPERIMENT = {"test": 6, "validation": 3, "train": 100}
RANDOM_POOL_SIZE = 1500

P1_TAG = "expression:"
P2_TAG = "answer:"
P1_PATTERN = r"^(?P<tag>expression:\s*)(?P<content>(?P<response>.+)\n*(?P<remainder>(.|\n)*))"
P2_PATTERN = (r"^(?P<tag>answer:\s*)(?P<content>(?P<response>first|second|third|1|2|3).*\n*"
              r"(?P<remainder>(.|\n)*))")
# Instances from before the answer tag existed: the tag is optional.
LEGACY_P2_PATTERN = (r"^(?P<tag>(answer:)?\s*)(?P<content>(?P<response>first|second|third|1|2|3).*\n*"
                     r"(?P<remainder>(.|\n)*))")
MODES = ("strict", "liberal")

RESOURCES = Path(__file__).parent / "resources" / GAME

PLAYER_1_TEMPLATE = """\
Below are three grids with 5 rows and 5 columns each. A filled cell is drawn as "X" and an empty cell as "□".
The first grid is the target; the other two are distractors. Write a referring expression for the target \
grid: it should let someone who sees all three grids, in an unknown order, tell the target apart from both \
distractors.

Target grid:

TARGET_GRID

Distractor grid 1:

SECOND_GRID

Distractor grid 2:

THIRD_GRID

Instruction: Describe the target grid.
Reply with one line that starts with "Expression: " followed by your referring expression, and nothing \
else."""

PLAYER_2_TEMPLATE = """\
Below are three grids with 5 rows and 5 columns each. A filled cell is drawn as "X" and an empty cell as "□".
After them comes a referring expression that was written for exactly one of the three grids.
Your task is to find the grid that the expression refers to.

First:

FIRST_GRID

Second:

SECOND_GRID

Third:

THIRD_GRID

TARGET_EXPRESSION
Question: Which grid does the expression refer to?
Reply with one line that starts with "Answer: " followed by first, second or third, and nothing else.
"""


# ----- grids ----------------------------------------------------------------------------------------
# A grid is a 25-bit mask: bit r * 5 + c is set when row r, column c (0-based) is filled.

def grid_text(mask: int) -> str:
    return "\n".join(" ".join(FILLED if mask >> (r * SIZE + c) & 1 else EMPTY for c in range(SIZE))
                     for r in range(SIZE))


def parse_grid(text: Any) -> int | None:
    """The mask of a 5x5 grid written with X and □/▢ cells, or None if `text` is not one."""
    if not isinstance(text, str):
        return None
    rows = [line.split() for line in text.strip().splitlines() if line.strip()]
    if len(rows) != SIZE or any(len(row) != SIZE for row in rows):
        return None
    mask = 0
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell.upper() == FILLED:
                mask |= 1 << (r * SIZE + c)
            elif cell not in EMPTY_CHARS:
                return None
    return mask


def _from_rows(rows: Sequence[str], offset: int = 0) -> int:
    mask = 0
    for r, row in enumerate(rows):
        for c, ch in enumerate(row):
            if ch == "#":
                mask |= 1 << (r * SIZE + c + offset)
    return mask


def _transpose(mask: int) -> int:
    out = 0
    for r in range(SIZE):
        for c in range(SIZE):
            if mask >> (r * SIZE + c) & 1:
                out |= 1 << (c * SIZE + r)
    return out


def _glyph_grids(fonts: Mapping[str, Mapping[str, Sequence[str]]], names: Sequence[str]) -> list[int]:
    """Every glyph of the fonts at every horizontal offset, plus its inverse (light on dark)."""
    out: list[int] = []
    for name in names:
        for rows in fonts[name].values():
            width = len(rows[0])
            for offset in range(SIZE - width + 1):
                mask = _from_rows(rows, offset)
                out += [mask, FULL ^ mask]
    return out


def _row_line_grids() -> list[int]:
    """Grids whose rows are empty or a horizontal line of 4-5 cells; 1 to 4 rows drawn."""
    lines = (0b11111, 0b01111, 0b11110)
    out = []
    for code in range(4 ** SIZE):
        digits = [code // 4 ** r % 4 for r in range(SIZE)]
        if not 1 <= sum(d > 0 for d in digits) <= 4:
            continue
        out.append(sum(lines[d - 1] << (r * SIZE) for r, d in enumerate(digits) if d))
    return out


def _random_grids() -> list[int]:
    rng = random.Random(f"{GAME}/random-grid-pool")
    out: list[int] = []
    while len(out) < RANDOM_POOL_SIZE:
        cells = rng.sample(range(SIZE * SIZE), rng.randint(8, 14))
        out.append(sum(1 << i for i in cells))
    return out


@functools.lru_cache(maxsize=None)
def category_pools() -> dict[str, tuple[int, ...]]:
    """All grids of each category (deduplicated, in a fixed order)."""
    try:
        fonts = json.loads((RESOURCES / "glyphs.json").read_text())["fonts"]
    except (OSError, ValueError, KeyError) as e:  # pragma: no cover - broken checkout
        raise GameError(f"{GAME}: cannot read glyph fonts: {e}") from None
    rows = _row_line_grids()
    pools = {
        "letter_grids": _glyph_grids(fonts, ("letters_5x5", "letters_3x5")),
        "number_grids": _glyph_grids(fonts, ("digits_5x5", "digits_4x5", "digits_3x5")),
        "line_grids_rows": rows,
        "line_grids_columns": [_transpose(m) for m in rows],
        "random_grids": _random_grids(),
    }
    return {k: tuple(dict.fromkeys(m for m in v if 0 < m < FULL)) for k, v in pools.items()}


@functools.lru_cache(maxsize=None)
def split_pool(category: str, split: str) -> tuple[int, ...]:
    return tuple(m for m in category_pools()[category] if split_of(grid_text(m), salt=GAME) == split)


def _nearest(target: int, pool: Sequence[int], rng: random.Random) -> tuple[int, int]:
    ranked = sorted((bin(target ^ m).count("1"), rng.random(), m) for m in pool if m != target)
    if len(ranked) < 2:
        raise GameError(f"{GAME}: a category pool needs at least three grids")
    return ranked[0][2], ranked[1][2]


# ----- instances --------------------------------------------------------------------------------------

def make_instance(game_id: int, target: str, second: str, third: str, position: int) -> dict:
    """An instance in clembench's layout; `position` (0-2) is where Player 2 sees the target."""
    p2 = [[target, second, third], [second, target, third], [third, second, target]][position]
    return {
        "game_id": game_id,
        "player_1_prompt_header": PLAYER_1_TEMPLATE.replace("TARGET_GRID", target)
        .replace("SECOND_GRID", second).replace("THIRD_GRID", third),
        "player_1_target_grid": target,
        "player_1_second_grid": second,
        "player_1_third_grid": third,
        "player_2_prompt_header": PLAYER_2_TEMPLATE.replace("FIRST_GRID", p2[0])
        .replace("SECOND_GRID", p2[1]).replace("THIRD_GRID", p2[2]),
        "player_2_first_grid": p2[0],
        "player_2_second_grid": p2[1],
        "player_2_third_grid": p2[2],
        "target_grid_name": [ORDINALS[position], str(position + 1)],
        "player_1_response_pattern": P1_PATTERN,
        "player_2_response_pattern": P2_PATTERN,
        "lang": "en",
        "p1_mode": "strict",
        "p2_mode": "strict",
    }


def generate(split: str, seed: int) -> dict:
    """Instances of one split: per category, targets drawn from the split's grids by `seed`."""
    if split not in TARGETS_PER_EXPERIMENT:
        raise GameError(f"{GAME}: unknown split {split!r}")
    rng = random.Random(f"{GAME}/{split}/{seed}")
    experiments = []
    for name in EXPERIMENTS:
        pool = split_pool(name, split)
        targets = rng.sample(pool, min(TARGETS_PER_EXPERIMENT[split], len(pool)))
        game_instances: list[dict] = []
        for target in targets:
            second, third = _nearest(target, pool, rng)
            texts = grid_text(target), grid_text(second), grid_text(third)
            for position in range(3):
                game_instances.append(make_instance(len(game_instances), *texts, position))
        experiments.append({"name": name, "game_instances": game_instances})
    return {"experiments": experiments}


def instance_key(instance: Mapping[str, Any]) -> str:
    """The target grid, in canonical text."""
    raw = instance.get("player_1_target_grid", "")
    mask = parse_grid(raw)
    return grid_text(mask) if mask is not None else str(raw).strip()


def normalize(instance: Mapping[str, Any], experiment: Mapping[str, Any]) -> dict:
    """Fills what instances of older layouts lack (patterns, modes, label list)."""
    inst = dict(instance)
    name = inst.get("target_grid_name")
    if isinstance(name, str):
        label = name.strip().lower()
        inst["target_grid_name"] = [label] + ([str(ORDINALS.index(label) + 1)] if label in ORDINALS else [])
    if "player_1_response_pattern" not in inst:
        inst["player_1_response_pattern"] = P1_PATTERN
        inst.setdefault("p1_mode", "liberal")
    if "player_2_response_pattern" not in inst:
        inst["player_2_response_pattern"] = LEGACY_P2_PATTERN
        inst.setdefault("p2_mode", "liberal")
    inst.setdefault("p1_mode", "strict")
    inst.setdefault("p2_mode", "strict")
    inst.setdefault("lang", "en")
    return inst


# ----- game master ------------------------------------------------------------------------------------

def _match(pattern: re.Pattern, mode: str, text: str) -> re.Match | None:
    """The match of a valid reply: the pattern matches and, in strict mode, nothing follows."""
    m = pattern.match(text)
    if m is None or (mode == "strict" and m.group("remainder") != ""):
        return None
    return m


class ReferenceGameMaster(GameMaster):
    game_name = GAME
    roles = ("Instruction Giver", "Instruction Follower")

    def setup(self) -> None:
        inst = self.instance
        for key in ("player_1_prompt_header", "player_2_prompt_header",
                    "player_1_response_pattern", "player_2_response_pattern"):
            if not isinstance(inst.get(key), str):
                raise GameError(f"{GAME}: instance {inst.get('game_id')!r} needs a string {key!r}")
        names = inst.get("target_grid_name")
        if isinstance(names, str):
            names = [names]
        if (not isinstance(names, list) or not names
                or not all(isinstance(n, str) and n.strip() for n in names)):
            raise GameError(f"{GAME}: 'target_grid_name' must be a non-empty list of labels, got {names!r}")
        self.target_names = [n.strip().lower() for n in names]
        self.modes = []
        self.patterns = []
        for player in (1, 2):
            mode = inst.get(f"p{player}_mode", "strict")
            if mode not in MODES:
                raise GameError(f"{GAME}: 'p{player}_mode' must be one of {MODES}, got {mode!r}")
            try:
                pattern = re.compile(inst[f"player_{player}_response_pattern"], re.IGNORECASE)
            except re.error as e:
                raise GameError(f"{GAME}: bad 'player_{player}_response_pattern': {e}") from None
            needed = {"remainder"} | ({"response"} if player == 2 else set())
            if not needed <= set(pattern.groupindex):
                raise GameError(f"{GAME}: 'player_{player}_response_pattern' needs the groups "
                                f"{sorted(needed)}")
            self.modes.append(mode)
            self.patterns.append(pattern)
        self.expression: str | None = None
        self.answer: str | None = None
        self.aborted_at = 0  # 1 or 2: the player whose reply broke the format
        self.success = False

    def play(self):
        reply = yield from self.ask(0, self.instance["player_1_prompt_header"])
        text = reply.strip()
        if _match(self.patterns[0], self.modes[0], text) is None:
            self.count_violated()
            self.aborted_at = 1
            self.log_to_self("invalid format", "Invalid generated expression")
            return
        self.count_parsed()
        self.expression = text
        self.log_to_self("parse", text)

        prompt = self.instance["player_2_prompt_header"].replace("TARGET_EXPRESSION", text)
        reply = yield from self.ask(1, prompt)
        m = _match(self.patterns[1], self.modes[1], reply.strip())
        if m is None:
            self.count_violated()
            self.aborted_at = 2
            self.log_to_self("invalid format", "Invalid generated expression")
            return
        self.count_parsed()
        self.answer = m.group("response").lower()
        self.success = self.answer in self.target_names
        self.log_to_self("parse_correct" if self.success else "parse_wrong", self.answer)

    def compute_scores(self) -> None:
        self.log_request_turn_scores()
        aborted = self.aborted_at != 0
        success = int(self.success and not aborted)
        if self.expression is not None:
            length: float = len(self.expression)
            tokens: float = len(self.expression.split(" "))
        else:
            length = tokens = math.nan
        self.log_turn_score(0, "Generated Expression Length", length)
        self.log_turn_score(0, "Generated Expression Number of Tokens", tokens)
        self.log_turn_score(0, "Success", success)
        es = self.episode_scores
        es["Generated Expression Length"] = length
        es["Generated Expression Number of Tokens"] = tokens
        es["Aborted at Player 1"] = int(self.aborted_at == 1)
        es["Aborted at Player 2"] = int(self.aborted_at == 2)
        requests, parsed = sum(self.request_counts), sum(self.parsed_counts)
        es["Request Success Ratio"] = round(parsed / requests, 4) if requests else 0.0
        self.set_outcome(aborted=aborted, success=bool(success), score=100 * success)


# ----- programmatic players -------------------------------------------------------------------------

_CELL_RE = re.compile(r"row\s+(\d+)\s*,?\s*column\s+(\d+)\s+(?:is\s+)?(filled|empty)", re.IGNORECASE)


def _last_user(messages: Sequence[Message]) -> str:
    for m in reversed(messages):
        if isinstance(m, Mapping) and m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def _cell_phrase(index: int, filled: bool) -> str:
    return f"row {index // SIZE + 1}, column {index % SIZE + 1} is {'filled' if filled else 'empty'}"


def describe(target: int, distractors: Sequence[int]) -> str:
    """A referring expression naming cells whose state singles the target out."""
    cells = range(SIZE * SIZE)

    def differs(i: int, other: int) -> bool:
        return bool((target ^ other) >> i & 1)

    both = [i for i in cells if all(differs(i, d) for d in distractors)]
    if both:
        chosen = [min(both, key=lambda i: (not target >> i & 1, i))]
    else:
        chosen = []
        for d in distractors:
            if any(differs(i, d) for i in chosen):
                continue
            options = [i for i in cells if differs(i, d)]
            if options:
                chosen.append(min(options, key=lambda i: (not target >> i & 1, i)))
    if not chosen:
        return "Expression: The grid that looks exactly like the others."
    phrases = [_cell_phrase(i, bool(target >> i & 1)) for i in chosen]
    return "Expression: The grid in which " + " and ".join(phrases) + "."


def decode(expression: str, grids: Sequence[int | None]) -> int | None:
    """Index of the grid that satisfies most of the cell statements in `expression` (None: no statement)."""
    facts = []
    for r, c, state in _CELL_RE.findall(expression):
        r, c = int(r) - 1, int(c) - 1
        if 0 <= r < SIZE and 0 <= c < SIZE:
            facts.append((r * SIZE + c, state.lower() == "filled"))
    if not facts:
        return None
    scores = [-1 if g is None else sum(bool(g >> i & 1) == f for i, f in facts) for g in grids]
    return scores.index(max(scores))


def _strong_giver(instance: Mapping[str, Any], rng: random.Random) -> PlayerFn:
    target = parse_grid(instance.get("player_1_target_grid"))
    distractors = [parse_grid(instance.get(k)) for k in ("player_1_second_grid", "player_1_third_grid")]

    def play(messages: Sequence[Message]) -> str:
        if target is None or any(d is None for d in distractors):
            return "Expression: The target grid."
        return describe(target, distractors)

    return play


def _strong_follower(instance: Mapping[str, Any], rng: random.Random) -> PlayerFn:
    grids = [parse_grid(instance.get(f"player_2_{k}_grid")) for k in ORDINALS]

    def play(messages: Sequence[Message]) -> str:
        prompt = _last_user(messages)
        found = re.findall(r"expression:(.*)", prompt, re.IGNORECASE)
        choice = decode(found[-1] if found else prompt, grids)
        if choice is None:
            choice = rng.randrange(3)
        return f"Answer: {ORDINALS[choice]}"

    return play


_VAGUE = ("The grid with some X cells in it.", "The one that looks like a picture.",
          "The grid with a line of filled cells.", "The grid that is mostly empty.")


def strong_player(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                  rng: random.Random) -> PlayerFn:
    if role == ReferenceGameMaster.roles[0]:
        return _strong_giver(instance, rng)
    return _strong_follower(instance, rng)


def weak_player(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                rng: random.Random) -> PlayerFn:
    """Keeps the answer format but says nothing useful (giver) or guesses (follower)."""
    if role == ReferenceGameMaster.roles[0]:
        return lambda messages: "Expression: " + rng.choice(_VAGUE)
    return lambda messages: "Answer: " + rng.choice(ORDINALS)


SPEC = GameSpec(
    name=GAME,
    master=ReferenceGameMaster,
    generate=generate,
    instance_key=instance_key,
    players={"strong": strong_player, "weak": weak_player},
    description="One player describes a target 5x5 grid among two distractors; the other picks it out.",
    normalize=normalize,
)
