"""MatchIt ASCII: two players find out whether they look at the same 5x5 ASCII grid.

Each player sees one grid that the other cannot see. The dialogue follows a fixed schedule, with
`decision_turn` (D, 3 by default) question rounds:

    round 0     A: DESCRIPTION        B: DESCRIPTION, then QUESTION (after reading A's description)
    round 1..D  A: ANSWER, QUESTION   B: ANSWER, then QUESTION (in round D: DECISION instead)
    round D+1   A: DECISION (after reading B's last answer)

Every reply must start with the expected prefix (its first whitespace-separated word, split on " ",
of the first non-empty line). An empty reply or a wrong prefix aborts the episode at once; there are
no re-prompts. A decision must read exactly "DECISION: same grid" or "DECISION: different grids"
(case-insensitive, trailing dots and newlines ignored), anything else aborts.

Scores: "Main Score" is 100 when both players decide correctly and 0 otherwise (NaN when aborted);
"Player Score" is the share of correct decisions (0, 50 or 100; NaN when aborted).
Experiments: same_grid, similar_grid_1 (a mirror image or quarter turn), similar_grid_2 (two cells
flipped) and different_grid (pictures of different shapes).
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from pathlib import Path
from typing import Any, Generator, Mapping, Sequence

from games.core import GameError, GameMaster, Message, PlayerFn, Request
from games.registry import GameSpec, split_of

GAME_NAME = "matchit_ascii"
RESOURCES = Path(__file__).parent / "resources" / "matchit"

FLAGS = {"description": "DESCRIPTION:", "question": "QUESTION:", "answer": "ANSWER:", "decision": "DECISION:"}
SOL_SAME = "same grid"
SOL_DIFF = "different grids"
DECISION_TURN = 3
FILLED, EMPTY = "X", "\u25a2"
PLAYER_SCORE = "Player Score"

EXPERIMENTS = (
    ("same_grid", SOL_SAME),
    ("similar_grid_1", SOL_DIFF),
    ("similar_grid_2", SOL_DIFF),
    ("different_grid", SOL_DIFF),
)
# Instances per experiment and split.
SPLIT_SIZES = {"train": 400, "validation": 10, "test": 10}

# ----- prompt templates ------------------------------------------------------------------------
INITIAL_PROMPT = (
    "Let's play a cooperative game. You and I each have a grid made of symbols, and together we want "
    "to find out whether our two grids are identical. Neither of us can see the other's grid.\n"
    "You describe your grid first; then you get my description, and after that we take turns asking "
    "each other questions about our grids. $NUM_QUESTIONS$Begin your short description of the grid "
    "with \"$FLAG$\" and write nothing else besides it. Here is your grid:\n$GRID$"
)
Q_REPROMPT = (
    "Your turn: ask me one question about my grid that could reveal a difference from yours. "
    "Begin with \"$FLAG$\" and write nothing else besides it."
)
A_REQUEST = " Reply to this question beginning with \"$FLAG$\" and write nothing else besides it."
D_REPROMPT = (
    "Time to decide: do your grid and the grid I described look exactly alike? Reply "
    "\"$FLAG$ $SOL_SAME$\" if you believe they are the same grid, or \"$FLAG$ $SOL_DIFF$\" if you "
    "believe they are different grids. Write nothing else.\n"
)
DESC_INTRO = "Here is my description of my grid: "
INFO_NUM_QUESTIONS = "Each of us may ask $DEC_TURN$ questions. "

PROMPT_KEYS = ("initial_prompt", "q_reprompt", "d_reprompt", "a_request", "desc_intro")


def experiment_config(name: str, solution: str, *, decision_turn: int = DECISION_TURN,
                      info_num_questions: bool = False) -> dict:
    """The experiment config of one experiment: prompts, answer prefixes and the right decision."""
    num_q = INFO_NUM_QUESTIONS.replace("$DEC_TURN$", str(decision_turn)) if info_num_questions else ""
    wrong = SOL_DIFF if solution == SOL_SAME else SOL_SAME
    return {
        "name": name,
        "initial_prompt": INITIAL_PROMPT.replace("$FLAG$", FLAGS["description"]).replace(
            "$NUM_QUESTIONS$", num_q),
        "q_reprompt": Q_REPROMPT.replace("$FLAG$", FLAGS["question"]),
        "d_reprompt": (D_REPROMPT.replace("$SOL_SAME$", SOL_SAME).replace("$SOL_DIFF$", SOL_DIFF)
                       .replace("$FLAG$", FLAGS["decision"])),
        "a_request": A_REQUEST.replace("$FLAG$", FLAGS["answer"]),
        "desc_intro": DESC_INTRO,
        "flags": dict(FLAGS),
        "solution": solution,
        "wrong_solution": wrong,
    }


# ----- grids -------------------------------------------------------------------------------------
Grid = tuple[str, ...]  # rows of "X" (filled) and "." (empty)


def canon(text: str) -> str:
    """A grid text without its whitespace, rows joined by '/': the identity of a grid."""
    return "/".join("".join(line.split()) for line in str(text).splitlines() if line.strip())


def grid_rows(text: str) -> list[str]:
    """The non-empty lines of a grid text, stripped."""
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def render(grid: Grid) -> str:
    return "\n".join(" ".join(FILLED if c == "X" else EMPTY for c in row) for row in grid)


def vflip(g: Grid) -> Grid:
    """Mirror image along the vertical axis (left and right swap)."""
    return tuple(row[::-1] for row in g)


def hflip(g: Grid) -> Grid:
    """Mirror image along the horizontal axis (top and bottom swap)."""
    return tuple(reversed(g))


def turn(g: Grid) -> Grid:
    """A quarter turn clockwise."""
    n = len(g)
    return tuple("".join(g[n - 1 - r][c] for r in range(n)) for c in range(n))


def invert(g: Grid) -> Grid:
    return tuple(row.translate(str.maketrans("X.", ".X")) for row in g)


def flip_cells(g: Grid, cells: Sequence[int]) -> Grid:
    n = len(g)
    rows = [list(row) for row in g]
    for cell in cells:
        r, c = divmod(cell, n)
        rows[r][c] = "." if rows[r][c] == "X" else "X"
    return tuple("".join(row) for row in rows)


def hamming(a: Grid, b: Grid) -> int:
    return sum(x != y for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _orbit(g: Grid) -> set[Grid]:
    out: set[Grid] = set()
    for base in (g, invert(g)):
        for h in (base, vflip(base)):
            for _ in range(4):
                out.add(h)
                h = turn(h)
    return out


@functools.lru_cache(maxsize=1)
def _universe() -> tuple[tuple[Grid, ...], dict[Grid, Grid]]:
    """All grids (each base picture's mirror images, turns and inversions) and each grid's family."""
    data = json.loads((RESOURCES / "shapes.json").read_text())
    family: dict[Grid, Grid] = {}
    for name, rows in data["shapes"].items():
        if len(rows) != 5 or any(len(r) != 5 or set(r) - {"X", "."} for r in rows):
            raise GameError(f"{GAME_NAME}: shape {name!r} in shapes.json is not a 5x5 grid of 'X' and '.'")
        orbit = _orbit(tuple(rows))
        fam = min(orbit)
        for g in orbit:
            family.setdefault(g, fam)
    return tuple(sorted(family)), family


def pair_key(a: str, b: str) -> str:
    """Order-free identity of a grid pair (grid texts in any whitespace layout)."""
    return "|".join(sorted((canon(a), canon(b))))


def instance_key(instance: Mapping[str, Any]) -> str:
    return pair_key(instance.get("grid_a", ""), instance.get("grid_b", ""))


def _split(a: Grid, b: Grid) -> str:
    return split_of(pair_key(render(a), render(b)), salt=GAME_NAME)


@functools.lru_cache(maxsize=None)
def _pool(experiment: str, split: str) -> tuple[tuple[Grid, Grid], ...]:
    """The enumerable pairs of an experiment (same_grid, similar_grid_1) that fall in `split`."""
    grids, _ = _universe()
    pairs: set[tuple[Grid, Grid]] = set()
    if experiment == "same_grid":
        pairs = {(g, g) for g in grids}
    else:
        for g in grids:
            for t in (vflip, hflip, turn):
                h = t(g)
                if h != g:
                    pairs.add((min(g, h), max(g, h)))
    return tuple(sorted(p for p in pairs if _split(*p) == split))


def _sample_pairs(experiment: str, split: str, n: int, rng: random.Random) -> list[tuple[Grid, Grid]]:
    if experiment in ("same_grid", "similar_grid_1"):
        pool = _pool(experiment, split)
        chosen = rng.sample(pool, min(n, len(pool)))
    else:
        grids, family = _universe()
        chosen, seen = [], set()
        for _ in range(200 * n):
            if len(chosen) >= n:
                break
            a = rng.choice(grids)
            if experiment == "similar_grid_2":
                b = flip_cells(a, rng.sample(range(25), 2))
            else:
                b = rng.choice(grids)
                if family[a] == family[b] or hamming(a, b) < 3:
                    continue
            key = (min(a, b), max(a, b))
            if key in seen or _split(a, b) != split:
                continue
            seen.add(key)
            chosen.append((a, b))
    # Which player gets which grid.
    return [(a, b) if rng.random() < 0.5 else (b, a) for a, b in chosen]


def generate(split: str, seed: int = 0) -> dict:
    """instances.json for one split: every experiment with its instances, deterministic in (split, seed)."""
    if split not in SPLIT_SIZES:
        raise GameError(f"{GAME_NAME}: unknown split {split!r}")
    experiments = []
    for name, solution in EXPERIMENTS:
        rng = random.Random(f"{GAME_NAME}/{split}/{seed}/{name}")
        exp = experiment_config(name, solution)
        exp["game_instances"] = [
            {"game_id": i, "grid_a": render(a), "grid_b": render(b), "decision_turn": DECISION_TURN}
            for i, (a, b) in enumerate(_sample_pairs(name, split, SPLIT_SIZES[split], rng))
        ]
        experiments.append(exp)
    return {"experiments": experiments}


# ----- game master -------------------------------------------------------------------------------
class MatchItAscii(GameMaster):
    """Both players must decide whether their two grids are the same (rules in the module docstring)."""

    game_name = GAME_NAME
    roles = ("Player A", "Player B")

    def setup(self) -> None:
        inst, exp = self.instance, self.experiment
        for key in ("grid_a", "grid_b"):
            if not isinstance(inst.get(key), str) or not inst[key].strip():
                raise GameError(
                    f"{GAME_NAME}: instance {inst.get('game_id')!r} needs a non-empty string {key!r}")
        self.grid_a: str = inst["grid_a"]
        self.grid_b: str = inst["grid_b"]
        dt = inst.get("decision_turn", DECISION_TURN)
        if isinstance(dt, bool) or not isinstance(dt, int) or dt < 1:
            raise GameError(f"{GAME_NAME}: 'decision_turn' must be a positive integer, got {dt!r}")
        self.decision_turn: int = dt

        flags = exp.get("flags", FLAGS)
        if not isinstance(flags, Mapping) or any(
                not isinstance(flags.get(k), str) or not flags[k].strip() for k in FLAGS):
            raise GameError(
                f"{GAME_NAME}: experiment 'flags' must map {', '.join(FLAGS)} to non-empty strings")
        self.flags: dict[str, str] = {k: flags[k] for k in FLAGS}

        if "solution" in exp or "wrong_solution" in exp:
            solution, wrong = exp.get("solution"), exp.get("wrong_solution")
        else:  # no experiment config: the grids themselves say what is right
            same = canon(self.grid_a) == canon(self.grid_b)
            solution, wrong = (SOL_SAME, SOL_DIFF) if same else (SOL_DIFF, SOL_SAME)
        if not isinstance(solution, str) or not isinstance(wrong, str) or not solution or not wrong \
                or solution.lower() == wrong.lower():
            raise GameError(f"{GAME_NAME}: experiment needs two different strings 'solution' and "
                            f"'wrong_solution', got {solution!r} and {wrong!r}")
        self.solution, self.wrong_solution = solution, wrong

        defaults = experiment_config(str(exp.get("name", "")), SOL_SAME if solution == SOL_SAME else SOL_DIFF)
        prompts = {}
        for key in PROMPT_KEYS:
            value = exp.get(key, defaults[key])
            if not isinstance(value, str):
                raise GameError(f"{GAME_NAME}: experiment {key!r} must be a string")
            prompts[key] = value
        if "$GRID$" not in prompts["initial_prompt"]:
            raise GameError(f"{GAME_NAME}: 'initial_prompt' has no $GRID$ placeholder for the player's grid")
        self.prompt_a = prompts["initial_prompt"].replace("$GRID$", self.grid_a)
        self.prompt_b = prompts["initial_prompt"].replace("$GRID$", self.grid_b)
        self.q_reprompt = prompts["q_reprompt"]
        self.d_reprompt = prompts["d_reprompt"]
        self.a_request = prompts["a_request"]
        self.desc_intro = prompts["desc_intro"]

        self.aborted = False
        self.decisions: dict[str, bool] = {}  # "A"/"B" -> decided correctly

    # ----- rules ---------------------------------------------------------------------------------
    def _abort(self) -> None:
        self.aborted = True
        self.log_to_self("Game over", "Aborted")

    def _check_prefix(self, reply: str, kind: str) -> bool:
        """Logs and counts the format verdict of a reply that must start with the `kind` prefix."""
        flag = self.flags[kind]
        if not reply.strip():
            self.log_to_self("invalid content", "abort, empty message")
            self.count_violated()
            self._abort()
            return False
        first_line = next(line for line in reply.strip().split("\n") if line)
        first_word = first_line.split(" ")[0]
        if first_word == flag:
            self.log_to_self("valid format", "continue")
            self.count_parsed()
            return True
        self.log_to_self("invalid format", f"abort, first word: {first_word}, but expected {flag}")
        self.count_violated()
        self._abort()
        return False

    def _utterance(self, player: int, prompt: str, kind: str) -> Generator[Request, str, str | None]:
        """Asks a player; returns its stripped reply, or None when the episode was aborted."""
        reply = yield from self.ask(player, prompt)
        return reply.strip() if self._check_prefix(reply, kind) else None

    def _decision(self, player: int, prompt: str) -> Generator[Request, str, bool]:
        """Asks for a decision and records it; False when the episode was aborted."""
        reply = yield from self.ask(player, prompt)
        if not self._check_prefix(reply, "decision"):
            return False
        text = reply.lower().strip(".\n")
        role = "AB"[player]
        flag = self.flags["decision"]
        if text == f"{flag} {self.solution}".lower():
            self.decisions[role] = True
            self.log_to_self(f"Decision Player {role}", "success")
        elif text == f"{flag} {self.wrong_solution}".lower():
            self.decisions[role] = False
            self.log_to_self(f"Decision Player {role}", "loss")
        else:
            self.log_to_self("invalid content", "abort, wrong message content.")
            self.count_violated()
            self._abort()
            return False
        return True

    def play(self) -> Generator[Request, str, None]:
        a, b = 0, 1
        desc_a = yield from self._utterance(a, self.prompt_a, "description")
        if desc_a is None:
            return
        desc_b = yield from self._utterance(b, self.prompt_b, "description")
        if desc_b is None:
            return
        q_b = yield from self._utterance(b, self.desc_intro + desc_a + "\n" + self.q_reprompt, "question")
        if q_b is None:
            return
        to_a = self.desc_intro + desc_b + "\n" + q_b + self.a_request
        ans_b = ""
        for rnd in range(1, self.decision_turn + 1):
            self.next_round()
            ans_a = yield from self._utterance(a, to_a, "answer")
            if ans_a is None:
                return
            q_a = yield from self._utterance(a, self.q_reprompt, "question")
            if q_a is None:
                return
            ans_b = yield from self._utterance(b, ans_a + "\n" + q_a + self.a_request, "answer")
            if ans_b is None:
                return
            if rnd < self.decision_turn:
                q_b = yield from self._utterance(b, self.q_reprompt, "question")
                if q_b is None:
                    return
                to_a = ans_b + "\n" + q_b + self.a_request
        if not (yield from self._decision(b, self.d_reprompt)):
            return
        self.next_round()
        yield from self._decision(a, ans_b + "\n" + self.d_reprompt)

    # ----- scores --------------------------------------------------------------------------------
    def compute_scores(self) -> None:
        # A request counts once per format verdict: a decision with the right prefix but an unknown
        # choice is both a parsed and a violated request.
        for i in range(len(self.turns)):
            self.request_counts[i] = self.parsed_counts[i] + self.violated_counts[i]
        self.log_request_turn_scores()
        if self.aborted:
            self.set_outcome(aborted=True, success=False, score=None)
            self.episode_scores[PLAYER_SCORE] = math.nan
            return
        n_correct = sum(self.decisions.get(r, False) for r in "AB")
        self.set_outcome(aborted=False, success=n_correct == 2, score=100 if n_correct == 2 else 0)
        self.episode_scores[PLAYER_SCORE] = 50 * n_correct


# ----- programmatic players ------------------------------------------------------------------------
_ROW_RE = re.compile(r"row\s*(\d+)\s*:\s*([^;\n]*)", re.IGNORECASE)
_ROW_NUM_RE = re.compile(r"row\s*(\d+)", re.IGNORECASE)


def _norm(row: str) -> str:
    return "".join(row.split())


def _flags(experiment: Mapping[str, Any]) -> dict[str, str]:
    flags = experiment.get("flags")
    if isinstance(flags, Mapping) and all(isinstance(flags.get(k), str) for k in FLAGS):
        return {k: flags[k] for k in FLAGS}
    return dict(FLAGS)


def _options(experiment: Mapping[str, Any]) -> tuple[str, str]:
    """The (same, different) decision phrases of an experiment."""
    opts = [experiment.get("solution"), experiment.get("wrong_solution")]
    if all(isinstance(o, str) for o in opts):
        same = [o for o in opts if "same" in o.lower() and "diff" not in o.lower()]
        if len(same) == 1:
            return same[0], next(o for o in opts if o is not same[0])
    return SOL_SAME, SOL_DIFF


def _last_user(messages: Sequence[Message]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def _requested(messages: Sequence[Message], flags: Mapping[str, str]) -> str:
    """What the last prompt asks for: the kind whose prefix it names last."""
    text = _last_user(messages)
    best, pos = "", -1
    for kind, flag in flags.items():
        p = text.rfind(flag)
        if p > pos:
            best, pos = kind, p
    if best:
        return best
    return "description" if not any(m.get("role") == "assistant" for m in messages) else "answer"


def _own_grid(role: str, instance: Mapping[str, Any]) -> list[str]:
    return grid_rows(instance.get("grid_a" if role == "Player A" else "grid_b", ""))


def strong_player(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                  rng: random.Random) -> PlayerFn:
    """Describes its grid row by row, asks about rows, and compares the partner's rows with its own."""
    flags = _flags(experiment)
    same, diff = _options(experiment)
    rows = _own_grid(role, instance)

    def partner_rows(messages: Sequence[Message]) -> dict[int, str]:
        known: dict[int, str] = {}
        for m in messages:
            if m.get("role") == "user":
                for num, content in _ROW_RE.findall(str(m.get("content", ""))):
                    known[int(num)] = _norm(content)
        return known

    def play(messages: Sequence[Message]) -> str:
        kind = _requested(messages, flags)
        if kind == "description":
            return f"{flags['description']} " + "; ".join(f"row {i}: {r}" for i, r in enumerate(rows, 1))
        known = partner_rows(messages)
        if kind == "question":
            asked = [int(n) for m in messages if m.get("role") == "assistant"
                     and str(m.get("content", "")).startswith(flags["question"])
                     for n in _ROW_NUM_RE.findall(str(m.get("content", "")))[:1]]
            # Rows that look different first, then rows not asked about yet.
            order = sorted(range(1, len(rows) + 1),
                           key=lambda i: (known.get(i) == _norm(rows[i - 1]), asked.count(i), i))
            target = order[0] if order else 1
            return f"{flags['question']} What exactly is in row {target} of your grid?"
        if kind == "answer":
            text = _last_user(messages)
            q = text[text.rfind(flags["question"]):] if flags["question"] in text else text
            m = _ROW_NUM_RE.search(q)
            if m and 1 <= int(m.group(1)) <= len(rows):
                k = int(m.group(1))
                return f"{flags['answer']} row {k}: {rows[k - 1]}"
            return f"{flags['answer']} " + "; ".join(f"row {i}: {r}" for i, r in enumerate(rows, 1))
        # decision
        mine = {i: _norm(r) for i, r in enumerate(rows, 1)}
        if known == mine:
            choice = same
        elif any(known.get(i, v) != v for i, v in mine.items()) or set(known) - set(mine):
            choice = diff
        else:  # nothing learnt about the partner's grid
            choice = rng.choice((same, diff))
        return f"{flags['decision']} {choice}"

    return play


_VAGUE = ("there are some Xs and some squares", "it looks like a shape", "a pattern of symbols",
          "mostly squares", "mostly Xs", "it is a grid")
_QUESTIONS = ("Is there an X in your grid?", "Does your grid look nice?", "Is your grid symmetric?",
              "Do you have many squares?", "What is in the middle?")
_ANSWERS = ("yes", "no", "maybe", "I am not sure", "somewhat")


def weak_player(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                rng: random.Random) -> PlayerFn:
    """Keeps the prefixes but says nothing precise and decides at random."""
    flags = _flags(experiment)
    same, diff = _options(experiment)

    def play(messages: Sequence[Message]) -> str:
        kind = _requested(messages, flags)
        if kind == "description":
            return f"{flags['description']} {rng.choice(_VAGUE)}"
        if kind == "question":
            return f"{flags['question']} {rng.choice(_QUESTIONS)}"
        if kind == "answer":
            return f"{flags['answer']} {rng.choice(_ANSWERS)}"
        return f"{flags['decision']} {rng.choice((same, diff))}"

    return play


SPEC = GameSpec(
    name=GAME_NAME,
    master=MatchItAscii,
    generate=generate,
    instance_key=instance_key,
    players={"strong": strong_player, "weak": weak_player},
    description="Two players describe and question each other to decide whether their ASCII grids match.",
)
