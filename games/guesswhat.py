"""Guess What?: find the target word among eight candidates by asking yes/no questions.

The Guesser (Player 1) sees a list of candidate words; the Answerer (Player 2) knows which one is
the target. Each round the Guesser either asks a question or makes its single guess:

    Guesser:   "QUESTION: <one yes/no question>"   or   "GUESS: <word>"
    Answerer:  one of the experiment's `answer_variations` (e.g. "ANSWER: yes", "ANSWER: No.")

A guess ends the episode (success when it names the target, ignoring case and punctuation). After
`max_turns` (8) rounds without a guess the episode ends as a loss. Nothing is re-prompted; the
episode aborts at once when
  - the Guesser's reply starts with neither tag, holds the question tag twice, has text after the
    question mark (or several question marks), or guesses more than one word ("invalid format");
  - a question asks about letters, word length, syllables or the part of speech of the target, or
    asks "is the target word '<word>'?" (the experiment's regular expressions, "invalid content");
  - the Answerer's reply is not exactly one of the answer variations ("invalid format").

Scores (per episode): each round counts as one request, parsed unless it holds a violation. "Speed"
(on success) is 100 when the episode took at most LOWER_BOUND_TURNS rounds and otherwise falls
linearly to 0 at `max_turns` rounds: 100 * (max_turns - rounds) / (max_turns - LOWER_BOUND_TURNS).
"Main Score" is the speed on success, 0 on a loss, NaN when aborted. Invalid format / content
responses are counted per role. Per round: "Accuracy" (1 once the target is guessed).

Experiments: Level_1 (4 categories x 2 subcategories x 1 word), Level_2 (2 x 2 x 2) and Level_3
(1 category, 4 subcategories x 2 words), each with concrete words, and Abs_Level_1..3 with abstract
words. Resources: games/resources/guesswhat/ (categories -> subcategories -> words, with one
distinguishing yes/no question per word for the programmatic players).
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
import string
from pathlib import Path
from typing import Any, Generator, Iterable, Mapping, Sequence

import snowballstemmer

from games.core import (
    METRIC_REQUEST_COUNT,
    METRIC_REQUEST_COUNT_PARSED,
    METRIC_REQUEST_COUNT_VIOLATED,
    METRIC_REQUEST_SUCCESS_RATIO,
    GameError,
    GameMaster,
    Message,
    PlayerFn,
    Request,
)
from games.registry import GameSpec, split_of

GAME_NAME = "guesswhat"
RESOURCES = Path(__file__).parent / "resources" / GAME_NAME

NUM_WORDS = 8
MAX_TURNS = 8
# Rounds within which a success earns full speed. The bound is the same for every level (the number
# of categories of Level_1 plus the guess), which is how the benchmark's scores are computed.
LOWER_BOUND_TURNS = 5

SPEED = "Speed"
ACCURACY = "Accuracy"
INVALID_FORMAT_GUESSER = "Invalid format guesser response"
INVALID_FORMAT_ANSWERER = "Invalid format answerer response"
INVALID_CONTENT_GUESSER = "Invalid content guesser response"
INVALID_CONTENT_ANSWERER = "Invalid content answerer response"

QUESTION_TAG = "QUESTION:"
ANSWER_TAG = "ANSWER:"
GUESS_TAG = "GUESS:"
ANSWER_VARIATIONS = ["ANSWER: yes", "ANSWER: no", "ANSWER: Yes.", "ANSWER: Yes", "ANSWER: No.", "ANSWER: No"]

# Forbidden kinds of questions, matched against the lower-cased question without its tag. The direct
# guess and part-of-speech patterns must match at the start, the others anywhere.
PATTERNS = {
    "letter_based_pattern": (
        r"(does the target word (?:start with the letter|contain the letter)"
        r"|does the target word have the letter\s*[a-z]"
        r"|is the (?:first|second|third|fourth|fifth) letter of the target word [a-z])"),
    "direct_guess_pattern": r"^is the target word\s*(['\"])[^'\"]+?\1\s*\?",
    "length_question_pattern": (
        r"does the target word (?:have|contain) (?:more|less|exactly) \d+ (?:letters|letter)"),
    "syllable_question_pattern": (
        r"does the target word (?:have|contain) (?:more than|less than|exactly) "
        r"(?:one|two|three|four|five|six|seven|eight|nine|ten|\d+) (?:syllable|syllables)"),
    "pos_question_pattern": (
        r"^is the target word (?:a|an)\s+"
        r"(?:noun|verb|adjective|adverb|pronoun|preposition|conjunction|interjection)\s*\?"),
}
# (pattern key, matched at the start only, message) in the order the checks run.
CONTENT_CHECKS = (
    ("letter_based_pattern", False,
     "Invalid question. Questions about the letters of the target word or their positions are not allowed."),
    ("direct_guess_pattern", True,
     "Invalid question. A guess must be made with the guess tag, not asked as a question."),
    ("length_question_pattern", False,
     "Invalid question. Questions about the length of the target word are not allowed."),
    ("syllable_question_pattern", False,
     "Invalid question. Questions about the number of syllables are not allowed."),
    ("pos_question_pattern", True,
     "Invalid question. Questions about the part of speech of the target word are not allowed."),
)

# (experiment name, dataset, level)
EXPERIMENTS = (
    ("Level_1", "concrete", 1),
    ("Level_2", "concrete", 2),
    ("Level_3", "concrete", 3),
    ("Abs_Level_1", "abstract", 1),
    ("Abs_Level_2", "abstract", 2),
    ("Abs_Level_3", "abstract", 3),
)
# Instances per experiment; the train split has one instance per eligible training target.
SPLIT_SIZES = {"validation": 10, "test": 10}


# ----- resources ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def load_template(name: str) -> str:
    return (RESOURCES / f"{name}.template").read_text()


@functools.lru_cache(maxsize=None)
def load_dataset(name: str) -> tuple[dict, ...]:
    """The categories of one word set: ({"Category", "Hypernyms", "Subcategories": [...]}, ...)."""
    data = json.loads((RESOURCES / f"{name}.json").read_text())
    return tuple(data["Categories"])


def experiment_config(name: str) -> dict:
    """The experiment config (rules, tags, prompt templates) our generator writes."""
    return {
        "name": name,
        "max_turns": MAX_TURNS,
        "question_tag": QUESTION_TAG,
        "answer_tag": ANSWER_TAG,
        "guess_tag": GUESS_TAG,
        "answer_variations": list(ANSWER_VARIATIONS),
        **PATTERNS,
        "answerer_initial_prompt": load_template("answerer_prompt"),
        "guesser_initial_prompt": load_template("guesser_prompt"),
    }


# ----- word features, shared by the programmatic players -----------------------------------------
_STEMMER = snowballstemmer.stemmer("english")
_ARTICLES = {"a", "an", "the"}
_NEGATION = re.compile(r"\b(?:not|neither|nor|never)\b|n[’']t\b")


@functools.lru_cache(maxsize=65536)
def _tokens(text: str) -> tuple[str, ...]:
    return tuple(_STEMMER.stemWords(re.findall(r"[a-z0-9]+", text.lower())))


def _phrase(text: str) -> tuple[str, ...]:
    toks = _tokens(text)
    while toks and toks[0] in _ARTICLES:
        toks = toks[1:]
    return toks


class Lexicon:
    """Every resource word with its category, subcategory, hypernyms and distinguishing question.

    `truth(word, question)` is how the strong Answerer answers (and how the strong Guesser predicts
    the answers): a question that is some word's distinguishing question is true of that word only;
    otherwise the categories, subcategories, hypernyms and words it mentions (longest phrases first)
    are looked up, a question is true when the word has any of them, and a negation flips it.
    """

    def __init__(self, datasets: Mapping[str, Sequence[Mapping[str, Any]]]):
        self.info: dict[str, dict] = {}
        self.by_property: dict[tuple[str, ...], set[str]] = {}
        phrases: dict[tuple[str, ...], set[tuple[str, str]]] = {}

        def add(text: str, feature: tuple[str, str]) -> None:
            toks = _phrase(text)
            if toks:
                phrases.setdefault(toks, set()).add(feature)

        for dataset, categories in datasets.items():
            for cat in categories:
                add(cat["Category"], ("cat", cat["Category"]))
                hyps = tuple(cat.get("Hypernyms", ()))
                for h in hyps:
                    add(h, ("hyp", " ".join(_phrase(h))))
                for sub in cat["Subcategories"]:
                    add(sub["Subcategory"], ("sub", sub["Subcategory"]))
                    for word in sub["Members"]:
                        key = word.lower()
                        prop = sub.get("Properties", {}).get(word)
                        self.info[key] = {
                            "word": word, "dataset": dataset, "category": cat["Category"],
                            "subcategory": sub["Subcategory"], "hypernyms": hyps, "property": prop,
                        }
                        add(word, ("word", key))
                        if prop:
                            self.by_property.setdefault(_tokens(prop), set()).add(key)
        self.phrases = phrases
        self.by_first: dict[str, list[tuple[tuple[str, ...], set]]] = {}
        for toks, feats in phrases.items():
            self.by_first.setdefault(toks[0], []).append((toks, feats))

    @functools.lru_cache(maxsize=8192)
    def features(self, word: str) -> frozenset[tuple[str, str]]:
        key = word.lower()
        info = self.info.get(key)
        feats = {("word", key)}
        if info:
            feats |= {("cat", info["category"]), ("sub", info["subcategory"])}
            feats |= {("hyp", " ".join(_phrase(h))) for h in info["hypernyms"]}
        return frozenset(feats)

    def mentions(self, question: str, extra_words: Iterable[str] = ()) -> set[tuple[str, str]]:
        """The features a question names; the longest phrase wins where phrases overlap."""
        toks = _tokens(question)
        extra: dict[str, list[tuple[tuple[str, ...], set]]] = {}
        for w in extra_words:
            p = _phrase(w)
            if p and w.lower() not in self.info:
                extra.setdefault(p[0], []).append((p, {("word", w.lower())}))
        found = []
        for i, t in enumerate(toks):
            for phrase, feats in itertools.chain(self.by_first.get(t, ()), extra.get(t, ())):
                if toks[i:i + len(phrase)] == phrase:
                    found.append((len(phrase), i, feats))
        found.sort(key=lambda f: (-f[0], f[1]))
        used = [False] * len(toks)
        out: set[tuple[str, str]] = set()
        for n, i, feats in found:
            if not any(used[i:i + n]):
                used[i:i + n] = [True] * n
                out |= feats
        return out

    def truth(self, word: str, question: str, candidates: Iterable[str] = ()) -> bool:
        owners, named, negated = self._analyse(question, tuple(candidates))
        if owners:
            return word.lower() in owners
        if not named:
            return False
        return bool(named & self.features(word)) != negated

    @functools.lru_cache(maxsize=4096)
    def _analyse(self, question: str, candidates: tuple[str, ...]) -> tuple[frozenset, frozenset, bool]:
        """(words whose distinguishing question it is, features it names, whether it is negated)."""
        owners = self.by_property.get(_tokens(question))
        if owners:
            return frozenset(owners), frozenset(), False
        negated = bool(_NEGATION.search(question.lower()))
        return frozenset(), frozenset(self.mentions(question, candidates)), negated


@functools.lru_cache(maxsize=None)
def lexicon() -> Lexicon:
    return Lexicon({name: load_dataset(name) for name in ("concrete", "abstract")})


# ----- the game master ---------------------------------------------------------------------------
def _config(experiment: Mapping[str, Any]) -> dict:
    """The experiment config with our defaults for whatever it lacks."""
    cfg = experiment_config(str(experiment.get("name", "")))
    cfg.update({k: v for k, v in experiment.items() if k in cfg and v is not None})
    return cfg


def _remove_punctuation(text: str) -> str:
    return text.translate(str.maketrans("", "", string.punctuation))


class GuessWhatMaster(GameMaster):
    game_name = GAME_NAME
    roles = ("Guesser", "Answerer")

    def setup(self) -> None:
        inst, cfg = self.instance, _config(self.experiment)
        target, cands = inst.get("target_word"), inst.get("candidate_list")
        if not isinstance(target, str) or not target.strip():
            raise GameError(f"{GAME_NAME}: instance {inst.get('game_id')!r} needs a non-empty 'target_word'")
        if (not isinstance(cands, list) or not cands
                or not all(isinstance(c, str) and c.strip() for c in cands)):
            raise GameError(f"{GAME_NAME}: instance {inst.get('game_id')!r} needs a 'candidate_list' "
                            "of non-empty strings")
        if target.lower() not in {c.lower() for c in cands}:
            raise GameError(f"{GAME_NAME}: target word {target!r} is not in the candidate list {cands}")
        max_turns = cfg["max_turns"]
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise GameError(f"{GAME_NAME}: experiment 'max_turns' must be a positive integer, "
                            f"not {max_turns!r}")
        for key in ("question_tag", "answer_tag", "guess_tag", "guesser_initial_prompt",
                    "answerer_initial_prompt"):
            if not isinstance(cfg[key], str) or (key.endswith("_tag") and not cfg[key]):
                raise GameError(f"{GAME_NAME}: experiment {key!r} must be a (non-empty) string")
        variations = cfg["answer_variations"]
        if not isinstance(variations, list) or not all(isinstance(v, str) for v in variations):
            raise GameError(f"{GAME_NAME}: experiment 'answer_variations' must be a list of strings")
        self.patterns = {}
        for key in PATTERNS:
            try:
                self.patterns[key] = re.compile(str(cfg[key]))
            except re.error as e:
                raise GameError(f"{GAME_NAME}: experiment {key!r} is not a valid regular expression: "
                                f"{e}") from None
        self.target_word, self.candidates = target, list(cands)
        self.max_turns = max_turns
        self.question_tag, self.guess_tag = cfg["question_tag"], cfg["guess_tag"]
        self.answer_variations = list(variations)
        self.guesser_prompt = (cfg["guesser_initial_prompt"].replace("$LIST$", str(self.candidates))
                               .replace("$N$", str(max_turns - 1)))
        self.answerer_prompt = cfg["answerer_initial_prompt"].replace("$TARGET WORD$", target)
        # Outcome of the episode, filled by play().
        self.violations: dict[int, bool] = {}
        self.invalid = {INVALID_FORMAT_GUESSER: 0, INVALID_FORMAT_ANSWERER: 0,
                        INVALID_CONTENT_GUESSER: 0, INVALID_CONTENT_ANSWERER: 0}
        self.aborted = False
        self.won = False
        self.guess_word: str | None = None

    # ----- rules ---------------------------------------------------------------------------------
    def check_question(self, utterance: str) -> list[str]:
        """Messages for each forbidden kind of question the utterance is."""
        text = utterance.replace(self.question_tag, "").strip().lower()
        errors = []
        for key, anchored, message in CONTENT_CHECKS:
            pattern = self.patterns[key]
            if (pattern.match(text) if anchored else pattern.search(text)):
                errors.append(message)
        return errors

    def _abort(self, kind: str, counter: str) -> None:
        self.violations[self.current_round] = True
        self.invalid[counter] += 1
        self.aborted = True
        self.log_to_self(kind, "abort game")

    def play(self) -> Generator[Request, str, None]:
        content = self.guesser_prompt
        for rnd in range(self.max_turns):
            self.violations[self.current_round] = False
            reply = (yield from self.ask(0, content)).strip()
            if not (reply.startswith(self.question_tag) or reply.startswith(self.guess_tag)):
                self.log_to_self("invalid format", "Invalid format. The guesser must start its reply with "
                                 f"'{self.question_tag}' or '{self.guess_tag}'.")
                return self._abort("invalid format", INVALID_FORMAT_GUESSER)
            if reply.startswith(self.question_tag):
                question = reply[len(self.question_tag):].strip()
                if reply.count(self.question_tag) > 1:
                    self.log_to_self("invalid format", "Invalid format. More than one question in one turn.")
                    return self._abort("invalid format", INVALID_FORMAT_GUESSER)
                if "?" in question:
                    parts = question.split("?")
                    if len(parts) > 2 or parts[1].strip():
                        self.log_to_self("invalid format",
                                         "Invalid format. Nothing may follow the question mark.")
                        return self._abort("invalid format", INVALID_FORMAT_GUESSER)
                errors = self.check_question(reply)
                if errors:
                    for message in errors:
                        self.log_to_self("invalid content", message)
                    return self._abort("invalid content", INVALID_CONTENT_GUESSER)
            else:
                guess = _remove_punctuation(reply[len(self.guess_tag):].strip().lower())
                self.guess_word = guess
                if len(guess.split()) > 1:
                    self.log_to_self("invalid format", "Invalid format. The guess must be a single word.")
                    return self._abort("invalid format", INVALID_FORMAT_GUESSER)
                self.won = guess == self.target_word.lower()
                event = "correct guess" if self.won else "incorrect guess"
                self.log_to_self(event, guess)
                self.log_to_self(event, "end game")
                return
            answer_content = f"{self.answerer_prompt}\n\n{reply}" if rnd == 0 else reply
            answer = (yield from self.ask(1, answer_content)).strip()
            if answer not in self.answer_variations:
                return self._abort("invalid format", INVALID_FORMAT_ANSWERER)
            if rnd + 1 >= self.max_turns:
                self.log_to_self("max turns reached", str(self.max_turns))
                return
            self.next_round()
            content = answer

    # ----- scores --------------------------------------------------------------------------------
    def compute_scores(self) -> None:
        rounds = len(self.turns)
        violated = [int(self.violations.get(i, False)) for i in range(rounds)]
        self.log_request_turn_scores()
        # One request per round, parsed unless the round holds a violation.
        for i in range(rounds):
            self.log_turn_score(i, ACCURACY, int(self.won and i == rounds - 1))
            self.log_turn_score(i, METRIC_REQUEST_COUNT_VIOLATED, violated[i])
            self.log_turn_score(i, METRIC_REQUEST_COUNT_PARSED, 1 - violated[i])
            self.log_turn_score(i, METRIC_REQUEST_COUNT, 1)
        es = self.episode_scores
        es[METRIC_REQUEST_COUNT_VIOLATED] = sum(violated)
        es[METRIC_REQUEST_COUNT_PARSED] = rounds - sum(violated)
        es[METRIC_REQUEST_COUNT] = rounds
        es[METRIC_REQUEST_SUCCESS_RATIO] = (rounds - sum(violated)) / rounds if rounds else 0
        score = None
        if not self.aborted:
            if self.won:
                score = speed(rounds, self.max_turns)
                es[SPEED] = score
            else:
                score = 0.0
        self.set_outcome(aborted=self.aborted, success=self.won, score=score)
        es.update(self.invalid)


def speed(rounds: int, max_turns: int) -> float:
    """Speed of a success after `rounds` rounds: 100 up to the lower bound, then linearly down to 0."""
    if rounds <= LOWER_BOUND_TURNS:
        return 100.0
    return max(0.0, 100 * (max_turns - rounds) / (max_turns - LOWER_BOUND_TURNS))


# ----- instances ---------------------------------------------------------------------------------
def _eligible(categories: Sequence[Mapping], level: int) -> list[tuple[dict, dict, str]]:
    """(category, subcategory, word) for every word that can be the target of a `level` instance."""
    out = []
    for cat in categories:
        pairs = [s for s in cat["Subcategories"] if len(s["Members"]) >= 2]
        others = [c for c in categories if c is not cat]
        for sub in cat["Subcategories"]:
            if level == 1:
                ok = len(cat["Subcategories"]) >= 2 and len(others) >= 3
            elif level == 2:
                ok = len(sub["Members"]) >= 2 and len(pairs) >= 2 and any(
                    sum(len(s["Members"]) >= 2 for s in c["Subcategories"]) >= 2 for c in others)
            else:
                ok = len(sub["Members"]) >= 2 and len(pairs) >= 4
            if ok:
                out.extend((cat, sub, w) for w in sub["Members"])
    return out


def _candidates(categories: Sequence[Mapping], level: int, cat: Mapping, sub: Mapping, target: str,
                rng: random.Random) -> list[str]:
    """Eight words around the target, grouped by category as the levels prescribe."""
    def pick(c: Mapping, n_subs: int, per_sub: int) -> list[str]:
        # The target's subcategory (when c is its category) plus others of c with enough words.
        others = [s for s in c["Subcategories"] if s is not sub and len(s["Members"]) >= per_sub]
        subs = ([sub] if c is cat else []) + rng.sample(others, n_subs - (c is cat))
        rng.shuffle(subs)
        words = []
        for s in subs:
            pool = [w for w in s["Members"] if w != target]
            chosen = ([target] + rng.sample(pool, per_sub - 1)) if s is sub else rng.sample(pool, per_sub)
            rng.shuffle(chosen)
            words.extend(chosen)
        return words

    others = [c for c in categories if c is not cat]
    if level == 1:
        cats = [cat] + rng.sample(others, 3)
        shape = (2, 1)
    elif level == 2:
        others = [c for c in others if sum(len(s["Members"]) >= 2 for s in c["Subcategories"]) >= 2]
        cats = [cat, rng.choice(others)]
        shape = (2, 2)
    else:
        cats = [cat]
        shape = (4, 2)
    rng.shuffle(cats)
    return [w for c in cats for w in pick(c, *shape)]


def generate(split: str, seed: int = 0) -> dict:
    """Instances in the clembench layout; targets come from the split's share of the words."""
    rng = random.Random(f"{GAME_NAME}/{split}/{seed}")
    experiments = []
    for name, dataset, level in EXPERIMENTS:
        categories = load_dataset(dataset)
        eligible = [e for e in _eligible(categories, level)
                    if split_of(e[2].lower(), salt=GAME_NAME) == split]
        rng.shuffle(eligible)
        n = len(eligible) if split == "train" else SPLIT_SIZES[split]
        chosen = eligible[:n]
        if eligible and len(chosen) < n:
            chosen += [rng.choice(eligible) for _ in range(n - len(chosen))]
        game_instances = []
        for game_id, (cat, sub, word) in enumerate(chosen):
            game_instances.append({
                "game_id": game_id,
                "target_word": word,
                "candidate_list": _candidates(categories, level, cat, sub, word, rng),
            })
        experiments.append({**experiment_config(name), "game_instances": game_instances})
    return {"experiments": experiments}


