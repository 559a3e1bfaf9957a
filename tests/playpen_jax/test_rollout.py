"""The rollout driver samples every episode from keys of its own: what an episode plays does not
depend on how the episodes are batched into sampler calls or split between processes."""

import numpy as np
import pytest

from games import colourname, registry
from games.env import BatchedGameEnv
from models import registry as model_registry
from playpen_jax.rollout import ModelPolicy, play, turn_seed
from tests.train.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return model_registry.load(make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model")))


def _episodes(n: int) -> list:
    pool = registry.instances(colourname.GAME_NAME, "train", 0)
    return [pool[i % len(pool)] for i in range(n)]


def _play(model, episodes, *, env_batch, policy_batch, offset=0, seed=3):
    policy = ModelPolicy(model, max_new_tokens=4, temperature=1.0, batch_size=policy_batch, seed=seed)
    env = BatchedGameEnv(iter([(ep, k) for k, ep in enumerate(episodes)]), batch_size=env_batch,
                         learner_roles="all", partner="strong", seed=11)
    out = {}
    for f, traces in play(env, policy, episode_offset=offset):
        out[f.episode_id + offset] = ([t.reply for t in f.turns if t.learner],
                                      [t.tokens for t in traces], [t.logprobs for t in traces])
    return out


def test_an_episode_plays_the_same_however_it_is_batched(tiny_model):
    eps = _episodes(8)
    whole = _play(tiny_model, eps, env_batch=8, policy_batch=8)
    assert len(whole) == 8
    # sampled at temperature 1, the episodes differ from each other (the seeds are per episode)
    assert len({tuple(map(tuple, v[1])) for v in whole.values()}) > 1
    split = _play(tiny_model, eps, env_batch=3, policy_batch=2)
    # episodes 5..7 played alone, numbered as in the whole run (a second process's share)
    tail = _play(tiny_model, eps[5:], env_batch=2, policy_batch=4, offset=5)
    for other in (split, tail):
        for k, (replies, tokens, logprobs) in other.items():
            assert replies == whole[k][0] and tokens == whole[k][1], k
            for a, b in zip(logprobs, whole[k][2]):
                np.testing.assert_allclose(a, b, atol=1e-5)
    # another policy seed samples something else
    reseeded = _play(tiny_model, eps, env_batch=8, policy_batch=8, seed=4)
    assert [v[1] for v in reseeded.values()] != [v[1] for v in whole.values()]


def test_turn_seeds_are_distinct_and_checked():
    seeds = {turn_seed(e, t) for e in range(300) for t in range(20)}
    assert len(seeds) == 300 * 20 and all(0 <= s < 2 ** 32 for s in seeds)
    with pytest.raises(ValueError, match="out of range"):
        turn_seed(-1, 0)
    with pytest.raises(ValueError, match="seeds for"):
        ModelPolicy.__call__(object.__new__(ModelPolicy), [[{"role": "user", "content": "x"}]], seeds=[1, 2])


def test_a_turn_prefills_only_what_the_chat_added(tiny_model):
    """The second turn of each chat reuses the first turn's prompt and reply from the kept KV cache
    (the chat template renders the earlier turns the same), and replies as a policy without the
    cache does; play() frees the kept caches when its episodes end."""
    chats = [[{"role": "system", "content": "You guess colours."},
              {"role": "user", "content": f"Name colour number {i}, please."}] for i in range(3)]
    kw = dict(max_new_tokens=6, temperature=1.0, seed=5)
    cached, plain = ModelPolicy(tiny_model, **kw), ModelPolicy(tiny_model, prefix_cache=False, **kw)
    assert plain.prefix_cache is None
    first = cached(chats, seeds=[1, 2, 3])
    assert first == plain(chats, seeds=[1, 2, 3])
    prompts = list(cached.last.prompt_ids)
    chats = [c + [{"role": "assistant", "content": r}, {"role": "user", "content": "And the next?"}]
             for c, r in zip(chats, first)]
    second = cached(chats, seeds=[4, 5, 6])
    assert second == plain(chats, seeds=[4, 5, 6])
    assert cached.last.tokens == plain.last.tokens
    for a, b in zip(cached.last.logprobs, plain.last.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # every chat's whole first prompt came from the cache (and more: part of the reply's rendering)
    assert cached.prefix_cache.reused_tokens >= sum(len(p) for p in prompts)
    assert cached.prefix_cache.entries
    env = BatchedGameEnv(iter([(ep, k) for k, ep in enumerate(_episodes(2))]), batch_size=2,
                         learner_roles="all", partner="strong", seed=11)
    play(env, cached)
    assert not cached.prefix_cache.entries


def test_the_kept_caches_are_bounded_in_bytes(tiny_model):
    """By default a quarter of the memory the sampler's devices have (the host's, on CPU); a bound
    given in bytes, e.g. none, is kept to, and the replies are the same."""
    import os

    from models.sampler import memory_bytes

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory_bytes() == host > 0
    assert ModelPolicy(tiny_model).prefix_cache.max_bytes == host // 4
    chats = [[{"role": "user", "content": f"Name colour number {i}, please."}] for i in range(3)]
    kw = dict(max_new_tokens=6, temperature=1.0, seed=5)
    roomy, none = ModelPolicy(tiny_model, **kw), ModelPolicy(tiny_model, prefix_cache_bytes=0, **kw)
    assert roomy(chats, seeds=[1, 2, 3]) == none(chats, seeds=[1, 2, 3])
    assert roomy.prefix_cache.entries and roomy.prefix_cache.nbytes > 0
    assert not none.prefix_cache.entries and none.prefix_cache.dropped == 1
