"""Image game: the Instruction Giver sees a target 5x5 grid of letters and gives drawing commands,
one per turn; the Instruction Follower starts from an empty grid and returns the whole grid it has
drawn so far after each command. Rules as clembench defines them:

* Player 1 answers "Command: <one line>" (instance `player_1_response_pattern`, case-insensitive) or
  "Command: DONE" (`player_1_terminate_pattern`), which ends the episode.
* Player 2 answers a grid matching `player_2_response_pattern` (five rows of five cells, each an
  uppercase letter or "▢", separated by single whitespace characters).
* Any other reply aborts the episode ("invalid format"). After 2 * dimension^2 complete rounds
  the episode ends ("game end": "turn limit reached") and is scored like a finished one.
* Each round is scored by precision / recall / F1 (0-100) of the filled cells of the drawn grid
  against the target; the episode takes the last round's values, Main Score = F1, Success when
  F1 >= 99.

Targets are our own: compact grids (pictures, line and rectangle patterns; pictures from
games/resources/imagegame/shapes.json) and random grids (5-10 random cells), all in one random
letter. Every shape is assigned to a split by `split_of` on its canonical text (letters as "X").
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import re
import string
from pathlib import Path
from typing import Any, Mapping, Sequence

from games.core import GameError, GameMaster, Message, PlayerFn
from games.registry import GameSpec, split_of

GAME = "imagegame"
DIM = 5
EMPTY = "▢"
ALPHABET = string.ascii_uppercase
EXPERIMENTS = ("compact_grids", "random_grids")
SIZES = {"test": 30, "validation": 10, "train": 300}

P1_RESPONSE_PATTERN = "^command: [^\n]+$"
P1_TERMINATE_PATTERN = r"^\s*command\s*:\s*done\s*$"
_ROW = r"([A-Z▢]\s){4}[A-Z▢]"
P2_RESPONSE_PATTERN = "^\n*" + "\n".join([_ROW] * 5) + "\n*$"
# Instances from before the "Command:" prefix used "Instruction:".
LEGACY_P1_RESPONSE_PATTERN = r"^instruction:\s*[^\n]+"
LEGACY_P1_TERMINATE_PATTERN = r"^\s*instruction\s*:\s*done\s*$"

RESOURCES = Path(__file__).parent / "resources" / GAME

EMPTY_GRID = "\n".join(" ".join([EMPTY] * DIM) for _ in range(DIM))

PLAYER_1_TEMPLATE = f"""\
We are going to play a drawing game. Your partner starts from an empty grid like this one:

{EMPTY_GRID}

and draws whatever you tell it to. Empty cells are shown as "▢" and a filled cell holds an uppercase letter. \
A finished 5 by 5 grid could look like this:

▢ ▢ ▢ ▢ ▢
▢ ▢ ▢ K ▢
▢ ▢ ▢ ▢ ▢
▢ ▢ ▢ ▢ ▢
T T T T T

Your job is to describe a target grid to your partner step by step until its drawing matches the target. \
Describe only where the letters go, never the empty cells, and mind the size of the grid. Give exactly one \
command per turn; a command may address one cell or many at once (several cells of a row, a whole row or \
column, a diagonal, or the whole grid). After each command wait until I ask "What is your next command?". \
When everything is described, reply "Command: DONE". Every reply is a single line starting with \
"Command: ", with nothing else.

The grid above could be described like this:

Command: Put a K in row 2, column 4

What is your next command?
Command: Fill the bottom row with T

What is your next command?
Command: DONE

Now describe the following target grid, which is a GRID_DIMENSION grid."""

PLAYER_2_TEMPLATE = f"""\
Let us draw a picture together. We start with an empty 5 by 5 grid:

{EMPTY_GRID}

I will send you drawing commands one at a time. Carry out each command on the grid as it currently is and \
send back the complete updated grid. For example:

Command: Put an R in the top left corner

