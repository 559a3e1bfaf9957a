"""privateshared: scorekeeping of private and shared information in a slot-filling dialogue.

The Answerer (the only model-played role) privately knows the values of all slots of a scenario
(a trip, a CV, a dinner order, things at places, numbers for letters). A programmatic questioner,
run by the game master, asks for the slots one by one in a fixed order ("<TAG>: <question>"); the
Answerer must reply "ANSWER: <one sentence>". Before the first question and after every answer the
game master probes, in a throw-away copy of the Answerer's context, whether each slot is already
known to the questioner ("ME: <question> ..."), expecting "ASIDE: yes" or "ASIDE: no".

Rules as clembench defines them:
- An answer must start with "ANSWER:" and must not continue on a further line; otherwise the game
  aborts ("invalid format").
- A slot counts as filled if the answer contains the slot's value (case-insensitive). Any other
  slot value found in an answer becomes shared from that turn on (the probing ground truth moves).
- A probe reply must start with "ASIDE:", have no further line, and its remainder must start with
  "yes" or "no". An invalid reply is asked again with a reprompt suffix, at most 5 tries in all;
  after that the game aborts ("invalid format").
- Ground truth of a probe in round r about slot s: 1 (shared) iff r > the turn in which s was
  asked or first mentioned, else 0.

Record: the questioner's questions are "send message" events to Player 1 (the Answerer); a probe
is logged as its question, then one GM->GM "parse" event per try (yes / no / NA), a "metadata" and a
"check" event; the player's "get message" events are its answers to the questioner only.

Scores: per probing round "Accuracy" and (from round 1) "Slot Filled?"; per episode "Accuracy",
"Kappa" (Cohen's), "Truncated Kappa" (max(0, kappa)), "Slot-Filling-Accuracy", "Middle-Accuracy"
(probing round int((n+1)/2)-1) and Main Score = 100 * harmonic mean of Slot-Filling-Accuracy and
Truncated Kappa. Success iff probing accuracy and slot-filling accuracy are both 1.
"""

from __future__ import annotations

import functools
import json
import math
import random
from pathlib import Path
from typing import Any, Generator, Hashable, Mapping, Sequence

from games.core import GameError, GameMaster, Message, Request
from games.registry import GameSpec, split_of

GAME_NAME = "privateshared"
RESOURCES = Path(__file__).parent / "resources" / GAME_NAME
EXPERIMENTS = ("travel-booking", "job-interview", "restaurant", "things-places", "letter-number")

INVALID = "NA"
INVALID_LABEL = 2

# Log texts of GM→GM events.
UPDATE = "Value for {} anticipated; ground truth turn updated from {} to {}."
NOT_SUCCESS = "Answer for {} invalid after max attempts."
SUCCESS = "Answer for {} valid after {} tries."
RESULT = "Answer is {}correct."
ABORT_PROBING = "Abort: invalid format in probing."
ABORT_SLOT = "Abort: invalid format in slot filling."

# Instances per experiment and split.
SIZES = {"train": 200, "validation": 10, "test": 10}


# ----- resources ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _load(name: str) -> dict:
    return json.loads((RESOURCES / f"{name}.json").read_text())


def _common() -> dict:
    return _load("common")


def _domain(name: str) -> dict:
    return _load(name)


def _texts(experiment: Mapping[str, Any]) -> dict:
    """Texts for an experiment: what its config carries, else our resources for its name."""
    name = str(experiment.get("name", ""))
    base: dict = {}
    if name in EXPERIMENTS:
        dom = _domain(name)
        base = {"request_strings": dom["requests"], "probing_questions": dom["probing_questions"]}
    common = _common()
    words = dict(common["words"])
    if isinstance(experiment.get("words"), Mapping):
        words.update({str(k).upper(): v for k, v in experiment["words"].items()})
    out = {
        "words": words,
        "reprompts": experiment.get("reprompts", common["reprompts"]),
        "request_strings": experiment.get("request_strings", base.get("request_strings")),
        "probing_questions": experiment.get("probing_questions", base.get("probing_questions")),
    }
    if out["request_strings"] is None or out["probing_questions"] is None:
        raise GameError(f"{GAME_NAME}: unknown experiment {name!r} and its config carries no "
                        f"'request_strings' / 'probing_questions'; known: {', '.join(EXPERIMENTS)}")
    return out


