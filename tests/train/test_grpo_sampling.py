"""What GRPO trains on: DAPO's dynamic sampling (refill until every group has signal), its overlong
filter and soft length penalty, and beta = 0 skipping the reference forward."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from games import registry
from games.env import RewardConfig
from models import llama
from models import registry as model_registry
from playpen_jax import buffers
from playpen_jax.config import ConfigError, apply_override, validate
from playpen_jax.config import load_file as load_config
from playpen_jax.rollout import ModelPolicy, PolicyOutput
from tests.train.tiny_model import make_tiny_model
from train import grpo, losses


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return model_registry.load(make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model")))


def _config(**over):
    c = load_config("configs/grpo.py")
    base = {"games.names": "colourname", "games.learner_roles": "all", "rollout.max_new_tokens": 4,
            "batch.max_seq_len": 128, "grpo.group_size": 2, "grpo.groups_per_step": 4}
    for k, v in {**base, **over}.items():
        apply_override(c, k, str(v))
    validate(c)
    return c


def _collect(model, c, step=0, policy=None):
    if policy is None:
        policy = ModelPolicy(model, max_new_tokens=int(c.rollout.max_new_tokens), temperature=1.0)
        policy._key = jax.random.fold_in(jax.random.PRNGKey(int(c.seed)), step)
    pool = [registry.instances("colourname", "train", int(c.seed))]
    return grpo.collect(pool, c, step, policy, None, "all", RewardConfig("quality", 0.5),
                        env_partner="strong")


def _group_rewards(ro, reward=lambda f, t: f.reward):
    out: dict = {}
    for f, traces in ro.finished:
        out.setdefault(int(f.tag), []).append(reward(f, traces))
    return out


# ----- overlong ------------------------------------------------------------------------------------

def _dapo_length_reward(lengths, l_max, l_cache):
    """Yu et al. 2025 (DAPO), eq. 13: 0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache
    if L_max - L_cache < |y| <= L_max; -1 if L_max < |y|."""
    y = np.asarray(lengths, np.float64)
    mid = ((l_max - l_cache) - y) / max(l_cache, 1)
    return np.where(y <= l_max - l_cache, 0.0, np.where(y <= l_max, mid, -1.0))


@pytest.mark.parametrize("l_max, l_cache", [(64, 16), (8, 1), (100, 99), (32, 0)])
def test_overlong_penalty_is_daposs_soft_punishment(l_max, l_cache):
    lengths = np.arange(0, l_max + 4)
    got = [grpo.overlong_penalty(int(n), l_max, l_cache) for n in lengths]
    want = _dapo_length_reward(lengths, l_max, l_cache)
    if l_cache == 0:   # no buffer: only a reply cut at L_max is punished, fully
        want = np.where(lengths >= l_max, -1.0, 0.0)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got[l_max] == -1.0 and got[0] == 0.0


def test_overlong_settings_are_checked():
    with pytest.raises(ConfigError, match="grpo.overlong"):
        _config(**{"grpo.overlong": "cut"})
    with pytest.raises(ConfigError, match="overlong_buffer"):
        _config(**{"grpo.overlong": "penalty", "grpo.overlong_buffer": 4})


def test_overlong_filter_leaves_out_replies_cut_at_the_limit(tiny):
    # two new tokens: the tiny model rarely stops that early, so most replies are cut
    kept = _collect(tiny, _config(**{"rollout.max_new_tokens": 2, "grpo.drop_zero_variance": False}))
    c = _config(**{"rollout.max_new_tokens": 2, "grpo.drop_zero_variance": False,
                   "grpo.overlong": "filter"})
    ro = _collect(tiny, c)
    m = ro.metrics
    cut = sum(t.truncated for _, ts in ro.finished for t in ts if t is not None)
    assert cut == m["truncated_replies"] == m["dropped_overlong"] > 0
    assert m["rows"] + m["dropped_long"] + m["dropped_overlong"] == m["learner_turns"]
    assert all(len(t.tokens) == 2 for _, ts in ro.finished for t in ts if t is not None and t.truncated)
    # the same episodes were played; only the cut replies' rows are gone
    assert len(kept.sequences) - len(ro.sequences) == cut
    assert [f.reward for f, _ in kept.finished] == [f.reward for f, _ in ro.finished]


def test_overlong_penalty_enters_the_advantages(tiny):
    c = _config(**{"rollout.max_new_tokens": 4, "grpo.overlong": "penalty", "grpo.overlong_buffer": 2,
                   "grpo.overlong_penalty": 0.5, "grpo.drop_zero_variance": False})
    ro = _collect(tiny, c)

    def shaped(f, traces):
        lengths = [len(t.tokens) for t in traces if t is not None]
        return f.reward + 0.5 * float(np.mean(_dapo_length_reward(lengths, 4, 2)))

    rewards = np.asarray([shaped(f, t) for f, t in ro.finished], np.float32)
    assert not np.allclose(rewards, [f.reward for f, _ in ro.finished])   # the penalty did apply
    groups = np.asarray([f.tag for f, _ in ro.finished])
    want = np.asarray(losses.group_advantages(rewards, groups))
    by_episode = {}
    for (f, traces), a in zip(ro.finished, want):
        for t in traces:
            if t is not None and t.tokens:
                by_episode.setdefault((tuple(t.prompt_ids), tuple(t.tokens)), set()).add(round(float(a), 5))
    assert ro.sequences and ro.metrics["penalized_replies"] > 0
    for s in ro.sequences:
        n = len(s.tokens) - sum(s.loss_mask)
        key = (tuple(s.tokens[:n]), tuple(s.tokens[n:]))
        assert round(float(s.advantage), 5) in by_episode[key]


# ----- dynamic sampling --------------------------------------------------------------------------

def test_dynamic_sampling_refills_until_every_group_has_signal(tiny):
    plain = _collect(tiny, _config())
    c = _config(**{"grpo.dynamic_sampling": True, "grpo.max_refill_rounds": 8})
    ro = _collect(tiny, c)
    m = ro.metrics
    first = _group_rewards(plain)
    rewards = _group_rewards(ro)
    flat_first = sum(np.ptp(r) == 0 for r in first.values())
    assert flat_first > 0, "the test needs some all-equal groups in the first round"
    # the first round is the plain step's, played the same
    assert {g: rewards[g] for g in first} == first
    assert m["groups_played"] > 4 and m["zero_variance_groups"] >= flat_first
    trained = {s.group for s in ro.sequences}
    assert len(trained) == 4   # exactly groups_per_step informative groups
    assert all(np.ptp(rewards[g]) > 0 for g in trained)
    # the kept ones are the first informative groups in draw order; later ones are surplus
    informative = [g for g in sorted(rewards) if np.ptp(rewards[g]) > 0]
    assert sorted(trained) == informative[:4]
    assert (m["rows"] + m["dropped_long"] + m["dropped_zero_variance"] + m["dropped_surplus"]
            == m["learner_turns"])
    # the rows of a group carry that group's advantages
    adv = losses.group_advantages(np.asarray([f.reward for f, _ in ro.finished], np.float32),
                                  np.asarray([f.tag for f, _ in ro.finished]))
    assert {round(float(a), 5) for a in adv} >= {round(float(s.advantage), 5) for s in ro.sequences}


def test_dynamic_sampling_stops_after_its_rounds(tiny):
    # a learner that never names a colour: every group ties, and the rounds run out
    c = _config(**{"grpo.dynamic_sampling": True, "grpo.max_refill_rounds": 2})
    ro = _collect(tiny, c, policy=lambda requests: ["no idea"] * len(requests))
    rewards = _group_rewards(ro)
    assert all(np.ptp(r) == 0 for r in rewards.values())
    assert ro.sequences == [] and ro.metrics["rows"] == 0
    # round one plays 4 groups; each refill at most groups_per_step more
    assert 4 < ro.metrics["groups_played"] <= 4 * 3


# ----- credit ------------------------------------------------------------------------------------

class _BreaksAtSecondGuess:
    """A Wordle learner: the strong programmatic guesser in odd-numbered episodes; in even ones it
    plays the strong guesser's first guess and then replies outside the answer format (the game
    aborts on it). Its traces are the chat and reply token ids of the tiny model's tokenizer."""

    def __init__(self, tokenizer, ep):
        self.tok, self.ep, self.players, self.turn = tokenizer, ep, {}, {}

    def __call__(self, reqs):
        texts = []
        for r in reqs:
            k = self.turn.get(r.episode_id, 0)
            self.turn[r.episode_id] = k + 1
            player = self.players.setdefault(r.episode_id,
                                             registry.make_player("wordle", "strong", r.role, self.ep))
            strong = player(list(r.messages))
            texts.append("no idea, sorry" if r.episode_id % 2 == 0 and k >= 1 else strong)
        prompts = [self.tok.encode_chat(list(r.messages), add_generation_prompt=True).ids for r in reqs]
        replies = [list(self.tok.encode(t)) for t in texts]
        self.last = PolicyOutput(texts, prompts, replies, [[-1.0] * len(x) for x in replies],
                                 [False] * len(reqs))
        return texts


