import json
import math

import pytest

from games import clemscore, registry, replay
from games import eval as game_eval
from games import list as game_list
from games.core import BENCH_SCORE, GameError, run_episode
from games.env import BatchedGameEnv, RewardConfig

MIX = ["taboo", "wordle", "referencegame", "privateshared", "textmapworld"]


def mixed_episodes(n_per_game=3):
    return [ep for g in MIX for ep in registry.instances(g, "test", seed=0)[:n_per_game]]


def strong_policy(env_seed=0):
    """Answers outside requests with each episode's strong programmatic player of that role."""
    cache = {}

    def policy(reqs, episodes):
        out = []
        for r in reqs:
            key = (r.episode_id, r.role)
            if key not in cache:
                ep = episodes[r.episode_id]
                cache[key] = registry.make_player(ep.game, "strong", r.role, ep, seed=0)
            out.append(cache[key](list(r.messages)))
        return out

    return policy


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_batched_env_matches_sequential_play(batch_size):
    eps = mixed_episodes()
    env = BatchedGameEnv(iter(eps), batch_size=batch_size, learner_roles="all", partner=None)
    policy = strong_policy()
    steps, max_pending, finished = 0, 0, []
    while not env.done:
        reqs = env.pending()
        assert reqs and len({r.episode_id for r in reqs}) == len(reqs)  # one request per live episode
        assert env.live_count <= batch_size
        max_pending = max(max_pending, len(reqs))
        finished += env.step(policy(reqs, eps))
        steps += 1
    assert sorted(f.episode_id for f in finished) == list(range(len(eps)))
    assert max_pending == min(batch_size, len(eps))
    for f in finished:
        ep = eps[f.episode_id]
        spec = registry.get(ep.game)
        seq = run_episode(registry.make_master(ep),
                          {r: registry.make_player(ep.game, "strong", r, ep, seed=0) for r in spec.roles})
        a, b = f.master.episode_scores, seq.episode_scores
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), (ep.game, k)
        assert f.reward == RewardConfig()(b)
        assert all(t.learner for t in f.turns)
    if batch_size > 1:
        # Batching saves policy calls: far fewer steps than requests answered.
        assert steps < sum(len(f.turns) for f in finished) / 2


def test_programmatic_partner_answers_inside_env_and_only_learner_requests_go_out():
    eps = registry.instances("taboo", "test", seed=0)[:6]
    roles = registry.get("taboo").roles
    learner = roles[1]
    env = BatchedGameEnv(iter(eps), batch_size=3, learner_roles={"taboo": [learner]}, partner="strong")
    policy = strong_policy()
    finished = []
    while not env.done:
        reqs = env.pending()
        assert all(r.role == learner and r.learner for r in reqs)
        finished += env.step(policy(reqs, eps))
    assert len(finished) == 6
    for f in finished:
        assert f.learner_roles == (learner,)
        assert {t.role for t in f.turns if t.learner} == {learner}
        assert {t.role for t in f.turns if not t.learner} <= {roles[0]}
        assert f.master.interactions()["players"]["Player 1"]["model_name"] == "strong-programmatic"
        conv = f.conversation(f.master.player_names[1])
        assert conv[-1]["role"] == "assistant"
        assert f.reward > 0


def test_reward_config():
    played = {"Aborted": 0, "Success": 1, "Lose": 0, BENCH_SCORE: 50.0}
    aborted = {"Aborted": 1, "Success": 0, "Lose": 0, BENCH_SCORE: math.nan}
    assert RewardConfig()(played) == 0.5
    assert RewardConfig(kind="success")(played) == 1.0
    assert RewardConfig(abort_penalty=0.25)(aborted) == -0.25
    with pytest.raises(GameError, match="reward kind"):
        RewardConfig(kind="bogus")


def test_env_errors():
    eps = registry.instances("taboo", "test", seed=0)[:2]
    with pytest.raises(GameError, match="not among"):
        BatchedGameEnv(iter(eps), learner_roles={"taboo": ["Nobody"]})
    env = BatchedGameEnv(iter(eps), batch_size=2, partner=None)
    with pytest.raises(GameError, match="replies for"):
        env.step(["only one"])
    with pytest.raises(GameError, match="no pending request"):
        env.step({12345: "x"})


def test_clemscore_aggregate_matches_definition():
    a = [{"Aborted": 0, "Success": 1, BENCH_SCORE: 100.0},
         {"Aborted": 1, "Success": 0, BENCH_SCORE: math.nan}]
    b = [{"Aborted": 0, "Success": 0, BENCH_SCORE: 20.0}, {"Aborted": 0, "Success": 1, BENCH_SCORE: 40.0}]
    c = [{"Aborted": 1, "Success": 0, BENCH_SCORE: math.nan}]
    res = clemscore.aggregate({"a": a, "b": b, "c": c})
    assert res["games"]["a"]["played"] == 50 and res["games"]["a"]["quality"] == 100
    assert res["games"]["a"]["clemscore"] == 50
    assert res["games"]["b"]["quality"] == 30 and res["games"]["b"]["clemscore"] == 30
    assert math.isnan(res["games"]["c"]["quality"]) and res["games"]["c"]["clemscore"] == 0
    assert res["played"] == pytest.approx((50 + 100 + 0) / 3)
    assert res["quality"] == pytest.approx((100 + 30) / 2)
    assert res["clemscore"] == pytest.approx(res["played"] / 100 * res["quality"])


def test_eval_and_replay_clis(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = game_eval.main(["--players=strong", "--games=taboo,wordle,imagegame", "--limit=3", "--quiet",
                         f"--out={out}"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["games"]) == {"taboo", "wordle", "imagegame"}
    assert res["games"]["taboo"]["episodes"] == 3 and res["clemscore"] > 50
    assert (out / "clemscore.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(out.rglob("scores.json"))) == 9
    capsys.readouterr()
    rc = replay.main([str(out), "--out", str(tmp_path / "rescored")])
    text = capsys.readouterr().out
    assert rc == 0 and "100.0%" in text
    assert len(list((tmp_path / "rescored").rglob("scores.json"))) == 9
    # Without its experiment config a record is replayed on the game's own defaults.
    exp = sorted(out.rglob("taboo/*/experiment.json"))[0]
    exp.unlink()
    results = replay.replay_dir(exp.parent)
    assert results and all(r.used_default_config and r.agrees for r in results)
    # A record whose reply was altered disagrees, and the report names the round.
    victim = sorted(out.rglob("interactions.json"))[0]
    inter = json.loads(victim.read_text())
    for rnd in inter["turns"]:
        for ev in rnd:
            if ev["action"]["type"] == "get message":
                ev["action"]["content"] = "nonsense that breaks every format"
    victim.write_text(json.dumps(inter))
    rc = replay.main([str(victim.parent)])
    text = capsys.readouterr().out
    assert rc == 0 and "0.0%" in text and "first differing round" in text


def test_cli_errors(tmp_path, capsys):
    assert game_eval.main(["--players=strong", "--games=nope", "--quiet", f"--out={tmp_path}"]) == 2
    assert "unknown game 'nope'" in capsys.readouterr().err
    assert game_eval.main(["--games=taboo"]) == 2
    assert "exactly one of --model or --players" in capsys.readouterr().err
    assert replay.main([str(tmp_path / "missing")]) == 2
    assert "records folder not found" in capsys.readouterr().err
    assert game_list.main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["game"] for r in rows} == set(registry.names())
    assert {r["game"] for r in rows if r["set"] != "test"} == set(registry.resolve_names("all"))
    assert all(r["test"] > 0 and r["train"] > 0 for r in rows)
