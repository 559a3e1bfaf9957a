"""Tests of matchit_ascii: scripted episodes, players, generator, clembench files and a fuzz."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from games import registry
from games.core import GameError, run_episode
from games.matchit import (
    FLAGS,
    SOL_DIFF,
    SOL_SAME,
    MatchItAscii,
    canon,
    experiment_config,
    flip_cells,
    hamming,
    hflip,
    instance_key,
    turn,
    vflip,
)

GAME = "matchit_ascii"
GRID_1 = "X X X X X\nX \u25a2 \u25a2 \u25a2 X\nX \u25a2 X \u25a2 X\nX \u25a2 \u25a2 \u25a2 X\nX X X X X"
GRID_2 = "\n".join(["X . . . X", ". X . X .", ". . X . .", ". X . X .", "X . . . X"]).replace(".", "\u25a2")


def make(grid_a=GRID_1, grid_b=GRID_1, solution=SOL_SAME, decision_turn=3, **exp_over):
    exp = experiment_config("same_grid" if solution == SOL_SAME else "different_grid", solution)
    exp.update(exp_over)
    inst = {"game_id": 0, "grid_a": grid_a, "grid_b": grid_b, "decision_turn": decision_turn}
    return MatchItAscii(inst, exp)


def drive(master, replies):
    """Plays scripted replies; returns the roles asked, checking the script is used up exactly."""
    roles = []
    req = master.start()
    for reply in replies:
        assert req is not None, "episode ended before the script did"
        roles.append(req.role)
        req = master.step(reply)
    assert req is None, f"episode still waits for {req.role}"
    return roles


def full_script(decision_b="DECISION: same grid", decision_a="DECISION: same grid", turns=3):
    script = ["DESCRIPTION: a frame with a dot", "DESCRIPTION: a frame with a dot", "QUESTION: centre?"]
    for rnd in range(1, turns + 1):
        script += ["ANSWER: yes", "QUESTION: corners?", "ANSWER: filled"]
        script.append(decision_b if rnd == turns else "QUESTION: edges?")
    return script + [decision_a]


def events(master, type_=None):
    return [(e.type, e.content) for rnd in master.turns for e in rnd
            if e.from_ == "GM" and e.to == "GM" and (type_ is None or e.type == type_)]


def episode(master):
    return master.scores()["episode scores"]


def turn_counts(master):
    ts = master.scores()["turn scores"]
    return [(ts[k]["Request Count"], ts[k]["Parsed Request Count"], ts[k]["Violated Request Count"])
            for k in sorted(ts, key=int)]


# ----- scripted episodes -------------------------------------------------------------------------
def test_success_both_right():
    m = make()
    roles = drive(m, full_script())
    A, B = "Player A", "Player B"
    assert roles == [A, B, B] + [A, A, B, B] * 3 + [A]
    es = episode(m)
    outcome = (es["Aborted"], es["Success"], es["Lose"], es["Main Score"], es["Player Score"])
    assert outcome == (0, 1, 0, 100, 100)
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (16, 16, 0)
    assert turn_counts(m) == [(3, 3, 0), (4, 4, 0), (4, 4, 0), (4, 4, 0), (1, 1, 0)]
    assert events(m, "Decision Player B") == [("Decision Player B", "success")]
    assert events(m, "Decision Player A") == [("Decision Player A", "success")]


def test_contexts_carry_partner_utterances():
    m = make(grid_a=GRID_1, grid_b=GRID_2, solution=SOL_DIFF)
    req = m.start()
    assert req.messages[-1]["content"].endswith(GRID_1)
    req = m.step("DESCRIPTION: my frame")
    assert req.role == "Player B" and req.messages[-1]["content"].endswith(GRID_2)
    req = m.step("DESCRIPTION: my cross")
    intro = "Here is my description of my grid: "
    assert req.messages[-1]["content"].startswith(intro + "DESCRIPTION: my frame\n")
    req = m.step("QUESTION: is the centre filled?")
    last = req.messages[-1]["content"]
    assert req.role == "Player A"
    assert "DESCRIPTION: my cross\nQUESTION: is the centre filled?" in last and '"ANSWER:"' in last
    middle = ["ANSWER: yes", "QUESTION: q1", "ANSWER: b1", "QUESTION: q2"] * 2
    for reply in middle + ["ANSWER: a3", "QUESTION: q3"]:
        req = m.step(reply)
    req = m.step("ANSWER: last answer of B")
    assert req.role == "Player B" and "DECISION: same grid" in req.messages[-1]["content"]
    req = m.step("DECISION: different grids")
    assert req.role == "Player A" and req.messages[-1]["content"].startswith("ANSWER: last answer of B\n")
    assert m.step("DECISION: different grids") is None
    assert episode(m)["Success"] == 1


def test_decision_case_and_trailing_dot_accepted():
    m = make(solution=SOL_DIFF, grid_b=GRID_2)
    drive(m, full_script("DECISION: Different Grids.", "DECISION: different grids.\n"))
    assert episode(m)["Main Score"] == 100


def test_both_wrong_is_a_loss():
    m = make(grid_b=GRID_2, solution=SOL_DIFF)
    drive(m, full_script())
    es = episode(m)
    assert (es["Aborted"], es["Success"], es["Lose"], es["Main Score"], es["Player Score"]) == (0, 0, 1, 0, 0)
    assert events(m, "Decision Player A") == [("Decision Player A", "loss")]


@pytest.mark.parametrize("dec_b,dec_a", [("DECISION: same grid", "DECISION: different grids"),
                                         ("DECISION: different grids", "DECISION: same grid")])
def test_one_right_scores_zero(dec_b, dec_a):
    m = make()
    drive(m, full_script(dec_b, dec_a))
    es = episode(m)
    assert (es["Success"], es["Lose"], es["Main Score"], es["Player Score"]) == (0, 1, 0, 50)


def assert_aborted(m):
    es = episode(m)
    assert (es["Aborted"], es["Success"], es["Lose"]) == (1, 0, 0)
    assert math.isnan(es["Main Score"]) and math.isnan(es["Player Score"])
    assert events(m)[-1] == ("Game over", "Aborted")


def test_abort_wrong_description_prefix():
    m = make()
    drive(m, ["Description: a frame"])
    assert_aborted(m)
    assert ("invalid format", "abort, first word: Description:, but expected DESCRIPTION:") in events(m)
    assert turn_counts(m) == [(1, 0, 1)]


def test_abort_prefix_glued_to_text():
    m = make()
    drive(m, ["DESCRIPTION:a frame"])
    assert_aborted(m)


def test_prefix_after_blank_lines_is_valid():
    m = make()
    drive(m, ["\n\n  DESCRIPTION: a frame\nmore", "DESCRIPTION: x", "QUESTION: y", "I refuse"])
    assert_aborted(m)
    assert turn_counts(m) == [(3, 3, 0), (1, 0, 1)]


def test_abort_empty_reply():
    m = make()
    drive(m, ["DESCRIPTION: a", "DESCRIPTION: b", "   \n "])
    assert_aborted(m)
    assert ("invalid content", "abort, empty message") in events(m)
    assert turn_counts(m) == [(3, 2, 1)]


def test_abort_question_instead_of_answer():
    m = make()
    drive(m, ["DESCRIPTION: a", "DESCRIPTION: b", "QUESTION: c", "QUESTION: what?"])
    assert_aborted(m)
    assert ("invalid format", "abort, first word: QUESTION:, but expected ANSWER:") in events(m)


def test_abort_unknown_decision_counts_parsed_and_violated():
    m = make()
    drive(m, full_script("DECISION: maybe")[:-1])
    assert_aborted(m)
    assert ("invalid content", "abort, wrong message content.") in events(m)
    # the decision passes the prefix check and then fails on its content
    assert turn_counts(m) == [(3, 3, 0), (4, 4, 0), (4, 4, 0), (5, 4, 1)]
    es = episode(m)
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (16, 15, 1)


def test_abort_decision_with_trailing_space_or_extra_text():
    for bad in ("DECISION: same grid ", "DECISION: same grid, I think"):
        m = make()
        drive(m, full_script("DECISION: same grid", bad))
        assert_aborted(m)
        assert events(m, "Decision Player B") == [("Decision Player B", "success")]


def test_one_question_round():
    m = make(decision_turn=1)
    drive(m, full_script(turns=1))
    assert turn_counts(m) == [(3, 3, 0), (4, 4, 0), (1, 1, 0)]
    assert episode(m)["Main Score"] == 100


@pytest.mark.parametrize("inst_over,exp_over", [
    ({"grid_a": None}, {}),
    ({"grid_b": "  "}, {}),
    ({"decision_turn": 0}, {}),
    ({"decision_turn": "3"}, {}),
    ({}, {"flags": {"description": "DESCRIPTION:", "question": "QUESTION:"}}),
    ({}, {"initial_prompt": "Describe your grid with DESCRIPTION:"}),
    ({}, {"solution": "same grid", "wrong_solution": "Same Grid"}),
    ({}, {"q_reprompt": 3}),
])
def test_malformed_instance_rejected(inst_over, exp_over):
    exp = experiment_config("same_grid", SOL_SAME)
    exp.update(exp_over)
    inst = {"game_id": 1, "grid_a": GRID_1, "grid_b": GRID_1, "decision_turn": 3}
    inst.update(inst_over)
    with pytest.raises(GameError):
        MatchItAscii(inst, exp)


# ----- programmatic players ----------------------------------------------------------------------
def play_split(kind, split, n=20, seed=0):
    eps = registry.instances(GAME, split, seed)
    per_exp = max(1, n // 4)
    chosen = [ep for name in {e.experiment_name for e in eps}
              for ep in [e for e in eps if e.experiment_name == name][:per_exp]]
    scores, played = [], 0
    for ep in chosen:
        m = registry.make_master(ep)
        run_episode(m, {r: registry.make_player(GAME, kind, r, ep, seed) for r in m.roles})
        es = episode(m)
        played += 1 - es["Aborted"]
        scores.append(0.0 if es["Aborted"] else es["Main Score"])
    return played / len(chosen), statistics.mean(scores)


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_strong_players_succeed(split):
    played, quality = play_split("strong", split)
    assert played >= 0.9 and quality >= 90


def test_weak_players_score_low():
    qualities = [play_split("weak", split, n=40)[1] for split in ("train", "validation", "test")]
    assert statistics.mean(qualities) <= 50


def test_strong_player_reads_the_partner_description():
    """A strong A told (falsely) that B's grid equals its own says 'same grid'."""
    ep = next(e for e in registry.instances(GAME, "test") if e.experiment_name == "different_grid")
    a_rows = [line.strip() for line in ep.instance["grid_a"].splitlines()]
    lie = "DESCRIPTION: " + "; ".join(f"row {i}: {r}" for i, r in enumerate(a_rows, 1))
    m = registry.make_master(ep)
    player_a = registry.make_player(GAME, "strong", "Player A", ep)
    answers = iter([lie, "QUESTION: row 1?", "ANSWER: row 1: " + a_rows[0], "QUESTION: row 2?",
                    "ANSWER: row 2: " + a_rows[1], "QUESTION: row 3?", "ANSWER: row 3: " + a_rows[2],
                    "DECISION: different grids"])
    run_episode(m, {"Player A": player_a, "Player B": lambda msgs: next(answers)})
    assert events(m, "Decision Player A") == [("Decision Player A", "loss")]
    assert events(m, "Decision Player B") == [("Decision Player B", "success")]


