"""Wordle and its two variants: with a clue, and with a clue plus a critic.

Rules as clembench defines them:

* The guesser answers with two lines, ``explanation: ...`` then ``guess: <word>``. The answer must
  start with the explanation keyword, have at most two lines and name exactly one guess. A guess
  that is not a single alphabetic word, or has the wrong length, aborts the episode; a well-formed
  word that is not in the game's vocabulary is re-prompted (at most ``max_retry_per_error`` times in a
  row, then the episode aborts). Such a re-prompted answer counts as parsed, the aborting errors as
  violated.
* Each valid guess gets letter feedback ``a<green> b<yellow> c<red> ...`` (greens first, then
  yellows from left to right while the target still has unused copies of the letter). Guessing the
  target wins; the sixth wrong guess (``n_turns``) loses.
* ``wordle_withclue``: the first message carries ``clue: <clue>``.
* ``wordle_withcritic``: every guess is first shown to the critic (clue, explanation, guess), who
  answers ``explanation: ...`` / ``agreement: yes|no``; any critic error aborts. The guesser then sees
  the critic's verdict and commits a guess (possibly the same); only the committed guess is scored.
* Main Score: 0 on a loss, NaN on an abort; on success after ``n`` rounds, for ``wordle`` 100 for
  n <= 3, then 50, 30, 20 for 4, 5, 6 rounds; for the variants ``round(100 / n, 2)``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from games.core import GameError, GameMaster
from games.registry import GameSpec, split_of

RESOURCES = Path(__file__).parent / "resources" / "wordle"
SALT = "wordle"  # one salt for the whole family: a test target is never a train target of any variant

# Turn-level and episode-level metric names.
CLOSENESS_SCORE = "Closeness Score"
STRATEGY_SCORE = "Strategy Score"
GUESS_REPETITIONS = "Guess Repetitions"
CHANGE_OF_OPINION = "Change-Of-Opinion"
REPETITION_ON_AGREEMENT = "Repetition-Guesser-On-Critic-Agreement"
ADJUSTMENT_ON_AGREEMENT = "Non-Repetition-Guesser-On-Critic-Agreement"
REPETITION_ON_DISAGREEMENT = "Repetition-Guesser-On-Critic-Disagreement"
ADJUSTMENT_ON_DISAGREEMENT = "Non-Repetition-Guesser-On-Critic-Disagreement"
# Episode-level record keys (top level of the interaction record).
GUESSER_GUESSES = "Guesser Guesses"
GUESSER_EXPLANATIONS = "Guesser Explanations"
GUESSER_FEEDBACKS = "Guesser Feedbacks"
GUESSER_GUESSES_COMMITTED = "Guesser Guesses Committed"
CRITIC_JUDGEMENTS = "Critic Judgements"

# Main Score of plain wordle by the number of rounds a success took.
SPEED_SCORES = {1: 100, 2: 100, 3: 100, 4: 50, 5: 30, 6: 20}

VARIANTS = {
    # game name: (experiment-name suffix, use_clue, use_critic)
    "wordle": ("no_clue_no_critic", False, False),
    "wordle_withclue": ("clue_no_critic", True, False),
    "wordle_withcritic": ("clue_with_critic", True, True),
}
DIFFICULTIES = ("high_frequency", "medium_frequency", "low_frequency")
# Targets per experiment and split; the test split has the size of the reference benchmark.
SPLIT_SIZES = {
    "test": {"high_frequency": 10, "medium_frequency": 20},
    "validation": {"high_frequency": 10, "medium_frequency": 10, "low_frequency": 10},
    "train": {"high_frequency": None, "medium_frequency": None, "low_frequency": None},  # all
}

# ----- keywords and prompts ----------------------------------------------------------------------

ERROR_PROMPT_TEXT = {
    "INVALID_WORD_LENGTH": "Your guess must have exactly 5 letters.",
    "INVALID_WORD": "Your guess must consist of letters only.",
    "NOT_VALID_WORD_FOR_GAME": "This word is not in the list of words allowed in this game.",
    "INVALID_FORMAT": "Answer only in this format:",
    "OTHER_ERROR": "Guess an English word of five letters.",
    "OTHER_DETAILS": "Write nothing else. Try again.",
    "ERROR_RESPONSE_FORMAT": "The answer does not follow the format rules.",
    "ERROR_GAME_FORMAT": "The guess does not follow the game rules.",
    "RETRY": "Try again.",
}

LANG_KEYWORDS = {
    "max_word_length": 5,
    "clue_lang": "clue:",
    "guess_lang": "guess:",
    "guess_word_lang": "your word",
    "explanation_lang": "explanation:",
    "explanataion_details_lang": "your reason",
    "guess_feedback_lang": "guess_feedback:",
    "agreement_lang": "agreement:",
    "agreement_word_lang": "yes or no",
    "guess_agreement_lang": "guess_agreement:",
    "agreement_explanation_lang": "agreement_explanation:",
    "agreement_match_keywords_lang": ["yes", "no"],
    "error_prompt_text": ERROR_PROMPT_TEXT,
}

_FEEDBACK_HELP = (
    "After each guess you receive feedback for each of its letters: green means the letter is in the "
    "word at exactly this position, yellow means the letter is in the word but at another position, "
    "and red means the letter is not in the word (or not as often as you used it). For the guess "
    "\"stare\" it might look like this:\n"
    "guess_feedback: s<red> t<yellow> a<green> r<red> e<yellow>\n\n"
)

GUESSER_PROMPT = (
    "You are playing Wordle. Find the secret word: an English word of exactly five lowercase letters "
    "(a-z). You have six guesses.\n\n"
    "Every answer consists of exactly two lines: first \"explanation:\" with a short reason for your "
    "choice, then \"guess:\" with your word. For example:\n"
    "explanation: a frequent word with many common letters is a good start\n"
    "guess: stare\n\n"
    + _FEEDBACK_HELP
    + "Use all the feedback you have received to choose your next word, and say in your explanation "
    "how you used it.\n\n"
    "Do not write anything else.\n\n"
    "Make your first guess."
)

_CLUE_INTRO = (
    "You are playing Wordle. Find the secret word: an English word of exactly five lowercase letters "
    "(a-z). You have six guesses.\n\n"
    "Before your first guess you get a clue to the word, for example:\n"
    "clue: keeps the doctor away\n\n"
    "Every answer consists of exactly two lines: first \"explanation:\" with a short reason for your "
    "choice, then \"guess:\" with your word. For example:\n"
    "explanation: an apple a day keeps the doctor away, and apple has five letters\n"
    "guess: apple\n\n"
)

GUESSER_WITHCLUE_PROMPT = (
    _CLUE_INTRO
    + _FEEDBACK_HELP
    + "In your explanation, say how the clue and the feedback together lead to your guess.\n\n"
    "Do not write anything else.\n\n"
    "Make your first guess."
)

GUESSER_WITHCRITIC_PROMPT = (
    _CLUE_INTRO
    + "Each guess is first shown to a critic, who tells you whether they agree with it and why. "
    "Agreement does not mean the guess is right. You then give your final guess for this turn, "
    "either the same word or a new one; only the final guess is checked and counts as one of your six.\n\n"
    + _FEEDBACK_HELP
    + "Rules:\n"
    "1. Never write feedback or clues yourself.\n"
    "2. Base each guess on the clue, the critic's opinion and the feedback, and say so in your "
    "explanation.\n\n"
    "Do not write anything else.\n\n"
    "Make your first guess."
)

CRITIC_PROMPT = (
    "You are helping a player in a word-guessing game. The player must find an English word of five "
    "letters. For each attempt you see the clue to the word, the player's explanation and the "
    "proposed guess, like this:\n"
    "clue: keeps the doctor away\n"
    "explanation: an apple a day keeps the doctor away, and apple has five letters\n"
    "guess: apple\n\n"
    "Decide whether you agree with the guess, given the clue. If you disagree, the player will "
    "probably make another guess; if you agree, the player will probably keep it. As the game goes "
    "on, the player learns which letters are right; judge whether the guess still fits the clue.\n\n"
    "Answer in lowercase with exactly two lines, your reason first and your decision second:\n"
    "explanation: why you agree or disagree\n"
    "agreement: yes or no\n\n"
    "Do not propose a word yourself and do not write anything else.\n\n"
    "Here is the first attempt."
)

COMMON_CONFIG = {
    "n_turns": 6,
    "retry_error_type": ["NOT_VALID_WORD_FOR_GAME"],
    "max_retry_per_error": {"NOT_VALID_WORD_FOR_GAME": 5},
    "use_error_explanation": True,
    "supported_word_difficulty": list(DIFFICULTIES),
    "number_of_target_words": {"high_frequency": 10, "medium_frequency": 20, "low_frequency": 10},
    "max_critic_opinion_count": 1,
    "max_word_length": 5,
}

# Keywords of the oldest instance layout, which carries no keyword table of its own.
LEGACY_KEYWORDS = dict(LANG_KEYWORDS, guess_word_lang="word", explanataion_details_lang="details")


# ----- resources ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def vocabulary() -> tuple[str, ...]:
    """The game's word list (sorted): the words a guess may be."""
    data = json.loads((RESOURCES / "vocabulary.json").read_text())
    return tuple(data["words"])


