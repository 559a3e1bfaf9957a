"""Tests of the privateshared game: rules, scores, generator, players, clembench files, fuzzing."""

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from games import privateshared as ps
from games import records, registry, replay
from games.core import GameError, run_episode

GAME = "privateshared"

# A small two-slot scenario whose experiment carries its own texts.
EXPERIMENT = {
    "name": "mini-trip",
    "request_strings": {"from": ["Where from?", "Origin?"], "to": ["Where to?"]},
    "probing_questions": {"from": ["Does the agent know your origin?"],
                          "to": ["Does the agent know your destination?", "Knows the agent where you go?"]},
}
INSTANCE = {
    "game_id": 7,
    "tag": "AGENT",
    "slots": {"from": "Oslo", "to": "Porto"},
    "initial_prompt": "You travel from Oslo to Porto.",
    "request_order": ["to", "from"],
    "requests": {"from": 1, "to": 0},
    # probing rounds 0..2, each asks about "from" then "to"
    "probes": {"0": {"from": 0, "to": 0}, "1": {"from": 0, "to": 1}, "2": {"from": 0, "to": 0}},
    "lang": "en",
}
# Ground truth per probing round (order: from, to) for correct answers: "to" is asked first.
GOLD = [[0, 0], [0, 1], [1, 1]]


def play_scripted(answers, probes, instance=INSTANCE, experiment=EXPERIMENT):
    """Plays with scripted replies: `answers` for the questions, `probes` for the probes (in order)."""
    master = ps.PrivateShared(instance, experiment)
    answers, probes = list(answers), list(probes)
    req = master.start()
    while req is not None:
        reply = probes.pop(0) if req.probe else answers.pop(0)
        req = master.step(reply)
    return master, master.scores()


def yn(bits):
    return ["ASIDE: yes" if b else "ASIDE: no" for b in bits]


def flat(rounds):
    return [b for r in rounds for b in r]


def events(master, type_):
    return [e for rnd in master.turns for e in rnd if e.type == type_]


# ----- hand-written episodes -------------------------------------------------------------------------
def test_success_episode():
    master, sc = play_scripted(["ANSWER: Porto.", "ANSWER: From Oslo."], yn(flat(GOLD)))
    es = sc["episode scores"]
    assert (es["Aborted"], es["Success"], es["Lose"]) == (0, 1, 0)
    assert es["Main Score"] == 100
    assert es["Accuracy"] == 1 and es["Kappa"] == 1 and es["Slot-Filling-Accuracy"] == 1
    assert es["Middle-Accuracy"] == 1  # probing round int(3/2)-1 = 0
    ts = sc["turn scores"]
    assert ts["0"]["Accuracy"] == 1 and "Slot Filled?" not in ts["0"]
    assert ts["1"]["Slot Filled?"] == 1 and ts["2"]["Slot Filled?"] == 1
    # round 0: two probes; rounds 1, 2: one answer + two probes
    assert [ts[str(r)]["Request Count"] for r in range(3)] == [2, 3, 3]
    assert es["Request Count"] == 8 and es["Parsed Request Count"] == 8 and es["Violated Request Count"] == 0
    # the questions use the experiment's texts and the tag
    sent = [e.content for e in events(master, "send message")]
    assert any(s.startswith("AGENT: Where to?") for s in sent)
    assert any(s.startswith("AGENT: Origin?") for s in sent)
    # probes are throw-away: the answerer's history holds the prompt, "Ok.", questions and answers only
    hist = master.histories[0]
    assert [m["role"] for m in hist] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert hist[0]["content"] == INSTANCE["initial_prompt"] and hist[1]["content"] == "Ok."
    assert not any(m["content"].startswith("ME:") for m in hist)
    # one parse event per probe try, with the parsed value
    assert [e.content for e in events(master, "parse")] == ["no", "no", "no", "yes", "yes", "yes"]