@pytest.mark.parametrize("merge", [False, True])
def test_abort_turn_credit_trains_only_the_reply_that_broke_the_rules(tiny, merge):
    ep = registry.instances("wordle", "train", 0)[0]
    ro = {}
    for credit in ("episode", "abort_turn"):
        c = _config(**{"games.names": "wordle", "grpo.credit": credit, "grpo.merge_turns": merge,
                       "batch.max_seq_len": 4096, "grpo.drop_zero_variance": False})
        ro[credit] = grpo.collect([[ep]], c, 0, _BreaksAtSecondGuess(tiny.tokenizer, ep), None, "all",
                                  RewardConfig("quality", 0.5), env_partner="strong")
    by_credit = {k: [(f, t) for f, t in v.finished] for k, v in ro.items()}
    aborted = [(f, t) for f, t in by_credit["abort_turn"] if f.episode_scores.get("Aborted")]
    played = [(f, t) for f, t in by_credit["abort_turn"] if not f.episode_scores.get("Aborted")]
    # the even episodes break at their second guess, the odd ones play to the end
    assert len(aborted) == 4 and len(played) == 4
    assert all(len(t) == 2 for _, t in aborted) and all(len(t) >= 2 for _, t in played)
    for f, t in aborted:
        assert grpo.credited_turns(f, t, "abort_turn") == [False, True]
        assert grpo.credited_turns(f, t, "episode") == [True, True]
    for f, t in played:
        assert grpo.credited_turns(f, t, "abort_turn") == [True] * len(t)
    # had the last answered request been the partner's, no learner turn would carry the blame
    f, t = aborted[0]
    partner_broke = dataclasses.replace(f, turns=f.turns[:-1] + [dataclasses.replace(f.turns[-1],
                                                                                      learner=False)])
    assert grpo.credited_turns(partner_broke, t, "abort_turn") == [False, False]

    def trained(r):   # the replies' token ids the loss counts, by the sign of their advantage
        out = {"neg": [], "pos": []}
        for s in r.sequences:
            ids = tuple(x for x, m in zip(s.tokens, s.loss_mask) if m)
            out["neg" if s.advantage < 0 else "pos"].append(ids)
        return out

    bad = tuple(tiny.tokenizer.encode("no idea, sorry"))
    episode, blame = trained(ro["episode"]), trained(ro["abort_turn"])
    # the played episodes' turns train alike under both; under "abort_turn" an aborted episode
    # trains its breaking reply alone, under "episode" its valid first guess too
    assert sorted(episode["pos"]) == sorted(blame["pos"]) and blame["pos"]
    assert blame["neg"] == [bad] * 4
    first_guesses = sum(len(t[0].tokens) for _, t in aborted)
    assert sum(map(len, episode["neg"])) == sum(map(len, blame["neg"])) + first_guesses > 0
    m = ro["abort_turn"].metrics
    assert m["context_turns"] == 4 and "context_turns" not in ro["episode"].metrics
    assert ro["abort_turn"].metrics["rows"] == ro["episode"].metrics["rows"] - 4
    # the advantages are the episode-level ones either way
    fin = ro["abort_turn"].finished
    adv = losses.group_advantages(np.asarray([f.reward for f, _ in fin], np.float32),
                                  np.asarray([f.tag for f, _ in fin]))
    want = {round(float(a), 5) for (f, _), a in zip(fin, adv) if f.episode_scores.get("Aborted")}
    assert {round(float(s.advantage), 5) for s in ro["abort_turn"].sequences if s.advantage < 0} == want