@functools.lru_cache(maxsize=None)
def targets() -> dict[str, dict[str, str]]:
    """Target words by frequency band, each with a short clue."""
    return json.loads((RESOURCES / "targets.json").read_text())


# ----- letter feedback ---------------------------------------------------------------------------

def feedback_codes(guess: str, target: str) -> str:
    """One letter per position: G (green), Y (yellow), R (red).

    Greens are marked first; a yellow then uses up one copy of its letter among the target's
    letters that are not already matched, from left to right.
    """
    if guess == target:
        return "G" * len(guess)
    codes = ["R"] * len(guess)
    pool: list[str | None] = list(target)
    for i, ch in enumerate(guess):
        if i < len(pool) and pool[i] == ch:
            codes[i] = "G"
            pool[i] = None
    for i, ch in enumerate(guess):
        if codes[i] == "G":
            continue
        if ch in pool:
            codes[i] = "Y"
            pool[pool.index(ch)] = None
    return "".join(codes)


_COLOR = {"G": "green", "Y": "yellow", "R": "red"}
_CODE = {v: k for k, v in _COLOR.items()}


def letter_feedback(guess: str, target: str) -> str:
    """Feedback text, e.g. ``s<red> t<yellow> a<green> r<red> e<yellow>``."""
    return " ".join(f"{ch}<{_COLOR[c]}>" for ch, c in zip(guess, feedback_codes(guess, target)))


