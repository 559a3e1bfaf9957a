"""Codenames: a cluegiver and a guesser play one team against a scripted opponent.

Rules as clembench defines them. The board holds words assigned to the team, to the opponent, to
nobody ("innocent", shown to the cluegiver as distractors) and kill words ("assassin"). Each round:

1. The cluegiver, who sees all assignments, answers on two lines
       CLUE: <one word>
       TARGETS: <comma-separated board words the clue is meant for>
   The number of targets is how many guesses the guesser may make.
2. The guesser, who sees the clue, that number and the hidden words, answers
       GUESS: <comma-separated board words>
   Guesses are revealed in order; the guessing turn ends after the first word that is not a team
   word (the remaining guesses are ignored).
3. If the game goes on, the opponent reveals `opponent difficulty` of its own words.

The team wins when all team words are revealed; it loses when all opponent words are revealed or
when it reveals a kill word. Checks run in that order after the guesser's turn and again after the
opponent's move.

A reply that breaks the format or the rules (see `_validate_clue` / `_validate_guess`) is logged as
a "validation error"; it aborts the episode unless the experiment's "REPROMPT ON ERROR" flag lets the
player try again (at most twice per round). The other flags ("STRIP WORDS", "IGNORE RAMBLING",
"IGNORE FALSE TARGETS OR GUESSES", "IGNORE NUMBER OF TARGETS") tolerate the corresponding slips.
The strict setting (only "STRIP WORDS") is the default. Replies are stripped of surrounding
whitespace first, as model backends deliver them.

Main Score: 100 for a win, 0 for a loss, NaN when aborted. Turn scores (per round) and episode
scores (averages, recall, efficiency, ...) follow clembench's names.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import random
import re
import string
from pathlib import Path
from string import Template
from typing import Any, Callable, Hashable, Mapping, Sequence

from games.core import (
    METRIC_REQUEST_SUCCESS_RATIO,
    GameError,
    GameMaster,
    PlayerFn,
)
from games.registry import GameSpec, split_of

GAME = "codenames"
RESOURCES = Path(__file__).parent / "resources" / GAME

TEAM, OPPONENT, INNOCENT, ASSASSIN = "team", "opponent", "innocent", "assassin"
ASSIGNMENTS = (TEAM, OPPONENT, INNOCENT, ASSASSIN)
HIDDEN, REVEALED, TARGET, TOTAL, TARGETED = "hidden", "revealed", "target", "total", "targeted"
CLUEGIVER, GUESSER = "Cluegiver", "Guesser"

MAX_RETRIES = 2
CHARS_TO_STRIP = " .,<>\"'"
NUMBERS_TO_STRIP = " ," + string.digits
EXPECTED_WORDS_PER_TURN = 2
CLUE_PREFIX = "CLUE: "
TARGETS_PREFIX = "TARGETS: "
GUESS_PREFIX = "GUESS: "

FLAG_RAMBLING = "IGNORE RAMBLING"
FLAG_FALSE = "IGNORE FALSE TARGETS OR GUESSES"
FLAG_REPROMPT = "REPROMPT ON ERROR"
FLAG_STRIP = "STRIP WORDS"
FLAG_NUMBER = "IGNORE NUMBER OF TARGETS"
FLAGS = (FLAG_RAMBLING, FLAG_FALSE, FLAG_REPROMPT, FLAG_STRIP, FLAG_NUMBER)
STRICT_FLAGS = {flag: flag == FLAG_STRIP for flag in FLAGS}
GENEROUS_FLAGS = {flag: True for flag in FLAGS}

# GM -> GM event types of the interaction log.
EV_VALIDATION_ERROR = "validation error"
EV_CLUE = "clue"
EV_TARGETS = "targets"
EV_GUESSES = "guesses"
EV_TEAM_REVEALED = "team revealed"
EV_OPPONENT_REVEALED = "opponent revealed"
EV_TARGET_REVEALED = "target revealed"
EV_WORD_TARGETED = "word targeted"
EV_TURN_END = "turn end after"
EV_BOARD_STATUS = "board status"
EV_GAME_END = "game end"

# Validation error types.
ERR_RAMBLING = "rambling error"
ERR_PREFIX = "prefix error"
ERR_RELATED_CLUE = "clue is morphologically related to word on the board"
ERR_CLUE_SPACES = "clue contains spaces"
ERR_CLUE_CHARS = "clue contains non-alphabetical characters"
ERR_GUESS_CHARS = "guess contains non-alphabetical characters"
ERR_CLUE_NUMBER = "clue line contains the number of targets"
ERR_CLUE_ON_BOARD = "clue is word on board"
ERR_NO_CORRECT_TARGET = "no correct target"
ERR_REPEATED_TARGET = "target was already guessed"
ERR_DOUBLE_TARGET = "target appears more than once in utterance"
ERR_HALLUCINATED_TARGET = "target is hallucination"
ERR_WRONG_NUMBER = "wrong number of guesses"
ERR_GUESS_IS_CLUE = "guess is clue word"
ERR_REPEATED_GUESS = "guess was already guessed"
ERR_DOUBLE_GUESS = "guess appears more than once in utterance"
ERR_HALLUCINATED_GUESS = "guess word is hallucination"
ERR_NO_CORRECT_GUESS = "no correct guess"

# Turn scores (per round), in the order they are logged.
CLUEGIVER_NUMBER_OF_TARGETS = "Cluegiver Number of Targets"
CLUEGIVER_TEAM_PRECISION = "Cluegiver Team Precision"
CLUEGIVER_TEAM_RECALL = "Cluegiver Team Recall"
CLUEGIVER_TEAM_F1 = "Cluegiver Team F1"
GUESSER_NUMBER_OF_GUESSES = "Guesser Number of Guesses"
GUESSER_NUMBER_OF_REVEALED_WORDS = "Guesser Number of Revealed Words"
GUESSER_NUMBER_OF_UNREVEALED_GUESSES = "Guesser Number of Unrevealed Guesses"
GUESSER_TARGET_PRECISION = "Guesser Target Precision"
GUESSER_TARGET_RECALL = "Guesser Target Recall"
GUESSER_TARGET_F1 = "Guesser Target F1"
GUESSER_TEAM_PRECISION = "Guesser Team Precision"
GUESSER_TEAM_RECALL = "Guesser Team Recall"
GUESSER_TEAM_F1 = "Guesser Team F1"
TURN_SCORES = (
    CLUEGIVER_NUMBER_OF_TARGETS, CLUEGIVER_TEAM_PRECISION, CLUEGIVER_TEAM_RECALL, CLUEGIVER_TEAM_F1,
    GUESSER_NUMBER_OF_GUESSES, GUESSER_NUMBER_OF_REVEALED_WORDS, GUESSER_NUMBER_OF_UNREVEALED_GUESSES,
    GUESSER_TARGET_PRECISION, GUESSER_TARGET_RECALL, GUESSER_TARGET_F1,
    GUESSER_TEAM_PRECISION, GUESSER_TEAM_RECALL, GUESSER_TEAM_F1,
)
CLUEGIVER_VALIDATION_ERRORS = f"{CLUEGIVER} {EV_VALIDATION_ERROR}"
GUESSER_VALIDATION_ERRORS = f"{GUESSER} {EV_VALIDATION_ERROR}"

# Episode scores.
EFFICIENCY = "Efficiency"
EPISODE_RECALL = "Episode Recall"
EPISODE_NEGATIVE_RECALL = "Episode Negative Recall"
NUMBER_OF_TURNS = "Number of turns"
GAME_ENDED_THROUGH_ASSASSIN = "Game ended through assassin"
EXPERIMENT_VARIABLE = "experiment variable"
EXPERIMENT_NAME = "experiment name"

# Experiment config keys.
OPPONENT_DIFFICULTY = "opponent difficulty"
PROMPT_KEYS = ("initial_prompt_cluegiver", "initial_prompt_guesser",
               "intermittent_prompt_cluegiver", "intermittent_prompt_guesser")

# ----------------------------------------------------------------------------------------------
# Prompts (templates with $team_words, $opponent_words, $innocent_words, $assassin_words for the
# cluegiver and $board, $clue, $number for the guesser).

INITIAL_PROMPT_CLUEGIVER = """\
You are the clue giver of a team in a word association game. Think of one single-word clue that \
points to one or more of your team's words in the lists below; your partner then has to pick those \
words from the board using only your clue and the number of words it is meant for.
Your team wins as soon as all of its words have been found. The other team uncovers some of its own \
words after each of your turns, and if all of theirs are uncovered first, your team loses. If your \
partner picks an opponent word or a distractor word, their turn is over at once; if they pick a kill \
word, your team loses immediately.
A clue that covers many words gets you to the goal faster but is harder to read, so choose with care. \
The clue must be related to the target words in meaning; it must not be one of the listed words, \
contain one of them, or be a form of one of them.

