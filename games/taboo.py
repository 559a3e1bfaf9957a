"""Taboo: a describer explains a target word to a guesser without using it or its related words.

Rules as clembench defines them:

* The describer (Player 1) sees the target word and three related ("taboo") words and answers
  `CLUE: <text>`; the guesser (Player 2) answers `GUESS: <word>`. Each player sees the other's last
  reply verbatim; the guesser's first prompt carries its instructions followed by the first clue.
* A reply that does not start with its prefix (`CLUE:` / `GUESS:`) aborts the episode
  ("invalid format").
* A clue is checked word by word: the text after `CLUE:` is lower-cased, stripped of punctuation and
  of English stop words, and every remaining word is stemmed; a stem equal to the stem of the target
  or of a related word ends the episode as a loss ("invalid clue"), not an abort.
* The guess is the text after `GUESS:`, stripped, lower-cased and without punctuation; it must equal
  the target word. The guesser has `max_turns` tries (3); one round is one clue plus one guess.
* Main Score: 100 / (rounds played) on success, 0 on a loss, NaN when aborted. Requests are counted
  one per round (the round that ends with a format violation counts as violated, every other round
  as parsed). Turn score `Accuracy` is 1 from the round of the correct guess on; episode scores
  `Repetition-Guesser` / `Repetition-Describer` count guesses / clues equal to those of the
  previous round.
"""

from __future__ import annotations

import functools
import json
import random
import string
from pathlib import Path
from typing import Any, Mapping, Sequence

import snowballstemmer

from games.core import (
    METRIC_REQUEST_COUNT,
    METRIC_REQUEST_COUNT_PARSED,
    METRIC_REQUEST_COUNT_VIOLATED,
    METRIC_REQUEST_SUCCESS_RATIO,
    GameError,
    GameMaster,
)
from games.registry import SPLITS, GameSpec, split_of

GAME_NAME = "taboo"
DESCRIBER, GUESSER = "Describer", "Guesser"
CLUE_PREFIX, GUESS_PREFIX = "CLUE:", "GUESS:"
DEFAULT_MAX_TURNS = 3
LEVELS = ("high", "medium", "low")
RESOURCE = Path(__file__).parent / "resources" / "taboo" / "taboo_words.json"
# Resource words are partitioned once, independently of any seed: 70% train, 10% validation,
# 20% test (a larger test share so that each frequency level has about 20 test words).
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
TEST_PER_EXPERIMENT = 20
VALIDATION_PER_EXPERIMENT = 10

# English function words ignored by the clue check (our own list). Clues are stripped of
# punctuation before this list is consulted, hence the apostrophe-less contractions.
EN_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she should
so some such than that the their theirs them themselves then there these they this those through to
too under until up very was we were what when where which while who whom why will with would you
your yours yourself yourselves
s t d ll m o re ve y ain aren couldn didn doesn don hadn hasn haven isn ma mightn mustn needn shan
shouldn wasn weren won wouldn
dont doesnt didnt isnt arent wasnt werent hasnt havent hadnt cant couldnt wouldnt shouldnt
im youre hes shes thats theyre weve youve theyve ive youd theyd youll theyll
""".split())

_STEMMER = snowballstemmer.stemmer("english")
_PUNCT = str.maketrans("", "", string.punctuation)


def stem(word: str) -> str:
    return _STEMMER.stemWord(word.lower())


def remove_punctuation(text: str) -> str:
    return text.translate(_PUNCT)


def check_clue(clue: str, target_word: str, related_words: Sequence[str]) -> tuple[str, list[dict]]:
    """Normalises a clue and lists its taboo violations.

    Returns `(normalised clue, errors)`; each error is `{"message", "type"}` with type 0 for the
    target word and 1 for a related word, in the order the clue's words occur.
    """
    text = remove_punctuation(clue.replace(CLUE_PREFIX, "").strip().lower())
    words = [w for w in text.split() if w not in EN_STOPWORDS]
    target_stem = stem(target_word)
    related = [(r, stem(r)) for r in related_words]
    errors = []
    for word in words:
        word_stem = stem(word)
        if word_stem == target_stem:
            errors.append({"message": f"Target word '{target_word}' (stem={target_stem}) is similar to "
                                      f"clue word '{word}' (stem={word_stem})", "type": 0})
        for rel, rel_stem in related:
            if rel_stem == word_stem:
                errors.append({"message": f"Related word '{rel}' (stem={rel_stem}) is similar to "
                                          f"clue word '{word}' (stem={word_stem})", "type": 1})
    return text, errors


def parse_guess(utterance: str) -> str:
    guess = utterance.replace(GUESS_PREFIX, "").strip().lower()
    return remove_punctuation(guess)


# ----- prompts ------------------------------------------------------------------------------------
DESCRIBER_PROMPT = """\
You are the describer in a cooperative word-guessing game: your partner has to find a secret word \
from the descriptions you give.

