"""The embedded model plays games through the batched environment and the sampler."""

import json

import pytest

from games import eval as game_eval
from games import registry
from games.env import BatchedGameEnv


@pytest.fixture(scope="module")
def smollm2():
    from models import registry as model_registry

    return model_registry.load("smollm2-135m-instruct")


@pytest.mark.slow
def test_model_policy_answers_all_pending_requests_in_one_batch(smollm2):
    from playpen_jax.rollout import ModelPolicy

    eps = [e for g in ("taboo", "wordle", "referencegame") for e in registry.instances(g, "test", 0)[:2]]
    policy = ModelPolicy(smollm2, max_new_tokens=24, batch_size=8)
    calls = []

    def counted(reqs):
        calls.append(len(reqs))
        texts = policy(reqs)
        assert len(texts) == len(reqs) and all(isinstance(t, str) for t in texts)
        out = policy.last
        for i in range(len(reqs)):
            assert len(out.tokens[i]) == len(out.logprobs[i]) <= 24
            assert all(lp <= 0 for lp in out.logprobs[i])
            # The reply is the decoded sampled tokens (stripped).
            assert smollm2.tokenizer.decode(out.tokens[i]).strip().startswith(texts[i][:5])
        return texts

    env = BatchedGameEnv(iter(eps), batch_size=8, learner_roles="all", partner=None)
    finished = env.run(counted)
    assert len(finished) == len(eps)
    assert calls[0] == len(eps)  # every episode's first request in one generate call
    for f in finished:
        es = f.master.episode_scores
        assert es["Aborted"] + es["Success"] + es["Lose"] == 1


@pytest.mark.slow
def test_eval_cli_with_model_and_partner(tmp_path, capsys):
    out = tmp_path / "ev"
    rc = game_eval.main(["--model=smollm2-135m-instruct", "--games=taboo,wordle", "--limit=2",
                         "--partner=strong", "--model_roles=2", "--max_new_tokens=16", "--quiet",
                         f"--out={out}"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["model"] == "smollm2-135m-instruct"
    assert {g: s["episodes"] for g, s in res["games"].items()} == {"taboo": 2, "wordle": 2}
    inter = json.loads(sorted((out).rglob("taboo/**/interactions.json"))[0].read_text())
    assert inter["players"]["Player 1"]["model_name"] == "strong-programmatic"
    assert inter["players"]["Player 2"]["model_name"] == "smollm2-135m-instruct"
    assert "overall" in capsys.readouterr().out


@pytest.mark.slow
def test_model_player_callback_plays_a_whole_episode(smollm2):
    from games.core import run_episode
    from playpen_jax.rollout import ModelPolicy

    ep = registry.instances("wordle", "test", 0)[0]
    player = ModelPolicy(smollm2, max_new_tokens=16).player()
    master = run_episode(registry.make_master(ep, ["smollm2"]), [player])
    assert master.done
    replies = [e for rnd in master.turns for e in rnd if e.type == "get message"]
    assert replies and all(isinstance(e.content, str) for e in replies)
    # The model's words are what the game scored: its first reply is in the player's history.
    assert master.histories[0][1] == {"role": "assistant", "content": replies[0].content}


def test_a_limited_evaluation_takes_its_episodes_from_every_experiment():
    """--limit / eval.limit: the first instances of each experiment in turn, not the first
    experiment's only (a game's experiments are its difficulty levels or variants)."""
    eps = game_eval.episodes_for(["textmapworld_specificroom", "referencegame"], "test", 0, 4)
    room = [e for e in eps if e.game == "textmapworld_specificroom"]
    ref = [e for e in eps if e.game == "referencegame"]
    assert [e.experiment["name"] for e in room] == ["on", "close", "far", "on"]
    assert [int(e.instance["Specific_Room_Distance"]) > 0 for e in room] == [False, True, True, False]
    assert len({e.experiment["name"] for e in ref}) == 4
    every = registry.instances("textmapworld_specificroom", "test", 0)
    first = {name: next(e for e in every if e.experiment["name"] == name) for name in ("on", "close", "far")}
    assert [e.instance for e in room[:3]] == [first[n].instance for n in ("on", "close", "far")]
    # at or past the number of instances: all of them, each once
    assert len(game_eval.spread(every, 1000)) == len(every)
    assert {id(e) for e in game_eval.spread(every, 1000)} == {id(e) for e in every}
    assert game_eval.episodes_for(["wordle"], "test", 0, None) == registry.instances("wordle", "test", 0)