Answer exactly in this form and write nothing else:

CLUE: <WORD>
TARGETS: <TARGETS>

where <TARGETS> is the comma-separated list of the words your clue is meant for.

Your team words are: $team_words.
Your opponent's team words are: $opponent_words.
Distractor words are: $innocent_words.
The kill words are: $assassin_words."""

INTERMITTENT_PROMPT_CLUEGIVER = """\
Now give a new clue for some of your team words that are still hidden, in the same form: one line \
beginning with 'CLUE: ' and one line beginning with 'TARGETS: ' followed by the comma-separated \
target words. Words that have been uncovered are no longer listed.

Your remaining team words are: $team_words.
Remaining words for your opponent are: $opponent_words.
Remaining distractor words are: $innocent_words.
Remaining kill words are: $assassin_words."""

INITIAL_PROMPT_GUESSER = """\
You are the guesser of a team in a word association game. Your partner gave the clue '$clue'. \
Choose up to $number words from the list below that go best with this clue, the most likely one \
first, separated by commas. Begin your answer with 'GUESS: ' and write nothing else.

$board"""

INTERMITTENT_PROMPT_GUESSER = """\
The new clue from your partner is '$clue'. Choose at least 1 and up to $number words from the list \
below that go best with it, separated by commas, and begin your answer with 'GUESS: '. Words that \
have been uncovered are no longer listed.