def test_the_master_keeps_each_probe_exchange_outside_the_history():
    master, _ = play_scripted(["ANSWER: Porto.", "ANSWER: From Oslo."], yn(flat(GOLD)))
    chats = master.probe_chats[0]
    assert len(chats) == 6
    assert [c[-1] for c in chats] == [{"role": "assistant", "content": a} for a in yn(flat(GOLD))]
    for c in chats:
        assert c[-2]["role"] == "user" and c[-2]["content"].startswith("ME:")
        # the context a probe was asked in is the history as it stood then
        assert list(c[:-2]) == master.histories[0][:len(c) - 2]
    assert not any(m["content"].startswith(("ME:", "ASIDE:")) for m in master.histories[0])


def test_wrong_probe_gives_partial_kappa():
    # round 1 "from" answered yes although "from" is still private
    pred = [[0, 0], [1, 1], [1, 1]]
    _, sc = play_scripted(["ANSWER: Porto.", "ANSWER: Oslo."], yn(flat(pred)))
    es = sc["episode scores"]
    # gold 000111, pred 001111: po = 5/6, pe = 1/2 -> kappa = 2/3; main = 100 * 2*(2/3)/(5/3) = 80
    assert es["Accuracy"] == pytest.approx(5 / 6)
    assert es["Kappa"] == pytest.approx(2 / 3)
    assert es["Main Score"] == pytest.approx(80)
    assert (es["Success"], es["Lose"], es["Aborted"]) == (0, 1, 0)
    assert sc["turn scores"]["1"]["Accuracy"] == 0.5


def test_all_yes_probes_give_zero_score():
    _, sc = play_scripted(["ANSWER: Porto.", "ANSWER: Oslo."], yn([1] * 6))
    es = sc["episode scores"]
    assert es["Accuracy"] == 0.5 and es["Kappa"] == pytest.approx(0) and es["Truncated Kappa"] == 0
    assert es["Main Score"] == 0 and es["Lose"] == 1


def test_negative_kappa_is_truncated():
    _, sc = play_scripted(["ANSWER: Porto.", "ANSWER: Oslo."], yn([1 - b for b in flat(GOLD)]))
    es = sc["episode scores"]
    assert es["Kappa"] == pytest.approx(-1) and es["Truncated Kappa"] == 0 and es["Main Score"] == 0


def test_wrong_slot_value_lowers_slot_filling():
    _, sc = play_scripted(["ANSWER: Naples.", "ANSWER: Oslo."], yn(flat(GOLD)))
    es = sc["episode scores"]
    assert es["Slot-Filling-Accuracy"] == 0.5 and es["Kappa"] == 1
    assert es["Main Score"] == pytest.approx(100 * 2 * 0.5 / 1.5)
    assert es["Success"] == 0 and es["Lose"] == 1
    assert sc["turn scores"]["1"]["Slot Filled?"] == 0


def test_anticipated_value_becomes_shared():
    # the first answer also reveals the origin: from round 1 on "from" is shared
    gold = [[0, 0], [1, 1], [1, 1]]
    master, sc = play_scripted(["ANSWER: Porto, coming from Oslo.", "ANSWER: Oslo."], yn(flat(gold)))
    assert sc["episode scores"]["Success"] == 1
    assert master.interactions()["realised_slots"] == {"to": 0, "from": 0}
    assert any("anticipated" in e.content for e in events(master, "metadata"))
    # the old ground truth now scores the round-1 "from" probe as wrong
    _, sc2 = play_scripted(["ANSWER: Porto, coming from Oslo.", "ANSWER: Oslo."], yn(flat(GOLD)))
    assert sc2["turn scores"]["1"]["Accuracy"] == 0.5


def test_abort_on_answer_without_tag():
    master, sc = play_scripted(["Porto."], yn(GOLD[0]))
    es = sc["episode scores"]
    assert (es["Aborted"], es["Success"], es["Lose"]) == (1, 0, 0)
    assert math.isnan(es["Main Score"]) and math.isnan(es["Accuracy"])
    assert [e.content for e in events(master, "invalid format")] == [ps.ABORT_SLOT]
    assert sc["turn scores"]["1"]["Violated Request Count"] == 1
    assert sc["turn scores"]["0"]["Accuracy"] == 1  # the played probing round still has its turn score
    assert master.current_round == 1


