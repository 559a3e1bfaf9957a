"""colourname: a one-turn game that exists for testing learning code, not for benchmarking.

A single role, the Player, is asked to answer with the name of a colour and nothing else. Each
instance mentions a different hint object ("a ripe banana", "the sea"), but the hint only varies the
prompt: any colour of the fixed list `COLOURS` counts as correct, whatever the object. So the game
can be learned without reading the prompt at all, and a tiny randomly initialised model trained with
a policy-gradient method raises its reward within a few dozen steps. It is registered like every
other game but belongs to neither the training nor the held-out games of `games.split`.

Rules:
- The reply is stripped of surrounding whitespace, lower-cased and stripped of punctuation at both
  ends; its first whitespace-separated word, itself stripped of punctuation at both ends, is the
  answer. "Blue.", "  RED!" and "**green**, I think" all answer with a colour.
- No word left (an empty reply, only whitespace or only punctuation): the episode aborts (a format
  violation; Main Score NaN).
- The answer is in `COLOURS`: success, Main Score 100. Any other word: loss, Main Score 0.
- There is one request and one round per episode.

Record: the prompt ("send message"), the reply ("get message"), then a GM->GM "parse" event with
the answer word, or an "invalid format" event when the reply holds no word.
"""

from __future__ import annotations

import random
import string
import unicodedata
from typing import Any, Generator, Hashable, Mapping, Sequence

from games.core import GameError, GameMaster, Message, Request
from games.registry import GameSpec, split_of

GAME_NAME = "colourname"
EXPERIMENT = "name_a_colour"

# Every one of these answers correctly, for every instance.
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")

# Objects that vary the prompts; an instance's identity is its hint.
HINTS = (
    "a ripe banana", "the sky on a clear day", "fresh grass", "a fire engine", "fresh snow",
    "a lump of coal", "a plum", "a lemon", "a strawberry", "the sea", "a crow", "a glass of milk",
    "a pumpkin", "an aubergine", "a frog", "a tomato", "a cloud", "a panda", "a carrot", "a lime",
    "a sunflower", "a blueberry", "a polar bear", "a traffic light", "a pine tree", "a school bus",
    "a violet", "a cherry", "a swan", "a raven", "a goldfish", "a flamingo", "a brick", "a chili pepper",
    "a lettuce leaf", "a piano key", "the night sky", "a dandelion", "a bunch of grapes", "a tangerine",
    "a cucumber", "an egg shell", "a zebra", "a ladybird", "a canary", "a lavender field",
    "a postbox", "a tennis ball",
)

# Prompt wordings; `{hint}` is the instance's object, `{colours}` the colour list.
TEMPLATES = (
    "Think of {hint}. Answer with the name of a colour and nothing else. Colours: {colours}.",
    "What colour comes to mind for {hint}? Reply with one colour name only, one of: {colours}.",
    "Name a colour for {hint}. Your whole answer must be a single colour word from this list: {colours}.",
)

# Words the weak player answers with; none of them is a colour.
NON_COLOURS = ("table", "river", "seven", "quickly", "house", "music", "window", "bread", "garden",
               "pencil", "maybe", "banana")

# Instances per split; validation and test instances cycle through their split's hints.
SIZES = {"train": 200, "validation": 20, "test": 20}
# Fractions of hints per split (few hints exist, so validation and test get a larger share).
FRACTIONS = (0.6, 0.2, 0.2)


# ----- parsing ---------------------------------------------------------------------------------------
def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def _strip_punctuation(text: str) -> str:
    start, end = 0, len(text)
    while start < end and _is_punctuation(text[start]):
        start += 1
    while end > start and _is_punctuation(text[end - 1]):
        end -= 1
    return text[start:end]


def parse_answer(reply: str) -> str | None:
    """The first word of a reply, lower-cased and without punctuation at its ends; None if no word."""
    text = _strip_punctuation(reply.strip().lower()).strip()
    words = text.split()
    if not words:
        return None
    word = _strip_punctuation(words[0])
    return word or None