# ----- generator ---------------------------------------------------------------------------------
def grid(text):
    return tuple(r.replace("\u25a2", ".") for r in canon(text).split("/"))


def test_generator_deterministic_and_sizes():
    spec = registry.get(GAME)
    train = spec.generate("train", 0)
    assert train == spec.generate("train", 0)
    assert train != spec.generate("train", 1)
    names = ["same_grid", "similar_grid_1", "similar_grid_2", "different_grid"]
    for split, per_exp in (("test", 10), ("validation", 10)):
        data = spec.generate(split, 0)
        assert [e["name"] for e in data["experiments"]] == names
        assert [len(e["game_instances"]) for e in data["experiments"]] == [per_exp] * 4
    assert [e["name"] for e in train["experiments"]] == names
    assert all(len(e["game_instances"]) >= 300 for e in train["experiments"])
    exp = train["experiments"][0]
    for key in ("initial_prompt", "q_reprompt", "d_reprompt", "a_request", "desc_intro", "flags",
                "solution", "wrong_solution"):
        assert key in exp
    assert exp["flags"] == FLAGS and "$GRID$" in exp["initial_prompt"]


def test_generated_pairs_match_their_experiment():
    for split in ("train", "test"):
        for exp in registry.get(GAME).generate(split, 3)["experiments"]:
            assert exp["solution"] == (SOL_SAME if exp["name"] == "same_grid" else SOL_DIFF)
            for inst in exp["game_instances"]:
                a, b = grid(inst["grid_a"]), grid(inst["grid_b"])
                assert len(a) == 5 and all(len(r) == 5 for r in a + b)
                if exp["name"] == "same_grid":
                    assert a == b
                elif exp["name"] == "similar_grid_1":
                    assert a != b and b in (vflip(a), hflip(a), turn(a), turn(turn(turn(a))))
                elif exp["name"] == "similar_grid_2":
                    assert hamming(a, b) == 2
                else:
                    assert hamming(a, b) >= 3