def instance_key(instance: Mapping[str, Any]) -> str:
    return str(instance.get("target_word", "")).lower()


# ----- programmatic players ----------------------------------------------------------------------
def _tags(experiment: Mapping[str, Any]) -> tuple[str, str, str, int]:
    cfg = _config(experiment)
    max_turns = cfg["max_turns"] if isinstance(cfg["max_turns"], int) else MAX_TURNS
    return cfg["question_tag"], cfg["answer_tag"], cfg["guess_tag"], max_turns


def _answer_line(experiment: Mapping[str, Any], yes: bool) -> str:
    """The first allowed answer variation that says yes (or no)."""
    cfg = _config(experiment)
    tag, word = cfg["answer_tag"], "yes" if yes else "no"
    for v in cfg["answer_variations"] if isinstance(cfg["answer_variations"], list) else ():
        if (isinstance(v, str) and v.startswith(tag)
                and _remove_punctuation(v[len(tag):]).strip().lower() == word):
            return v
    return f"{tag} {word}"


def _said_yes(text: str, answer_tag: str) -> bool | None:
    text = text.strip()
    if text.startswith(answer_tag):
        text = text[len(answer_tag):]
    words = _remove_punctuation(text).lower().split()
    if words and words[0] in ("yes", "no"):
        return words[0] == "yes"
    return None