# ----- the game master -------------------------------------------------------------------------------
class ColourName(GameMaster):
    game_name = GAME_NAME
    roles = ("Player",)

    def setup(self) -> None:
        inst = self.instance
        for key in ("hint", "prompt"):
            value = inst.get(key)
            if not isinstance(value, str) or not value.strip():
                raise GameError(f"{GAME_NAME}: instance {inst.get('game_id')!r} needs a non-empty string "
                                f"{key!r}, got {value!r}")
        self.prompt = inst["prompt"]
        self.answer: str | None = None
        self.aborted = False

    def play(self) -> Generator[Request, str, None]:
        reply = yield from self.ask(0, self.prompt)
        answer = parse_answer(reply)
        if answer is None:
            self.count_violated()
            self.aborted = True
            self.log_to_self("invalid format", "Abort: the reply holds no word.")
        else:
            self.count_parsed()
            self.answer = answer
            self.log_to_self("parse", answer)
        self.log_to_self("end", "Game finished.")

    def compute_scores(self) -> None:
        self.log_request_turn_scores()
        correct = self.answer in COLOURS
        if not self.aborted:
            self.log_turn_score(0, "Correct", int(correct))
        self.set_outcome(aborted=self.aborted, success=correct, score=100.0 if correct else 0.0)


# ----- instances -------------------------------------------------------------------------------------
def instance_key(instance: Mapping[str, Any]) -> Hashable:
    """An instance's identity: its hint object."""
    return str(instance.get("hint", ""))


def hints_of(split: str) -> list[str]:
    """The hint objects of a split (seed-independent, in `HINTS` order)."""
    return [h for h in HINTS if split_of(h, salt=GAME_NAME, fractions=FRACTIONS) == split]


def render_prompt(template: str, hint: str) -> str:
    return template.format(hint=hint, colours=", ".join(COLOURS))


def generate(split: str, seed: int = 0) -> dict:
    """Instances of one split: prompts about that split's hints, drawn afresh per seed."""
    if split not in SIZES:
        raise GameError(f"{GAME_NAME}: unknown split {split!r}; one of {', '.join(SIZES)}")
    hints = hints_of(split)
    if not hints:
        raise GameError(f"{GAME_NAME}: no hint object falls in the {split} split")
    rng = random.Random(f"{GAME_NAME}/{split}/{seed}")
    order = rng.sample(hints, len(hints))
    instances = []
    for i in range(SIZES[split]):
        hint = order[i % len(order)] if split != "train" else rng.choice(hints)
        template = rng.randrange(len(TEMPLATES))
        instances.append({"game_id": i, "hint": hint, "template": template,
                          "prompt": render_prompt(TEMPLATES[template], hint)})
    return {"experiments": [{"name": EXPERIMENT, "game_instances": instances}]}


# ----- programmatic players --------------------------------------------------------------------------
def _strong_factory(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                    rng: random.Random):
    """Answers with a colour of the list, always the same one for the same hint (a digest of the
    hint picks it), so that its episodes are consistent supervised data."""
    import hashlib

    digest = hashlib.sha256(str(instance.get("hint", "")).encode()).digest()
    colour = COLOURS[digest[0] % len(COLOURS)]

    def player(messages: Sequence[Message]) -> str:
        return colour

    return player


def _weak_factory(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                  rng: random.Random):
    """Answers with a word that is not a colour, chosen with its rng."""

    def player(messages: Sequence[Message]) -> str:
        return rng.choice(NON_COLOURS)

    return player


SPEC = GameSpec(
    name=GAME_NAME,
    master=ColourName,
    generate=generate,
    instance_key=instance_key,
    players={"strong": _strong_factory, "weak": _weak_factory},
    description="Test game for learning code: answer with any colour name (one turn).",
)