R ▢ ▢ ▢ ▢
▢ ▢ ▢ ▢ ▢
▢ ▢ ▢ ▢ ▢
▢ ▢ ▢ ▢ ▢
▢ ▢ ▢ ▢ ▢

Start from an empty GRID_DIMENSION grid. After every command reply with the grid only: five rows of five \
cells separated by single spaces, "▢" for an empty cell and an uppercase letter for a filled one, and no \
other text."""

QUESTION = "What is your next command?"


# ----- grids ------------------------------------------------------------------------------------------
# A grid is a list of rows of cells; a cell is an uppercase letter or None (empty).

def grid_text(grid: Sequence[Sequence[str | None]]) -> str:
    return "\n".join(" ".join(c or EMPTY for c in row) for row in grid)


def parse_grid(text: Any, dim: int = DIM) -> list[list[str | None]] | None:
    """A dim x dim grid of letters and ▢/□ cells, or None if `text` is not one."""
    if not isinstance(text, str):
        return None
    rows = [line.split() for line in text.strip().splitlines() if line.strip()]
    if len(rows) != dim or any(len(row) != dim for row in rows):
        return None
    grid: list[list[str | None]] = []
    for row in rows:
        out: list[str | None] = []
        for cell in row:
            if cell in (EMPTY, "□"):
                out.append(None)
            elif len(cell) == 1 and cell.isalpha() and cell.isascii():
                out.append(cell.upper())
            else:
                return None
        grid.append(out)
    return grid


def shape_text(cells: frozenset[int] | set[int], dim: int = DIM) -> str:
    """Canonical text of a shape: "X" where filled, "▢" where empty."""
    return "\n".join(" ".join("X" if r * dim + c in cells else EMPTY for c in range(dim)) for r in range(dim))


def _rows_shape(rows: Sequence[str]) -> frozenset[int]:
    return frozenset(r * DIM + c for r, row in enumerate(rows) for c, ch in enumerate(row) if ch == "#")


@functools.lru_cache(maxsize=None)
def _compact_shapes() -> tuple[frozenset[int], ...]:
    """Pictures from the resources, plus line, diagonal, rectangle and triangle patterns."""
    try:
        pictures = json.loads((RESOURCES / "shapes.json").read_text())["shapes"]
    except (OSError, ValueError, KeyError) as e:  # pragma: no cover - broken checkout
        raise GameError(f"{GAME}: cannot read shapes: {e}") from None
    n = DIM
    row = [frozenset(r * n + c for c in range(n)) for r in range(n)]
    col = [frozenset(r * n + c for r in range(n)) for c in range(n)]
    diag = frozenset(i * n + i for i in range(n))
    anti = frozenset(i * n + n - 1 - i for i in range(n))
    shapes = [_rows_shape(rows) for rows in pictures.values()]
    for k in (1, 2, 3):
        for lines in (row, col):
            shapes += [frozenset().union(*combo) for combo in itertools.combinations(lines, k)]
    shapes += [r | c for r in row for c in col]
    shapes += [r1 | r2 | c for r1, r2 in itertools.combinations(row, 2) for c in col]
    shapes += [diag, anti, diag | anti]
    shapes += [d | line for d in (diag, anti) for line in row + col]
    spans = [(a, b) for a in range(n) for b in range(a + 1, n)]  # at least two cells long
    for (r0, r1), (c0, c1) in itertools.product(spans, spans):
        box = frozenset(r * n + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1))
        shapes.append(box)
        if r1 - r0 >= 2 and c1 - c0 >= 2:
            inner = frozenset(r * n + c for r in range(r0 + 1, r1) for c in range(c0 + 1, c1))
            shapes.append(box - inner)
    for flip_r, flip_c in itertools.product((False, True), repeat=2):
        tri = frozenset((n - 1 - r if flip_r else r) * n + (n - 1 - c if flip_c else c)
                        for r in range(n) for c in range(r + 1))
        shapes.append(tri)
    return tuple(s for s in dict.fromkeys(shapes) if len(s) >= 5)


@functools.lru_cache(maxsize=None)
def compact_pool(split: str) -> tuple[frozenset[int], ...]:
    return tuple(s for s in _compact_shapes() if split_of(shape_text(s), salt=GAME) == split)


def _random_shapes(split: str, count: int, rng: random.Random, exclude: set[str]) -> list[frozenset[int]]:
    out: list[frozenset[int]] = []
    seen = set(exclude)
    for _ in range(count * 200):
        if len(out) == count:
            break
        shape = frozenset(rng.sample(range(DIM * DIM), rng.randint(5, 10)))
        text = shape_text(shape)
        if text in seen or split_of(text, salt=GAME) != split:
            continue
        seen.add(text)
        out.append(shape)
    return out


# ----- instances --------------------------------------------------------------------------------------

def make_instance(game_id: int, target_grid: str, dim: int = DIM) -> dict:
    """An instance in clembench's layout."""
    size = f"{dim} by {dim}"
    return {
        "game_id": game_id,
        "player_1_prompt_header": PLAYER_1_TEMPLATE.replace("GRID_DIMENSION", size),
        "player_2_prompt_header": PLAYER_2_TEMPLATE.replace("GRID_DIMENSION", size),
        "player_1_question": QUESTION,
        "grid_dimension": dim,
        "number_of_letters": sum(c != EMPTY for c in target_grid.split()),
        "player_1_response_pattern": P1_RESPONSE_PATTERN,
        "player_1_terminate_pattern": P1_TERMINATE_PATTERN,
        "player_2_response_pattern": P2_RESPONSE_PATTERN,
        "fill_row": False,
        "fill_column": False,
        "target_grid": target_grid,
    }