How to answer:
(a) Every reply must have the form CLUE: <your description>. Your partner's guesses start with GUESS.
(b) Do not use the secret word itself, any part of it, or any word formed from it (a plural, a verb \
form and the like).
(c) The same restriction holds for each of the related words listed below.

How the game ends:
(i) If a description contains the secret word or a related word, we both lose.
(ii) If your partner names the secret word within $N$ guesses, we both win.

The secret word you describe:

$TARGET_WORD$

The related words you must avoid:

$REL_WORD$

There is little time, so keep every description short and to the point."""

GUESSER_PROMPT = """\
You are the guesser in a cooperative word-guessing game: your partner describes a secret word and \
you have to find it.

You have $N$ guesses, one per turn. You win as soon as you name the secret word and lose if you \
have not named it after $N$ guesses.

Every description from your partner starts with CLUE, and after each wrong guess you get a new one.

Reply with a single word, exactly in this form: GUESS: <word>"""


class Taboo(GameMaster):
    game_name = GAME_NAME
    roles = (DESCRIBER, GUESSER)

    def setup(self) -> None:
        inst, exp = self.instance, self.experiment
        target = inst.get("target_word")
        if not isinstance(target, str) or not target.strip():
            raise GameError(f"{GAME_NAME}: instance {inst.get('game_id')!r} needs a non-empty string "
                            f"'target_word', got {target!r}")
        related = inst.get("related_word")
        if not isinstance(related, (list, tuple)) or not all(isinstance(r, str) for r in related):
            raise GameError(f"{GAME_NAME}: instance {inst.get('game_id')!r} needs 'related_word' as a "
                            f"list of strings, got {related!r}")
        max_turns = exp.get("max_turns", DEFAULT_MAX_TURNS)
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise GameError(f"{GAME_NAME}: experiment 'max_turns' must be a positive integer, "
                            f"got {max_turns!r}")
        prompts = {}
        for key, default in (("describer_initial_prompt", DESCRIBER_PROMPT),
                             ("guesser_initial_prompt", GUESSER_PROMPT)):
            value = exp.get(key, default)
            if not isinstance(value, str):
                raise GameError(f"{GAME_NAME}: experiment {key!r} must be a string template")
            prompts[key] = value
        self.target_word = target
        self.related_words = list(related)
        self.max_turns = max_turns
        rel = "\n".join(f"- {r}" for r in self.related_words)
        self.describer_prompt = (prompts["describer_initial_prompt"].replace("$TARGET_WORD$", target)
                                 .replace("$REL_WORD$", rel).replace("$N$", str(max_turns)))
        self.guesser_prompt = prompts["guesser_initial_prompt"].replace("$N$", str(max_turns))
        # Episode state, filled by play().
        self.aborted = False
        self.success = False
        self.clue_error: dict | None = None
        self.clues: list[str | None] = []    # per round: the normalised valid clue, else None
        self.guesses: list[str | None] = []  # per round: the parsed guess, else None

    def play(self):
        describer_msg = self.describer_prompt
        target = remove_punctuation(self.target_word.strip().lower())
        for round_index in range(self.max_turns):
            if round_index:
                self.next_round()
            self.clues.append(None)
            self.guesses.append(None)
            # -- describer
            clue_reply = (yield from self.ask(0, describer_msg)).strip()
            if not clue_reply.startswith(CLUE_PREFIX):
                self._abort()
                return
            self.count_parsed()
            self.log_to_self("valid response", "continue")
            clue, errors = check_clue(clue_reply, self.target_word, self.related_words)
            if errors:
                self.clue_error = errors[0]
                self.log_to_self("invalid clue", self.clue_error["message"])
                return
            self.clues[-1] = clue
            self.log_to_self("valid clue", clue)
            # -- guesser
            guesser_msg = self.guesser_prompt + "\n\n" + clue_reply if round_index == 0 else clue_reply
            guess_reply = (yield from self.ask(1, guesser_msg)).strip()
            if not guess_reply.startswith(GUESS_PREFIX):
                self._abort()
                return
            self.count_parsed()
            self.log_to_self("valid response", "continue")
            guess = parse_guess(guess_reply)
            self.guesses[-1] = guess
            self.log_to_self("valid guess", guess)
            self.success = guess == target
            last_round = round_index + 1 >= self.max_turns
            if last_round:
                self.log_to_self("max rounds reached", str(self.max_turns))
            if self.success:
                self.log_to_self("correct guess", "end game")
            if self.success or last_round:
                return
            describer_msg = guess_reply

    def _abort(self) -> None:
        self.count_violated()
        self.aborted = True
        self.log_to_self("invalid format", "abort game")

    def compute_scores(self) -> None:
        n = len(self.turns)
        # During play the counters count every request; the scores count one request per round,
        # the round ended by a format violation being the violated one.
        self.request_counts = [1] * n
        self.violated_counts = [int(self.aborted and i == n - 1) for i in range(n)]
        self.parsed_counts = [1 - v for v in self.violated_counts]
        self.log_request_turn_scores()
        for i in range(n):
            self.log_turn_score(i, "Accuracy", int(self.success and not self.aborted and i == n - 1))
        es = self.episode_scores
        es[METRIC_REQUEST_COUNT] = n
        es[METRIC_REQUEST_COUNT_PARSED] = sum(self.parsed_counts)
        es[METRIC_REQUEST_COUNT_VIOLATED] = sum(self.violated_counts)
        es[METRIC_REQUEST_SUCCESS_RATIO] = sum(self.parsed_counts) / n
        self.set_outcome(aborted=self.aborted, success=self.success,
                         score=100 / n if self.success else 0)
        es["Repetition-Guesser"] = _repetitions(self.guesses)
        es["Repetition-Describer"] = _repetitions(self.clues)


def _repetitions(values: Sequence[str | None]) -> int:
    """How often a round repeats the (non-missing) value of the round before."""
    return sum(1 for prev, cur in zip(values, values[1:]) if cur is not None and cur == prev)


# ----- resources and instances --------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_words() -> dict[str, list[dict]]:
    """The word resource: {level: [{"target_word", "related_word", "clue"}, ...]}."""
    with open(RESOURCE) as f:
        data = json.load(f)
    return {level: data[level] for level in LEVELS}


@functools.lru_cache(maxsize=1)
def _clue_index() -> dict[str, str]:
    return {e["target_word"]: e["clue"] for level in LEVELS for e in load_words()[level]}


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    return tuple(sorted({e["target_word"] for level in LEVELS for e in load_words()[level]}))


def _instance(game_id: int, entry: Mapping[str, Any]) -> dict:
    target, related = entry["target_word"], list(entry["related_word"])
    return {"game_id": game_id, "target_word": target, "related_word": related,
            "target_word_stem": stem(target), "related_word_stem": [stem(r) for r in related]}


def generate(split: str, seed: int = 0) -> dict:
    """Instances for one split: one experiment per frequency level, as clembench lays them out."""
    if split not in SPLITS:
        raise GameError(f"{GAME_NAME}: unknown split {split!r}")
    rng = random.Random(f"{GAME_NAME}/{split}/{seed}")
    words = load_words()
    experiments = []
    for level in LEVELS:
        pool = [e for e in words[level] if split_of(e["target_word"], GAME_NAME, SPLIT_FRACTIONS) == split]
        rng.shuffle(pool)
        if split == "test":
            pool = pool[:TEST_PER_EXPERIMENT]
        elif split == "validation":
            pool = pool[:VALIDATION_PER_EXPERIMENT]
        experiments.append({
            "name": f"{level}_en",
            "max_turns": DEFAULT_MAX_TURNS,
            "describer_initial_prompt": DESCRIBER_PROMPT,
            "guesser_initial_prompt": GUESSER_PROMPT,
            "game_instances": [_instance(i, e) for i, e in enumerate(pool)],
        })
    return {"experiments": experiments}


def instance_key(instance: Mapping[str, Any]) -> str:
    return str(instance.get("target_word", "")).strip().lower()


# ----- programmatic players -----------------------------------------------------------------------
def _turns_taken(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for m in messages if m.get("role") == "assistant")


def _spelled(word: str) -> str:
    return " ".join(c for c in word.lower() if c.isalpha())


def strong_clues(target: str, related: Sequence[str]) -> list[str]:
    """Clues that pass the taboo check, best first (always at least one)."""
    letters = [c for c in target if c.isalpha()]
    candidates = []
    if target in _clue_index():
        candidates.append(_clue_index()[target])
    if letters:
        candidates.append(f"It has {len(letters)} letters and begins with {letters[0].upper()}.")
        candidates.append(f"Spelled out: {_spelled(target)}.")
    candidates.append("Think about it once more.")
    passing = [c for c in candidates if not check_clue(c, target, related)[1]]
    return passing or ["..."]


def _strong(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any], rng: random.Random):
    target = str(instance.get("target_word", ""))
    related = [str(r) for r in instance.get("related_word", []) or []]
    if role == DESCRIBER:
        clues = strong_clues(target, related)

        def describer(messages):
            return f"{CLUE_PREFIX} {clues[min(_turns_taken(messages), len(clues) - 1)]}"
        return describer

    def guesser(messages):
        # Knowing the instance, the guesser names the target once it has received a clue.
        last = messages[-1]["content"] if messages else ""
        if CLUE_PREFIX in last:
            return f"{GUESS_PREFIX} {target}"
        return f"{GUESS_PREFIX} {rng.choice(_vocabulary())}"
    return guesser


VAGUE_CLUES = ("It is a thing.", "You know this one.", "Something people talk about.",
               "It exists in the world.", "Try harder, it is easy.")


def _weak(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any], rng: random.Random):
    target = str(instance.get("target_word", ""))
    related = [str(r) for r in instance.get("related_word", []) or []]
    if role == DESCRIBER:
        def describer(messages):
            u = rng.random()
            if u < 0.35 and related:  # breaks the taboo rule: a loss
                return f"{CLUE_PREFIX} It is close to {rng.choice(related)}."
            if u < 0.7:
                return f"{CLUE_PREFIX} {rng.choice(VAGUE_CLUES)}"
            other = [w for w in _vocabulary() if w != target]
            return f"{CLUE_PREFIX} {_clue_index()[rng.choice(other)]}"  # describes another word
        return describer

    def guesser(messages):
        return f"{GUESS_PREFIX} {rng.choice(_vocabulary())}"
    return guesser


SPEC = GameSpec(
    name=GAME_NAME,
    master=Taboo,
    generate=generate,
    instance_key=instance_key,
    players={"strong": _strong, "weak": _weak},
    description="A describer explains a target word without its taboo words; a guesser names it.",
)