$board"""

DEFAULT_PROMPTS = {
    "initial_prompt_cluegiver": INITIAL_PROMPT_CLUEGIVER,
    "initial_prompt_guesser": INITIAL_PROMPT_GUESSER,
    "intermittent_prompt_cluegiver": INTERMITTENT_PROMPT_CLUEGIVER,
    "intermittent_prompt_guesser": INTERMITTENT_PROMPT_GUESSER,
}
CLUEGIVER_FIELDS = ("team_words", "opponent_words", "innocent_words", "assassin_words")
GUESSER_FIELDS = ("board", "clue", "number")
REPROMPT = "Your answer broke the rules of the game: {message} Please answer again."
# How the feedback names the kind of a wrongly guessed word.
KIND_NAMES = {TEAM: "a team", OPPONENT: "an opponent", INNOCENT: "a distractor", ASSASSIN: "a kill"}


# ----------------------------------------------------------------------------------------------
# Board


class Board:
    """Hidden and revealed words per assignment; `order` is the board order shown to the guesser."""

    def __init__(self, assignments: Mapping[str, Sequence[str]], order: Sequence[str]):
        self.hidden = {key: list(assignments[key]) for key in ASSIGNMENTS}
        self.revealed = {side: {key: [] for key in ASSIGNMENTS} for side in (TEAM, OPPONENT)}
        self.order = list(order)

    def snapshot(self) -> dict:
        return copy.deepcopy({HIDDEN: self.hidden, REVEALED: self.revealed})

    def assignment_of(self, word: str) -> str | None:
        for key in ASSIGNMENTS:
            if word in self.hidden[key]:
                return key
        for side in self.revealed.values():
            for key in ASSIGNMENTS:
                if word in side[key]:
                    return key
        return None

    def hidden_words(self) -> list[str]:
        hidden = {w for key in ASSIGNMENTS for w in self.hidden[key]}
        return [w for w in self.order if w in hidden]

    def revealed_by(self, side: str) -> list[str]:
        return [w for key in ASSIGNMENTS for w in self.revealed[side][key]]

    def reveal(self, word: str, by: str = TEAM) -> str | None:
        for key in ASSIGNMENTS:
            if word in self.hidden[key]:
                self.hidden[key].remove(word)
                self.revealed[by][key].append(word)
                return key
        return None

    def team_won(self) -> bool:
        return not self.hidden[TEAM]

    def opponent_won(self) -> bool:
        return not self.hidden[OPPONENT]


# ----------------------------------------------------------------------------------------------
# Parsing helpers

IRREGULAR_PLURALS = {"men": "man", "women": "woman", "children": "child", "teeth": "tooth",
                     "feet": "foot", "geese": "goose", "mice": "mouse", "people": "person",
                     "oxen": "ox", "lice": "louse", "wolves": "wolf", "knives": "knife"}


@functools.lru_cache(maxsize=65536)
def base_forms(word: str) -> frozenset[str]:
    """The word and the singular nouns it may be a plural of (a small noun lemmatizer)."""
    forms = {word}
    if word in IRREGULAR_PLURALS:
        forms.add(IRREGULAR_PLURALS[word])
    if len(word) > 4 and word.endswith("men"):
        forms.add(word[:-3] + "man")
    if len(word) > 4 and word.endswith("ies"):
        forms.add(word[:-3] + "y")
    if len(word) > 4 and word.endswith("ves"):
        forms.update({word[:-3] + "f", word[:-3] + "fe"})
    if len(word) > 3 and word.endswith("es"):
        forms.add(word[:-2])
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        forms.add(word[:-1])
    return frozenset(forms)


def related_word(clue: str, words: Sequence[str]) -> str | None:
    """The first of `words` sharing a base form with `clue` (equal words included), else None."""
    forms = base_forms(clue)
    for word in words:
        if forms & base_forms(word):
            return word
    return None


def _space_after_commas(text: str) -> str:
    return re.sub(r",(?=[^\s])", ", ", text)


def _line_starting_with(prefix: str, lines: Sequence[str]) -> str | None:
    for line in lines:
        if line.startswith(prefix):
            return line
    return None


class _Invalid(Exception):
    """A reply that breaks the rules: `player`, error `type`, feedback `message`, details."""

    def __init__(self, player: str, type_: str, utterance: str, message: str, **attributes: Any):
        super().__init__(message)
        self.content = {"player": player, "type": type_, "utterance": utterance, "message": message,
                        **attributes}

    @property
    def message(self) -> str:
        return self.content["message"]


# ----------------------------------------------------------------------------------------------
# Game master


class CodenamesMaster(GameMaster):
    game_name = GAME
    roles = (CLUEGIVER, GUESSER)

    def setup(self) -> None:
        inst = self.instance
        board = inst.get("board")
        if not isinstance(board, list) or not board:
            raise GameError(f"{GAME}: instance {inst.get('game_id')!r} needs a non-empty 'board' list")
        if not all(isinstance(w, str) and w.strip() for w in board):
            raise GameError(f"{GAME}: every board word must be a non-empty string")
        order = [w.strip().lower() for w in board]
        if len(set(order)) != len(order):
            raise GameError(f"{GAME}: the board lists a word twice")
        raw = inst.get("assignments")
        if not isinstance(raw, Mapping):
            raise GameError(f"{GAME}: instance needs an 'assignments' object with keys {list(ASSIGNMENTS)}")
        unknown = set(raw) - set(ASSIGNMENTS)
        if unknown:
            raise GameError(f"{GAME}: unknown assignment key(s) {sorted(unknown)}")
        assignments: dict[str, list[str]] = {}
        for key in ASSIGNMENTS:
            words = raw.get(key)
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise GameError(f"{GAME}: assignments[{key!r}] must be a list of words")
            assignments[key] = [w.strip().lower() for w in words]
        assigned = [w for key in ASSIGNMENTS for w in assignments[key]]
        if len(set(assigned)) != len(assigned):
            raise GameError(f"{GAME}: a word has more than one assignment")
        if set(assigned) != set(order):
            raise GameError(f"{GAME}: the assigned words do not match the board words")
        if not assignments[TEAM] or not assignments[OPPONENT]:
            raise GameError(f"{GAME}: the board needs at least one team word and one opponent word")

        exp = self.experiment
        difficulty = exp.get(OPPONENT_DIFFICULTY, 1)
        if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty < 0:
            raise GameError(f"{GAME}: '{OPPONENT_DIFFICULTY}' must be a non-negative integer")
        flags = exp.get("flags", STRICT_FLAGS)
        if not isinstance(flags, Mapping) or not all(isinstance(v, bool) for v in flags.values()):
            raise GameError(f"{GAME}: 'flags' must map flag names to true/false")
        self.flags = {flag: bool(flags.get(flag, STRICT_FLAGS[flag])) for flag in FLAGS}
        self.templates = {}
        for key in PROMPT_KEYS:
            text = exp.get(key, DEFAULT_PROMPTS[key])
            fields = CLUEGIVER_FIELDS if key.endswith("cluegiver") else GUESSER_FIELDS
            try:
                Template(text).substitute({f: "x" for f in fields})
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                raise GameError(f"{GAME}: prompt template {key!r} is malformed: {e!r}") from None
            self.templates[key] = text

        self.assignments = assignments
        self.board = Board(assignments, order)
        self.opponent_difficulty = difficulty
        key = "|".join(sorted(order))
        self.opponent_rng = random.Random(f"{GAME}/opponent/{inst.get('game_id')}/{key}")
        self.engaged = {role: {flag: 0 for flag in FLAGS} for role in (CLUEGIVER, GUESSER)}
        self.clue = ""
        self.targets: list[str] = []
        self.guesses: list[str] = []
        self.aborted = False
        self.lost = False
        self.assassin_won = False

    # ----- prompts ------------------------------------------------------------------------------
    def _cluegiver_prompt(self, initial: bool) -> str:
        key = "initial_prompt_cluegiver" if initial else "intermittent_prompt_cluegiver"
        hidden = self.board.hidden
        return Template(self.templates[key]).substitute(
            team_words=", ".join(hidden[TEAM]), opponent_words=", ".join(hidden[OPPONENT]),
            innocent_words=", ".join(hidden[INNOCENT]), assassin_words=", ".join(hidden[ASSASSIN]))

    def _guesser_prompt(self, initial: bool) -> str:
        key = "initial_prompt_guesser" if initial else "intermittent_prompt_guesser"
        return Template(self.templates[key]).substitute(
            board=", ".join(self.board.hidden_words()), clue=self.clue, number=len(self.targets))

    # ----- validation and parsing -----------------------------------------------------------------
    def _validate_clue(self, utterance: str) -> None:
        flags, engaged = self.flags, self.engaged[CLUEGIVER]
        remaining = self.board.hidden_words()
        previous = self.board.revealed_by(TEAM)
        text = _space_after_commas(utterance)
        parts = text.split("\n")
        if len(parts) > 2:
            if not flags[FLAG_RAMBLING]:
                raise _Invalid(CLUEGIVER, ERR_RAMBLING, utterance,
                               "Your answer had more than two lines; give only the clue line and the "
                               "targets line.")
            engaged[FLAG_RAMBLING] += 1
        clue_line = _line_starting_with(CLUE_PREFIX, parts)
        targets_line = _line_starting_with(TARGETS_PREFIX, parts)
        if clue_line is None:
            raise _Invalid(CLUEGIVER, ERR_PREFIX, utterance,
                           f"No line of your answer began with the clue prefix ({CLUE_PREFIX}).",
                           prefix=CLUE_PREFIX)
        if targets_line is None:
            raise _Invalid(CLUEGIVER, ERR_PREFIX, utterance,
                           f"No line of your answer began with the targets prefix ({TARGETS_PREFIX}).",
                           prefix=TARGETS_PREFIX)
        clue = clue_line.removeprefix(CLUE_PREFIX).lower()
        if any(ch in clue for ch in CHARS_TO_STRIP):
            if not flags[FLAG_STRIP]:
                raise _Invalid(CLUEGIVER, ERR_CLUE_CHARS, utterance,
                               f"The clue '{clue}' contains characters other than letters; give one "
                               "plain English word.", clue=clue)
            engaged[FLAG_STRIP] += 1
            clue = clue.strip(CHARS_TO_STRIP)
        if re.search(r", [0-9]+", clue):
            if not flags[FLAG_NUMBER]:
                raise _Invalid(CLUEGIVER, ERR_CLUE_NUMBER, utterance,
                               "Give only the clue word and the target words; do not add the number "
                               "of targets yourself.", clue=clue)
            engaged[FLAG_NUMBER] += 1
            clue = clue.strip(NUMBERS_TO_STRIP)
        targets = targets_line.removeprefix(TARGETS_PREFIX).split(", ")
        for target in targets:
            if any(ch in target for ch in CHARS_TO_STRIP) and flags[FLAG_STRIP]:
                engaged[FLAG_STRIP] += 1
        if flags[FLAG_STRIP]:
            targets = [t.strip(CHARS_TO_STRIP) for t in targets]
        targets = [t.lower() for t in targets]
        if " " in clue:
            raise _Invalid(CLUEGIVER, ERR_CLUE_SPACES, utterance,
                           f"The clue '{clue}' contains a space, so it is not a single word.", clue=clue)
        similar = related_word(clue, remaining)
        if similar is not None:
            raise _Invalid(CLUEGIVER, ERR_RELATED_CLUE, utterance,
                           f"The clue '{clue}' is a form of the board word '{similar}'; choose another "
                           "clue.", clue=clue, similar_board_word=similar)
        if clue in remaining:  # kept for completeness; the form check above already covers it
            raise _Invalid(CLUEGIVER, ERR_CLUE_ON_BOARD, utterance,
                           f"The clue '{clue}' is a word on the board; choose another clue.",
                           clue=clue, board=remaining)
        incorrect = 0
        for target in targets:
            if target not in remaining:
                incorrect += 1
                if flags[FLAG_FALSE]:
                    engaged[FLAG_FALSE] += 1
                elif target in previous:
                    raise _Invalid(CLUEGIVER, ERR_REPEATED_TARGET, utterance,
                                   f"The target '{target}' has already been uncovered; only the words "
                                   "in the new lists are left.", target=target, previous_targets=previous)
                else:
                    raise _Invalid(CLUEGIVER, ERR_HALLUCINATED_TARGET, utterance,
                                   f"The target '{target}' is not in the lists; you can only target "
                                   "listed words.", target=target, previous_targets=previous,
                                   remaining_words=remaining)
            if targets.count(target) > 1:
                if flags[FLAG_FALSE]:
                    engaged[FLAG_FALSE] += 1
                else:
                    raise _Invalid(CLUEGIVER, ERR_DOUBLE_TARGET, utterance,
                                   f"The target '{target}' appears more than once; list each target "
                                   "once.", target=target, remaining_words=remaining)
        if incorrect == len(targets):
            raise _Invalid(CLUEGIVER, ERR_NO_CORRECT_TARGET, utterance,
                           "None of your targets is a remaining word; at least one target must be one "
                           "of the listed words.", targets=targets, remaining_words=remaining)

    def _parse_clue(self, utterance: str) -> None:
        parts = _space_after_commas(utterance).split("\n")
        clue_line = _line_starting_with(CLUE_PREFIX, parts) or CLUE_PREFIX
        targets_line = _line_starting_with(TARGETS_PREFIX, parts) or TARGETS_PREFIX
        clue = clue_line.removeprefix(CLUE_PREFIX).lower()
        self.clue = clue.strip(CHARS_TO_STRIP).strip(NUMBERS_TO_STRIP)
        targets = targets_line.removeprefix(TARGETS_PREFIX).split(", ")
        targets = [t.strip(CHARS_TO_STRIP).lower() for t in targets]
        if self.flags[FLAG_FALSE]:
            remaining = set(self.board.hidden_words())
            targets = [t for t in targets if t in remaining]
        self.targets = targets

    def _validate_guess(self, utterance: str) -> None:
        flags, engaged = self.flags, self.engaged[GUESSER]
        remaining = self.board.hidden_words()
        previous = self.board.revealed_by(TEAM)
        allowed = len(self.targets)
        text = _space_after_commas(utterance)
        if "\n" in text:
            if not flags[FLAG_RAMBLING]:
                raise _Invalid(GUESSER, ERR_RAMBLING, utterance,
                               "Your answer had more than one line; give your guesses on one line.")
            engaged[FLAG_RAMBLING] += 1
            line = _line_starting_with(GUESS_PREFIX, text.split("\n"))
            if line:
                text = line
        if not text.startswith(GUESS_PREFIX):
            raise _Invalid(GUESSER, ERR_PREFIX, utterance,
                           f"Your answer did not begin with the guess prefix ({GUESS_PREFIX}).",
                           prefix=GUESS_PREFIX)
        text = text.removeprefix(GUESS_PREFIX)
        guesses = text.split(", ")
        for guess in guesses:
            if any(ch in guess for ch in CHARS_TO_STRIP):
                if not flags[FLAG_STRIP]:
                    raise _Invalid(GUESSER, ERR_GUESS_CHARS, text,
                                   f"The guess '{guess}' contains other characters; give only the board "
                                   "words, separated by commas.", guess=guess)
                engaged[FLAG_STRIP] += 1
        if flags[FLAG_STRIP]:
            guesses = [g.strip(CHARS_TO_STRIP) for g in guesses]
        guesses = [g.lower() for g in guesses]
        if not 0 < len(guesses) <= allowed:
            raise _Invalid(GUESSER, ERR_WRONG_NUMBER, text,
                           f"You made {len(guesses)} guesses but may make at most {allowed}.",
                           guesses=guesses, number_of_allowed_guesses=allowed)
        incorrect = 0
        for guess in guesses:
            if guess == self.clue:
                if flags[FLAG_FALSE]:
                    engaged[FLAG_FALSE] += 1
                else:
                    raise _Invalid(GUESSER, ERR_GUESS_IS_CLUE, text,
                                   f"The guess '{guess}' is the clue itself; choose words from the list.",
                                   guess=guess, clue=self.clue)
            if guess not in remaining:
                incorrect += 1
                if flags[FLAG_FALSE]:
                    engaged[FLAG_FALSE] += 1
                elif guess in previous:
                    raise _Invalid(GUESSER, ERR_REPEATED_GUESS, text,
                                   f"The word '{guess}' has already been uncovered; only the words in "
                                   "the new list are left.", guess=guess, previous_guesses=previous)
                else:
                    raise _Invalid(GUESSER, ERR_HALLUCINATED_GUESS, text,
                                   f"The word '{guess}' is not in the list; you can only guess listed "
                                   "words.", guess=guess, previous_guesses=previous,
                                   remaining_words=remaining)
            if guesses.count(guess) > 1:
                if flags[FLAG_FALSE]:
                    engaged[FLAG_FALSE] += 1
                else:
                    raise _Invalid(GUESSER, ERR_DOUBLE_GUESS, text,
                                   f"The word '{guess}' appears more than once; name each word once.",
                                   guess=guess, remaining_words=remaining)
        if incorrect == len(guesses):
            raise _Invalid(GUESSER, ERR_NO_CORRECT_GUESS, text,
                           "None of your guesses is a remaining word; at least one must be in the list.",
                           guesses=guesses, remaining_words=remaining)

    def _parse_guess(self, utterance: str) -> None:
        text = _space_after_commas(utterance)
        if self.flags[FLAG_RAMBLING]:
            text = _line_starting_with(GUESS_PREFIX, text.split("\n")) or text
        guesses = [g.strip(CHARS_TO_STRIP).lower() for g in text.removeprefix(GUESS_PREFIX).split(", ")]
        if self.flags[FLAG_FALSE]:
            remaining = set(self.board.hidden_words())
            guesses = [g for g in guesses if g in remaining]
        self.guesses = guesses

    # ----- the rules ------------------------------------------------------------------------------
    def _ask_valid(self, player: int, content: str, validate: Callable[[str], None], retries: list[int]):
        """Asks until a reply passes `validate` (re-prompting if the flags allow); None = abort."""
        role = self.roles[player]
        while True:
            reply = (yield from self.ask(player, content)).strip()
            try:
                validate(reply)
            except _Invalid as error:
                self.log_to_self(EV_VALIDATION_ERROR, error.content)
                self.count_violated()
                if self.flags[FLAG_REPROMPT] and retries[player] < MAX_RETRIES:
                    retries[player] += 1
                    self.engaged[role][FLAG_REPROMPT] += 1
                    content = REPROMPT.format(message=error.message)
                    continue
                return None
            self.count_parsed()
            return reply

    def _game_over(self) -> bool:
        board = self.board
        if board.team_won():
            self.lost, self.assassin_won = False, False
            self.log_to_self(EV_GAME_END, "team has won")
        elif board.opponent_won():
            self.lost, self.assassin_won = True, False
            self.log_to_self(EV_GAME_END, "opponent has won")
        elif board.revealed[OPPONENT][ASSASSIN]:
            self.lost, self.assassin_won = False, True
            self.log_to_self(EV_GAME_END, "team has won through assassin")
        elif board.revealed[TEAM][ASSASSIN]:
            self.lost, self.assassin_won = True, True
            self.log_to_self(EV_GAME_END, "opponent has won through assassin")
        else:
            return False
        return True

    def _feedback(self, evaluated: list[tuple[str, str]]) -> str:
        def correct(words: list[str]) -> str:
            if len(words) >= 2:
                return f"The words {', '.join(words)} were guessed correctly. "
            if words:
                return f"The word {words[0]} was guessed correctly. "
            return ""

        if not evaluated:
            return ""
        if evaluated[-1][1] == TEAM:
            return correct([w for w, _ in evaluated])
        word, kind = evaluated[-1]
        return correct([w for w, _ in evaluated[:-1]]) + (
            f"The word {word} was guessed, but it is {KIND_NAMES[kind]} word. ")

    def play(self):
        board = self.board
        cluegiver_content = self._cluegiver_prompt(initial=True)
        guesser_feedback = ""
        # Each valid guess reveals a word, so the game ends within len(board) rounds.
        for round_index in range(len(board.order) + 1):
            self.log_to_self(EV_BOARD_STATUS, board.snapshot())
            retries = [0, 0]
            reply = yield from self._ask_valid(0, cluegiver_content, self._validate_clue, retries)
            if reply is None:
                self.aborted = True
                return
            self._parse_clue(reply)
            self.log_to_self(EV_CLUE, self.clue)
            self.log_to_self(EV_TARGETS, list(self.targets))
            for target in self.targets:
                self.log_to_self(EV_WORD_TARGETED,
                                 {"word": target, "assignment": board.assignment_of(target)})

            if round_index == 0:
                guesser_content = self._guesser_prompt(initial=True)
            else:
                guesser_content = f"{guesser_feedback}\n{self._guesser_prompt(initial=False)}"
            reply = yield from self._ask_valid(1, guesser_content, self._validate_guess, retries)
            if reply is None:
                self.aborted = True
                return
            self._parse_guess(reply)
            self.log_to_self(EV_GUESSES, list(self.guesses))
            evaluated: list[tuple[str, str]] = []
            for guess in self.guesses:
                kind = board.reveal(guess)
                if kind is None:
                    continue
                evaluated.append((guess, kind))
                self.log_to_self(EV_TEAM_REVEALED, {"word": guess, "assignment": kind})
                if guess in self.targets:
                    self.log_to_self(EV_TARGET_REVEALED, {"word": guess, "assignment": kind})
                if kind != TEAM:
                    self.log_to_self(EV_TURN_END, guess)
                    break
            feedback = self._feedback(evaluated)
            guesser_feedback = feedback + "Your turn is over."

            if self._game_over():
                return
            hidden_opponent = board.hidden[OPPONENT]
            count = min(self.opponent_difficulty, len(hidden_opponent))
            for word in self.opponent_rng.sample(sorted(hidden_opponent), count):
                kind = board.reveal(word, OPPONENT)
                self.log_to_self(EV_OPPONENT_REVEALED, {"word": word, "assignment": kind})
            if self._game_over():
                return
            self.next_round()
            # The next prompt lists the board as it stands after the opponent's move.
            cluegiver_content = (f"{feedback}Your partner's turn is over.\n"
                                 f"{self._cluegiver_prompt(initial=False)}")
        self.lost = True  # not reached: every round reveals at least one word

    # ----- scores ---------------------------------------------------------------------------------
    def compute_scores(self) -> None:
        number_of_turns = len(self.turns)
        for index, events in enumerate(self.turns):
            errors = {CLUEGIVER: 0, GUESSER: 0}
            targeted = dict.fromkeys((*ASSIGNMENTS, TOTAL), 0)
            revealed = dict.fromkeys((TARGET, *ASSIGNMENTS, TOTAL), 0)
            guesses: list = []
            board_status: dict = {}
            for event in events:
                if event.type == EV_VALIDATION_ERROR:
                    errors[event.content["player"]] += 1
                elif event.type == EV_GUESSES:
                    guesses = event.content
                elif event.type == EV_WORD_TARGETED:
                    if event.content["assignment"]:
                        targeted[event.content["assignment"]] += 1
                        targeted[TOTAL] += 1
                elif event.type == EV_TEAM_REVEALED:
                    revealed[event.content["assignment"]] += 1
                    revealed[TOTAL] += 1
                elif event.type == EV_TARGET_REVEALED:
                    revealed[TARGET] += 1
                elif event.type == EV_BOARD_STATUS:
                    board_status = event.content
            remaining_team = max(len(board_status.get(HIDDEN, {}).get(TEAM, [])), 1)
            n_targets = targeted[TOTAL]
            cg_precision = targeted[TEAM] / n_targets if n_targets else 0
            cg_recall = targeted[TEAM] / remaining_team
            n_guesses = len(guesses)
            n_revealed = revealed[TOTAL]
            target_precision = revealed[TARGET] / n_revealed if n_revealed else 0
            team_precision = revealed[TEAM] / n_revealed if n_revealed else 0
            target_recall = revealed[TARGET] / n_targets if n_targets else 0
            team_recall = revealed[TEAM] / remaining_team
            values = {
                CLUEGIVER_VALIDATION_ERRORS: errors[CLUEGIVER],
                GUESSER_VALIDATION_ERRORS: errors[GUESSER],
                CLUEGIVER_NUMBER_OF_TARGETS: n_targets,
                CLUEGIVER_TEAM_PRECISION: cg_precision,
                CLUEGIVER_TEAM_RECALL: cg_recall,
                CLUEGIVER_TEAM_F1: _f1(cg_precision, cg_recall),
                GUESSER_NUMBER_OF_GUESSES: n_guesses,
                GUESSER_NUMBER_OF_REVEALED_WORDS: n_revealed,
                GUESSER_NUMBER_OF_UNREVEALED_GUESSES: n_guesses - n_revealed,
                GUESSER_TARGET_PRECISION: target_precision,
                GUESSER_TARGET_RECALL: target_recall,
                GUESSER_TARGET_F1: _f1(target_precision, target_recall),
                GUESSER_TEAM_PRECISION: team_precision,
                GUESSER_TEAM_RECALL: team_recall,
                GUESSER_TEAM_F1: _f1(team_precision, team_recall),
            }
            for name, value in values.items():
                self.log_turn_score(index, name, _round(value))
        self.log_request_turn_scores()

        es = self.episode_scores
        if "variable" in self.experiment:
            es[EXPERIMENT_VARIABLE] = self.experiment["variable"]
        if "name" in self.experiment:
            es[EXPERIMENT_NAME] = self.experiment["name"]
        for flag in FLAGS:
            if self.flags[flag]:
                es[f"{CLUEGIVER} {flag.lower()}"] = self.engaged[CLUEGIVER][flag]
                es[f"{GUESSER} {flag.lower()}"] = self.engaged[GUESSER][flag]
        for name in TURN_SCORES:
            es[f"Average {name}"] = _round(sum(self.turn_scores[i][name] for i in range(number_of_turns))
                                           / number_of_turns)
        es[GAME_ENDED_THROUGH_ASSASSIN] = int(self.assassin_won)
        counts = {key: len(self.assignments[key]) for key in ASSIGNMENTS}
        team_revealed = self.board.revealed[TEAM]
        es[EPISODE_RECALL] = _round(len(team_revealed[TEAM]) / counts[TEAM])
        non_team = counts[OPPONENT] + counts[INNOCENT] + counts[ASSASSIN]
        wrong = len(team_revealed[OPPONENT]) + len(team_revealed[INNOCENT]) + len(team_revealed[ASSASSIN])
        es[EPISODE_NEGATIVE_RECALL] = _round(1 - wrong / non_team)
        es[NUMBER_OF_TURNS] = number_of_turns
        guesses_per_turn = sum(self.turn_scores[i][GUESSER_NUMBER_OF_GUESSES]
                               for i in range(number_of_turns)) / number_of_turns
        es[EFFICIENCY] = _round(min(guesses_per_turn / EXPECTED_WORDS_PER_TURN, 1))
        requests = sum(self.request_counts)
        es[METRIC_REQUEST_SUCCESS_RATIO] = _round(sum(self.parsed_counts) / requests) if requests else 0.0
        success = not self.aborted and not self.lost
        self.set_outcome(aborted=self.aborted, success=success, score=100.0 if success else 0.0)


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0


def _round(value: float) -> float:
    return round(value, 3)


# ----------------------------------------------------------------------------------------------
# Resources: words by category, and the association data the programmatic players use.


@dataclasses.dataclass(frozen=True)
class _Tag:
    """A clue concept: `level` 0 = category, 1 = domain, 2 = group; `words` it names."""

    level: int
    name: str
    clues: tuple[str, ...]
    words: frozenset[str]


@dataclasses.dataclass(frozen=True)
class _Resources:
    categories: dict[str, list[str]]
    abstract_categories: frozenset[str]
    tags: tuple[_Tag, ...]
    by_clue: dict[str, _Tag]
    wordlists: dict[str, list[str]]


@functools.lru_cache(maxsize=1)
def resources() -> _Resources:
    data = json.loads((RESOURCES / "categories.json").read_text())
    features = json.loads((RESOURCES / "word_features.json").read_text())
    categories = {name: list(c["words"]) for name, c in data["categories"].items()}
    abstract = frozenset(name for name, c in data["categories"].items() if c["abstract"])
    tags: list[_Tag] = []
    domain_words: dict[str, set[str]] = {}
    for name, c in data["categories"].items():
        tags.append(_Tag(0, name, tuple(c["clues"]), frozenset(c["words"])))
        domain_words.setdefault(c["domain"], set()).update(c["words"])
    for name, d in data["domains"].items():
        tags.append(_Tag(1, name, tuple(d["clues"]), frozenset(domain_words.get(name, ()))))
    for name, g in data["groups"].items():
        words = frozenset().union(*(domain_words.get(d, set()) for d in g["domains"]))
        tags.append(_Tag(2, name, tuple(g["clues"]), words))
    by_clue = {clue: tag for tag in tags for clue in tag.clues}
    vocab = sorted({w for words in categories.values() for w in words})
    abstract_words = {w for n in abstract for w in categories[n]}
    concrete_words = {w for n in categories if n not in abstract for w in categories[n]}
    ambiguous = set(features["ambiguous"])
    wordlists = {
        "original": vocab,
        "categories": vocab,
        "high_frequency": sorted(features["high_frequency"]),
        "low_frequency": sorted(features["low_frequency"]),
        "ambiguous": sorted(ambiguous),
        "unambiguous": [w for w in vocab if w not in ambiguous],
        "concrete": sorted(concrete_words - abstract_words),
        "abstract": sorted(abstract_words - concrete_words),
    }
    return _Resources(categories, abstract, tuple(tags), by_clue, wordlists)


# ----------------------------------------------------------------------------------------------
# Instance generation

DEFAULT_EXPERIMENT = {
    "generator": "random",
    OPPONENT_DIFFICULTY: 1,
    "assignments": {TEAM: 9, OPPONENT: 8, INNOCENT: 7, ASSASSIN: 1},
    "wordlist": "original",
}
# (name, variable, overrides), one experiment per condition of each variable.
EXPERIMENTS = (
    ("risk_low", "Risk", {"assignments": {TEAM: 9, OPPONENT: 8, INNOCENT: 8, ASSASSIN: 0}}),
    ("risk_high", "Risk", {"assignments": {TEAM: 9, OPPONENT: 8, INNOCENT: 3, ASSASSIN: 5}}),
    ("association_easy", "Word Assignments",
     {"generator": "easy word assignments", "wordlist": "categories"}),
    ("association_difficult", "Word Assignments",
     {"generator": "difficult word assignments", "wordlist": "categories"}),
    ("opponent_none", "Opponent Difficulty", {OPPONENT_DIFFICULTY: 0}),
    ("opponent_easy", "Opponent Difficulty", {OPPONENT_DIFFICULTY: 1}),
    ("opponent_difficult", "Opponent Difficulty", {OPPONENT_DIFFICULTY: 2}),
    ("frequency_low", "Word Frequency", {"wordlist": "low_frequency"}),
    ("frequency_high", "Word Frequency", {"wordlist": "high_frequency"}),
    ("unambiguous", "Word Ambiguity", {"wordlist": "unambiguous"}),
    ("ambiguous", "Word Ambiguity", {"wordlist": "ambiguous"}),
    ("concrete", "Word Concreteness", {"wordlist": "concrete"}),
    ("abstract", "Word Concreteness", {"wordlist": "abstract"}),
)
SPLIT_SIZES = {"train": 40, "validation": 10, "test": 10}


def _shuffled_instance(rng: random.Random, assignments: dict[str, list[str]], **extra: Any) -> dict:
    board = [w for key in ASSIGNMENTS for w in assignments[key]]
    rng.shuffle(board)
    for words in assignments.values():
        rng.shuffle(words)
    return {"board": board, "assignments": assignments, **extra}


def _generate_random(rng: random.Random, wordlist: list[str], required: Mapping[str, int]) -> dict:
    words = rng.sample(wordlist, sum(required[key] for key in ASSIGNMENTS))
    assignments, start = {}, 0
    for key in ASSIGNMENTS:
        assignments[key] = words[start:start + required[key]]
        start += required[key]
    return _shuffled_instance(rng, assignments)


class _CategoryPicker:
    """Draws groups of 2-4 words from categories not used yet, categories weighted by words left."""

    def __init__(self, rng: random.Random, categories: Mapping[str, list[str]]):
        self.rng = rng
        self.categories = categories
        self.names = sorted(categories)
        self.taken: set[str] = set()
        self.used: list[str] = []

    def take(self, maximum: int) -> list[str]:
        weights = [0 if n in self.used else sum(w not in self.taken for w in self.categories[n])
                   for n in self.names]
        name = self.rng.choices(self.names, weights)[0]
        self.used.append(name)
        left = [w for w in self.categories[name] if w not in self.taken]
        # 2-4 words, but never so many that exactly one free slot would remain.
        sizes = [s for s in (2, 3, 4) if maximum - s != 1]
        amount = min(self.rng.choice(sizes), maximum, len(left))
        words = self.rng.sample(left, amount)
        self.taken.update(words)
        return words


def _generate_within_teams(rng: random.Random, categories: Mapping[str, list[str]],
                           required: Mapping[str, int]) -> dict:
    picker = _CategoryPicker(rng, categories)
    assignments: dict[str, list[str]] = {key: [] for key in ASSIGNMENTS}
    for key in ASSIGNMENTS:
        while len(assignments[key]) < required[key]:
            assignments[key].extend(picker.take(required[key] - len(assignments[key])))
    return _shuffled_instance(rng, assignments, private={"categories": list(picker.used)})


def _generate_across_teams(rng: random.Random, categories: Mapping[str, list[str]],
                           required: Mapping[str, int]) -> dict:
    picker = _CategoryPicker(rng, categories)
    assignments: dict[str, list[str]] = {key: [] for key in ASSIGNMENTS}
    total = sum(required[key] for key in ASSIGNMENTS)
    placed = 0
    while placed < total:
        words = picker.take(total - placed)
        i = 0
        while i < len(words):
            open_keys = [key for key in ASSIGNMENTS if len(assignments[key]) < required[key]]
            for key in rng.sample(open_keys, min(len(open_keys), len(words) - i)):
                assignments[key].append(words[i])
                i += 1
        placed += len(words)
    return _shuffled_instance(rng, assignments, private={"categories": list(picker.used)})


def instance_key(instance: Mapping[str, Any]) -> Hashable:
    """The board's words: test and train boards never hold the same set of words."""
    return tuple(sorted(str(w).strip().lower() for w in instance.get("board", [])))