def _paint(shape: frozenset[int], letter: str) -> str:
    return grid_text([[letter if r * DIM + c in shape else None for c in range(DIM)] for r in range(DIM)])


def generate(split: str, seed: int) -> dict:
    """Compact and random target grids of one split, each in one letter drawn by `seed`."""
    if split not in SIZES:
        raise GameError(f"{GAME}: unknown split {split!r}")
    rng = random.Random(f"{GAME}/{split}/{seed}")
    pool = list(compact_pool(split))
    compact = rng.sample(pool, min(SIZES[split], len(pool)))
    randoms = _random_shapes(split, SIZES[split], rng, {shape_text(s) for s in _compact_shapes()})
    experiments = []
    for name, shapes in (("compact_grids", compact), ("random_grids", randoms)):
        instances = [make_instance(i, _paint(s, rng.choice(ALPHABET))) for i, s in enumerate(shapes)]
        experiments.append({"name": name, "game_instances": instances})
    return {"experiments": experiments}


def instance_key(instance: Mapping[str, Any]) -> str:
    """The target's shape: its filled cells, whatever the letters."""
    raw = str(instance.get("target_grid", ""))
    rows = [line.split() for line in raw.strip().splitlines()]
    return "\n".join(" ".join(EMPTY if c in (EMPTY, "□") else "X" for c in row) for row in rows)


def normalize(instance: Mapping[str, Any], experiment: Mapping[str, Any]) -> dict:
    """Fills the patterns that instances of older layouts lack (they used "Instruction:")."""
    inst = dict(instance)
    if "player_1_response_pattern" not in inst:
        inst["player_1_response_pattern"] = LEGACY_P1_RESPONSE_PATTERN
        inst.setdefault("player_1_terminate_pattern", LEGACY_P1_TERMINATE_PATTERN)
    inst.setdefault("player_1_terminate_pattern", P1_TERMINATE_PATTERN)
    inst.setdefault("player_2_response_pattern", P2_RESPONSE_PATTERN)
    inst.setdefault("player_1_question", QUESTION)
    return inst


# ----- scoring ----------------------------------------------------------------------------------------

def _size(grid: str) -> tuple[int, int]:
    rows = grid.strip().split("\n")
    return len(rows), len(rows[0].split(" "))