# ----- parsing (shared by the master and the players) -----------------------------------------------
def _has_continuation(response: str) -> bool:
    """True if the reply goes on past a line break (trailing/leading newlines do not count)."""
    return "\n" in response.strip("\n")


def parse_answer(response: str, answer_tag: str) -> str | None:
    """The answer text without its tag, or None if the reply breaks the answer format."""
    tag = answer_tag.strip()
    if not response.startswith(tag) or _has_continuation(response):
        return None
    return response.replace(tag, "").strip()


def parse_probe(response: str, aside_tag: str, yes: str, no: str) -> str:
    """"yes" / "no" for a well-formed probe reply, "NA" otherwise."""
    tag = aside_tag.strip()
    if not response.startswith(tag) or _has_continuation(response):
        return INVALID
    clean = response.replace(tag, "").strip().lower()
    if clean.startswith(yes):
        return yes
    if clean.startswith(no):
        return no
    return INVALID


def cohen_kappa(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Cohen's kappa of two label sequences (NaN when chance agreement is total)."""
    n = len(gold)
    if n == 0:
        return math.nan
    labels = sorted(set(gold) | set(pred))
    p_obs = sum(g == p for g, p in zip(gold, pred)) / n
    p_exp = sum((gold.count(c) / n) * (pred.count(c) / n) for c in labels)
    if p_exp == 1:
        return math.nan
    return (p_obs - p_exp) / (1 - p_exp)


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else math.nan


def bench_score(sf_acc: float, trunc_kappa: float) -> float:
    """100 * harmonic mean of slot-filling accuracy and truncated kappa."""
    if math.isnan(sf_acc) or math.isnan(trunc_kappa):
        return math.nan
    if sf_acc + trunc_kappa == 0:
        return 0.0
    return 100 * (2 * sf_acc * trunc_kappa / (sf_acc + trunc_kappa))


# ----- the game master -----------------------------------------------------------------------------
class PrivateShared(GameMaster):
    game_name = GAME_NAME
    roles = ("Answerer",)

    def setup(self) -> None:
        inst = self.instance
        texts = _texts(self.experiment)
        self.words = texts["words"]
        self.reprompts = texts["reprompts"]
        if not isinstance(self.reprompts, list) or not self.reprompts \
                or not all(isinstance(s, str) for s in self.reprompts):
            raise GameError(f"{GAME_NAME}: 'reprompts' must be a non-empty list of strings")
        for key in ("ANSWER", "ASIDE", "ME", "PROBE", "CODA", "YES", "NO", "OK"):
            if not isinstance(self.words.get(key), str) or not self.words[key]:
                raise GameError(f"{GAME_NAME}: word {key!r} missing from the experiment's 'words'")
        for key in ("PROBE", "CODA"):
            try:
                self.words[key].format("x")
            except (IndexError, KeyError, ValueError) as e:
                raise GameError(f"{GAME_NAME}: word {key!r} must be a template with one '{{}}': {e}") \
                    from None
        slots = inst.get("slots")
        if not isinstance(slots, Mapping) or not slots or not all(
                isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in slots.items()):
            raise GameError(f"{GAME_NAME}: instance {inst.get('game_id')!r}: 'slots' must map slot "
                            "names to non-empty strings")
        self.slots = dict(slots)
        order = inst.get("request_order")
        if not isinstance(order, list) or sorted(map(str, order)) != sorted(self.slots) \
                or len(order) != len(self.slots):
            raise GameError(f"{GAME_NAME}: 'request_order' must list every slot exactly once")
        self.request_order = [str(s) for s in order]
        for key in ("tag", "initial_prompt"):
            if not isinstance(inst.get(key), str) or not inst[key]:
                raise GameError(f"{GAME_NAME}: instance needs a non-empty string {key!r}")
        self.tag = inst["tag"]
        self.initial_prompt = inst["initial_prompt"]
        lang = inst.get("lang", "en")
        if lang != "en" and "words" not in self.experiment:
            raise GameError(f"{GAME_NAME}: language {lang!r} needs 'words' in the experiment config")

        req_strings = texts["request_strings"]
        requests = inst.get("requests")
        if not isinstance(requests, Mapping):
            raise GameError(f"{GAME_NAME}: 'requests' must map slots to request indices")
        self.request_texts: dict[str, str] = {}
        for slot in self.request_order:
            self.request_texts[slot] = self._pick(req_strings, slot, requests.get(slot), "request")

        probes = inst.get("probes")
        if not isinstance(probes, Mapping):
            raise GameError(f"{GAME_NAME}: 'probes' must map probing rounds to {{slot: index}}")
        probes = {str(k): v for k, v in probes.items()}
        n = len(self.slots)
        self.probe_plan: list[list[tuple[str, str]]] = []
        for r in range(n + 1):
            round_probes = probes.get(str(r))
            if not isinstance(round_probes, Mapping) or not round_probes:
                raise GameError(f"{GAME_NAME}: 'probes' lacks probing round {r} (needs rounds 0..{n})")
            plan = []
            for slot, idx in round_probes.items():
                if slot not in self.slots:
                    raise GameError(f"{GAME_NAME}: probing round {r} names unknown slot {slot!r}")
                plan.append((slot, self._pick(texts["probing_questions"], slot, idx, "probing question")))
            self.probe_plan.append(plan)

        # Turn (0-based) from which on a slot counts as shared: when it is asked or first mentioned.
        self.probe_gt = {slot: i for i, slot in enumerate(self.request_order)}
        self.filled_slots: list[bool] = []
        self.all_probes: list[list[dict]] = []
        self.played_probing_rounds = 0
        self.aborted = False

    def _pick(self, table: Any, slot: str, idx: Any, what: str) -> str:
        options = table.get(slot) if isinstance(table, Mapping) else None
        if not isinstance(options, list) or not options:
            raise GameError(f"{GAME_NAME}: no {what} texts for slot {slot!r}")
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(options):
            raise GameError(f"{GAME_NAME}: {what} index {idx!r} for slot {slot!r} is not in "
                            f"0..{len(options) - 1}")
        return options[idx]

    # ----- rules ---------------------------------------------------------------------------------
    def play(self) -> Generator[Request, str, None]:
        w = self.words
        # The initial prompt with a fixed acknowledgement, so that probes follow an assistant turn.
        self.add_message(0, self.initial_prompt)
        self.add_message(0, w["OK"], role="assistant")
        self.log_event("GM", self.player_names[0], "send message", self.initial_prompt)
        self.log_to_self("metadata", f"Initial prompt acknowledged with the fixed reply {w['OK']!r}.")

        ok = yield from self._probe_round()
        if not ok:
            self._abort(ABORT_PROBING)
        else:
            for r in range(1, len(self.request_order) + 1):
                self.next_round()
                slot = self.request_order[r - 1]
                question = w["CODA"].format(f"{self.tag}: {self.request_texts[slot]}")
                reply = yield from self.ask(0, question)
                answer = parse_answer(reply, w["ANSWER"])
                if answer is None:
                    self.count_violated()
                    self._abort(ABORT_SLOT)
                    break
                self.count_parsed()
                filled = self.slots[slot].lower() in answer.lower()
                self.filled_slots.append(filled)
                self.log_to_self("metadata", f"Slot filled: {filled}")
                self._update_anticipated(answer, r - 1)
                ok = yield from self._probe_round()
                if not ok:
                    self._abort(ABORT_PROBING)
                    break
        self.log_to_self("end", "Game finished.")

    def _abort(self, message: str) -> None:
        self.aborted = True
        self.log_to_self("invalid format", message)

    def _update_anticipated(self, answer: str, turn: int) -> None:
        low = answer.lower()
        for slot, value in self.slots.items():
            if value.lower() in low and turn < self.probe_gt[slot]:
                self.log_to_self("metadata", UPDATE.format(slot.upper(), self.probe_gt[slot], turn))
                self.probe_gt[slot] = turn

    def _probe_round(self) -> Generator[Request, str, bool]:
        """Asks every probe of the current round; False (and stops) once a probe stays invalid."""
        w = self.words
        r = self.current_round
        probes = []
        success = True
        for slot, question in self.probe_plan[r]:
            probe = {"target": slot.upper(), "question": w["PROBE"].format(question),
                     "gt": 1 if r > self.probe_gt[slot] else 0}
            tries, parsed, answer, replies = 1, INVALID, "", []
            while tries <= len(self.reprompts):
                suffix = self.reprompts[tries - 1]
                text = probe["question"].replace(w["ME"], f"{w['ME']}{suffix} " if suffix else w["ME"], 1)
                # As in clembench records, a probe's reply is recorded as its GM->GM "parse" event
                # (yes / no / NA, one per try; the raw replies stay in the record's "probes"), so the
                # player's "get message" events are exactly its answers to the questioner.
                answer = yield from self.ask(0, text, probe=True, log_reply=False)
                replies.append(answer)
                parsed = parse_probe(answer, w["ASIDE"], w["YES"], w["NO"])
                self.log_to_self("parse", parsed)
                if parsed in (w["YES"], w["NO"]):
                    self.count_parsed()
                    break
                self.count_violated()
                tries += 1
            valid = parsed in (w["YES"], w["NO"])
            probe.update(answer=answer, replies=replies, tries=tries,
                         value=1 if parsed == w["YES"] else 0 if parsed == w["NO"] else INVALID_LABEL)
            probes.append(probe)
            self.log_to_self("metadata", SUCCESS.format(probe["target"], tries) if valid
                             else NOT_SUCCESS.format(probe["target"]))
            self.log_to_self("check", RESULT.format("" if probe["value"] == probe["gt"] else "in"))
            if not valid:
                success = False
                break
        self.all_probes.append(probes)
        if success:
            self.played_probing_rounds += 1
        return success

    # ----- scores --------------------------------------------------------------------------------
    def compute_scores(self) -> None:
        self.log_request_turn_scores()
        aborted = self.aborted
        n = len(self.slots)
        mid_turn = int((n + 1) / 2) - 1
        gold: list[int] = []
        pred: list[int] = []
        mid_acc = math.nan
        for t in range(self.played_probing_rounds):
            tg = [p["gt"] for p in self.all_probes[t]]
            tp = [p["value"] for p in self.all_probes[t]]
            gold += tg
            pred += tp
            acc_t = accuracy(tg, tp)
            self.log_turn_score(t, "Accuracy", acc_t)
            if t != 0 and t - 1 < len(self.filled_slots):
                self.log_turn_score(t, "Slot Filled?", int(self.filled_slots[t - 1]))
            if t == mid_turn and not aborted:
                mid_acc = acc_t
        es = self.episode_scores
        if aborted:
            acc = kappa = trunc = sf_acc = math.nan
        else:
            acc = accuracy(gold, pred)
            kappa = cohen_kappa(gold, pred)
            trunc = 0.0 if math.isnan(kappa) else max(0.0, kappa)
            sf_acc = sum(self.filled_slots) / len(self.filled_slots) if self.filled_slots else math.nan
        es["Accuracy"] = acc
        es["Kappa"] = kappa
        es["Truncated Kappa"] = trunc
        es["Slot-Filling-Accuracy"] = sf_acc
        es["Middle-Accuracy"] = mid_acc
        es["Played Probe Rounds"] = self.played_probing_rounds
        success = not aborted and acc == 1.0 and sf_acc == 1.0
        self.set_outcome(aborted=aborted, success=success, score=bench_score(sf_acc, trunc))

    def interactions(self, experiment_name: str = "", game_id: Any = None) -> dict:
        """The interaction record plus the evaluation keys of the game (probes, realised slots...)."""
        rec = super().interactions(experiment_name, game_id)
        rec["players"]["Player 2"] = {"game_role": "Questioner", "model_name": "programmatic"}
        rec["probes"] = self.all_probes
        rec["realised_slots"] = dict(self.probe_gt)
        rec["Filled Slots"] = list(self.filled_slots)
        rec["Aborted"] = self.aborted
        rec["Played Probe Rounds"] = self.played_probing_rounds
        rec["Request Count"] = list(self.request_counts)
        rec["Parsed Request Count"] = list(self.parsed_counts)
        rec["Violated Request Count"] = list(self.violated_counts)
        return rec


# ----- instances -----------------------------------------------------------------------------------
def instance_key(instance: Mapping[str, Any]) -> Hashable:
    """A scenario's identity: its slot values (the order of questions does not count)."""
    slots = instance.get("slots") or {}
    return tuple(sorted((str(k), str(v)) for k, v in slots.items()))


def _render_prompt(template: str, what: str, slots: Mapping[str, str], tag: str) -> str:
    listing = "\n".join([f"WHAT: {what}"] + [f"{k.upper()}: {v}" for k, v in slots.items()])
    w = _common()["words"]
    return (template.replace("$INSTANCE$", listing).replace("$QUESTIONER$", tag)
            .replace("$ANSWER$", w["ANSWER"]).replace("$ASIDE$", w["ASIDE"]).replace("$ME$", w["ME"]))


def _experiment_config(name: str) -> dict:
    dom = _domain(name)
    common = _common()
    return {
        "name": name,
        "words": dict(common["words"]),
        "reprompts": list(common["reprompts"]),
        "prompt_template": dom["prompt_template"],
        "request_strings": dom["requests"],
        "probing_questions": dom["probing_questions"],
    }


def generate(split: str, seed: int = 0) -> dict:
    """Instances of one split: scenarios whose identity falls in `split`, fresh per seed."""
    if split not in SIZES:
        raise GameError(f"{GAME_NAME}: unknown split {split!r}")
    experiments = []
    for name in EXPERIMENTS:
        dom = _domain(name)
        rng = random.Random(f"{GAME_NAME}/{split}/{seed}/{name}")
        values, requests, probes_q = dom["slot_values"], dom["requests"], dom["probing_questions"]
        names = list(values)
        seen: set = set()
        instances = []
        attempts = 0
        while len(instances) < SIZES[split]:
            attempts += 1
            if attempts > 100_000:
                raise GameError(f"{GAME_NAME}: cannot draw enough {split} scenarios for {name}")
            slots = {s: rng.choice(values[s]) for s in names}
            key = instance_key({"slots": slots})
            if key in seen or split_of(repr(key), salt=GAME_NAME) != split:
                continue
            seen.add(key)
            order = rng.sample(names, len(names))
            instances.append({
                "game_id": len(instances),
                "tag": dom["tag"],
                "slots": slots,
                "initial_prompt": _render_prompt(dom["prompt_template"], dom["what"], slots, dom["tag"]),
                "request_order": order,
                "requests": {s: rng.randrange(len(requests[s])) for s in names},
                "probes": {str(r): {s: rng.randrange(len(probes_q[s])) for s in names}
                           for r in range(len(names) + 1)},
                "lang": "en",
            })
        experiments.append({**_experiment_config(name), "game_instances": instances})
    return {"experiments": experiments}


def probe_reply(parsed: Any) -> str:
    """A reply that parses to a recorded probe value ("yes" / "no"; anything else stays invalid)."""
    w = _common()["words"]
    return f"{w['ASIDE']}{parsed}" if parsed in (w["YES"], w["NO"]) else ""


def normalize(instance: Mapping[str, Any], experiment: Mapping[str, Any]) -> dict:
    """Older instance files lack 'lang'; probing rounds may be keyed by integers."""
    inst = dict(instance)
    inst.setdefault("lang", "en")
    if isinstance(inst.get("probes"), Mapping):
        inst["probes"] = {str(k): v for k, v in inst["probes"].items()}
    return inst


# ----- programmatic players ------------------------------------------------------------------------
def _best_match(text: str, table: Mapping[str, Sequence[str]]) -> str | None:
    """The slot whose text (longest first) occurs in `text`."""
    best, best_len = None, -1
    for slot, options in table.items():
        for opt in options:
            if isinstance(opt, str) and opt and opt in text and len(opt) > best_len:
                best, best_len = slot, len(opt)
    return best


def _last_user(messages: Sequence[Message]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def _strong_factory(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                    rng: random.Random):
    """Answers every question with its slot's value; probes from what the dialogue has shown."""
    texts = _texts(experiment)
    w = texts["words"]
    slots = dict(instance.get("slots") or {})
    order = list(instance.get("request_order") or [])
    tag = f"{instance.get('tag', '')}: "

    def asked_slots(messages: Sequence[Message]) -> set[str]:
        out = set()
        questions = [str(m.get("content", "")) for m in messages
                     if m.get("role") == "user" and str(m.get("content", "")).startswith(tag)]
        for i, q in enumerate(questions):
            slot = _best_match(q, texts["request_strings"])
            if slot is None and i < len(order):
                slot = order[i]
            if slot is not None:
                out.add(slot)
        return out

    def player(messages: Sequence[Message]) -> str:
        last = _last_user(messages)
        if last.startswith(w["ME"].strip()) and not last.startswith(tag):
            slot = _best_match(last, texts["probing_questions"])
            history = list(messages)[:-1]
            said = " ".join(str(m.get("content", "")).lower() for m in history
                            if m.get("role") == "assistant")
            shared = slot is not None and (
                slot in asked_slots(history) or str(slots.get(slot, "\0")).lower() in said)
            return f"{w['ASIDE']}{w['YES'] if shared else w['NO']}"
        slot = _best_match(last, texts["request_strings"])
        if slot is None:
            n_asked = len(asked_slots(messages))
            slot = order[n_asked - 1] if 0 < n_asked <= len(order) else None
        value = slots.get(slot, "") if slot is not None else ""
        return f"{w['ANSWER']}{value}."

    return player


def _weak_factory(role: str, instance: Mapping[str, Any], experiment: Mapping[str, Any],
                  rng: random.Random):
    """Keeps the reply format, but names a random value of the scenario and probes at random."""
    texts = _texts(experiment)
    w = texts["words"]
    values = [str(v) for v in (instance.get("slots") or {}).values()] or ["nothing"]

    def player(messages: Sequence[Message]) -> str:
        last = _last_user(messages)
        if last.startswith(w["ME"].strip()):
            return f"{w['ASIDE']}{rng.choice([w['YES'], w['NO']])}"
        return f"{w['ANSWER']}{rng.choice(values)}."

    return player


SPEC = GameSpec(
    name=GAME_NAME,
    master=PrivateShared,
    generate=generate,
    instance_key=instance_key,
    players={"strong": _strong_factory, "weak": _weak_factory},
    description="Slot-filling dialogue whose answerer is probed on what is private and what is shared.",
    normalize=normalize,
    probe_event="parse",
    probe_reply=probe_reply,
)
