"""Tests of the reference game: rules, scores, generator, players, instance files, fuzzing."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from games import referencegame as rg
from games import registry
from games.core import GameError, run_episode

T = "X X X X X\n□ □ □ □ □\n□ □ □ □ □\n□ □ □ □ □\n□ □ □ □ □"
D1 = "X X X X X\n□ □ □ □ □\nX X X X X\n□ □ □ □ □\n□ □ □ □ □"
D2 = "X X X X □\n□ □ □ □ □\n□ □ □ □ □\n□ □ □ □ □\n□ □ □ □ □"


def play(replies, position=0, **changes):
    """Plays one episode of a hand-made instance with scripted replies (giver, follower)."""
    inst = {**rg.make_instance(0, T, D1, D2, position), **changes}
    master = rg.ReferenceGameMaster(inst, {"name": "line_grids_rows"})
    seen = []
    script = iter(replies)

    def player(messages):
        seen.append(messages[-1]["content"])
        return next(script)

    run_episode(master, [player, player])
    return master, master.scores()["episode scores"], seen


def event_types(master):
    return [e.type for e in master.turns[0] if e.from_ == "GM" and e.to == "GM"]


# ----- rules and scores ------------------------------------------------------------------------------

def test_success_and_expression_metrics():
    expression = "Expression: The grid with only the top row filled."
    master, es, seen = play([expression, "Answer: first"])
    assert (es["Success"], es["Lose"], es["Aborted"], es["Main Score"]) == (1, 0, 0, 100.0)
    assert es["Generated Expression Length"] == len(expression)
    assert es["Generated Expression Number of Tokens"] == 9
    assert es["Request Count"] == 2 and es["Parsed Request Count"] == 2 and es["Violated Request Count"] == 0
    assert es["Request Success Ratio"] == 1.0
    assert (es["Aborted at Player 1"], es["Aborted at Player 2"]) == (0, 0)
    assert event_types(master) == ["parse", "parse_correct"]
    ts = master.scores()["turn scores"]["0"]
    assert ts["Success"] == 1 and ts["Request Count"] == 2
    assert ts["Generated Expression Length"] == len(expression)
    # The follower sees the giver's whole reply in place of TARGET_EXPRESSION, and the grids in its order.
    assert expression in seen[1] and "TARGET_EXPRESSION" not in seen[1]
    assert seen[1].index(T) < seen[1].index(D1) < seen[1].index(D2)
    assert "Target grid:" in seen[0] and T in seen[0]


@pytest.mark.parametrize("answer,position", [
    ("Answer: second", 1), ("answer: 2", 1), ("ANSWER: Third grid.", 2), ("Answer:third", 2),
    ("Answer: 1st", 0),
])
def test_answer_forms_that_count_as_correct(answer, position):
    _, es, _ = play(["Expression: the top row", answer], position=position)
    assert es["Success"] == 1 and es["Main Score"] == 100.0


def test_wrong_answer_is_a_loss():
    master, es, _ = play(["Expression: the top row", "Answer: third"], position=1)
    assert (es["Success"], es["Lose"], es["Aborted"], es["Main Score"]) == (0, 1, 0, 0.0)
    assert event_types(master) == ["parse", "parse_wrong"]
    assert master.scores()["turn scores"]["0"]["Success"] == 0


@pytest.mark.parametrize("reply", [
    "The grid with the top row filled.",          # no tag
    "Expression:",                                # nothing after the tag
    "Expression: the top row\nIt is the first.",  # a second paragraph (strict mode)
    "",
])
def test_invalid_expression_aborts_before_the_follower(reply):
    master, es, seen = play([reply, "Answer: first"])
    assert len(seen) == 1  # the follower is never asked
    assert (es["Aborted"], es["Success"], es["Lose"]) == (1, 0, 0)
    assert math.isnan(es["Main Score"])
    assert (es["Aborted at Player 1"], es["Aborted at Player 2"]) == (1, 0)
    assert math.isnan(es["Generated Expression Length"])
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (1, 0, 1)
    assert es["Request Success Ratio"] == 0.0
    assert event_types(master) == ["invalid format"]


@pytest.mark.parametrize("reply", [
    "first", "The answer is first.", "Answer: fourth", "Answer: first\nbecause of the top row", "Answer:",
])
def test_invalid_answer_aborts(reply):
    master, es, _ = play(["Expression: the top row", reply])
    assert es["Aborted"] == 1 and math.isnan(es["Main Score"])
    assert (es["Aborted at Player 1"], es["Aborted at Player 2"]) == (0, 1)
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (2, 1, 1)
    assert es["Request Success Ratio"] == 0.5
    assert es["Generated Expression Length"] == len("Expression: the top row")
    assert event_types(master) == ["parse", "invalid format"]


def test_liberal_mode_accepts_trailing_text():
    _, es, _ = play(["Expression: the top row\nmore words", "Answer: first\nbecause"],
                    p1_mode="liberal", p2_mode="liberal")
    assert es["Aborted"] == 0 and es["Success"] == 1


def test_surrounding_whitespace_is_ignored():
    _, es, _ = play(["  Expression: the top row\n\n", "\nAnswer: first \n"])
    assert es["Aborted"] == 0 and es["Success"] == 1


@pytest.mark.parametrize("changes,message", [
    ({"player_1_prompt_header": None}, "player_1_prompt_header"),
    ({"player_2_response_pattern": "(unclosed"}, "player_2_response_pattern"),
    ({"player_2_response_pattern": "^answer: (first|second)"}, "groups"),
    ({"p1_mode": "lenient"}, "p1_mode"),
    ({"target_grid_name": []}, "target_grid_name"),
    ({"target_grid_name": 3}, "target_grid_name"),
])
def test_malformed_instances_are_rejected(changes, message):
    inst = {**rg.make_instance(0, T, D1, D2, 0), **changes}
    with pytest.raises(GameError, match=message):
        rg.ReferenceGameMaster(inst, {})


# ----- grids and the generator --------------------------------------------------------------------------

def test_grid_text_round_trip():
    assert rg.grid_text(rg.parse_grid(T)) == T
    assert rg.parse_grid(T.replace("□", "▢")) == rg.parse_grid(T)
    assert rg.parse_grid("X X\nX X") is None and rg.parse_grid(T.replace("X", "O", 1)) is None


def test_generator_sizes_and_layout():
    data = rg.generate("test", 0)
    names = [e["name"] for e in data["experiments"]]
    assert names == list(rg.EXPERIMENTS)
    assert [len(e["game_instances"]) for e in data["experiments"]] == [18] * 5  # 90, as in clembench
    assert sum(len(e["game_instances"]) for e in rg.generate("validation", 0)["experiments"]) == 45
    assert sum(len(e["game_instances"]) for e in rg.generate("train", 0)["experiments"]) >= 1400
    for exp in data["experiments"]:
        assert [i["game_id"] for i in exp["game_instances"]] == list(range(18))
        for inst in exp["game_instances"]:
            label = inst["target_grid_name"][0]
            assert inst[f"player_2_{label}_grid"] == inst["player_1_target_grid"]
            grids = {inst["player_1_target_grid"], inst["player_1_second_grid"], inst["player_1_third_grid"]}
            assert len(grids) == 3
            assert grids == {inst[f"player_2_{k}_grid"] for k in rg.ORDINALS}
            assert all(g in inst["player_1_prompt_header"] for g in grids)
            assert "TARGET_EXPRESSION" in inst["player_2_prompt_header"]
        labels = [i["target_grid_name"][0] for i in exp["game_instances"]]
        assert labels == ["first", "second", "third"] * 6


def test_generator_is_deterministic_and_seeded():
    assert rg.generate("train", 3) == rg.generate("train", 3)
    assert rg.generate("test", 3) != rg.generate("test", 4)


def test_distractors_are_the_nearest_grids_of_the_same_split():
    for split in ("test", "validation"):
        for exp in rg.generate(split, 1)["experiments"]:
            pool = rg.split_pool(exp["name"], split)
            for inst in exp["game_instances"]:
                target, second, third = (rg.parse_grid(inst[f"player_1_{k}_grid"])
                                         for k in ("target", "second", "third"))
                assert {target, second, third} <= set(pool)
                dist = sorted(bin(target ^ m).count("1") for m in pool if m != target)
                assert bin(target ^ second).count("1") == dist[0]
                assert bin(target ^ third).count("1") == dist[1]


def test_no_target_overlap_between_splits():
    train = {rg.instance_key(ep.instance) for seed in (0, 1)
             for ep in registry.instances("referencegame", "train", seed)}
    for split in ("test", "validation"):
        for seed in (0, 1, 2):
            keys = {rg.instance_key(ep.instance) for ep in registry.instances("referencegame", split, seed)}
            assert keys and not keys & train
    # Not even a distractor of a test instance appears anywhere in training.
    train_grids = {inst[k] for ep in registry.instances("referencegame", "train", 0)
                   for inst in [ep.instance] for k in ("player_1_target_grid", "player_1_second_grid",
                                                        "player_1_third_grid")}
    test_grids = {ep.instance[k] for ep in registry.instances("referencegame", "test", 0)
                  for k in ("player_1_target_grid", "player_1_second_grid", "player_1_third_grid")}
    assert not train_grids & test_grids


# ----- programmatic players -----------------------------------------------------------------------------

def run_players(episodes, kind):
    results = []
    for ep in episodes:
        master = registry.make_master(ep)
        players = [registry.make_player("referencegame", kind, role, ep) for role in master.roles]
        run_episode(master, players)
        results.append(master.scores()["episode scores"])
    played = [s for s in results if not s["Aborted"]]
    return len(played) / len(results), sum(s["Main Score"] for s in played) / max(1, len(played))


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_strong_players_win_and_weak_players_guess(split):
    episodes = random.Random(split).sample(registry.instances("referencegame", split, 0), 20)
    played, quality = run_players(episodes, "strong")
    assert played >= 0.9 and quality >= 95
    played, quality = run_players(episodes, "weak")
    assert played >= 0.9 and quality <= 60


def test_strong_follower_reads_the_expression():
    ep = registry.instances("referencegame", "test", 0)[4]
    follower = registry.make_player("referencegame", "strong", "Instruction Follower", ep)
    target_label = ep.instance["target_grid_name"][0]
    grids = [rg.parse_grid(ep.instance[f"player_2_{k}_grid"]) for k in rg.ORDINALS]
    for index, label in enumerate(rg.ORDINALS):
        others = [g for i, g in enumerate(grids) if i != index]
        expression = rg.describe(grids[index], others)
        prompt = ep.instance["player_2_prompt_header"].replace("TARGET_EXPRESSION", expression)
        assert follower([{"role": "user", "content": prompt}]) == f"Answer: {label}"
    assert target_label in rg.ORDINALS


# ----- clembench instance files ----------------------------------------------------------------------------

def test_clembench_instances_file_loads_and_plays(tmp_path):
    current = rg.make_instance(0, T, D1, D2, 2)
    legacy = {  # an older layout: one label, no patterns or modes
        "game_id": 1,
        "edit_distance_interval": [2, 2],
        "player_1_prompt_header": "Describe the target.\n\n" + T + "\n\nGenerate the referring expression.",
        "player_1_target_grid": T.replace("□", "▢"),
        "player_1_second_grid": D1.replace("□", "▢"),
        "player_1_third_grid": D2.replace("□", "▢"),
        "player_2_prompt_header": "Which grid?\n\nTARGET_EXPRESSION\nGenerate only first, second or third.",
        "player_2_first_grid": D1.replace("□", "▢"),
        "player_2_second_grid": T.replace("□", "▢"),
        "player_2_third_grid": D2.replace("□", "▢"),
        "target_grid_name": "second",
    }
    data = {"experiments": [{"name": "line_grids_rows", "game_instances": [current]},
                            {"name": "hard_grids_edit_distance_2", "game_instances": [legacy]}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    episodes = registry.load_instances_file(path, "referencegame")
    assert [ep.experiment for ep in episodes] == [{"name": "line_grids_rows"},
                                                  {"name": "hard_grids_edit_distance_2"}]
    assert episodes[1].instance["target_grid_name"] == ["second", "2"]
    for ep in episodes:
        master = registry.make_master(ep)
        run_episode(master, [registry.make_player("referencegame", "strong", r, ep) for r in master.roles])
        assert master.scores()["episode scores"]["Success"] == 1
    # The legacy follower may answer without the tag.
    master = registry.make_master(episodes[1])
    run_episode(master, [lambda m: "Expression: the top row", lambda m: "second"])
    assert master.scores()["episode scores"]["Success"] == 1


# ----- fuzzing ---------------------------------------------------------------------------------------------

replies = st.one_of(
    st.text(max_size=80),
    st.builds(lambda tag, rest: tag + rest,
              st.sampled_from(["Expression: ", "expression:", "Answer: ", "answer:", "ANSWER: "]),
              st.one_of(st.text(max_size=40), st.sampled_from(["first", "2", "third\n", "second grid\nx"]))),
)


def check_scores(scores):
    es = scores["episode scores"]
    assert es["Aborted"] + es["Success"] + es["Lose"] == 1
    if es["Aborted"]:
        assert math.isnan(es["Main Score"])
    else:
        assert es["Main Score"] in (0.0, 100.0)
    assert es["Request Count"] == es["Parsed Request Count"] + es["Violated Request Count"]
    assert set(scores["turn scores"]) == {"0"}


@settings(max_examples=50, deadline=None)
@given(giver=replies, follower=replies, position=st.integers(0, 2))
def test_fuzz_arbitrary_replies(giver, follower, position):
    master = rg.ReferenceGameMaster(rg.make_instance(0, T, D1, D2, position), {})
    run_episode(master, [lambda m: giver, lambda m: follower])
    check_scores(master.scores())
