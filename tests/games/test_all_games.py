"""Properties every game must have, checked on every registered game."""

import json
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from games import records, registry, replay, split
from games.core import BENCH_SCORE, STANDARD_EPISODE_METRICS, run_episode

# Registered games that belong to neither side of the Playpen split (games for testing learning code).
TEST_GAMES = ["colourname"]
GAMES = split.TRAINING_GAMES + split.HELD_OUT_GAMES + TEST_GAMES


def test_split_covers_registry_and_is_disjoint():
    assert set(split.TRAINING_GAMES).isdisjoint(split.HELD_OUT_GAMES)
    assert set(TEST_GAMES).isdisjoint(split.TRAINING_GAMES + split.HELD_OUT_GAMES)
    assert sorted(GAMES) == sorted(registry.names())


def play(ep, kind, seed=0, kinds=None):
    spec = registry.get(ep.game)
    players = {r: registry.make_player(ep.game, (kinds or {}).get(r, kind), r, ep, seed) for r in spec.roles}
    return run_episode(registry.make_master(ep), players)


def check_scores(master):
    s = master.scores()
    es = s["episode scores"]
    for k in STANDARD_EPISODE_METRICS:
        assert k in es, k
    assert es["Aborted"] + es["Success"] + es["Lose"] == 1
    if es["Aborted"]:
        assert math.isnan(es[BENCH_SCORE])
    else:
        assert 0 <= es[BENCH_SCORE] <= 100
    assert es["Request Count"] >= es["Parsed Request Count"]
    json.dumps(s, allow_nan=True)
    json.dumps(master.interactions())
    return es


@pytest.mark.parametrize("game", GAMES)
def test_instances_deterministic_and_splits_disjoint(game):
    spec = registry.get(game)
    sets = {s: registry.instances(game, s, seed=0) for s in registry.SPLITS}
    for s, eps in sets.items():
        assert eps, f"{game}: empty {s} split"
    again = registry.instances(game, "test", seed=0)
    assert [e.instance for e in again] == [e.instance for e in sets["test"]]
    keys = {s: {spec.instance_key(e.instance) for e in eps} for s, eps in sets.items()}
    assert keys["train"].isdisjoint(keys["test"])
    assert keys["train"].isdisjoint(keys["validation"])
    # Another seed makes other training sets but still never touches the test identities.
    other = {spec.instance_key(e.instance) for e in registry.instances(game, "train", seed=1)}
    assert other.isdisjoint(keys["test"])


@pytest.mark.parametrize("game", GAMES)
def test_strong_players_play_well_weak_players_worse(game):
    eps = registry.instances(game, "test", seed=0)[:12]
    strong = [check_scores(play(e, "strong", i)) for i, e in enumerate(eps)]
    weak = [check_scores(play(e, "weak", i)) for i, e in enumerate(eps)]
    played = sum(1 - s["Aborted"] for s in strong) / len(strong)
    q_strong = sum(s[BENCH_SCORE] for s in strong if not s["Aborted"]) / max(1, sum(1 - s["Aborted"]
                                                                                    for s in strong))
    q_weak = [0.0 if s["Aborted"] else s[BENCH_SCORE] for s in weak]
    assert played >= 0.9, f"{game}: strong players played {played:.0%}"
    assert q_strong >= 60, f"{game}: strong quality {q_strong:.1f}"
    assert sum(q_weak) / len(q_weak) < q_strong - 10, f"{game}: weak {q_weak} vs strong {q_strong}"


@pytest.mark.parametrize("game", GAMES)
def test_records_round_trip_and_replay_agrees(game, tmp_path):
    eps = registry.instances(game, "test", seed=0)[:4]
    masters = [play(e, kind, i) for i, e in enumerate(eps) for kind in ("strong", "weak")]
    for i, m in enumerate(masters):
        folder = records.write_episode(tmp_path, m, m.experiment, index=i)
        assert (folder / "transcript.html").read_text().startswith("<!DOCTYPE html>")
    results = replay.replay_dir(tmp_path)
    assert len(results) == len(masters)
    for r in results:
        assert r.agrees, (r.folder, r.differences, r.note)
        assert not r.note, r.note


@pytest.mark.parametrize("game", GAMES)
def test_arbitrary_replies_never_crash(game):
    eps = registry.instances(game, "test", seed=0)[:3]
    spec = registry.get(game)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.text(max_size=60), min_size=1, max_size=12), st.integers(0, len(eps) - 1),
           st.randoms(use_true_random=False))
    def run(texts, which, rnd):
        ep = eps[which]
        strong = {r: registry.make_player(game, "strong", r, ep) for r in spec.roles}
        master = registry.make_master(ep)
        req = master.start()
        n = 0
        while req is not None:
            n += 1
            assert n < 2000, "episode does not end"
            # Mix garbage with sensible replies so that later turns are reached too.
            text = texts[n % len(texts)] if rnd.random() < 0.6 else strong[req.role](list(req.messages))
            req = master.step(text)
        check_scores(master)

    run()


def test_weak_partner_with_strong_learner_is_deterministic():
    game = "taboo"
    ep = registry.instances(game, "test", seed=0)[0]
    roles = registry.get(game).roles
    a = play(ep, "strong", 3, kinds={roles[-1]: "weak"}).scores()["episode scores"]
    b = play(ep, "strong", 3, kinds={roles[-1]: "weak"}).scores()["episode scores"]
    assert a == b or (math.isnan(a[BENCH_SCORE]) and {k: v for k, v in a.items() if k != BENCH_SCORE}
                      == {k: v for k, v in b.items() if k != BENCH_SCORE})


def test_random_is_not_used_globally():
    # Programmatic players take their randomness from the rng they are given.
    ep = registry.instances("wordle", "test", seed=0)[0]
    random.seed(1)
    a = play(ep, "weak", 5).scores()["episode scores"]
    random.seed(2)
    b = play(ep, "weak", 5).scores()["episode scores"]
    assert a[BENCH_SCORE] == b[BENCH_SCORE] or (math.isnan(a[BENCH_SCORE]) and math.isnan(b[BENCH_SCORE]))