def evaluate(target: str, drawn: str) -> tuple[float, float, float] | None:
    """Precision, recall and F1 (0-100, rounded) of the drawn grid's filled cells.

    Cells are compared case-insensitively at equal positions. A grid of another size scores 0;
    None when the scores are undefined (no filled cell in the target or in the drawing, ragged rows),
    in which case the previous round's scores stand.
    """
    if _size(target) != _size(drawn):
        return 0.0, 0.0, 0.0
    target_rows = target.strip().split("\n")
    drawn_rows = drawn.strip().split("\n")
    hits_r = total_r = hits_p = total_p = 0
    try:
        for r, trow in enumerate(target_rows):
            tcells, dcells = trow.split(" "), drawn_rows[r].split(" ")
            for c, tcell in enumerate(tcells):
                same = tcell.lower() == dcells[c].lower()
                if tcell != EMPTY:
                    total_r += 1
                    hits_r += same
                if dcells[c] != EMPTY:
                    total_p += 1
                    hits_p += same
        recall = round(hits_r / float(total_r), 4)
        precision = round(hits_p / float(total_p), 4)
    except (IndexError, ZeroDivisionError):
        return None
    f1 = 0 if precision == 0 or recall == 0 else (2 * precision * recall) / (precision + recall)
    f1 = round(f1, 4)
    return round(100 * precision, 0), round(100 * recall, 0), round(100 * f1, 0)


def changed_cells(previous: str, current: str) -> int:
    """Number of cells that differ (case-insensitively) between two drawings; 0 if they do not align."""
    prev_rows, cur_rows = previous.strip().split("\n"), current.strip().split("\n")
    count = 0
    try:
        for r, prow in enumerate(prev_rows):
            pcells, ccells = prow.split(" "), cur_rows[r].split(" ")
            for c, pcell in enumerate(pcells):
                count += pcell.lower() != ccells[c].lower()
    except IndexError:
        return 0
    return count


# ----- game master ------------------------------------------------------------------------------------