_FEEDBACK_TOKEN = re.compile(r"(\w)\s*<(green|yellow|red)>")


def parse_feedback(text: str) -> tuple[str, str]:
    """(word, codes) from a feedback text; ("", "") when there is none."""
    pairs = _FEEDBACK_TOKEN.findall(text)
    return "".join(p[0] for p in pairs), "".join(_CODE[p[1]] for p in pairs)


def closeness_scores(feedbacks: Sequence[str]) -> list[int]:
    """Per feedback: 5 points per green letter, 3 per yellow."""
    out = []
    for fb in feedbacks:
        score = 0
        for token in fb.split(" "):
            if "green" in token:
                score += 5
            elif "yellow" in token:
                score += 3
        out.append(score)
    return out


def strategy_scores(feedbacks: Sequence[str], aborted: bool) -> list[int]:
    """Per feedback: how well the guess used the previous feedback.

    +20 per green letter of the previous guess that is used again, +10 per yellow one, -20 per red one
    (letters counted once each). The first guess scores 0, or 100 when it was the only one and won.
    """
    if len(feedbacks) == 1:
        return [0] if aborted else [100]
    out = [0] if feedbacks else []
    for prev, nxt in zip(feedbacks, feedbacks[1:]):
        by_color: dict[str, set[str]] = {}
        for letter, color in _FEEDBACK_TOKEN.findall(prev):
            by_color.setdefault(color, set()).add(letter)
        next_letters = {letter for letter, _ in _FEEDBACK_TOKEN.findall(nxt)}
        score = -20 * len(by_color.get("red", set()) & next_letters)
        score += 20 * len(by_color.get("green", set()) & next_letters)
        score += 10 * len(by_color.get("yellow", set()) & next_letters)
        out.append(score)
    return out


# ----- experiment configuration --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WordleConfig:
    """The settings of one experiment, whichever instance layout it came in."""

    words: dict
    vocabulary: frozenset
    word_list: tuple  # the vocabulary in a fixed order (for players)
    word_length: int
    max_rounds: int
    max_retry: int
    guesser_prompt: str
    critic_prompt: str
    legacy: bool


