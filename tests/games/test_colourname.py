"""Tests of the colourname test game: parsing, scores, record, generator, players, registry, env."""

import math

import pytest

from games import colourname as cn
from games import registry, split
from games.core import BENCH_SCORE, GameError, run_episode
from games.env import BatchedGameEnv

GAME = "colourname"
INSTANCE = {"game_id": 3, "hint": "a ripe banana", "prompt": "Name a colour for a ripe banana."}


def play(reply, instance=INSTANCE):
    master = cn.ColourName(instance, {"name": cn.EXPERIMENT})
    req = master.start()
    assert req is not None and req.role == "Player" and req.player == "Player 1"
    assert req.messages == ({"role": "user", "content": instance["prompt"]},)
    assert master.step(reply) is None and master.done
    return master, master.scores()["episode scores"]


@pytest.mark.parametrize("reply", ["red", "Blue.", "  PURPLE!\n", "**green**, I think", '"white"',
                                   "Yellow is my answer", "“orange”", "- black"])
def test_any_colour_as_first_word_succeeds(reply):
    master, es = play(reply)
    assert (es["Success"], es["Lose"], es["Aborted"], es[BENCH_SCORE]) == (1, 0, 0, 100.0)
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (1, 1, 0)
    assert es["Request Success Ratio"] == 1.0
    assert master.turn_scores[0]["Correct"] == 1


@pytest.mark.parametrize("reply,word", [("pink", "pink"), ("banana yellow", "banana"),
                                        ("The colour is red", "the"), ("reddish", "reddish"),
                                        ("red-ish", "red-ish"), ("grey.", "grey"), ("42", "42")])
def test_other_first_words_lose(reply, word):
    master, es = play(reply)
    assert (es["Success"], es["Lose"], es["Aborted"], es[BENCH_SCORE]) == (0, 1, 0, 0.0)
    assert (es["Parsed Request Count"], es["Violated Request Count"]) == (1, 0)
    assert master.answer == word
    assert master.turn_scores[0]["Correct"] == 0


@pytest.mark.parametrize("reply", ["", "   ", "\n\t", "?!", " ... "])
def test_reply_without_a_word_aborts(reply):
    master, es = play(reply)
    assert (es["Success"], es["Lose"], es["Aborted"]) == (0, 0, 1)
    assert math.isnan(es[BENCH_SCORE])
    assert (es["Request Count"], es["Parsed Request Count"], es["Violated Request Count"]) == (1, 0, 1)
    assert es["Request Success Ratio"] == 0.0
    assert "Correct" not in master.turn_scores[0]


def test_parse_answer():
    assert cn.parse_answer("  Red, blue ") == "red"
    assert cn.parse_answer("'GREEN'") == "green"
    assert cn.parse_answer("!! red") == "red"
    assert cn.parse_answer("") is None
    assert cn.parse_answer(" , . ") is None


def test_record_has_prompt_reply_and_parse_events():
    master, _ = play("Blue.")
    inter = master.interactions()
    assert inter["meta"]["round_count"] == 1 and inter["meta"]["game_id"] == 3
    events = [(e["from"], e["to"], e["action"]["type"], e["action"]["content"]) for e in inter["turns"][0]]
    assert events[:3] == [("GM", "Player 1", "send message", INSTANCE["prompt"]),
                          ("Player 1", "GM", "get message", "Blue."),
                          ("GM", "GM", "parse", "blue")]
    master, _ = play("")
    assert [e.type for e in master.turns[0]][2] == "invalid format"


@pytest.mark.parametrize("bad", [{"game_id": 1, "prompt": "x"}, {"game_id": 1, "hint": "x", "prompt": "  "},
                                 {"game_id": 1, "hint": 5, "prompt": "x"}])
def test_malformed_instance_is_refused(bad):
    with pytest.raises(GameError, match="colourname: instance 1 needs a non-empty string"):
        cn.ColourName(bad)


def test_colour_lists():
    assert len(cn.COLOURS) == len(set(cn.COLOURS)) == 8
    assert all(c.isalpha() and c == c.lower() for c in cn.COLOURS)
    assert not set(cn.NON_COLOURS) & set(cn.COLOURS)
    assert len(set(cn.HINTS)) == len(cn.HINTS) >= 40


def test_generator_partitions_hints_and_is_deterministic():
    by_split = {s: cn.hints_of(s) for s in registry.SPLITS}
    assert all(by_split.values())
    assert sorted(h for hs in by_split.values() for h in hs) == sorted(cn.HINTS)
    for s in registry.SPLITS:
        data = cn.generate(s, seed=0)
        assert data == cn.generate(s, seed=0)
        (exp,) = data["experiments"]
        insts = exp["game_instances"]
        assert len(insts) == cn.SIZES[s]
        assert [i["game_id"] for i in insts] == list(range(len(insts)))
        assert {i["hint"] for i in insts} <= set(by_split[s])
        for inst in insts:
            assert inst["hint"] in inst["prompt"] and ", ".join(cn.COLOURS) in inst["prompt"]
    # Validation and test use every hint of their split; another seed draws other training instances.
    test_insts = cn.generate("test", 0)["experiments"][0]["game_instances"]
    assert {i["hint"] for i in test_insts} == set(by_split["test"])
    assert cn.generate("train", 0) != cn.generate("train", 1)
    # Prompts vary across instances.
    prompts = [i["prompt"] for i in cn.generate("train", 0)["experiments"][0]["game_instances"]]
    assert len(set(prompts)) > 20
    with pytest.raises(GameError, match="unknown split 'dev'"):
        cn.generate("dev")


def play_with(kind, ep, seed):
    return run_episode(registry.make_master(ep), [registry.make_player(GAME, kind, "Player", ep, seed)])


def test_programmatic_players():
    eps = registry.instances(GAME, "test", seed=0)
    for i, ep in enumerate(eps):
        strong, weak = play_with("strong", ep, i), play_with("weak", ep, i)
        assert strong.episode_scores["Success"] == 1 and strong.answer in cn.COLOURS
        assert weak.episode_scores["Lose"] == 1 and weak.answer in cn.NON_COLOURS
    # The strong player's colour comes from its rng: several colours over the episodes.
    assert len({play_with("strong", ep, i).answer for i, ep in enumerate(eps)}) > 2


def test_registered_but_outside_the_playpen_split():
    assert GAME in registry.names()
    assert registry.get(GAME).roles == ("Player",)
    assert registry.resolve_names(GAME) == [GAME]
    assert registry.resolve_names("all") == split.TRAINING_GAMES + split.HELD_OUT_GAMES
    for spec in ("all", "train", "heldout"):
        assert GAME not in registry.resolve_names(spec)


def test_env_reward_depends_only_on_the_reply():
    eps = registry.instances(GAME, "train", seed=0)[:8]
    for reply, reward in [("red", 1.0), ("chair", 0.0), ("", -0.5)]:
        env = BatchedGameEnv(iter(eps), batch_size=4, learner_roles="all", partner=None)
        finished = env.run(lambda reqs: [reply] * len(reqs))
        assert len(finished) == len(eps)
        assert {f.reward for f in finished} == {reward}
        assert all(len(f.turns) == 1 for f in finished)