class ImageGameMaster(GameMaster):
    game_name = GAME
    roles = ("Instruction Giver", "Instruction Follower")

    def setup(self) -> None:
        inst = self.instance
        gid = inst.get("game_id")
        for key in ("player_1_prompt_header", "player_2_prompt_header", "player_1_question", "target_grid",
                    "player_1_response_pattern", "player_1_terminate_pattern", "player_2_response_pattern"):
            if not isinstance(inst.get(key), str):
                raise GameError(f"{GAME}: instance {gid!r} needs a string {key!r}")
        dim = inst.get("grid_dimension")
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 26:
            raise GameError(f"{GAME}: instance {gid!r}: 'grid_dimension' must be an integer 1-26, "
                            f"got {dim!r}")
        target = parse_grid(inst["target_grid"], dim)
        if target is None:
            raise GameError(f"{GAME}: instance {gid!r}: 'target_grid' is not a {dim}x{dim} grid of letters "
                            f"and '{EMPTY}' cells")
        self.dim = dim
        self.target_cells = target
        self.target = grid_text(target)
        try:
            self.p1_terminate = re.compile(inst["player_1_terminate_pattern"], re.IGNORECASE)
            self.p1_response = re.compile(inst["player_1_response_pattern"], re.IGNORECASE)
            self.p2_response = re.compile(inst["player_2_response_pattern"])
        except re.error as e:
            raise GameError(f"{GAME}: instance {gid!r} has a bad response pattern: {e}") from None
        self.max_rounds = dim * dim * 2
        self.rounds: list[tuple[str, str]] = []  # (instruction, drawn grid) of each complete round
        self.aborted = False
        self.finished = False  # Player 1 said DONE

    def play(self):
        inst = self.instance
        question = inst["player_1_question"]
        prompt = inst["player_1_prompt_header"] + "\n" + inst["target_grid"] + "\n" + question
        reply = yield from self.ask(0, prompt)
        while True:
            text = reply.strip()
            if self.p1_terminate.match(text):
                self.count_parsed()
                self.finished = True
                self.log_to_self("found terminate pattern", text)
                return
            if not self.p1_response.match(text):
                self.count_violated()
                self.aborted = True
                self.log_to_self("invalid format", "Invalid instruction format")
                return
            self.count_parsed()
            instruction = text.split("\n")[0]
            self.log_to_self("found instruction", instruction)
            if not self.rounds:
                message = inst["player_2_prompt_header"] + "\n\n" + instruction
            else:
                message = instruction
            drawn = (yield from self.ask(1, message)).strip()
            if not self.p2_response.match(drawn):
                self.count_violated()
                self.aborted = True
                self.log_to_self("invalid format", "Invalid grid format")
                return
            self.count_parsed()
            self.log_to_self("found grid", drawn)
            self.rounds.append((instruction, drawn))
            if len(self.rounds) >= self.max_rounds:
                self.log_to_self("game end", "turn limit reached")
                return
            self.next_round()
            reply = yield from self.ask(0, question)

    def compute_scores(self) -> None:
        self.log_request_turn_scores()
        precision = recall = f1 = 0.0
        previous = "\n".join(" ".join([EMPTY] * self.dim) for _ in range(self.dim))
        changed_sum = length_sum = tokens_sum = 0
        for t, (instruction, drawn) in enumerate(self.rounds):
            scores = evaluate(self.target, drawn)
            if scores is not None:
                precision, recall, f1 = scores
            expression = instruction.replace("Instruction:", "").strip()
            length, tokens = len(expression), len(expression.split(" "))
            changed = changed_cells(previous, drawn)
            previous = drawn
            length_sum += length
            tokens_sum += tokens
            changed_sum += changed
            for key, value in (("Generated Expression Length", length),
                               ("Generated Expression Number of Tokens", tokens),
                               ("Precision", precision), ("Recall", recall), ("F1", f1),
                               ("Changed Cell Count", changed)):
                self.log_turn_score(t, key, value)
        es = self.episode_scores
        n = len(self.rounds)
        if self.aborted:
            for key in ("Precision", "Recall", "F1", "Average Changed Cell Count",
                        "Average Generated Instruction Length",
                        "Average Generated Expression Number of Tokens"):
                es[key] = math.nan
        else:
            es["Precision"], es["Recall"], es["F1"] = precision, recall, f1
            es["Average Changed Cell Count"] = round(changed_sum / n, 4) if n else math.nan
            es["Average Generated Instruction Length"] = round(length_sum / n, 4) if n else math.nan
            es["Average Generated Expression Number of Tokens"] = round(tokens_sum / n, 4) if n else math.nan
        requests, parsed = sum(self.request_counts), sum(self.parsed_counts)
        es["Request Success Ratio"] = round(parsed / requests, 4) if requests else 0
        self.set_outcome(aborted=self.aborted, success=f1 >= 99, score=f1)


# ----- commands: planning (giver) and executing (follower) ----------------------------------------------

