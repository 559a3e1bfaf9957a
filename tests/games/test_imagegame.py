"""Tests of the image game: rules, scores, generator, players, instance files, fuzzing."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from games import imagegame as ig
from games import registry
from games.core import GameError, run_episode

E = "▢"
TARGET = "A ▢ ▢ ▢ ▢\n▢ A ▢ ▢ ▢\n▢ ▢ A ▢ ▢\n▢ ▢ ▢ A ▢\n▢ ▢ ▢ ▢ ▢"
EMPTY_GRID = "\n".join(" ".join([E] * 5) for _ in range(5))


def grid(**cells):
    """A 5x5 grid with the given cells, e.g. grid(r1c1="A")."""
    rows = [[E] * 5 for _ in range(5)]
    for key, letter in cells.items():
        rows[int(key[1]) - 1][int(key[3]) - 1] = letter
    return "\n".join(" ".join(r) for r in rows)


def play(giver, follower, target=TARGET, **changes):
    """Plays a hand-made instance; giver/follower are lists of replies (or callables)."""
    inst = {**ig.make_instance(0, target), **changes}
    master = ig.ImageGameMaster(inst, {"name": "compact_grids"})
    seen = {0: [], 1: []}

    def scripted(index, replies):
        it = iter(replies) if isinstance(replies, list) else None

        def player(messages):
            seen[index].append(messages[-1]["content"])
            return next(it) if it else replies(messages)
        return player

    run_episode(master, [scripted(0, giver), scripted(1, follower)])
    return master, master.scores(), seen


def gm_events(master):
    return [[e.type for e in rnd if e.from_ == "GM" and e.to == "GM"] for rnd in master.turns]


# ----- rules and scores --------------------------------------------------------------------------------

def test_partial_drawing_is_scored_by_filled_cell_f1():
    giver = ["Command: Put A in row 1, column 1",
             "Command: Put A in row 2, column 2 and B in row 5, column 5",
             "Command: Erase everything",
             "Command: DONE"]
    g1 = grid(r1c1="A")
    g2 = grid(r1c1="A", r2c2="A", r5c5="B")
    master, scores, seen = play(giver, [g1, g2, EMPTY_GRID])
    ts, es = scores["turn scores"], scores["episode scores"]
    # Round 1: 1 of 1 drawn cells right, 1 of 4 target cells drawn: P 100, R 25, F1 = 2*.25/1.25 = 40.
    assert (ts["0"]["Precision"], ts["0"]["Recall"], ts["0"]["F1"]) == (100.0, 25.0, 40.0)
    # Round 2: 2 of 3 drawn cells right (.6667), 2 of 4 target cells (.5): F1 = .5714 -> 57.
    assert (ts["1"]["Precision"], ts["1"]["Recall"], ts["1"]["F1"]) == (67.0, 50.0, 57.0)
    # Round 3: an empty drawing leaves the scores undefined; the previous ones stand.
    assert (ts["2"]["Precision"], ts["2"]["Recall"], ts["2"]["F1"]) == (67.0, 50.0, 57.0)
    assert [ts[str(i)]["Changed Cell Count"] for i in range(3)] == [1, 2, 3]
    assert ts["0"]["Generated Expression Length"] == len(giver[0])
    assert ts["1"]["Generated Expression Number of Tokens"] == len(giver[1].split(" "))
    assert (es["Precision"], es["Recall"], es["F1"], es["Main Score"]) == (67.0, 50.0, 57.0, 57.0)
    assert (es["Success"], es["Lose"], es["Aborted"]) == (0, 1, 0)
    assert es["Average Changed Cell Count"] == 2.0
    assert es["Average Generated Instruction Length"] == round(sum(map(len, giver[:3])) / 3, 4)
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (7, 7, 0)
    assert es["Request Success Ratio"] == 1.0
    assert gm_events(master) == [["found instruction", "found grid"]] * 3 + [["found terminate pattern"]]
    # What the players saw.
    inst = master.instance
    assert seen[0][0] == inst["player_1_prompt_header"] + "\n" + TARGET + "\n" + "What is your next command?"
    assert seen[0][1:] == ["What is your next command?"] * 3
    assert seen[1][0] == inst["player_2_prompt_header"] + "\n\n" + giver[0]
    assert seen[1][1:] == giver[1:3]


def test_exact_drawing_is_a_success():
    target = "\n".join([" ".join([E] * 5)] * 4 + ["K K K K K"])
    giver = ["Command: Fill the bottom row with K", "command :  done "]
    master, scores, _ = play(giver, [target], target=target)
    es = scores["episode scores"]
    assert (es["Success"], es["Lose"], es["Aborted"], es["Main Score"]) == (1, 0, 0, 100.0)
    assert es["Average Changed Cell Count"] == 5.0
    assert es["Request Count"] == 3


def test_done_at_once_scores_zero():
    master, scores, seen = play(["Command: DONE"], [])
    es = scores["episode scores"]
    assert (es["Success"], es["Lose"], es["Aborted"], es["Main Score"]) == (0, 1, 0, 0.0)
    assert math.isnan(es["Average Changed Cell Count"]) and seen[1] == []
    assert (es["Request Count"], es["Parsed Request Count"]) == (1, 1)


def test_done_with_punctuation_is_an_instruction():
    master, scores, seen = play(["Command: DONE.", "Command: DONE"], [EMPTY_GRID])
    assert seen[1] and seen[1][0].endswith("Command: DONE.")
    assert scores["episode scores"]["Request Count"] == 3


@pytest.mark.parametrize("reply", [
    "Put an A in the top left corner.",     # no prefix
    "Command: Put A in row 1\nand row 2",   # more than one line
    "Command:",                            # nothing to do
    "Instruction: Put A in row 1",          # the prefix of older versions
])
def test_invalid_command_aborts(reply):
    master, scores, seen = play(["Command: Put A in row 1, column 1", reply], [grid(r1c1="A")])
    es = scores["episode scores"]
    assert (es["Aborted"], es["Success"], es["Lose"]) == (1, 0, 0)
    for key in ("Main Score", "Precision", "Recall", "F1", "Average Changed Cell Count"):
        assert math.isnan(es[key])
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (3, 2, 1)
    assert gm_events(master)[-1] == ["invalid format"]
    assert scores["turn scores"]["0"]["F1"] == 40.0  # completed rounds keep their turn scores


@pytest.mark.parametrize("reply", [
    "Here is the grid:\n" + grid(r1c1="A"),
    grid(r1c1="a"),                          # lowercase letters are not allowed
    grid(r1c1="A").replace("▢", "□"),        # another empty-cell character
    "A ▢ ▢ ▢\n▢ ▢ ▢ ▢\n▢ ▢ ▢ ▢\n▢ ▢ ▢ ▢",     # 4x4
    grid(r1c1="A").replace(" ", "  ", 1),    # two spaces between cells
])
def test_invalid_grid_aborts(reply):
    master, scores, _ = play(["Command: Put A in row 1, column 1"], [reply])
    es = scores["episode scores"]
    assert es["Aborted"] == 1 and math.isnan(es["Main Score"])
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (2, 1, 1)
    assert gm_events(master) == [["found instruction", "invalid format"]]


def test_turn_limit_ends_the_game_without_abort():
    target = grid(r1c1="A")
    master, scores, _ = play(lambda m: "Command: Put A in row 1, column 1", lambda m: target, target=target)
    es = scores["episode scores"]
    assert len(master.turns) == 50 and master.max_rounds == 50
    assert gm_events(master)[-1] == ["found instruction", "found grid", "game end"]
    assert (es["Aborted"], es["Success"], es["Main Score"]) == (0, 1, 100.0)
    assert es["Request Count"] == 100
    assert es["Average Changed Cell Count"] == round(1 / 50, 4)


def test_evaluate_matches_the_formula():
    assert ig.evaluate(TARGET, TARGET) == (100.0, 100.0, 100.0)
    assert ig.evaluate(TARGET, TARGET.replace("A", "B")) == (0.0, 0.0, 0.0)
    assert ig.evaluate(TARGET, "A ▢\n▢ ▢") == (0.0, 0.0, 0.0)  # another size
    assert ig.evaluate(TARGET, EMPTY_GRID) is None
    # 3 of 5 drawn cells right (.6), 3 of 4 target cells (.75): F1 = .6667.
    drawn = grid(r1c1="A", r2c2="A", r3c3="A", r5c5="A", r5c1="A")
    assert ig.evaluate(TARGET, drawn) == (60.0, 75.0, 67.0)
    assert ig.changed_cells(EMPTY_GRID, drawn) == 5
    assert ig.changed_cells(EMPTY_GRID, "A ▢\n▢") == 0


@pytest.mark.parametrize("changes,message", [
    ({"target_grid": "A B\nC D"}, "target_grid"),
    ({"target_grid": TARGET.replace("A", "7")}, "target_grid"),
    ({"grid_dimension": "5"}, "grid_dimension"),
    ({"player_2_response_pattern": "[A-Z"}, "pattern"),
    ({"player_1_question": None}, "player_1_question"),
])
def test_malformed_instances_are_rejected(changes, message):
    with pytest.raises(GameError, match=message):
        ig.ImageGameMaster({**ig.make_instance(0, TARGET), **changes}, {})


# ----- commands ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command,cells,letter", [
    ("Put an E in second row third column", {(1, 2)}, "E"),
    ("Fill the last row with X", {(4, c) for c in range(5)}, "X"),
    ("Put an R in the top left corner", {(0, 0)}, "R"),
    ("Put B in row 2, columns 1, 3 and 5", {(1, 0), (1, 2), (1, 4)}, "B"),
    ("Fill column 3 with Z", {(r, 2) for r in range(5)}, "Z"),
    ("Fill the whole grid with Q", {(r, c) for r in range(5) for c in range(5)}, "Q"),
    ("Put W in five cells diagonally starting from top left going to bottom right",
     {(i, i) for i in range(5)}, "W"),
    ("Fill the diagonal from the top right to the bottom left with M", {(i, 4 - i) for i in range(5)}, "M"),
])
def test_follower_understands_commands(command, cells, letter):
    assert ig.command_letter(command) == letter
    assert ig.command_cells(command, 5) == cells


def test_plans_redraw_every_target():
    shapes = [s for split in ("train", "validation", "test") for s in ig.compact_pool(split)]
    rng = random.Random(0)
    shapes += [frozenset(rng.sample(range(25), rng.randint(5, 10))) for _ in range(200)]
    for shape in shapes:
        letters = [rng.choice("ABCXYZ") for _ in range(25)] if rng.random() < 0.3 else ["K"] * 25
        target = [[letters[r * 5 + c] if r * 5 + c in shape else None for c in range(5)] for r in range(5)]
        drawn = [[None] * 5 for _ in range(5)]
        commands = ig.plan_commands(target)
        for command in commands:
            drawn = ig.apply_command(drawn, command)
        assert drawn == target, (ig.grid_text(target), commands)
        assert len(commands) <= (10 if letters[0] == "K" else 25)


# ----- generator --------------------------------------------------------------------------------

def test_generator_sizes_and_layout():
    for split, size in (("test", 30), ("validation", 10)):
        data = ig.generate(split, 0)
        assert [e["name"] for e in data["experiments"]] == ["compact_grids", "random_grids"]
        assert [len(e["game_instances"]) for e in data["experiments"]] == [size, size]
    train = ig.generate("train", 0)
    assert sum(len(e["game_instances"]) for e in train["experiments"]) >= 500
    for exp in ig.generate("test", 0)["experiments"]:
        assert [i["game_id"] for i in exp["game_instances"]] == list(range(len(exp["game_instances"])))
        for inst in exp["game_instances"]:
            cells = [c for c in inst["target_grid"].split() if c != E]
            assert len(set(cells)) == 1 and len(cells) == inst["number_of_letters"] >= 5
            if exp["name"] == "random_grids":
                assert len(cells) <= 10
            assert inst["player_1_response_pattern"] == "^command: [^\n]+$"
            ig.ImageGameMaster(inst, exp)  # valid


def test_generator_is_deterministic_and_seeded():
    assert ig.generate("train", 5) == ig.generate("train", 5)
    assert ig.generate("test", 5) != ig.generate("test", 6)


def test_no_shape_overlap_between_splits():
    train = {ig.instance_key(ep.instance) for seed in (0, 1)
             for ep in registry.instances("imagegame", "train", seed)}
    for split in ("test", "validation"):
        for seed in (0, 1, 2):
            keys = [ig.instance_key(ep.instance) for ep in registry.instances("imagegame", split, seed)]
            assert len(keys) == len(set(keys)) and not set(keys) & train
    # The key ignores the letter.
    key = ig.instance_key({"target_grid": TARGET})
    assert key == ig.instance_key({"target_grid": TARGET.replace("A", "Q")})
    assert key != ig.instance_key({"target_grid": TARGET.replace("▢", "A", 1)})


# ----- programmatic players --------------------------------------------------------------------------------

def run_players(episodes, kinds):
    results = []
    for ep in episodes:
        master = registry.make_master(ep)
        players = [registry.make_player("imagegame", k, role, ep) for k, role in zip(kinds, master.roles)]
        run_episode(master, players)
        results.append(master.scores()["episode scores"])
    played = [s for s in results if not s["Aborted"]]
    return len(played) / len(results), sum(s["Main Score"] for s in played) / max(1, len(played))


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_strong_players_draw_the_target_and_weak_ones_do_not(split):
    episodes = random.Random(split).sample(registry.instances("imagegame", split, 0), 20)
    played, quality = run_players(episodes, ("strong", "strong"))
    assert played >= 0.9 and quality >= 95
    for kinds in (("weak", "weak"), ("strong", "weak"), ("weak", "strong")):
        played, quality = run_players(episodes, kinds)
        assert played >= 0.9 and quality <= 30


# ----- clembench instance files ----------------------------------------------------------------------------

def test_clembench_instances_file_loads_and_plays(tmp_path):
    current = ig.make_instance(0, "▢ ▢ ▢ ▢ B\n▢ ▢ ▢ B ▢\n▢ ▢ B ▢ ▢\n▢ B ▢ ▢ ▢\nB B B B B")
    legacy = {  # an older layout: "Instruction:" commands, no patterns, a trailing newline
        "game_id": 0,
        "player_1_prompt_header": "Describe this grid step by step; say \"Instruction: DONE\" at the end.",
        "player_2_prompt_header": "Draw on an empty 5 by 5 grid.",
        "player_1_question": "What is your next instruction?",
        "grid_dimension": 5,
        "number_of_letters": 0,
        "fill_row": False,
        "fill_column": False,
        "target_grid": "B ▢ ▢ ▢ ▢\nB ▢ ▢ ▢ ▢\nB ▢ ▢ ▢ ▢\nB ▢ ▢ ▢ ▢\nB B B B B\n",
    }
    data = {"experiments": [{"name": "compact_grids", "game_instances": [current]},
                            {"name": "random_grids", "game_instances": [legacy]}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    episodes = registry.load_instances_file(path, "imagegame")
    assert [ep.experiment_name for ep in episodes] == ["compact_grids", "random_grids"]
    for ep in episodes:
        master = registry.make_master(ep)
        run_episode(master, [registry.make_player("imagegame", "strong", r, ep) for r in master.roles])
        es = master.scores()["episode scores"]
        assert es["Success"] == 1 and es["Main Score"] == 100.0
    master = registry.make_master(episodes[1])
    run_episode(master, [lambda m: "Command: Fill column 1 with B", lambda m: ""])
    assert master.scores()["episode scores"]["Aborted"] == 1


# ----- fuzzing ---------------------------------------------------------------------------------------------

cell = st.sampled_from(list("ABXZ▢") + ["□", "a"])
sep = st.sampled_from([" ", " ", " ", "\t", "\n", "  "])
grids = st.builds(lambda cells, seps: "".join(c + s for c, s in zip(cells, seps)).rstrip(),
                  st.lists(cell, min_size=20, max_size=30), st.lists(sep, min_size=30, max_size=30))
rows = st.lists(st.lists(cell, min_size=5, max_size=5).map(" ".join), min_size=4, max_size=6).map("\n".join)
replies = st.one_of(
    st.text(max_size=60),
    st.builds(lambda tag, rest: tag + rest,
              st.sampled_from(["Command: ", "command:", "Command: DONE", "Instruction: "]),
              st.text(max_size=30)),
    grids, rows,
)


@settings(max_examples=50, deadline=None)
@given(giver=st.lists(replies, min_size=1, max_size=4), follower=st.lists(replies, min_size=1, max_size=4))
def test_fuzz_arbitrary_replies(giver, follower):
    cycles = itertools.cycle(giver), itertools.cycle(follower)
    master = ig.ImageGameMaster(ig.make_instance(0, TARGET), {})
    run_episode(master, [lambda m: next(cycles[0]), lambda m: next(cycles[1])])
    scores = master.scores()
    es = scores["episode scores"]
    assert es["Aborted"] + es["Success"] + es["Lose"] == 1
    if es["Aborted"]:
        assert math.isnan(es["Main Score"])
    else:
        assert 0 <= es["Main Score"] <= 100
    assert es["Request Count"] == es["Parsed Request Count"] + es["Violated Request Count"] <= 101
    assert len(master.turns) <= 51