def _prompt_text(value: Any, what: str) -> str | None:
    """A prompt given as text, or (older layout) as a list of chat messages."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], Mapping) \
            and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    raise GameError(f"wordle: experiment field {what!r} must be a text or a list of messages")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GameError(f"wordle: {what} must be a non-negative integer, got {value!r}")
    return value


def _word_list(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
        raise GameError(f"wordle: {what} must be a list of words")
    return tuple(sorted({w.strip().lower() for w in value if w.strip()}))


def resolve_config(experiment: Mapping[str, Any], game: str) -> WordleConfig:
    """Reads an experiment config of the current or the older (pre-keyword-table) layout.

    Missing settings fall back to this module's defaults, so that a bare instance plays too.
    """
    if not isinstance(experiment, Mapping):
        raise GameError("wordle: the experiment config must be an object")
    _, use_clue, use_critic = VARIANTS[game]
    common = experiment.get("common_config") or {}
    if not isinstance(common, Mapping):
        raise GameError("wordle: 'common_config' must be an object")
    lang = experiment.get("lang_keywords")
    legacy = lang is None and ("english_words" in experiment or isinstance(experiment.get("guesser_prompt"),
                                                                          list))
    if lang is None:
        words = json.loads(json.dumps(LEGACY_KEYWORDS if legacy else LANG_KEYWORDS))
    elif isinstance(lang, Mapping):
        words = {**LANG_KEYWORDS, **lang}
        errors = lang.get("error_prompt_text")
        if errors is not None and not isinstance(errors, Mapping):
            raise GameError("wordle: 'lang_keywords.error_prompt_text' must be an object")
        words["error_prompt_text"] = {**ERROR_PROMPT_TEXT, **(errors or {})}
    else:
        raise GameError("wordle: 'lang_keywords' must be an object")
    for key in ("clue_lang", "guess_lang", "explanation_lang", "guess_feedback_lang", "agreement_lang",
                "guess_agreement_lang", "agreement_explanation_lang", "guess_word_lang",
                "explanataion_details_lang", "agreement_word_lang"):
        if not isinstance(words.get(key), str) or (key.endswith("_lang") and not words[key].strip()):
            raise GameError(f"wordle: keyword {key!r} must be a non-empty text")
    agree = words.get("agreement_match_keywords_lang")
    if not isinstance(agree, list) or not all(isinstance(a, str) for a in agree):
        raise GameError("wordle: 'agreement_match_keywords_lang' must be a list of words")

    if isinstance(lang, Mapping) and "official_words_list" in lang:
        word_list = _word_list(lang["official_words_list"], "lang_keywords.official_words_list")
    elif "english_words" in experiment:
        word_list = _word_list(experiment["english_words"], "english_words")
    else:
        word_list = vocabulary()
    length = words.get("max_word_length", common.get("max_word_length", 5))
    length = _positive_int(length, "max_word_length")

    max_rounds = common.get("n_turns") or common.get("max_attempts_per_game") or 6
    max_rounds = _positive_int(max_rounds, "n_turns")
    retry = common.get("max_retry_per_error", 5)
    if isinstance(retry, Mapping):
        retry = retry.get("NOT_VALID_WORD_FOR_GAME", 5)
    retry = _positive_int(retry, "max_retry_per_error")

    default_guesser = (GUESSER_WITHCRITIC_PROMPT if use_critic else
                       GUESSER_WITHCLUE_PROMPT if use_clue else GUESSER_PROMPT)
    guesser_prompt = _prompt_text(experiment.get("guesser_prompt"), "guesser_prompt") or default_guesser
    critic_prompt = ""
    if use_critic:
        critic_prompt = _prompt_text(experiment.get("guesser_critic_prompt"), "guesser_critic_prompt") \
            or CRITIC_PROMPT
    return WordleConfig(words=words, vocabulary=frozenset(word_list), word_list=word_list,
                        word_length=length, max_rounds=max_rounds, max_retry=retry,
                        guesser_prompt=guesser_prompt, critic_prompt=critic_prompt, legacy=legacy)


# ----- parsing answers ---------------------------------------------------------------------------

class _AnswerError(Exception):
    """A guesser or critic answer that breaks the rules; `key` names the error kind."""

    def __init__(self, reason: str, key: str):
        super().__init__(reason)
        self.reason = reason
        self.key = key


def parse_answer(response: str, words: Mapping[str, Any], content_prefix: str,
                 legacy: bool = False) -> tuple[str, str]:
    """(content, explanation) of a two-line answer; raises _AnswerError on a format error.

    The answer must start with the explanation keyword (older layouts asked for the content line
    first, so there either order is accepted), have at most two lines and contain the content
    keyword exactly once (case-insensitive).
    """
    expl_kw = words["explanation_lang"]
    starts = (expl_kw, content_prefix) if legacy else (expl_kw,)
    if not response or not response.startswith(starts):
        raise _AnswerError(f"The response should always start with the keyword '{expl_kw}'",
                           "INVALID_START_WORD")
    response = response.strip()
    if len(response.split("\n")) > 2:
        raise _AnswerError(f"The response should contain only the '{content_prefix}' and '{expl_kw}' "
                           "keywords and associated information.", "UNKNOWN_TAGS")
    explanation = re.search(rf"{re.escape(expl_kw)}([^\n]*)", response, re.IGNORECASE)
    contents = re.findall(rf"{re.escape(content_prefix)}([^\n]*)", response, re.IGNORECASE)
    if len(contents) != 1:
        raise _AnswerError(f"The response should contain the '{content_prefix}' keyword exactly once.",
                           "MORE_THAN_ONE_GUESS")
    return contents[0].strip().lower(), (explanation.group(1).strip() if explanation else "")


def validate_guess(guess: str, cfg: WordleConfig, target: str) -> None:
    if not guess.isalpha() or " " in guess:
        raise _AnswerError("The guess should be a single word and should only contain letters.",
                           "INVALID_FORMAT")
    if len(guess) != cfg.word_length:
        raise _AnswerError(f"The length of the guessed word is not {cfg.word_length}.",
                           "INVALID_WORD_LENGTH")
    if guess not in cfg.vocabulary and guess != target:
        raise _AnswerError("The guessed word is not a valid word for this game.", "NOT_VALID_WORD_FOR_GAME")


def validate_agreement(agreement: str, words: Mapping[str, Any]) -> None:
    if not agreement.isalpha() or " " in agreement:
        raise _AnswerError("The agreement should be a single word and should only contain letters.",
                           "INVALID_FORMAT")
    if agreement not in words["agreement_match_keywords_lang"]:
        raise _AnswerError(f"The agreement should be one of the following: "
                           f"{words['agreement_match_keywords_lang']}", "NOT_VALID_CRITIC_WORD")


# ----- game masters ------------------------------------------------------------------------------

class WordleMaster(GameMaster):
    """Plain Wordle: one guesser, six guesses, letter feedback."""

    game_name = "wordle"
    roles = ("Guesser",)

    def setup(self) -> None:
        self.cfg = resolve_config(self.experiment, self.game_name)
        _, self.use_clue, self.use_critic = VARIANTS[self.game_name]
        target = self.instance.get("target_word")
        if not isinstance(target, str) or not target.strip():
            raise GameError(f"{self.game_name}: instance {self.instance.get('game_id')!r} needs a "
                            "'target_word' text")
        self.target = target.strip().lower()
        if not self.target.isalpha() or len(self.target) != self.cfg.word_length:
            raise GameError(f"{self.game_name}: target word {self.target!r} is not a word of "
                            f"{self.cfg.word_length} letters")
        clue = self.instance.get("target_word_clue")
        if self.use_clue and (not isinstance(clue, str) or not clue.strip()):
            raise GameError(f"{self.game_name}: instance {self.instance.get('game_id')!r} needs a "
                            "'target_word_clue' text")
        self.clue = clue.strip() if isinstance(clue, str) else ""
        self.aborted = False
        self.success = False
        self.failure = False
        self.guesses: list[str] = []  # committed guesses (with a critic: initial and committed, in turn)
        self.explanations: list[str] = []
        self.feedbacks: list[str] = []
        self.judgements: list[str] = []
        self._critic_asked = False
        self._record: dict[str, Any] = {}

    # ----- message texts -----
    def _format_hint(self) -> str:
        w = self.cfg.words
        return (f"{w['error_prompt_text']['INVALID_FORMAT']}\n"
                f"{w['explanation_lang']} {w['explanataion_details_lang']}\n"
                f"{w['guess_lang']} {w['guess_word_lang']}")

    def _reprompt(self, key: str) -> str:
        errors = self.cfg.words["error_prompt_text"]
        return f"{errors.get(key, key)} {errors['RETRY']}\n\n{self._format_hint()}"

    def _first_message(self) -> str:
        if self.use_clue:
            return f"{self.cfg.guesser_prompt}\n\n{self.cfg.words['clue_lang']} {self.clue}"
        return self.cfg.guesser_prompt

    # ----- rules -----
    def _abort(self) -> None:
        self.log_to_self("invalid format", "game_result = ABORT")
        self.aborted = True

    def _ask_guess(self, content: str):
        """Asks the guesser until it gives a valid guess; (guess, explanation) or None on abort."""
        attempts = 0
        while True:
            reply = yield from self.ask(0, content)
            try:
                guess, explanation = parse_answer(reply, self.cfg.words, self.cfg.words["guess_lang"],
                                                  self.cfg.legacy)
                validate_guess(guess, self.cfg, self.target)
            except _AnswerError as e:
                self.log_to_self("metadata", f"Error: {e.reason}")
                if e.key == "NOT_VALID_WORD_FOR_GAME":
                    self.count_parsed()
                    attempts += 1
                    if attempts > self.cfg.max_retry:
                        self._abort()
                        return None
                    content = self._reprompt(e.key)
                    continue
                self.count_violated()
                self._abort()
                return None
            self.count_parsed()
            return guess, explanation

    def _commit(self, guess: str, explanation: str) -> str | None:
        """Scores a committed guess; returns the next message for the guesser, or None at the end."""
        feedback = letter_feedback(guess, self.target)
        stats = {"attempts": self.current_round + 1, "target_word": self.target}
        if self.use_clue:
            stats["target_word_clue"] = self.clue
        stats.update(guess=guess, guess_feedback=feedback)
        self.log_to_self("metadata", "\n".join(f"{k} = {v}" for k, v in stats.items()))
        self.feedbacks.append(feedback)
        self.guesses.append(guess)
        self.explanations.append(explanation)
        if guess == self.target:
            self.log_to_self("correct guess", "game_result = WIN")
            self.success = True
            return None
        if self.current_round + 1 >= self.cfg.max_rounds:
            self.log_to_self("max rounds played", "game_result = LOSS")
            self.failure = True
            return None
        return f"{self.cfg.words['guess_feedback_lang']} {feedback}\n\n{self._format_hint()}"

    def _critic_round(self, guess: str, explanation: str):
        """Overridden by the critic variant: returns the committed (guess, explanation) or None."""
        return (guess, explanation)
        yield  # pragma: no cover  (makes this a generator)

    def play(self):
        content = self._first_message()
        while True:
            answer = yield from self._ask_guess(content)
            if answer is None:
                return
            answer = yield from self._critic_round(*answer)
            if answer is None:
                return
            content = self._commit(*answer)
            if content is None:
                return
            self.next_round()

    # ----- scores -----
    def _main_score(self) -> float:
        rounds = len(self.turns)
        if self.game_name == "wordle":
            return SPEED_SCORES.get(rounds, 0)
        return round(100 / rounds, 2)

    def _scored_guesses(self) -> list[str]:
        return self.guesses

    def compute_scores(self) -> None:
        score = self._main_score() if self.success else 0
        self.set_outcome(aborted=self.aborted, success=self.success, score=score)
        self.log_request_turn_scores()
        if not self.feedbacks:
            self.log_turn_score(0, CLOSENESS_SCORE, math.nan)
            self.log_turn_score(0, STRATEGY_SCORE, math.nan)
        for i, s in enumerate(closeness_scores(self.feedbacks)):
            self.log_turn_score(i, CLOSENESS_SCORE, s)
        for i, s in enumerate(strategy_scores(self.feedbacks, self.aborted)):
            self.log_turn_score(i, STRATEGY_SCORE, s)
        guesses = self._scored_guesses()
        self.episode_scores[GUESS_REPETITIONS] = (math.nan if self.aborted
                                                  else len(guesses) - len(set(guesses)))
        self._record = {
            "Aborted": int(self.aborted), "Lose": int(self.failure), "Success": int(self.success),
            "Request Count": sum(self.request_counts),
            "Parsed Request Count": sum(self.parsed_counts),
            "Violated Request Count": sum(self.violated_counts),
            GUESSER_GUESSES: list(self.guesses),
            GUESSER_FEEDBACKS: list(self.feedbacks),
            GUESSER_EXPLANATIONS: list(self.explanations),
        }

    def interactions(self, experiment_name: str = "", game_id: Any = None) -> dict:
        record = super().interactions(experiment_name, game_id)
        record.update(self._record)
        return record


class WordleWithClueMaster(WordleMaster):
    """Wordle where the guesser gets a clue to the target first."""

    game_name = "wordle_withclue"


class WordleWithCriticMaster(WordleMaster):
    """Wordle with a clue, where a critic comments on each guess before the guesser commits it."""

    game_name = "wordle_withcritic"
    roles = ("Guesser", "Critic")

    def setup(self) -> None:
        super().setup()
        self.initial_guesses: list[str] = []

    def _critic_round(self, guess: str, explanation: str):
        w = self.cfg.words
        self.initial_guesses.append(guess)
        content = (f"{w['clue_lang']} {self.clue}\n{w['explanation_lang']} {explanation}\n"
                   f"{w['guess_lang']} {guess}")
        if self.current_round > 0:
            content += (f"\n\n{w['error_prompt_text']['INVALID_FORMAT']}\n"
                        f"{w['explanation_lang']} {w['explanataion_details_lang']}\n"
                        f"{w['agreement_lang']} {w['agreement_word_lang']}")
        if not self._critic_asked:
            content = f"{self.cfg.critic_prompt}\n\n{content}"
            self._critic_asked = True
        reply = yield from self.ask(1, content)
        try:
            agreement, reason = parse_answer(reply, w, w["agreement_lang"], self.cfg.legacy)
            validate_agreement(agreement, w)
        except _AnswerError as e:
            self.count_violated()
            self.log_to_self("metadata", e.reason)
            self._abort()
            return None
        self.count_parsed()
        self.judgements.append(agreement)
        content = (f"{w['clue_lang']} {self.clue}\n{w['guess_agreement_lang']} {agreement}\n"
                   f"{w['agreement_explanation_lang']} {reason}\n\n{self._format_hint()}")
        return (yield from self._ask_guess(content))

    def compute_scores(self) -> None:
        super().compute_scores()
        committed = self.guesses
        totals = {"yes": [0, 0], "no": [0, 0]}  # [kept, changed]
        changes = []
        for initial, final, verdict in zip(self.initial_guesses, committed, self.judgements):
            changed = int(initial != final)
            changes.append(changed)
            totals["yes" if verdict == "yes" else "no"][changed] += 1
        for i, change in enumerate(changes):
            self.log_turn_score(i, CHANGE_OF_OPINION, change)
        ratios = {}
        for verdict, (rep_key, adj_key) in {"yes": (REPETITION_ON_AGREEMENT, ADJUSTMENT_ON_AGREEMENT),
                                            "no": (REPETITION_ON_DISAGREEMENT,
                                                   ADJUSTMENT_ON_DISAGREEMENT)}.items():
            kept, changed = totals[verdict]
            if not changes:
                ratios[rep_key] = ratios[adj_key] = math.nan
            elif kept + changed == 0:
                ratios[rep_key] = ratios[adj_key] = 0
            else:
                ratios[rep_key] = round(kept / (kept + changed), 2)
                ratios[adj_key] = round(changed / (kept + changed), 2)
        self.episode_scores.update(ratios)
        self._record[GUESSER_GUESSES] = list(self.initial_guesses)
        self._record[GUESSER_GUESSES_COMMITTED] = list(committed)
        self._record[CRITIC_JUDGEMENTS] = list(self.judgements)


# ----- instances ---------------------------------------------------------------------------------

def _experiment(game: str, difficulty: str) -> dict:
    suffix, use_clue, use_critic = VARIANTS[game]
    lang = dict(LANG_KEYWORDS, error_prompt_text=dict(ERROR_PROMPT_TEXT),
                official_words_list=list(vocabulary()))
    return {
        "name": f"{difficulty}_words_{suffix}",
        "common_config": json.loads(json.dumps(COMMON_CONFIG)),
        "use_clue": use_clue,
        "use_critic": use_critic,
        "guesser_prompt": (GUESSER_WITHCRITIC_PROMPT if use_critic else
                           GUESSER_WITHCLUE_PROMPT if use_clue else GUESSER_PROMPT),
        "guesser_critic_prompt": CRITIC_PROMPT if use_critic else "",
        "lang_keywords": lang,
        "game_instances": [],
    }


def _generator(game: str):
    def generate(split: str, seed: int = 0) -> dict:
        if split not in SPLIT_SIZES:
            raise GameError(f"{game}: unknown split {split!r}")
        experiments = []
        for difficulty, size in SPLIT_SIZES[split].items():
            pool = sorted(w for w in targets()[difficulty] if split_of(w, salt=SALT) == split)
            # The same seed picks the same targets for all three variants.
            rng = random.Random(f"{SALT}/{split}/{seed}/{difficulty}")
            chosen = rng.sample(pool, k=len(pool) if size is None else min(size, len(pool)))
            exp = _experiment(game, difficulty)
            for i, word in enumerate(chosen):
                exp["game_instances"].append({
                    "game_id": i + 1,
                    "target_word": word,
                    "target_word_clue": targets()[difficulty][word],
                    "target_word_difficulty": difficulty,
                })
            experiments.append(exp)
        return {"experiments": experiments}
    return generate


def instance_key(instance: Mapping[str, Any]) -> str:
    return str(instance.get("target_word", "")).strip().lower()


def normalize(instance: Mapping[str, Any], experiment: Mapping[str, Any]) -> dict:
    """Brings an instance of any published layout into the current one.

    Instances of all layouts carry the same fields; older ones may leave out the difficulty, which
    the experiment name tells. The older experiment configs (word list under ``english_words``,
    prompts as message lists, ``max_attempts_per_game``, an integer ``max_retry_per_error``) are
    read by `resolve_config`, since an instance cannot carry its experiment's settings.
    """
    out = dict(instance)
    if isinstance(out.get("target_word"), str):
        out["target_word"] = out["target_word"].strip().lower()
    if isinstance(out.get("target_word_clue"), str):
        out["target_word_clue"] = out["target_word_clue"].strip()
    if "target_word_difficulty" not in out:
        name = str(experiment.get("name", ""))
        for difficulty in DIFFICULTIES:
            if name.startswith(difficulty):
                out["target_word_difficulty"] = difficulty
    return out


# ----- programmatic players ----------------------------------------------------------------------

OPENERS = ("slate", "crane", "trace", "crate", "stare", "raise", "arose", "least", "irate", "later")


def _clean_line(text: str) -> str:
    """One line of free text that cannot be mistaken for a keyword."""
    return re.sub(r"[:\n\r]+", " ", text).strip()


def _last_keyword_line(text: str, keyword: str) -> str | None:
    """The value of the last line of `text` that starts with `keyword`."""
    found = re.findall(rf"^\s*{re.escape(keyword)}([^\n]*)", text, re.IGNORECASE | re.MULTILINE)
    return found[-1].strip().lower() if found else None


def _consistent(word: str, history: Sequence[tuple[str, str]]) -> bool:
    return all(feedback_codes(g, word) == codes for g, codes in history)


def _describe(history: Sequence[tuple[str, str]]) -> str:
    greens, yellows, reds = {}, set(), set()
    for g, codes in history:
        for i, (ch, c) in enumerate(zip(g, codes)):
            if c == "G":
                greens[i] = ch
            elif c == "Y":
                yellows.add(ch)
    for g, codes in history:
        for ch, c in zip(g, codes):
            if c == "R" and ch not in greens.values() and ch not in yellows:
                reds.add(ch)
    parts = []
    if greens:
        parts.append("the feedback fixes " + ", ".join(f"{ch} at position {i + 1}"
                                                        for i, ch in sorted(greens.items())))
    yellows -= set(greens.values())
    if yellows:
        parts.append(f"{', '.join(sorted(yellows))} must appear in other places")
    if reds:
        parts.append(f"{', '.join(sorted(reds))} are ruled out")
    return "; ".join(parts) if parts else "the feedback gave no matching letters"


class _Solver:
    """Consistent-candidate Wordle solver over the game's vocabulary; it also knows the target."""

    def __init__(self, instance, experiment, game, rng: random.Random):
        self.cfg = resolve_config(experiment, game)
        self.game = game
        _, self.use_clue, self.use_critic = VARIANTS[game]
        self.target = str(instance.get("target_word", "")).strip().lower()
        self.clue = _clean_line(str(instance.get("target_word_clue", "")))
        n = self.cfg.word_length
        words = [w for w in self.cfg.word_list if len(w) == n and w.isalpha()]
        if self.target and self.target not in self.cfg.vocabulary:
            words.append(self.target)
        self.words = sorted(set(words))
        self.rng = rng
        openers = [w for w in OPENERS if w in self.cfg.vocabulary]
        self.opener = rng.choice(openers) if openers else None
        # With a clue, how soon the solver trusts it: right away in most episodes.
        self.clue_first = self.use_clue and rng.random() < 0.7

    def history(self, messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
        kw = self.cfg.words["guess_feedback_lang"]
        hist = []
        for m in list(messages)[1:]:  # the first message is the rules, with an example
            if m.get("role") != "user":
                continue
            for line in re.findall(rf"{re.escape(kw)}([^\n]*)", str(m.get("content", ""))):
                word, codes = parse_feedback(line)
                if len(word) == self.cfg.word_length and word.isalpha():
                    hist.append((word.lower(), codes))
        return hist

    def own_guesses(self, messages) -> list[str]:
        out = []
        for m in messages:
            if m.get("role") == "assistant":
                g = _last_keyword_line(str(m.get("content", "")), self.cfg.words["guess_lang"])
                if g:
                    out.append(g)
        return out

    def _best(self, candidates: Sequence[str]) -> str:
        freq: dict[str, int] = {}
        for w in candidates:
            for ch in set(w):
                freq[ch] = freq.get(ch, 0) + 1
        return max(candidates, key=lambda w: (sum(freq[ch] for ch in set(w)), w))

    def choose(self, messages, exclude=()) -> tuple[str, str]:
        hist = self.history(messages)
        n = len(hist) + 1
        candidates = self.words
        for g, codes in hist:
            candidates = [w for w in candidates if feedback_codes(g, w) == codes]
        candidates = [w for w in candidates if w not in exclude] or ([self.target] if self.target else [])
        if not candidates:
            candidates = self.words[:1] or ["apple"]
        if n == 1:
            if self.clue_first and self.target not in exclude:
                return self.target, (f"the clue '{self.clue}' points to {self.target}, "
                                     f"which has {len(self.target)} letters")
            word = self.opener if self.opener and self.opener not in exclude else self._best(candidates)
            return word, f"{word} has frequent letters, a good first word to learn which ones are in"
        limit = math.inf if (self.use_clue or n >= 4) else (2 if n == 2 else 30)
        if self.target in candidates and len(candidates) <= limit:
            word = self.target
        else:
            word = self._best(candidates)
        reason = _describe(hist)
        if self.use_clue and word == self.target:
            reason += f"; together with the clue '{self.clue}' this points to {word}"
        else:
            left = len(candidates)
            reason += f"; {word} fits all of it ({left} word{'s' if left != 1 else ''} still fit)"
        return word, reason

    def answer(self, word: str, reason: str) -> str:
        w = self.cfg.words
        return f"{w['explanation_lang']} {_clean_line(reason)}\n{w['guess_lang']} {word}"


def _critic_phase(messages, solver: _Solver) -> str | None:
    """The critic's verdict if the last message to the guesser is one, else None."""
    if not solver.use_critic or not messages:
        return None
    last = str(messages[-1].get("content", ""))
    if messages[-1].get("role") != "user" or solver.cfg.words["guess_agreement_lang"] not in last:
        return None
    return _last_keyword_line(last, solver.cfg.words["guess_agreement_lang"]) or ""


def _strong_guesser(game: str, instance, experiment, rng):
    solver = _Solver(instance, experiment, game, rng)

    def player(messages: Sequence[Mapping[str, Any]]) -> str:
        verdict = _critic_phase(messages, solver)
        mine = solver.own_guesses(messages)
        if verdict is not None and mine:
            last = mine[-1]
            if verdict.startswith("yes") or last == solver.target:
                why = "the critic agrees" if verdict.startswith("yes") else "I trust the letters so far"
                return solver.answer(last, f"{why}, so I keep {last}")
            word, reason = solver.choose(messages, exclude={last})
            return solver.answer(word, f"the critic disagrees with {last}; {reason}")
        exclude = {g for g in mine if g != solver.target and g not in solver.cfg.vocabulary}
        return solver.answer(*solver.choose(messages, exclude=exclude))

    return player


def _strong_critic(game: str, instance, experiment, rng):
    cfg = resolve_config(experiment, game)
    target = str(instance.get("target_word", "")).strip().lower()
    w = cfg.words

    def player(messages: Sequence[Mapping[str, Any]]) -> str:
        shown = [_last_keyword_line(str(m.get("content", "")), w["guess_lang"])
                 for m in messages if m.get("role") == "user"]
        shown = [g for g in shown if g]
        guess = shown[-1] if shown else ""
        history = [(g, feedback_codes(g, target)) for g in shown[:-1]
                   if len(g) == len(target) and g.isalpha()]
        if len(guess) == len(target) and guess.isalpha() and (guess == target or _consistent(guess,
                                                                                           history)):
            reason = f"{guess} fits the clue and every letter hint so far"
            verdict = "yes"
        else:
            reason = f"{guess or 'this'} does not fit the clue together with the letters found so far"
            verdict = "no"
        return f"{w['explanation_lang']} {reason}\n{w['agreement_lang']} {verdict}"

    return player


def _weak_guesser(game: str, instance, experiment, rng):
    cfg = resolve_config(experiment, game)
    words = [x for x in cfg.word_list if len(x) == cfg.word_length] or ["apple"]
    w = cfg.words

    def player(messages: Sequence[Mapping[str, Any]]) -> str:
        word = rng.choice(words)
        return f"{w['explanation_lang']} I pick a word I like\n{w['guess_lang']} {word}"

    return player


def _weak_critic(game: str, instance, experiment, rng):
    w = resolve_config(experiment, game).words

    def player(messages: Sequence[Mapping[str, Any]]) -> str:
        verdict = rng.choice(["yes", "no"])
        return f"{w['explanation_lang']} just a feeling\n{w['agreement_lang']} {verdict}"

    return player


def _factory(game: str, guesser, critic):
    def make(role: str, instance, experiment, rng: random.Random):
        if role == "Critic":
            return critic(game, instance, experiment, rng)
        return guesser(game, instance, experiment, rng)
    return make


def _spec(game: str, master: type[WordleMaster], description: str) -> GameSpec:
    return GameSpec(
        name=game,
        master=master,
        generate=_generator(game),
        instance_key=instance_key,
        players={"strong": _factory(game, _strong_guesser, _strong_critic),
                 "weak": _factory(game, _weak_guesser, _weak_critic)},
        description=description,
        normalize=normalize,
    )


SPECS = [
    _spec("wordle", WordleMaster, "Wordle: guess a five-letter word in six tries from letter feedback."),
    _spec("wordle_withclue", WordleWithClueMaster, "Wordle with a clue to the target word."),
    _spec("wordle_withcritic", WordleWithCriticMaster,
          "Wordle with a clue and a critic who comments on each guess before it is committed."),
]

__all__ = ["SPECS", "WordleMaster", "WordleWithClueMaster", "WordleWithCriticMaster", "letter_feedback",
           "feedback_codes", "resolve_config", "normalize", "instance_key"]