def _and_list(numbers: Sequence[int]) -> str:
    words = [str(x) for x in numbers]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def plan_commands(grid: Sequence[Sequence[str | None]]) -> list[str]:
    """Commands that draw `grid` from an empty one: whole lines first, then the rest by row or column."""
    n = len(grid)
    cells = {(r, c): grid[r][c] for r in range(n) for c in range(n) if grid[r][c]}
    letters = set(cells.values())
    if len(cells) == n * n and len(letters) == 1:
        return [f"Fill the whole grid with {letters.pop()}"]
    lines = [(f"row {r + 1}", [(r, c) for c in range(n)]) for r in range(n)]
    lines += [(f"column {c + 1}", [(r, c) for r in range(n)]) for c in range(n)]
    lines += [("diagonal from the top left to the bottom right", [(i, i) for i in range(n)]),
              ("diagonal from the top right to the bottom left", [(i, n - 1 - i) for i in range(n)])]
    commands, covered = [], set()
    for name, line in lines:
        values = {cells.get(cell) for cell in line}
        if len(values) == 1 and None not in values and len(set(line) - covered) >= 2:
            commands.append(f"Fill the {name} with {values.pop()}" if "diagonal" in name
                            else f"Fill {name} with {values.pop()}")
            covered.update(line)
    rest = {cell: letter for cell, letter in cells.items() if cell not in covered}
    by_row: dict[tuple[str, int], list[int]] = {}
    by_col: dict[tuple[str, int], list[int]] = {}
    for (r, c), letter in sorted(rest.items()):
        by_row.setdefault((letter, r), []).append(c)
        by_col.setdefault((letter, c), []).append(r)
    if len(by_row) <= len(by_col):
        for (letter, r), cols in sorted(by_row.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            noun = "column" if len(cols) == 1 else "columns"
            commands.append(f"Put {letter} in row {r + 1}, {noun} {_and_list([c + 1 for c in cols])}")
    else:
        for (letter, c), rows in sorted(by_col.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            noun = "row" if len(rows) == 1 else "rows"
            commands.append(f"Put {letter} in column {c + 1}, {noun} {_and_list([r + 1 for r in rows])}")
    return commands


_ORDINAL = {"first": 1, "1st": 1, "one": 1, "second": 2, "2nd": 2, "two": 2, "third": 3, "3rd": 3,
            "three": 3, "fourth": 4, "4th": 4, "four": 4, "fifth": 5, "5th": 5, "five": 5}
_LETTER_RES = (
    re.compile(r"\bwith\s+(?:an?\s+|the\s+letter\s+|letter\s+)?[\"']?([A-Za-z])[\"']?(?![A-Za-z])"),
    re.compile(r"\b(?:[Pp]ut|[Pp]lace|[Ww]rite|[Dd]raw|[Aa]dd)\s+(?:an?\s+|the\s+letter\s+|letter\s+)?"
               r"[\"']?([A-Za-z])[\"']?(?![A-Za-z])"),
)


def _numbers(text: str, noun: str, n: int) -> list[int]:
    """1-based indices of `noun` ("row"/"column") named in `text`, as 0-based indices."""
    out: list[int] = []
    for m in re.finditer(rf"\b{noun}s?\s+((?:(?:\d+|one|two|three|four|five)\b(?:\s*(?:,|and|&)\s*)?)+)",
                         text):
        for tok in re.findall(r"\d+|one|two|three|four|five", m.group(1)):
            out.append(int(tok) if tok.isdigit() else _ORDINAL[tok])
    words = {"last": n, "middle": (n + 1) // 2, "center": (n + 1) // 2, "centre": (n + 1) // 2}
    if noun == "row":
        words.update(top=1, bottom=n, upper=1, lower=n)
    else:
        words.update(left=1, leftmost=1, right=n, rightmost=n)
    for m in re.finditer(rf"\b(\w+)\s+{noun}\b", text):
        word = m.group(1)
        if word in _ORDINAL:
            out.append(_ORDINAL[word])
        elif word in words:
            out.append(words[word])
    return sorted({i - 1 for i in out if 1 <= i <= n})


def command_cells(command: str, n: int) -> set[tuple[int, int]]:
    """The cells a drawing command addresses (empty when it cannot be understood)."""
    text = command.lower()
    if re.search(r"\b(whole|entire|every|all)\b.*\b(grid|cells?|board|squares?)\b", text):
        return {(r, c) for r in range(n) for c in range(n)}
    cells: set[tuple[int, int]] = set()
    if "diagonal" in text:
        anti = re.search(r"anti|top right|bottom left|upper right|lower left", text)
        cells |= {(i, n - 1 - i) if anti else (i, i) for i in range(n)}
    for vert, horiz in itertools.product(("top", "bottom"), ("left", "right")):
        if re.search(rf"\b{vert}[ -]{horiz}\b", text):
            cells.add((0 if vert == "top" else n - 1, 0 if horiz == "left" else n - 1))
    rows, cols = _numbers(text, "row", n), _numbers(text, "column", n)
    if rows and cols:
        cells |= {(r, c) for r in rows for c in cols}
    elif rows:
        cells |= {(r, c) for r in rows for c in range(n)}
    elif cols:
        cells |= {(r, c) for r in range(n) for c in cols}
    return cells


def command_letter(command: str) -> str | None:
    for pattern in _LETTER_RES:
        m = pattern.search(command)
        if m:
            return m.group(1).upper()
    return None


def apply_command(grid: list[list[str | None]], command: str) -> list[list[str | None]]:
    """`grid` with `command` carried out (unchanged when the command is not understood)."""
    letter = command_letter(command)
    if letter is None:
        return grid
    out = [list(row) for row in grid]
    for r, c in command_cells(command, len(grid)):
        out[r][c] = letter
    return out


# ----- programmatic players -------------------------------------------------------------------------

def _count_replies(messages: Sequence[Message]) -> int:
    return sum(1 for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant")


def _last_grid(messages: Sequence[Message], dim: int) -> list[list[str | None]]:
    for m in reversed(messages):
        if isinstance(m, Mapping) and m.get("role") == "assistant":
            grid = parse_grid(m.get("content"), dim)
            if grid is not None:
                return grid
            break
    return [[None] * dim for _ in range(dim)]


def _last_command(messages: Sequence[Message]) -> str:
    for m in reversed(messages):
        if isinstance(m, Mapping) and m.get("role") == "user":
            content = str(m.get("content", ""))
            found = re.findall(r"(?:command|instruction)\s*:\s*(.*)", content, re.IGNORECASE)
            return found[-1] if found else content.strip().split("\n")[-1]
    return ""


def _dim(instance: Mapping[str, Any]) -> int:
    dim = instance.get("grid_dimension", DIM)
    return dim if isinstance(dim, int) and 1 <= dim <= 26 else DIM


def _prefix(instance: Mapping[str, Any]) -> str:
    """The command prefix the instance's patterns expect ("Command" or, in older layouts, "Instruction")."""
    return "Instruction" if "instruction" in str(instance.get("player_1_response_pattern", "")).lower() \
        else "Command"


def strong_player(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                  rng: random.Random) -> PlayerFn:
    dim = _dim(instance)
    if role == ImageGameMaster.roles[0]:
        target = parse_grid(instance.get("target_grid"), dim)
        commands = plan_commands(target) if target is not None else []
        prefix = _prefix(instance)

        def give(messages: Sequence[Message]) -> str:
            k = _count_replies(messages)
            return f"{prefix}: {commands[k]}" if k < len(commands) else f"{prefix}: DONE"

        return give

    def follow(messages: Sequence[Message]) -> str:
        grid = _last_grid(messages, dim)
        return grid_text(apply_command(grid, _last_command(messages)))

    return follow


def weak_player(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                rng: random.Random) -> PlayerFn:
    """Keeps the format but draws at random: a few random cells (giver), random marks (follower)."""
    dim = _dim(instance)
    if role == ImageGameMaster.roles[0]:
        steps = rng.randint(1, 3)
        prefix = _prefix(instance)

        def give(messages: Sequence[Message]) -> str:
            if _count_replies(messages) >= steps:
                return f"{prefix}: DONE"
            return (f"{prefix}: Put {rng.choice(ALPHABET)} in row {rng.randint(1, dim)}, "
                    f"column {rng.randint(1, dim)}")

        return give

    def follow(messages: Sequence[Message]) -> str:
        grid = _last_grid(messages, dim)
        grid[rng.randrange(dim)][rng.randrange(dim)] = rng.choice(ALPHABET)
        return grid_text(grid)

    return follow


SPEC = GameSpec(
    name=GAME,
    master=ImageGameMaster,
    generate=generate,
    instance_key=instance_key,
    players={"strong": strong_player, "weak": weak_player},
    description="One player instructs the other, command by command, to draw a target 5x5 letter grid.",
    normalize=normalize,
)