def test_credit_setting_is_checked():
    with pytest.raises(ConfigError, match="grpo.credit"):
        _config(**{"grpo.credit": "turn"})


# ----- beta = 0 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta, kl, forwards", [(0.04, "k3", 2), (0.0, "k3", 1), (0.04, "none", 1)])
def test_reference_forward_only_when_the_kl_term_counts(tiny, monkeypatch, beta, kl, forwards):
    calls = []
    real = llama.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(llama, "forward", counting)
    c = _config(**{"grpo.beta": beta, "grpo.kl": kl})
    loss_fn = grpo.make_loss_fn(tiny.config, c, 4)
    batch = buffers.pack([buffers.completion([1, 2, 3], [4, 5], [-1.0, -1.0], advantage=1.0)],
                         micro_batch=1, max_len=16)
    mb = {k: jnp.asarray(np.asarray(v)[0]) for k, v in batch.items() if np.ndim(v) >= 1}
    extra = {"ref_params": tiny.params} if grpo.uses_reference(c) else None
    jax.make_jaxpr(lambda p: jax.grad(lambda q: loss_fn(q, mb, extra)[0])(p))(tiny.params)
    assert len(calls) == forwards
    assert grpo.uses_reference(c) == (forwards == 2)


# ----- per-step sampling keys ------------------------------------------------------------------------