@pytest.mark.parametrize("reply", ["ANSWER: Porto.\nAnything else?", " ANSWER: Porto.", "answer: Porto."])
def test_abort_on_malformed_answer(reply):
    _, sc = play_scripted([reply], yn(GOLD[0]))
    assert sc["episode scores"]["Aborted"] == 1


def test_trailing_newline_is_fine():
    _, sc = play_scripted(["ANSWER: Porto.\n\n", "ANSWER: Oslo.\n"], yn(flat(GOLD)))
    assert sc["episode scores"]["Success"] == 1


def test_abort_after_five_invalid_probe_tries():
    master, sc = play_scripted([], ["maybe"] * 5)
    es = sc["episode scores"]
    assert es["Aborted"] == 1 and es["Success"] == 0 and es["Lose"] == 0
    assert [e.content for e in events(master, "parse")] == ["NA"] * 5
    assert [e.content for e in events(master, "invalid format")] == [ps.ABORT_PROBING]
    ts = sc["turn scores"]["0"]
    assert ts["Request Count"] == 5 and ts["Violated Request Count"] == 5 and ts["Parsed Request Count"] == 0
    assert "Accuracy" not in ts
    probes = master.interactions()["probes"]
    assert probes[0][0]["value"] == ps.INVALID_LABEL and probes[0][0]["tries"] == 6
    # the retries carry the reprompt suffixes
    sent = [e.content for e in events(master, "send message")][1:]
    assert sent[0].startswith("ME: Does") and all(
        s.startswith("ME: " + suffix) for s, suffix in zip(sent[1:], ps._common()["reprompts"][1:]))


def test_probe_recovers_within_five_tries():
    probes = ["ASIDE: maybe", "yes", "ASIDE: no\nbecause", "ASIDE:", "ASIDE: no"] + yn(flat(GOLD)[1:])
    _, sc = play_scripted(["ANSWER: Porto.", "ANSWER: Oslo."], probes)
    es = sc["episode scores"]
    assert es["Aborted"] == 0 and es["Success"] == 1
    assert sc["turn scores"]["0"]["Violated Request Count"] == 4
    assert es["Request Count"] == 12 and es["Violated Request Count"] == 4
    assert es["Request Success Ratio"] == pytest.approx(8 / 12)


def test_probe_abort_in_later_round():
    probes = yn(GOLD[0]) + ["ASIDE: no"] + ["nope"] * 5
    master, sc = play_scripted(["ANSWER: Porto."], probes)
    assert sc["episode scores"]["Aborted"] == 1
    assert sc["episode scores"]["Played Probe Rounds"] == 1
    assert sc["turn scores"]["1"]["Request Count"] == 7  # answer + 1 valid probe + 5 invalid tries


@pytest.mark.parametrize("reply,expected", [
    ("ASIDE: yes", "yes"), ("ASIDE: Yes, I told them.", "yes"), ("ASIDE: Not yet.", "no"),
    ("ASIDE: no\n", "no"), ("ASIDE:no", "no"), (" ASIDE: yes", "NA"), ("aside: yes", "NA"),
    ("ASIDE: I think so", "NA"), ("ASIDE: yes\nreally", "NA"), ("yes", "NA")])
def test_probe_parsing(reply, expected):
    assert ps.parse_probe(reply, "ASIDE: ", "yes", "no") == expected


def test_probe_requests_are_flagged():
    master = ps.PrivateShared(INSTANCE, EXPERIMENT)
    req = master.start()
    assert req.probe and req.role == "Answerer"
    assert req.messages[-1]["content"].startswith("ME: Does the agent know your origin?")
    req = master.step("ASIDE: no")
    req = master.step("ASIDE: no")
    assert not req.probe and req.messages[-1]["content"].startswith("AGENT: Where to?")