def generate(split: str, seed: int) -> dict:
    if split not in SPLIT_SIZES:
        raise GameError(f"{GAME}: unknown split {split!r}")
    res = resources()
    size = SPLIT_SIZES[split]
    experiments = []
    for name, variable, overrides in EXPERIMENTS:
        config = {"name": name, "variable": variable, "number of instances": size,
                  **copy.deepcopy(DEFAULT_EXPERIMENT), **copy.deepcopy(overrides),
                  "flags": dict(STRICT_FLAGS), **DEFAULT_PROMPTS}
        rng = random.Random(f"{GAME}/{split}/{seed}/{name}")
        wordlist = res.wordlists[config["wordlist"]]
        instances: list[dict] = []
        seen: set = set()
        for _ in range(size * 1000):
            if len(instances) == size:
                break
            if config["generator"] == "random":
                inst = _generate_random(rng, wordlist, config["assignments"])
            elif config["generator"] == "easy word assignments":
                inst = _generate_within_teams(rng, res.categories, config["assignments"])
            else:
                inst = _generate_across_teams(rng, res.categories, config["assignments"])
            key = instance_key(inst)
            if key in seen or split_of(key, salt=GAME) != split:
                continue
            seen.add(key)
            instances.append({"game_id": len(instances), **inst})
        experiments.append({**config, "game_instances": instances})
    return {"experiments": experiments}


