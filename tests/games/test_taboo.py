"""Taboo: rules, scores, generator, players and clembench-file loading."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from games import registry, taboo
from games.core import GameError, run_episode

INSTANCE = {"game_id": 7, "target_word": "snow", "related_word": ["cold", "white", "winter"]}
EXPERIMENT = {"name": "high_en", "max_turns": 3,
              "describer_initial_prompt": "D: describe $TARGET_WORD$ avoiding\n$REL_WORD$\nin $N$ tries",
              "guesser_initial_prompt": "G: guess within $N$ tries"}
GOOD_CLUE = "CLUE: Frozen flakes that fall from clouds."


class Scripted:
    """A player replying from a list and keeping the messages it was shown."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.seen = []

    def __call__(self, messages):
        self.seen.append([dict(m) for m in messages])
        return self.replies.pop(0)


def play(clues, guesses, instance=INSTANCE, experiment=EXPERIMENT):
    d, g = Scripted(clues), Scripted(guesses)
    master = run_episode(taboo.Taboo(instance, experiment), {"Describer": d, "Guesser": g})
    assert not d.replies and not g.replies, "the episode ended before all scripted replies were used"
    return master, master.scores(), d, g


def gm_events(master, round_index):
    return [(e.type, e.content) for e in master.turns[round_index] if e.from_ == "GM" and e.to == "GM"]


# ----- hand-written episodes -----------------------------------------------------------------------
def test_success_in_first_round():
    m, s, d, g = play([GOOD_CLUE], ["GUESS: snow"])
    es = s["episode scores"]
    assert (es["Aborted"], es["Success"], es["Lose"], es["Main Score"]) == (0, 1, 0, 100.0)
    assert s["turn scores"] == {"0": {"Request Count": 1, "Parsed Request Count": 1,
                                      "Violated Request Count": 0, "Accuracy": 1}}
    assert gm_events(m, 0)[-1] == ("correct guess", "end game")
    assert ("valid clue", "frozen flakes that fall from clouds") in gm_events(m, 0)
    # Prompts: placeholders filled; the guesser's first message is its prompt followed by the clue.
    assert d.seen[0] == [{"role": "user", "content": "D: describe snow avoiding\n- cold\n- white\n- winter\n"
                                                     "in 3 tries"}]
    assert g.seen[0] == [{"role": "user", "content": "G: guess within 3 tries\n\n" + GOOD_CLUE}]


def test_success_in_third_round_and_message_flow():
    clues = [GOOD_CLUE, "CLUE: You build a man from it in December.", "CLUE: Sledding needs it."]
    m, s, d, g = play(clues, ["GUESS: rain", "GUESS: ice", "GUESS: Snow!"])
    es = s["episode scores"]
    assert (es["Aborted"], es["Success"], es["Lose"]) == (0, 1, 0)
    assert es["Main Score"] == pytest.approx(100 / 3)
    assert [s["turn scores"][str(i)]["Accuracy"] for i in range(3)] == [0, 0, 1]
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (3, 3, 0)
    assert es["Request Success Ratio"] == 1.0
    # A correct guess in the last round logs both end events, limit first.
    assert gm_events(m, 2)[-2:] == [("max rounds reached", "3"), ("correct guess", "end game")]
    # Each player sees the other's last reply verbatim.
    assert d.seen[1][-1] == {"role": "user", "content": "GUESS: rain"}
    assert g.seen[1][-1] == {"role": "user", "content": clues[1]}
    assert len(m.turns) == 3


def test_success_in_second_round_scores_fifty():
    _, s, _, _ = play([GOOD_CLUE, "CLUE: Sledding needs it."], ["GUESS: ice", "GUESS: snow"])
    assert s["episode scores"]["Main Score"] == 50.0


def test_loss_when_turns_run_out_and_repetitions():
    clues = [GOOD_CLUE, GOOD_CLUE, "CLUE: Sledding needs it."]
    m, s, _, _ = play(clues, ["GUESS: rain", "GUESS: rain", "GUESS: hail"])
    es = s["episode scores"]
    assert (es["Aborted"], es["Success"], es["Lose"], es["Main Score"]) == (0, 0, 1, 0.0)
    assert es["Repetition-Guesser"] == 1 and es["Repetition-Describer"] == 1
    assert gm_events(m, 2)[-1] == ("max rounds reached", "3")
    assert all(s["turn scores"][str(i)]["Accuracy"] == 0 for i in range(3))