@pytest.mark.parametrize("change", [
    {"slots": {}}, {"slots": {"from": "Oslo", "to": ""}}, {"request_order": ["to"]},
    {"request_order": ["to", "to"]}, {"requests": {"from": 5, "to": 0}}, {"requests": {"from": 0}},
    {"probes": {"0": {"from": 0}, "1": {"from": 0}}}, {"probes": {"0": {"x": 0}, "1": {"from": 0},
                                                                "2": {"to": 0}}},
    {"tag": None}, {"initial_prompt": 3}, {"lang": "de"}])
def test_malformed_instance_raises(change):
    with pytest.raises(GameError):
        ps.PrivateShared({**INSTANCE, **change}, EXPERIMENT)


def test_unknown_experiment_without_texts_raises():
    with pytest.raises(GameError):
        ps.PrivateShared(INSTANCE, {"name": "no-such-domain"})
    with pytest.raises(GameError):
        ps.PrivateShared(INSTANCE, {**EXPERIMENT, "words": {"PROBE": "ME: {q} yes or no?"}})
    with pytest.raises(GameError):
        ps.PrivateShared(INSTANCE, {**EXPERIMENT, "reprompts": []})


# ----- players -------------------------------------------------------------------------------------
def play(ep, kind, seed=0):
    master = registry.make_master(ep)
    players = {r: registry.make_player(GAME, kind, r, ep, seed) for r in master.roles}
    run_episode(master, players)
    return master.scores()["episode scores"]


def sample(split, n=20):
    eps = registry.instances(GAME, split, 0)
    rng = random.Random(split)
    return rng.sample(eps, min(n, len(eps)))


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_strong_player_plays_well(split):
    scores = [play(ep, "strong") for ep in sample(split)]
    played = sum(not s["Aborted"] for s in scores) / len(scores)
    quality = sum(s["Main Score"] for s in scores if not s["Aborted"]) / len(scores)
    assert played >= 0.9 and quality >= 90


@pytest.mark.parametrize("split", ["train", "test"])
def test_weak_player_plays_badly(split):
    scores = [play(ep, "weak") for ep in sample(split)]
    assert all(not s["Aborted"] for s in scores)  # the format is kept
    assert sum(s["Main Score"] for s in scores) / len(scores) < 30