# ----------------------------------------------------------------------------------------------
# Programmatic players

FALLBACK_CLUES = ("hint", "pointer", "signal", "token", "marker")


def _listed_words(text: str, vocab: set[str]) -> list[str]:
    """Words of `vocab` that `text` lists: lines (or what follows their last colon) whose
    comma-separated items are all vocabulary words."""
    found: list[str] = []
    for line in text.splitlines():
        segment = line.rsplit(":", 1)[-1].strip().rstrip(".").strip()
        items = [item.strip().strip(".'\"").lower() for item in segment.split(",")]
        if items and all(item in vocab for item in items):
            found.extend(items)
    return found


def _hidden_from(messages: Sequence[Mapping[str, Any]], vocab: set[str]) -> set[str]:
    """The hidden words as listed by the latest prompt that lists any."""
    for message in reversed(messages):
        if message.get("role") == "user":
            found = _listed_words(str(message.get("content", "")), vocab)
            if found:
                return set(found)
    return set(vocab)


def _last_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


def _clue_from(prompt: str) -> str:
    quoted = re.findall(r"'([^'\s]*)'", prompt)
    return quoted[-1].lower() if quoted else ""


def _number_from(prompt: str) -> int | None:
    match = re.search(r"up to (\d+)", prompt)
    return int(match.group(1)) if match else None