def test_no_overlap_between_splits():
    spec = registry.get(GAME)
    train = {spec.instance_key(ep.instance) for s in (0, 1) for ep in registry.instances(GAME, "train", s)}
    for split in ("validation", "test"):
        held = {spec.instance_key(ep.instance) for s in (0, 5) for ep in registry.instances(GAME, split, s)}
        assert held and not (held & train)


def test_instance_key_ignores_order_and_layout():
    a, b = GRID_1, GRID_2
    spaced = "\n".join("  " + line.replace(" ", "   ") for line in a.splitlines()) + "\n\n"
    assert instance_key({"grid_a": a, "grid_b": b}) == instance_key({"grid_a": b, "grid_b": spaced})
    assert instance_key({"grid_a": a, "grid_b": b}) != instance_key({"grid_a": a, "grid_b": a})
    g = grid(a)
    assert hamming(g, flip_cells(g, [0, 24])) == 2


# ----- clembench instance files ------------------------------------------------------------------
def test_clembench_instances_file_loads_and_plays(tmp_path):
    exp = {
        "name": "similar_grid_2",
        "initial_prompt": "We both hold a grid. Say \"DESCRIPTION:\" and describe it.\n$GRID$",
        "q_reprompt": "Ask something, opening with \"QUESTION:\".",
        "d_reprompt": "Choose: \"DECISION: same grid\" or \"DECISION: different grids\".\n",
        "a_request": " Open your reply with \"ANSWER:\".",
        "desc_intro": "Partner says: ",
        "flags": dict(FLAGS),
        "solution": SOL_DIFF,
        "wrong_solution": SOL_SAME,
        "game_instances": [
            {"game_id": 0, "grid_a": GRID_1, "grid_b": GRID_2, "decision_turn": 3},
            {"game_id": 1, "grid_a": GRID_2, "grid_b": GRID_1, "decision_turn": 5},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"experiments": [exp]}, ensure_ascii=False))
    eps = registry.load_instances_file(path, GAME)
    assert [ep.game_id for ep in eps] == [0, 1]
    requests = []
    for ep in eps:
        m = registry.make_master(ep)
        first = m.start()
        assert first.messages[0]["content"] == exp["initial_prompt"].replace("$GRID$", ep.instance["grid_a"])
        players = {r: registry.make_player(GAME, "strong", r, ep) for r in m.roles}
        req = first
        while req is not None:
            req = m.step(players[req.role](list(req.messages)))
        assert episode(m)["Success"] == 1
        requests.append(episode(m)["Request Count"])
        assert any("Partner says: DESCRIPTION:" in msg["content"] for msg in m.histories[1])
    assert requests == [16, 24]