def test_clue_with_target_variant_is_a_loss_not_an_abort():
    # "Snows" has the target's stem; the check happens before the guesser is asked.
    m, s, _, g = play(["CLUE: It snows in the mountains."], [])
    es = s["episode scores"]
    assert (es["Aborted"], es["Success"], es["Lose"], es["Main Score"]) == (0, 0, 1, 0.0)
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (1, 1, 0)
    assert g.seen == []
    kind, message = gm_events(m, 0)[-1]
    assert kind == "invalid clue" and "Target word 'snow'" in message and "'snows'" in message


def test_related_word_variant_in_later_round_is_a_loss():
    m, s, _, _ = play([GOOD_CLUE, "CLUE: Typical of winters up north."], ["GUESS: rain"])
    es = s["episode scores"]
    assert (es["Aborted"], es["Lose"], es["Main Score"], es["Request Count"]) == (0, 1, 0.0, 2)
    assert gm_events(m, 1)[-1][0] == "invalid clue"
    assert "Related word 'winter'" in gm_events(m, 1)[-1][1]


@pytest.mark.parametrize("reply", ["Frozen flakes.", "clue: frozen flakes", "The CLUE: is flakes", ""])
def test_describer_format_violation_aborts(reply):
    m, s, _, g = play([reply], [])
    es = s["episode scores"]
    assert (es["Aborted"], es["Success"], es["Lose"]) == (1, 0, 0)
    assert math.isnan(es["Main Score"])
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (1, 0, 1)
    assert s["turn scores"]["0"]["Violated Request Count"] == 1
    assert gm_events(m, 0)[-1] == ("invalid format", "abort game")
    assert g.seen == []


def test_guesser_format_violation_in_second_round_aborts():
    m, s, _, _ = play([GOOD_CLUE, "CLUE: Sledding needs it."], ["GUESS: rain", "I think it is snow"])
    es = s["episode scores"]
    assert es["Aborted"] == 1 and math.isnan(es["Main Score"])
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (2, 1, 1)
    assert es["Request Success Ratio"] == 0.5
    assert [s["turn scores"][str(i)]["Parsed Request Count"] for i in range(2)] == [1, 0]


def test_guess_must_be_exactly_the_target():
    _, s, _, _ = play([GOOD_CLUE] * 3, ["GUESS: snow, I think", "GUESS: snowfall", "GUESS: a snow"])
    assert s["episode scores"]["Lose"] == 1
    _, s, _, _ = play(["  " + GOOD_CLUE + "\n"], ["\nGUESS:   SNOW.  "])
    assert s["episode scores"]["Success"] == 1


def test_max_turns_comes_from_the_experiment():
    exp = dict(EXPERIMENT, max_turns=1)
    m, s, _, _ = play([GOOD_CLUE], ["GUESS: rain"], experiment=exp)
    assert s["episode scores"]["Lose"] == 1 and len(m.turns) == 1


# ----- the clue check --------------------------------------------------------------------------------
def test_check_clue_stems_and_stop_words():
    rel = ["transport", "cross", "traverse"]
    _, errors = taboo.check_clue("The state of doing a transition from A to B", "transit", rel)
    assert [e["type"] for e in errors] == [0]
    assert "'transition' (stem=transit)" in errors[0]["message"]
    _, errors = taboo.check_clue("Usually local transportation of people.", "transit", rel)
    assert [e["type"] for e in errors] == [1]
    assert taboo.check_clue("Conveyance of persons or things from one place to another.", "transit",
                            rel)[1] == []
    # Stop words are never checked, even when they are the related words.
    assert taboo.check_clue("Doing it all by yourself at home", "diy", ["do", "it", "yourself"])[1] == []
    # Punctuation is removed and any whitespace separates words, newlines included.
    assert taboo.check_clue("CLUE: frozen\nwinters!", "snow", ["winter"])[0] == "frozen\nwinters"
    assert len(taboo.check_clue("frozen\nwinters!", "snow", ["winter"])[1]) == 1
    # Case does not matter on either side.
    assert len(taboo.check_clue("Cold", "snow", ["COLD"])[1]) == 1