def _min_cover(words: frozenset[str], covers: Sequence[frozenset[str]], limit: int) -> int:
    """Fewest covers (or single-word clues for uncovered words) naming all `words`; limit+1 if more."""
    if not words:
        return 0
    if limit <= 0:
        return 1
    options = {w: [c for c in covers if w in c] for w in words}
    word = min(words, key=lambda w: (len(options[w]), w))
    if not options[word]:
        return 1 + _min_cover(words - {word}, covers, limit - 1)
    best = limit + 1
    for cover in options[word]:
        best = min(best, 1 + _min_cover(words - cover, covers, best - 2))
    return best


def plan_clue(team_hidden: Sequence[str], hidden: Sequence[str], turns_left: int) -> tuple[str, list[str]]:
    """The strong cluegiver's choice: the most specific clue concept (category, then domain, then
    group) covering the most hidden team words whose use still lets the remaining team words be
    covered within `turns_left` turns; the clue must not be a form of a hidden word."""
    res = resources()
    team = frozenset(team_hidden)
    usable = []
    for tag in res.tags:
        cover = tag.words & team
        if not cover:
            continue
        clue = next((c for c in tag.clues if related_word(c, hidden) is None), None)
        if clue is not None:
            usable.append((tag.level, -len(cover), tag.name, clue, cover))
    if not usable:
        clue = next((c for c in FALLBACK_CLUES if related_word(c, hidden) is None), "xyzzy")
        return clue, list(team_hidden[:1])
    usable.sort()
    choice = None
    if turns_left >= len(team):
        choice = usable[0]
    else:
        covers = [u[4] for u in usable]
        if _min_cover(team, covers, turns_left) <= turns_left:
            choice = next((u for u in usable
                           if _min_cover(team - u[4], covers, turns_left - 1) <= turns_left - 1), None)
    if choice is None:
        choice = min(usable, key=lambda u: (u[1], u[0], u[2]))
    return choice[3], [w for w in team_hidden if w in choice[4]]