def test_single_instance_file_without_config(tmp_path):
    path = tmp_path / "same_grid" / "instance.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"game_id": 7, "grid_a": GRID_2, "grid_b": GRID_2, "decision_turn": 2}))
    (ep,) = registry.load_instances_file(path, GAME)
    m = registry.make_master(ep)
    run_episode(m, {r: registry.make_player(GAME, "strong", r, ep) for r in m.roles})
    assert episode(m)["Success"] == 1 and m.solution == SOL_SAME


# ----- fuzz --------------------------------------------------------------------------------------
reply_text = st.one_of(
    st.text(max_size=40),
    st.builds(lambda f, t: f + t, st.sampled_from(list(FLAGS.values()) + ["DECISION: same grid",
                                                                          "DECISION: different grids"]),
              st.text(max_size=12)),
    st.sampled_from(["DECISION: same grid", "DECISION: different grids", "DESCRIPTION: x",
                     "QUESTION: y", "ANSWER: z", ""]),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), same=st.booleans(), turns=st.integers(1, 3))
def test_fuzz_arbitrary_replies(data, same, turns):
    m = make(grid_b=GRID_1 if same else GRID_2, solution=SOL_SAME if same else SOL_DIFF, decision_turn=turns)
    req = m.start()
    n = 0
    while req is not None:
        n += 1
        assert n <= 4 + 4 * turns
        req = m.step(data.draw(reply_text))
    scores = m.scores()
    es = scores["episode scores"]
    assert es["Aborted"] + es["Success"] + es["Lose"] == 1
    assert math.isnan(es["Main Score"]) == bool(es["Aborted"])
    if not es["Aborted"]:
        assert es["Main Score"] in (0, 100) and es["Player Score"] in (0, 50, 100)
        assert n == 4 + 4 * turns
    assert es["Request Count"] == es["Parsed Request Count"] + es["Violated Request Count"] >= n
    assert len(scores["turn scores"]) == len(m.turns)
    json.dumps(m.interactions())