# ----- instance validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("instance,experiment", [
    ({"target_word": "", "related_word": []}, {}),
    ({"related_word": ["a"]}, {}),
    ({"target_word": "snow", "related_word": "cold"}, {}),
    ({"target_word": "snow", "related_word": ["cold", 3]}, {}),
    ({"target_word": "snow", "related_word": ["cold"]}, {"max_turns": 0}),
    ({"target_word": "snow", "related_word": ["cold"]}, {"max_turns": "3"}),
    ({"target_word": "snow", "related_word": ["cold"]}, {"describer_initial_prompt": ["x"]}),
])
def test_malformed_instances_raise_game_error(instance, experiment):
    with pytest.raises(GameError):
        taboo.Taboo(instance, experiment)


# ----- programmatic players --------------------------------------------------------------------------
def run_kind(ep, kind, seed):
    players = {r: registry.make_player("taboo", kind, r, ep, seed) for r in taboo.Taboo.roles}
    return run_episode(registry.make_master(ep), players).scores()["episode scores"]


@pytest.mark.parametrize("split", registry.SPLITS)
def test_strong_players_win_and_weak_players_do_not(split):
    eps = registry.instances("taboo", split, seed=3)[::2][:20]
    assert len(eps) >= 15
    strong = [run_kind(ep, "strong", i) for i, ep in enumerate(eps)]
    weak = [run_kind(ep, "weak", i) for i, ep in enumerate(eps)]
    played = sum(1 - s["Aborted"] for s in strong) / len(strong)
    quality = sum(s["Main Score"] for s in strong) / len(strong)
    assert played >= 0.9 and quality >= 90
    weak_quality = sum(0 if s["Aborted"] else s["Main Score"] for s in weak) / len(weak)
    assert all(s["Aborted"] == 0 for s in weak)  # weak players keep the format
    assert weak_quality < 20
    assert sum(s["Lose"] for s in weak) >= 0.8 * len(weak)


def test_strong_describer_varies_its_clue_and_stays_legal():
    ep = registry.instances("taboo", "test", seed=0)[0]
    describer = registry.make_player("taboo", "strong", "Describer", ep)
    wrong = Scripted(["GUESS: xyz", "GUESS: xyz", "GUESS: xyz"])
    m = run_episode(registry.make_master(ep), {"Describer": describer, "Guesser": wrong})
    es = m.scores()["episode scores"]
    assert es["Lose"] == 1 and len(m.turns) == 3 and es["Repetition-Describer"] == 0
    # For a word outside the resource, and with taboo words that rule out the letter hints.
    clues = taboo.strong_clues("xylograph", ["letters", "spelled", "begins"])
    assert clues and all(taboo.check_clue(c, "xylograph", ["letters", "spelled", "begins"])[1] == []
                         for c in clues)


def test_strong_guesser_reads_the_clue():
    ep = registry.instances("taboo", "test", seed=0)[0]
    guesser = registry.make_player("taboo", "strong", "Guesser", ep)
    target = ep.instance["target_word"]
    assert guesser([{"role": "user", "content": "CLUE: something"}]) == f"GUESS: {target}"


