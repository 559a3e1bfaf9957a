"""Codenames: rules, scores, generator, players and instance files."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from games import codenames as cn
from games import registry
from games.core import GameError, run_episode

BOARD = ["apple", "river", "lion", "piano", "castle", "rain", "ghost"]
ASSIGN = {"team": ["apple", "lion", "piano"], "opponent": ["river", "castle"], "innocent": ["rain"],
          "assassin": ["ghost"]}


def instance(**overrides):
    inst = {"game_id": 7, "board": list(BOARD), "assignments": {k: list(v) for k, v in ASSIGN.items()}}
    inst.update(overrides)
    return inst


def experiment(difficulty=1, flags=None, **extra):
    return {"name": "unit", "variable": "Unit", "opponent difficulty": difficulty,
            "assignments": {"team": 3, "opponent": 2, "innocent": 1, "assassin": 1},
            "flags": dict(flags or cn.STRICT_FLAGS), **extra}


def scripted(cluegiver, guesser, difficulty=1, flags=None, inst=None):
    """Plays with scripted replies; returns the master (the scripts must not run out)."""
    queues = {"Cluegiver": list(cluegiver), "Guesser": list(guesser)}
    master = cn.CodenamesMaster(inst or instance(), experiment(difficulty, flags))
    seen = {"Cluegiver": [], "Guesser": []}

    def player(role):
        def reply(messages):
            seen[role].append(messages[-1]["content"])
            return queues[role].pop(0)
        return reply

    run_episode(master, {r: player(r) for r in master.roles})
    master.prompts = seen
    assert not queues["Cluegiver"] and not queues["Guesser"], "unused scripted replies"
    return master


def events(master, type_):
    return [e.content for rnd in master.turns for e in rnd if e.type == type_]


def episode(master):
    return master.scores()["episode scores"]


def turn(master, i):
    return master.scores()["turn scores"][str(i)]


# ----- hand-written episodes ------------------------------------------------------------------------

def test_win_in_one_round():
    m = scripted(["CLUE: thing\nTARGETS: apple, lion, piano"], ["GUESS: apple, lion, piano"])
    es, ts = episode(m), turn(m, 0)
    assert (es["Success"], es["Lose"], es["Aborted"], es["Main Score"]) == (1, 0, 0, 100.0)
    assert es["Number of turns"] == 1 and es["Efficiency"] == 1
    assert es["Episode Recall"] == 1 and es["Episode Negative Recall"] == 1
    assert es["Request Count"] == 2 and es["Parsed Request Count"] == 2 and es["Violated Request Count"] == 0
    assert es["Request Success Ratio"] == 1.0 and es["Game ended through assassin"] == 0
    assert ts["Cluegiver Number of Targets"] == 3 and ts["Cluegiver Team Precision"] == 1
    assert ts["Guesser Number of Guesses"] == 3 and ts["Guesser Number of Revealed Words"] == 3
    assert ts["Guesser Target F1"] == 1 and ts["Guesser Team Recall"] == 1
    assert ts["Request Count"] == 2 and ts["Cluegiver validation error"] == 0
    assert events(m, "game end") == ["team has won"]
    assert not events(m, "opponent revealed")


def test_two_rounds_turn_ends_on_wrong_guess_and_opponent_moves():
    m = scripted(["CLUE: fruit\nTARGETS: apple, lion", "CLUE: zoo\nTARGETS: lion, piano"],
                 ["GUESS: apple, rain", "GUESS: lion, piano"])
    es, t0, t1 = episode(m), turn(m, 0), turn(m, 1)
    assert (es["Success"], es["Main Score"], es["Number of turns"]) == (1, 100.0, 2)
    assert events(m, "turn end after") == ["rain"]
    assert len(events(m, "opponent revealed")) == 1
    assert t0["Cluegiver Team Recall"] == 0.667 and t0["Cluegiver Team F1"] == 0.8
    assert t0["Guesser Number of Guesses"] == 2 and t0["Guesser Number of Revealed Words"] == 2
    assert t0["Guesser Target Precision"] == 0.5 and t0["Guesser Target Recall"] == 0.5
    assert t0["Guesser Team Precision"] == 0.5 and t0["Guesser Team Recall"] == 0.333
    assert t0["Guesser Team F1"] == 0.4
    assert t1["Cluegiver Team Recall"] == 1 and t1["Guesser Team F1"] == 1
    assert es["Average Cluegiver Team Recall"] == pytest.approx(0.8335, abs=1e-3)
    assert es["Episode Negative Recall"] == 0.75 and es["Efficiency"] == 1
    # Feedback, and lists that show the board after the opponent's move.
    opp_left = [w for w in ASSIGN["opponent"] if w not in [e["word"] for e in events(m, "opponent revealed")]]
    second_cg, second_g = m.prompts["Cluegiver"][1], m.prompts["Guesser"][1]
    assert second_cg.startswith("The word apple was guessed correctly. The word rain was guessed, but it is "
                                "a distractor word.")
    assert f"Remaining words for your opponent are: {opp_left[0]}." in second_cg
    assert "Your remaining team words are: lion, piano." in second_cg
    assert second_g.startswith("The word apple was guessed correctly.")
    board_line = second_g.strip().splitlines()[-1]
    assert board_line == ", ".join(w for w in BOARD if w in {"lion", "piano", "ghost", opp_left[0]})


def test_assassin_loses():
    m = scripted(["CLUE: spooky\nTARGETS: apple"], ["GUESS: ghost"])
    es, ts = episode(m), turn(m, 0)
    assert (es["Success"], es["Lose"], es["Aborted"], es["Main Score"]) == (0, 1, 0, 0.0)
    assert es["Game ended through assassin"] == 1
    assert es["Episode Negative Recall"] == 0.75 and es["Episode Recall"] == 0
    assert ts["Guesser Target Precision"] == 0 and ts["Guesser Team Precision"] == 0
    assert events(m, "game end") == ["opponent has won through assassin"]


def test_opponent_wins_by_its_moves_and_by_our_guesses():
    m = scripted(["CLUE: fruit\nTARGETS: apple"], ["GUESS: rain"], difficulty=2)
    es = episode(m)
    assert (es["Lose"], es["Main Score"], es["Game ended through assassin"]) == (1, 0.0, 0)
    assert sorted(e["word"] for e in events(m, "opponent revealed")) == ["castle", "river"]
    m = scripted(["CLUE: water\nTARGETS: apple", "CLUE: fort\nTARGETS: lion"],
                 ["GUESS: river", "GUESS: castle"], difficulty=0)
    es = episode(m)
    assert (es["Lose"], es["Number of turns"]) == (1, 2)
    assert events(m, "game end") == ["opponent has won"]
    assert es["Episode Negative Recall"] == 0.5


def test_more_guesses_than_needed_continue_after_last_team_word():
    m = scripted(["CLUE: thing\nTARGETS: apple, lion, piano, rain"], ["GUESS: apple, lion, piano, rain"])
    es = episode(m)
    # The last team word is found before the distractor; the team still wins.
    assert es["Success"] == 1 and events(m, "turn end after") == ["rain"]
    assert turn(m, 0)["Cluegiver Team Precision"] == 0.75


ABORTS = [
    (["fruit apple"], [], "prefix error", "Cluegiver"),
    (["CLUE: fruit"], [], "prefix error", "Cluegiver"),
    (["CLUE: fruit\nTARGETS: apple\nand more"], [], "rambling error", "Cluegiver"),
    (["CLUE: apples\nTARGETS: lion"], [], cn.ERR_RELATED_CLUE, "Cluegiver"),
    (["CLUE: apple\nTARGETS: lion"], [], cn.ERR_RELATED_CLUE, "Cluegiver"),
    (["CLUE: red fruit\nTARGETS: apple"], [], "clue contains spaces", "Cluegiver"),
    (["CLUE: fruit, 2\nTARGETS: apple"], [], "clue line contains the number of targets", "Cluegiver"),
    (["CLUE: fruit\nTARGETS: banana"], [], "target is hallucination", "Cluegiver"),
    (["CLUE: fruit\nTARGETS: apple, apple"], [], "target appears more than once in utterance", "Cluegiver"),
    (["CLUE: fruit\nTARGETS: apple"], ["apple"], "prefix error", "Guesser"),
    (["CLUE: fruit\nTARGETS: apple"], ["GUESS: apple, lion"], "wrong number of guesses", "Guesser"),
    (["CLUE: fruit\nTARGETS: apple"], ["GUESS: banana"], "guess word is hallucination", "Guesser"),
    (["CLUE: fruit\nTARGETS: apple"], ["GUESS: apple\nGUESS: lion"], "rambling error", "Guesser"),
    (["CLUE: fruit\nTARGETS: apple"], ["GUESS: fruit"], "guess is clue word", "Guesser"),
    (["CLUE: zoo\nTARGETS: apple, lion"], ["GUESS: lion, lion"], "guess appears more than once in utterance",
     "Guesser"),
    (["CLUE: fruit\nTARGETS: apple", "CLUE: x\nTARGETS: apple"], ["GUESS: apple"],
     "target was already guessed", "Cluegiver"),
    (["CLUE: fruit\nTARGETS: apple", "CLUE: zoo\nTARGETS: lion"], ["GUESS: apple", "GUESS: apple"],
     "guess was already guessed", "Guesser"),
]


@pytest.mark.parametrize("cluegiver,guesser,error,player", ABORTS)
def test_rule_violations_abort(cluegiver, guesser, error, player):
    m = scripted(cluegiver, guesser)
    es = episode(m)
    assert (es["Aborted"], es["Success"], es["Lose"]) == (1, 0, 0)
    assert math.isnan(es["Main Score"])
    assert es["Violated Request Count"] == 1
    assert es["Request Count"] == len(cluegiver) + len(guesser)
    assert es["Parsed Request Count"] == es["Request Count"] - 1
    errors = events(m, "validation error")
    assert [(e["type"], e["player"]) for e in errors] == [(error, player)]
    last = turn(m, len(m.turns) - 1)
    assert last[f"{player} validation error"] == 1


def test_reprompt_flag_allows_two_retries_per_round():
    flags = dict(cn.STRICT_FLAGS, **{cn.FLAG_REPROMPT: True})
    m = scripted(["nonsense", "CLUE: a b\nTARGETS: apple", "CLUE: thing\nTARGETS: apple, lion, piano"],
                 ["GUESS: apple, lion, piano"], flags=flags)
    es = episode(m)
    assert es["Success"] == 1 and es["Violated Request Count"] == 2 and es["Request Count"] == 4
    assert es["Cluegiver reprompt on error"] == 2 and es["Guesser reprompt on error"] == 0
    assert turn(m, 0)["Cluegiver validation error"] == 2
    assert m.prompts["Cluegiver"][1].startswith("Your answer broke the rules of the game: No line")
    m = scripted(["nonsense"] * 3, [], flags=flags)
    assert episode(m)["Aborted"] == 1 and episode(m)["Violated Request Count"] == 3


def test_generous_flags_tolerate_slips():
    flags = dict(cn.GENEROUS_FLAGS, **{cn.FLAG_REPROMPT: False})
    m = scripted(["Here you go:\nCLUE: fruit, 2\nTARGETS: apple, lion, banana",
                  "CLUE: x\nTARGETS: lion, piano"],
                 ["I think so.\nGUESS: kiwi, apple", "GUESS: lion, piano"], flags=flags)
    es = episode(m)
    assert es["Success"] == 1 and events(m, "clue") == ["fruit", "x"]
    assert events(m, "targets")[0] == ["apple", "lion"] and events(m, "guesses")[0] == ["apple"]
    assert es["Cluegiver ignore false targets or guesses"] == 1
    assert es["Cluegiver ignore number of targets"] == 1 and es["Cluegiver ignore rambling"] == 1
    assert es["Guesser ignore rambling"] == 1 and es["Guesser ignore false targets or guesses"] == 1


def test_strip_words_flag():
    m = scripted(["CLUE: fruit.\nTARGETS: apple.", "CLUE: zoo\nTARGETS: lion"],
                 ["GUESS: 'apple'.", "GUESS: rain"])
    assert episode(m)["Aborted"] == 0 and episode(m)["Cluegiver strip words"] == 2
    assert episode(m)["Guesser strip words"] == 1
    m = scripted(["CLUE: fruit.\nTARGETS: apple"], [], flags={f: False for f in cn.FLAGS})
    assert events(m, "validation error")[0]["type"] == "clue contains non-alphabetical characters"


def test_surrounding_whitespace_is_ignored():
    m = scripted(["\nCLUE: thing\nTARGETS: apple, lion, piano\n"], ["GUESS: apple, lion, piano\n\n"])
    assert episode(m)["Success"] == 1


@pytest.mark.parametrize("bad", [
    {"board": []},
    {"board": ["apple", "apple", "lion", "piano", "castle", "rain", "ghost"]},
    {"assignments": {"team": ["apple"], "opponent": ["river"]}},
    {"assignments": dict(ASSIGN, team=[])},
    {"assignments": dict(ASSIGN, innocent=["rain", "apple"])},
    {"assignments": dict(ASSIGN, joker=[])},
    {"board": BOARD + ["extra"]},
])
def test_malformed_instances_raise(bad):
    with pytest.raises(GameError):
        cn.CodenamesMaster(instance(**bad), experiment())


@pytest.mark.parametrize("bad", [{"opponent difficulty": -1}, {"opponent difficulty": "2"},
                                 {"flags": ["STRIP WORDS"]},
                                 {"initial_prompt_guesser": "clue $clue on $unknown"}])
def test_malformed_experiments_raise(bad):
    with pytest.raises(GameError):
        cn.CodenamesMaster(instance(), {**experiment(), **bad})


# ----- association data and players -------------------------------------------------------------------

def test_resources_are_consistent():
    res = cn.resources()
    vocab = res.wordlists["original"]
    assert len(vocab) >= 1000 and len(res.categories) >= 50
    assert all(len(words) >= 10 for words in res.categories.values())
    for name, words in res.wordlists.items():
        assert len(words) >= 100, name
    for clue in res.by_clue:
        assert cn.related_word(clue, vocab) is None, clue


def test_plan_clue_keeps_pace_and_avoids_board_words():
    team = ["lullaby", "rudder", "bribery"]
    hidden = team + ["treaty", "storm"]
    clue, targets = cn.plan_clue(team, hidden, 2)
    rest = [w for w in team if w not in targets]
    assert len(cn.plan_clue(rest, hidden, 1)[1]) == len(rest)  # the rest fits one clue
    clue, targets = cn.plan_clue(team, hidden, 10)   # no hurry: one precise category
    assert cn.resources().by_clue[clue].level == 0 and len(targets) == 1
    # A clue that is a form of a hidden word is never given.
    assert cn.plan_clue(["fox"], ["fox"], 5)[0] == "mammal"
    assert cn.plan_clue(["fox"], ["fox", "mammals"], 5)[0] == "furry"
    assert cn.plan_clue(["fox"], ["fox", "mammals", "furry"], 5)[0] == "creature"


def spread(split, n=20):
    eps = registry.instances("codenames", split, seed=0)
    return eps[::max(1, len(eps) // n)][:n]


def play(ep, kind, seed=0):
    players = {r: registry.make_player("codenames", kind, r, ep, seed) for r in cn.CodenamesMaster.roles}
    return run_episode(registry.make_master(ep), players)


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_strong_players_win_weak_players_lose(split):
    eps = spread(split)
    strong = [episode(play(ep, "strong")) for ep in eps]
    weak = [episode(play(ep, "weak")) for ep in eps]
    played = sum(1 - s["Aborted"] for s in strong) / len(strong)
    quality = sum(s["Main Score"] for s in strong if not s["Aborted"]) / len(strong)
    assert played >= 0.9 and quality >= 85, (played, quality)
    weak_quality = sum(0 if s["Aborted"] else s["Main Score"] for s in weak) / len(weak)
    assert weak_quality <= 15
    assert all(s["Average Guesser Team Precision"] == 1 for s in strong)


def test_strong_players_follow_the_prompts_of_a_clembench_style_file(tmp_path):
    ep = registry.instances("codenames", "test", seed=0)[0]
    templates = {
        "initial_prompt_cluegiver": "Team: $team_words.\nOpponent: $opponent_words.\nNeutral: "
                                    "$innocent_words.\nKill: $assassin_words.\nReply with CLUE: and TARGETS:",
        "intermittent_prompt_cluegiver": "Team: $team_words.\nOpponent: $opponent_words.\n"
                                         "Neutral: $innocent_words.\nKill: $assassin_words.",
        "initial_prompt_guesser": "MARKER pick up to $number words for '$clue'. "
                                  "Start with 'GUESS: '.\n\n$board",
        "intermittent_prompt_guesser": "Again up to $number words for '$clue'.\n\n$board",
    }
    config = {k: v for k, v in ep.experiment.items() if k not in cn.PROMPT_KEYS}
    data = {"experiments": [
        {**config, **templates, "game_instances": [ep.instance]},
        {"name": "no_templates", "variable": "Risk", "number of instances": 1, "generator": "random",
         "opponent difficulty": 1, "assignments": {"team": 9, "opponent": 8, "innocent": 7, "assassin": 1},
         "wordlist": "original.json", "flags": dict(cn.STRICT_FLAGS),
         "game_instances": [dict(ep.instance, game_id=0)]},
    ]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    loaded = registry.load_instances_file(path, "codenames")
    assert len(loaded) == 2
    for i, loaded_ep in enumerate(loaded):
        m = play(loaded_ep, "strong")
        assert episode(m)["Success"] == 1
        first_guesser_prompt = m.histories[1][0]["content"]
        assert first_guesser_prompt.startswith("MARKER") == (i == 0)


# ----- generator ----------------------------------------------------------------------------------------

def test_generator_sizes_layout_and_determinism():
    for split, per_exp in cn.SPLIT_SIZES.items():
        data = cn.generate(split, 3)
        assert [e["name"] for e in data["experiments"]] == [name for name, _, _ in cn.EXPERIMENTS]
        for exp in data["experiments"]:
            assert len(exp["game_instances"]) == per_exp == exp["number of instances"]
            counts = exp["assignments"]
            for inst in exp["game_instances"]:
                assert {k: len(v) for k, v in inst["assignments"].items()} == counts
                assert sorted(inst["board"]) == sorted(w for v in inst["assignments"].values() for w in v)
                assert registry.split_of(cn.instance_key(inst), salt="codenames") == split
                cn.CodenamesMaster(inst, exp)  # valid
        assert cn.generate(split, 3) == data
    assert cn.generate("train", 3) != cn.generate("train", 4)


def test_association_experiments_group_words_by_category():
    exp = {e["name"]: e for e in cn.generate("test", 0)["experiments"]}
    cats = cn.resources().categories
    for inst in exp["association_easy"]["game_instances"]:
        team = inst["assignments"]["team"]
        used = inst["private"]["categories"]
        assert 2 <= len([c for c in used if set(cats[c]) & set(team)]) <= 5
    for inst in exp["abstract"]["game_instances"]:
        assert set(inst["board"]) <= set(cn.resources().wordlists["abstract"])
    assert all(e["opponent difficulty"] == d for e, d in
               [(exp["opponent_none"], 0), (exp["opponent_difficult"], 2)])


def test_splits_never_share_boards():
    keys = {s: {cn.instance_key(ep.instance) for ep in registry.instances("codenames", s, seed=0)}
            for s in registry.SPLITS}
    other_train = {cn.instance_key(ep.instance) for ep in registry.instances("codenames", "train", seed=5)}
    assert len(keys["test"]) == 130 and len(keys["validation"]) == 130 and len(keys["train"]) == 520
    assert keys["train"].isdisjoint(keys["test"]) and keys["train"].isdisjoint(keys["validation"])
    assert keys["validation"].isdisjoint(keys["test"]) and other_train.isdisjoint(keys["test"])


# ----- fuzz -----------------------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.text(max_size=40) | st.sampled_from(
    ["CLUE: fruit\nTARGETS: apple", "GUESS: apple", "GUESS: rain, lion", "GUESS: ghost",
     "CLUE: x\nTARGETS: lion, piano, rain", "CLUE: zoo\nTARGETS: banana, lion"]), min_size=1, max_size=20),
    st.booleans(), st.integers(0, 2))
def test_arbitrary_replies_never_raise(replies, generous, difficulty):
    flags = cn.GENEROUS_FLAGS if generous else cn.STRICT_FLAGS
    master = cn.CodenamesMaster(instance(), experiment(difficulty, flags))
    req, n = master.start(), 0
    while req is not None:
        req = master.step(replies[n % len(replies)])
        n += 1
        assert n < 500
    scores = master.scores()
    es = scores["episode scores"]
    assert es["Aborted"] + es["Success"] + es["Lose"] == 1
    assert math.isnan(es["Main Score"]) if es["Aborted"] else es["Main Score"] in (0.0, 100.0)
    assert es["Request Count"] == es["Parsed Request Count"] + es["Violated Request Count"] == n
    assert len(scores["turn scores"]) == es["Number of turns"]
    json.dumps(scores, allow_nan=True)
    json.dumps(master.interactions())