def test_each_step_samples_fresh_draws_and_a_resumed_step_the_same(tiny):
    """collect numbers a step's episodes from 0 every step, so the per-reply seeds repeat from step
    to step; the loop's per-step key (`_reseed`) is what makes the draws new, and a function of
    (seed, step) only, so that a resumed step samples what the uninterrupted one did."""
    from train.loop import _reseed

    policy = ModelPolicy(tiny, max_new_tokens=6, temperature=1.0, prefix_cache=False)
    chats = [[{"role": "user", "content": f"name a colour {i}"}] for i in range(4)]
    seeds = [11, 12, 13, 14]

    def sample(step):
        _reseed(policy, 0, step)
        policy(chats, seeds=seeds)
        return policy.last.tokens

    first, second, again = sample(3), sample(4), sample(3)
    assert first == again
    assert first != second
    assert sum(a != b for a, b in zip(first, second)) >= 3   # new draws for (nearly) every row


# ----- probe turns -------------------------------------------------------------------------------

class _StrongAnswerer:
    """A privateshared learner: the strong programmatic answerer, except that in even-numbered
    episodes it answers every probe outside the "ASIDE:" format (the game aborts after five tries)."""

    def __init__(self, tokenizer, ep):
        self.tok, self.ep, self.players = tokenizer, ep, {}

    def __call__(self, reqs):
        texts = []
        for r in reqs:
            player = self.players.setdefault(r.episode_id,
                                             registry.make_player("privateshared", "strong", r.role, self.ep))
            strong = player(list(r.messages))
            texts.append("maybe" if r.probe and r.episode_id % 2 == 0 else strong)
        prompts = [self.tok.encode_chat(list(r.messages), add_generation_prompt=True).ids for r in reqs]
        replies = [list(self.tok.encode(t)) for t in texts]
        self.last = PolicyOutput(texts, prompts, replies, [[-1.0] * len(x) for x in replies],
                                 [False] * len(reqs))
        return texts


def test_probe_turns_train_a_few_probes_of_an_episode_and_always_an_abort_s_last(tiny):
    """privateshared asks dozens of probes outside the answerer's chat, each prompted with the chat
    so far: grpo.probe_turns of them train per episode (first to last, and the blamed last reply
    of an abort at a probe), the others are left out; -1 trains all of them."""
    ep = registry.instances("privateshared", "train", 0)[0]
    ro = {}
    for limit in (-1, 2):
        c = _config(**{"games.names": "privateshared", "grpo.probe_turns": limit, "batch.max_seq_len": 8192,
                       "grpo.drop_zero_variance": False})
        ro[limit] = grpo.collect([[ep]], c, 0, _StrongAnswerer(tiny.tokenizer, ep), None, "all",
                                 RewardConfig("quality", 0.5), env_partner="strong")
    fin = ro[-1].finished
    played = [t for f, t in fin if not f.episode_scores.get("Aborted")]
    aborted = [t for f, t in fin if f.episode_scores.get("Aborted")]
    assert len(played) == 4 and len(aborted) == 4
    n_probes = [sum(x.probe for x in t) for t in played]
    assert all(n >= 10 for n in n_probes)
    assert all([x.probe for x in t] == [True] * 5 for t in aborted)   # five tries at the first probe
    # an aborted episode: its first and last probe (the last is the blamed reply anyway)
    assert grpo.probe_picks(aborted[0], 2) == {0, 4}
    assert grpo.probe_picks(aborted[0], 1) == {0, 4} and grpo.probe_picks(aborted[0], 0) == set()
    k = [i for i, x in enumerate(played[0]) if x.probe]
    assert grpo.probe_picks(played[0], 2) == {k[0], k[-1]} and grpo.probe_picks(played[0], -1) == set(k)
    m_all, m_two = ro[-1].metrics, ro[2].metrics
    assert "dropped_probes" not in m_all
    assert m_two["dropped_probes"] == sum(n - 2 for n in n_probes) + 4 * 3
    assert m_all["rows"] - m_two["rows"] == m_two["dropped_probes"]
    assert m_two["sequence_tokens"] < m_all["sequence_tokens"] / 2
    # an aborted episode's first and last probe train
    bad = tuple(tiny.tokenizer.encode("maybe"))
    trained = [tuple(x for x, m in zip(s.tokens, s.loss_mask) if m) for s in ro[2].sequences]
    assert sum(ids == bad for ids in trained) == 8   # each abort's first and last "maybe", a row each


def test_probe_turns_setting_is_checked():
    with pytest.raises(ConfigError, match="grpo.probe_turns"):
        _config(**{"grpo.probe_turns": -2})