# ----- generator -------------------------------------------------------------------------------------
def test_generator_layout_sizes_determinism_and_disjoint_splits():
    sets = {s: taboo.generate(s, 0) for s in registry.SPLITS}
    for s, data in sets.items():
        assert [e["name"] for e in data["experiments"]] == ["high_en", "medium_en", "low_en"]
        for exp in data["experiments"]:
            assert exp["max_turns"] == 3
            assert "$TARGET_WORD$" in exp["describer_initial_prompt"]
            assert "$REL_WORD$" in exp["describer_initial_prompt"]
            assert "$N$" in exp["guesser_initial_prompt"]
            inst = exp["game_instances"][0]
            assert set(inst) == {"game_id", "target_word", "related_word", "target_word_stem",
                                 "related_word_stem"}
            assert [i["game_id"] for i in exp["game_instances"]] == list(range(len(exp["game_instances"])))
    count = {s: sum(len(e["game_instances"]) for e in d["experiments"]) for s, d in sets.items()}
    assert count["test"] == 60 and count["validation"] == 30 and count["train"] >= 300
    assert taboo.generate("test", 0) == sets["test"]
    assert taboo.generate("train", 1) != sets["train"]

    def keys(data):
        return {taboo.instance_key(i) for e in data["experiments"] for i in e["game_instances"]}
    test_keys = keys(sets["test"]) | keys(taboo.generate("test", 5))
    for seed in (0, 1, 2):
        train = keys(taboo.generate("train", seed))
        assert train.isdisjoint(test_keys)
        assert train.isdisjoint(keys(taboo.generate("validation", seed)))
    with pytest.raises(GameError):
        taboo.generate("dev", 0)


def test_resource_is_well_formed():
    words = taboo.load_words()
    assert all(len(words[level]) >= 150 for level in taboo.LEVELS)
    targets = [e["target_word"] for level in taboo.LEVELS for e in words[level]]
    assert len(targets) == len(set(targets))
    for level in taboo.LEVELS:
        for e in words[level]:
            assert len(e["related_word"]) == 3 and len(e["target_word"]) >= 3
            assert taboo.check_clue(e["clue"], e["target_word"], e["related_word"])[1] == [], e


# ----- clembench files -------------------------------------------------------------------------------
def test_clembench_instances_file_loads_and_plays(tmp_path):
    data = {"experiments": [{
        "name": "low_en", "max_turns": 2,
        "describer_initial_prompt": "Describe $TARGET_WORD$, not:\n$REL_WORD$ ($N$ tries)",
        "guesser_initial_prompt": "Guess it in $N$ tries.",
        "game_instances": [
            {"game_id": 0, "target_word": "autograph", "related_word": ["signature", "hand", "sign"],
             "target_word_stem": "autograph", "related_word_stem": ["signatur", "hand", "sign"]},
            {"game_id": 1, "target_word": "klein", "related_word": ["small"]},
        ]}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    eps = registry.load_instances_file(path, "taboo")
    assert [e.experiment_name for e in eps] == ["low_en", "low_en"]
    for i, ep in enumerate(eps):
        master = registry.make_master(ep)
        assert master.max_turns == 2
        assert master.describer_prompt.endswith("(2 tries)")
        es = run_kind(ep, "strong", i)
        assert es["Success"] == 1 and es["Main Score"] == 100.0
    # A single instance.json next to no experiment config plays with the default prompts.
    single = tmp_path / "high_en" / "instance.json"
    single.parent.mkdir()
    single.write_text(json.dumps(data["experiments"][0]["game_instances"][0]))
    (ep,) = registry.load_instances_file(single, "taboo")
    assert registry.make_master(ep).max_turns == 3
    assert run_kind(ep, "strong", 0)["Success"] == 1


# ----- fuzz ------------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(st.text(max_size=40),
                          st.builds(lambda p, t: p + t, st.sampled_from(["CLUE:", "GUESS:", " CLUE: "]),
                                    st.text(max_size=30))),
                min_size=1, max_size=8))
def test_arbitrary_replies_never_raise(texts):
    master = taboo.Taboo(INSTANCE, EXPERIMENT)
    req = master.start()
    n = 0
    while req is not None:
        assert n < 20
        req = master.step(texts[n % len(texts)])
        n += 1
    es = master.scores()["episode scores"]
    assert es["Aborted"] + es["Success"] + es["Lose"] == 1
    assert math.isnan(es["Main Score"]) if es["Aborted"] else 0 <= es["Main Score"] <= 100
    assert es["Request Count"] == len(master.turns) <= 3
    assert es["Parsed Request Count"] + es["Violated Request Count"] == es["Request Count"]
    json.dumps(master.scores(), allow_nan=True)