def _normalized(instance: Mapping[str, Any]) -> tuple[list[str], dict[str, list[str]]]:
    board = [str(w).strip().lower() for w in instance.get("board", []) if isinstance(w, str)]
    raw = instance.get("assignments") if isinstance(instance.get("assignments"), Mapping) else {}
    assignments = {key: [str(w).strip().lower() for w in raw.get(key, []) if isinstance(w, str)]
                   for key in ASSIGNMENTS}
    return board, assignments


def _strong_player(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                   rng: random.Random) -> PlayerFn:
    board, assignments = _normalized(instance)
    vocab = set(board)
    team = set(assignments[TEAM])
    difficulty = experiment.get(OPPONENT_DIFFICULTY, 1)
    difficulty = difficulty if isinstance(difficulty, int) and difficulty > 0 else 0

    def cluegiver(messages: Sequence[Mapping[str, Any]]) -> str:
        hidden_set = _hidden_from(messages, vocab)
        hidden = [w for w in board if w in hidden_set]
        team_hidden = [w for w in hidden if w in team] or [w for w in board if w in team]
        opponents = sum(w in hidden_set for w in assignments[OPPONENT])
        turns_left = math.ceil(opponents / difficulty) if difficulty and opponents else len(board)
        clue, targets = plan_clue(team_hidden, hidden, max(turns_left, 1))
        return f"{CLUE_PREFIX}{clue}\n{TARGETS_PREFIX}{', '.join(targets)}"

    def guesser(messages: Sequence[Mapping[str, Any]]) -> str:
        prompt = _last_prompt(messages)
        hidden_set = _hidden_from(messages, vocab)
        hidden = [w for w in board if w in hidden_set]
        team_hidden = [w for w in hidden if w in team] or hidden
        tag = resources().by_clue.get(_clue_from(prompt))
        candidates = [w for w in team_hidden if tag and w in tag.words] or team_hidden[:1]
        number = _number_from(prompt) or len(candidates)
        return GUESS_PREFIX + ", ".join(candidates[:max(number, 1)])

    return cluegiver if role == CLUEGIVER else guesser