def test_strong_player_follows_anticipation():
    # a weak answer revealing another slot makes the strong player's probe for that slot "yes"
    ep = registry.instances(GAME, "test", 0)[0]
    strong = registry.make_player(GAME, "strong", "Answerer", ep)
    inst = ep.instance
    first, later = inst["request_order"][0], inst["request_order"][-1]
    q_later = ps._texts(ep.experiment)["probing_questions"][later][0]
    msgs = [{"role": "user", "content": inst["initial_prompt"]}, {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": f"{inst['tag']}: question"},
            {"role": "assistant", "content": f"ANSWER: {inst['slots'][first]}"}]
    probe = {"role": "user", "content": f"ME: {q_later} Reply with yes or no."}
    assert strong(msgs + [probe]) == "ASIDE: no"
    msgs[-1] = {"role": "assistant", "content": f"ANSWER: {inst['slots'][first]} and {inst['slots'][later]}"}
    assert strong(msgs + [probe]) == "ASIDE: yes"


# ----- generator -----------------------------------------------------------------------------------
def test_generator_deterministic_and_sized():
    for split, per_exp in (("test", 10), ("validation", 10), ("train", 200)):
        a, b = ps.generate(split, 3), ps.generate(split, 3)
        assert a == b
        assert [e["name"] for e in a["experiments"]] == list(ps.EXPERIMENTS)
        assert all(len(e["game_instances"]) == per_exp for e in a["experiments"])
    assert ps.generate("test", 0) != ps.generate("test", 1)


def test_no_overlap_between_splits():
    keys = {}
    for split in registry.SPLITS:
        keys[split] = set()
        for seed in (0, 1):
            for ep in registry.instances(GAME, split, seed):
                keys[split].add(ps.instance_key(ep.instance))
    assert len(keys["train"]) > 1500
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["test"] & keys["validation"]


def test_generated_instances_are_consistent():
    for ep in registry.instances(GAME, "validation", 0):
        inst = ep.instance
        assert sorted(inst["request_order"]) == sorted(inst["slots"])
        assert sorted(inst["probes"]) == sorted(str(r) for r in range(len(inst["slots"]) + 1))
        for v in inst["slots"].values():
            assert v in inst["initial_prompt"]
        assert "ANSWER: <one sentence>" in inst["initial_prompt"]
        assert f"begin with {inst['tag']}" in inst["initial_prompt"]
        ps.PrivateShared(inst, ep.experiment)  # validates


def test_slot_values_never_contain_one_another():
    # slot filling is checked by substring, so within a domain no value may contain another
    for name in ps.EXPERIMENTS:
        dom = ps._domain(name)
        vals = [v.lower() for vs in dom["slot_values"].values() for v in vs]
        assert len(vals) == len(set(vals)), name
        assert not [(a, b) for a in vals for b in vals if a != b and a in b], name
        # every wording belongs to one slot only
        for table in (dom["requests"], dom["probing_questions"]):
            texts = [t for ts in table.values() for t in ts]
            assert len(texts) == len(set(texts)) and set(table) == set(dom["slot_values"]), name


# Fewest wordings per slot that clembench's instance files index into.
MIN_TEXTS = {
    "travel-booking": ({"from": 10, "to": 10, "by": 8, "class": 4, "when": 10}, 5),
    "job-interview": ({"bachelor": 5, "industry-experience": 5, "highest-education": 5, "other-skills": 5,
                       "availability": 7}, 5),
    "restaurant": ({s: 5 for s in ("appetizer", "drink", "main-dish", "dessert", "salad")}, 5),
}


@pytest.mark.parametrize("name", sorted(MIN_TEXTS))
def test_texts_cover_clembench_indices(name):
    dom = ps._domain(name)
    probes, n_requests = MIN_TEXTS[name]
    assert set(dom["slot_values"]) == set(probes)
    for slot, n in probes.items():
        assert len(dom["probing_questions"][slot]) >= n and len(dom["requests"][slot]) >= n_requests


# ----- clembench files -----------------------------------------------------------------------------
def test_clembench_instances_file_plays(tmp_path):
    trip = {
        "game_id": 0, "tag": "TRAVEL-AGENT",
        "slots": {"from": "Oslo", "to": "Porto", "by": "Ferry", "class": "Budget fare",
                  "when": "Next Friday"},
        "initial_prompt": "You are a customer. FROM: Oslo TO: Porto BY: Ferry CLASS: Budget fare "
                          "WHEN: Next Friday",
        "request_order": ["to", "when", "by", "from", "class"],
        "requests": {"from": 4, "to": 3, "by": 0, "class": 0, "when": 0},
        "probes": {str(r): {"from": 9, "to": 3, "by": 7, "class": 3, "when": 8} for r in range(6)},
    }  # older layout: no "lang"
    job = {
        "game_id": 1, "tag": "RECRUITER",
        "slots": {"bachelor": "Biology", "industry-experience": "Two years", "highest-education": "MBA",
                  "other-skills": "Chess", "availability": "Immediately"},
        "initial_prompt": "You are an applicant.", "lang": "en",
        "request_order": ["other-skills", "industry-experience", "highest-education", "availability",
                          "bachelor"],
        "requests": {"bachelor": 0, "industry-experience": 2, "highest-education": 2, "other-skills": 4,
                     "availability": 3},
        "probes": {str(r): {"bachelor": 4, "industry-experience": 1, "highest-education": 0,
                            "other-skills": 3, "availability": 6} for r in range(6)},
    }
    custom = {**INSTANCE, "game_id": 2}
    data = {"experiments": [
        {"name": "travel-booking", "game_instances": [trip]},
        {"name": "job-interview", "game_instances": [job]},
        {**EXPERIMENT, "words": {"ANSWER": "ANSWER: ", "ASIDE": "ASIDE: ", "ME": "ME: ",
                                 "PROBE": "ME: {} Yes or no?", "CODA": "{} Be brief.",
                                 "YES": "yes", "NO": "no", "OK": "Ok."},
         "game_instances": [custom]},
    ]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    eps = registry.load_instances_file(path, GAME)
    assert [ep.experiment_name for ep in eps] == ["travel-booking", "job-interview", "mini-trip"]
    assert eps[0].instance["lang"] == "en"
    for ep in eps:
        master = registry.make_master(ep)
        req = master.start()
        assert req.messages[0]["content"] == ep.instance["initial_prompt"]
        while req is not None:
            req = master.step(registry.make_player(GAME, "strong", "Answerer", ep)(list(req.messages)))
        es = master.scores()["episode scores"]
        assert es["Success"] == 1 and es["Main Score"] == 100
    assert any(e.content == "AGENT: Where to? Be brief." for e in events(master, "send message"))
    assert any(e.content.endswith("Yes or no?") for e in events(master, "send message"))


def test_interaction_record_is_json():
    master, _ = play_scripted(["ANSWER: Porto.", "ANSWER: Oslo."], yn(flat(GOLD)))
    rec = json.loads(json.dumps(master.interactions("mini-trip")))
    assert rec["players"]["Player 1"]["game_role"] == "Answerer"
    assert rec["Filled Slots"] == [True, True] and rec["Played Probe Rounds"] == 3
    assert [[p["gt"] for p in r] for r in rec["probes"]] == GOLD
    assert rec["turns"][-1][-1]["action"] == {"type": "end", "content": "Game finished."}


# ----- fuzz ----------------------------------------------------------------------------------------
_fuzz_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["ASIDE: yes", "ASIDE: no", "ANSWER: Porto.", "ANSWER: Oslo", "ASIDE: maybe",
                     "ANSWER: x\ny", ""]),
)