def _or(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _questions(remaining: Sequence[str], lex: Lexicon) -> list[tuple[int, str]]:
    """(priority, question) options about the remaining candidates, most natural first."""
    infos = [lex.info[w.lower()] for w in remaining if w.lower() in lex.info]
    cats = sorted({i["category"] for i in infos})
    subs = sorted({i["subcategory"] for i in infos})
    hyps = sorted({h for i in infos for h in i["hypernyms"]})
    opts = [(0, f"Is it {c}?") for c in cats]
    opts += [(1, f"Is it {h}?") for h in hyps]
    opts += [(2, f"Is it {s}?") for s in subs]
    opts += [(3, f"Is it {a} or {b}?") for a, b in itertools.combinations(cats, 2)]
    opts += [(4, f"Is it {a} or {b}?") for a, b in itertools.combinations(subs, 2)]
    opts += [(5, i["property"]) for i in infos if i["property"]]
    return opts


def best_question(remaining: Sequence[str], candidates: Sequence[str], lex: Lexicon) -> str:
    """The question that splits the remaining candidates most evenly (by their predicted answers)."""
    best = None
    for priority, text in _questions(remaining, lex):
        yes = sum(lex.truth(w, text, candidates) for w in remaining)
        if 0 < yes < len(remaining):
            key = (max(yes, len(remaining) - yes), priority, text)
            best = min(best, key) if best else key
    if best:
        return best[2]
    # No known feature tells them apart: ask about half of them by name.
    return f"Is it {_or(list(remaining[:len(remaining) // 2]))}?"


def _strong_guesser(role, instance, experiment, rng: random.Random) -> PlayerFn:
    qtag, atag, gtag, max_turns = _tags(experiment)
    candidates = [str(c) for c in instance.get("candidate_list", [])]
    lex = lexicon()

    def player(messages: Sequence[Message]) -> str:
        remaining, asked = list(candidates), 0
        for i, m in enumerate(messages):
            content = str(m.get("content", "")).strip()
            if m.get("role") != "assistant" or not content.startswith(qtag):
                continue
            asked += 1
            reply = next((n["content"] for n in messages[i + 1:] if n.get("role") == "user"), None)
            yes = _said_yes(str(reply), atag) if reply is not None else None
            if yes is None:
                continue
            question = content[len(qtag):].strip()
            kept = [w for w in remaining if lex.truth(w, question, candidates) == yes]
            remaining = kept or remaining
        if not remaining:
            return f"{gtag} unknown"
        if len(remaining) == 1 or asked >= max_turns - 1:
            return f"{gtag} {remaining[0] if len(remaining) == 1 else rng.choice(remaining)}"
        return f"{qtag} {best_question(remaining, candidates, lex)}"

    return player


def _last_question(messages: Sequence[Message], qtag: str) -> str:
    last = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
    return last[last.rfind(qtag) + len(qtag):].strip() if qtag in last else last.strip()


def _strong_answerer(role, instance, experiment, rng: random.Random) -> PlayerFn:
    qtag = _tags(experiment)[0]
    target = str(instance.get("target_word", ""))
    candidates = [str(c) for c in instance.get("candidate_list", [])]
    lex = lexicon()

    def player(messages: Sequence[Message]) -> str:
        return _answer_line(experiment, lex.truth(target, _last_question(messages, qtag), candidates))

    return player


WEAK_QUESTIONS = (
    "Is it bigger than a breadbox?", "Is it something you find at home?", "Can you hold it in your hand?",
    "Is it colourful?", "Is it popular?", "Is it expensive?", "Is it old?", "Would a child know it?",
    "Is it found outdoors?", "Is it used every day?", "Is it something people like?", "Is it heavy?",
)


def _weak_guesser(role, instance, experiment, rng: random.Random) -> PlayerFn:
    qtag, _, gtag, max_turns = _tags(experiment)
    candidates = [str(c) for c in instance.get("candidate_list", [])] or ["something"]
    # How many questions it asks before guessing at random; max_turns means it never guesses.
    n_questions = rng.randint(0, max_turns)
    categories = [c["Category"] for d in ("concrete", "abstract") for c in load_dataset(d)]

    def player(messages: Sequence[Message]) -> str:
        asked = sum(1 for m in messages if m.get("role") == "assistant")
        if asked < n_questions:
            if rng.random() < 0.5:
                return f"{qtag} {rng.choice(WEAK_QUESTIONS)}"
            return f"{qtag} Is it {rng.choice(categories)}?"
        return f"{gtag} {rng.choice(candidates)}"

    return player


def _weak_answerer(role, instance, experiment, rng: random.Random) -> PlayerFn:
    def player(messages: Sequence[Message]) -> str:
        return _answer_line(experiment, rng.random() < 0.5)

    return player


def _player(kind: str):
    factories = {
        "strong": {"Guesser": _strong_guesser, "Answerer": _strong_answerer},
        "weak": {"Guesser": _weak_guesser, "Answerer": _weak_answerer},
    }[kind]

    def factory(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                rng: random.Random) -> PlayerFn:
        if role not in factories:
            raise GameError(f"{GAME_NAME}: unknown role {role!r}")
        return factories[role](role, instance, experiment, rng)

    return factory


SPEC = GameSpec(
    name=GAME_NAME,
    master=GuessWhatMaster,
    generate=generate,
    instance_key=instance_key,
    players={"strong": _player("strong"), "weak": _player("weak")},
    description="Find the target word among eight candidates by asking yes/no questions.",
)