def _weak_player(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                 rng: random.Random) -> PlayerFn:
    board, _ = _normalized(instance)
    vocab = set(board)
    clue_pool = sorted(resources().by_clue)

    def cluegiver(messages: Sequence[Mapping[str, Any]]) -> str:
        hidden_set = _hidden_from(messages, vocab)
        hidden = [w for w in board if w in hidden_set] or board
        clues = [c for c in clue_pool if related_word(c, hidden) is None] or list(FALLBACK_CLUES)
        targets = rng.sample(hidden, rng.randint(1, min(3, len(hidden))))
        return f"{CLUE_PREFIX}{rng.choice(clues)}\n{TARGETS_PREFIX}{', '.join(targets)}"

    def guesser(messages: Sequence[Mapping[str, Any]]) -> str:
        hidden_set = _hidden_from(messages, vocab)
        hidden = [w for w in board if w in hidden_set] or board
        number = _number_from(_last_prompt(messages)) or 1
        return GUESS_PREFIX + ", ".join(rng.sample(hidden, rng.randint(1, min(number, len(hidden)))))

    return cluegiver if role == CLUEGIVER else guesser


SPEC = GameSpec(
    name=GAME,
    master=CodenamesMaster,
    generate=generate,
    instance_key=instance_key,
    players={"strong": _strong_player, "weak": _weak_player},
    description="Codenames: a cluegiver gives one-word clues, a guesser picks the team's words "
                "from the board before a scripted opponent uncovers its own.",
)