@settings(max_examples=50, deadline=None)
@given(st.lists(_fuzz_text, min_size=1, max_size=30))
def test_fuzz_replies_never_raise(replies):
    master = ps.PrivateShared(INSTANCE, EXPERIMENT)
    req = master.start()
    i = 0
    while req is not None:
        req = master.step(replies[i % len(replies)])
        i += 1
        assert i < 200
    sc = master.scores()
    es = sc["episode scores"]
    assert es["Aborted"] + es["Success"] + es["Lose"] == 1
    assert es["Aborted"] or 0 <= es["Main Score"] <= 100
    assert es["Request Count"] == es["Parsed Request Count"] + es["Violated Request Count"] == i
    json.dumps(sc)


# ----- records and replay --------------------------------------------------------------------------
@pytest.mark.parametrize("answers,probes", [
    (["ANSWER: Porto.", "ANSWER: Oslo."], ["ASIDE: maybe", "ASIDE: no"] + yn(flat(GOLD)[1:])),
    (["ANSWER: Porto, from Oslo.", "ANSWER: Naples."], yn([0, 0, 1, 0, 1, 1])),
    (["ANSWER: Porto."], yn(GOLD[0]) + ["no"] * 5),
    (["Porto"], yn(GOLD[0])),
])
def test_record_replays_to_same_scores(tmp_path, answers, probes):
    master, sc = play_scripted(answers, probes)
    rec = master.interactions("mini-trip")
    # the player's get messages are its answers only; probe replies are parse events
    got = [e["action"]["content"] for r in rec["turns"] for e in r if e["action"]["type"] == "get message"]
    assert got == answers
    assert len(events(master, "parse")) == len(probes)
    assert [x for rnd in rec["probes"] for pr in rnd for x in pr["replies"]] == probes
    folder = records.write_episode(tmp_path, master, EXPERIMENT)
    result = replay.replay_record(records.read_episode(folder))
    assert result.agrees, (result.differences, result.note)
    assert result.note == ""
    assert ps.probe_reply("yes") == "ASIDE: yes" and ps.parse_probe(ps.probe_reply("NA"), "ASIDE: ", "yes",
                                                                       "no") == "NA"
