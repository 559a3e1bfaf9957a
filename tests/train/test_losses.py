"""The objectives in train/losses.py against float64 NumPy references written from the formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from tests.conftest import tiny_config
from train import losses

RTOL = 1e-5
ATOL = 1e-6


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol)


def ragged_mask(rng, n, t, empty_row=True):
    """[n, t] 0/1 mask: each row a contiguous span of random length; row 1 fully masked."""
    mask = np.zeros((n, t), np.float32)
    for i in range(n):
        start = rng.integers(0, t // 2)
        length = rng.integers(1, t - start + 1)
        mask[i, start:start + length] = 1
    if empty_row:
        mask[1] = 0
    return mask


# ----------------------------------------------------------------------------------------------
# NumPy references (float64)
# ----------------------------------------------------------------------------------------------

def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_group_advantages(rewards, group_ids, scale, eps, ddof=0):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for g in set(np.asarray(group_ids).tolist()):
        members = [i for i in range(len(rewards)) if group_ids[i] == g]
        r = rewards[members]
        adv = r - r.mean()
        if scale == "std":
            std = np.sqrt(((r - r.mean()) ** 2).sum() / (len(r) - ddof)) if len(r) > ddof else 0.0
            adv = adv / (std + eps)
        out[members] = adv
    return out


def np_grpo(lp, old, ref, adv, mask, clip_eps, clip_eps_high, beta, kl, aggregation, max_tokens):
    lp, old, adv, mask = (np.asarray(a, np.float64) for a in (lp, old, adv, mask))
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    n, t = lp.shape
    per_token = np.zeros((n, t))
    kls = np.zeros((n, t))
    clipped = np.zeros((n, t))
    ratios = np.zeros((n, t))
    for i in range(n):
        for j in range(t):
            if not mask[i, j]:
                continue
            r = np.exp(lp[i, j] - old[i, j])
            a = adv[i]
            unclipped, clipped_r = r * a, min(max(r, 1 - clip_eps), 1 + hi) * a
            surrogate = min(unclipped, clipped_r)
            clipped[i, j] = float(clipped_r < unclipped)
            ratios[i, j] = r
            k = 0.0
            if kl != "none":
                x = float(ref[i, j]) - lp[i, j]  # log(pi_ref / pi)
                k = {"k1": -x, "k2": x * x / 2, "k3": np.exp(x) - x - 1}[kl]
            kls[i, j] = k
            per_token[i, j] = -surrogate + (beta * k if kl != "none" else 0.0)
    lengths = mask.sum(1)
    nonempty = [i for i in range(n) if lengths[i] > 0]
    if aggregation == "token-mean":
        loss = per_token.sum() / mask.sum()
    elif aggregation == "sequence-mean":
        loss = np.mean([per_token[i].sum() / lengths[i] for i in nonempty])
    else:
        loss = per_token.sum() / (len(nonempty) * max_tokens)
    tokens = mask.sum()
    metrics = {"clip_fraction": clipped.sum() / tokens, "kl": kls.sum() / tokens,
               "ratio_mean": ratios.sum() / tokens, "advantage_mean": adv[nonempty].mean(),
               "tokens": tokens}
    return loss, metrics


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------

def test_token_logprobs_matches_numpy_and_is_stable():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 5, 11)) * 30 + 500).astype(np.float32)  # large: naive exp overflows
    targets = rng.integers(0, 11, size=(3, 5))
    got = jax.jit(losses.token_logprobs)(logits, targets)
    assert got.dtype == jnp.float32 and got.shape == (3, 5)
    want = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    close(got, want, atol=1e-4)  # |values| up to ~100: atol is below rtol * |value| here
    got16 = losses.token_logprobs(jnp.asarray(logits[..., :] / 100, jnp.bfloat16), targets)
    assert got16.dtype == jnp.float32


def _right_and_left_batches(rng, lengths, t, vocab):
    b = len(lengths)
    right = {k: np.zeros((b, t), np.int32) for k in ("tokens", "positions", "segment_ids")}
    left = {k: np.zeros((b, t), np.int32) for k in ("tokens", "positions", "segment_ids")}
    right_loss, left_loss = np.zeros((b, t), np.float32), np.zeros((b, t), np.float32)
    for i, n in enumerate(lengths):
        seq = rng.integers(3, vocab, size=n)
        loss = (np.arange(n) >= n // 3).astype(np.float32)  # "prompt" then "reply"
        right["tokens"][i, :n], right["positions"][i, :n], right["segment_ids"][i, :n] = seq, np.arange(n), 1
        right_loss[i, :n] = loss
        left["tokens"][i, t - n:], left["positions"][i, t - n:], left["segment_ids"][i, t - n:] = (
            seq, np.arange(n), 1)
        left_loss[i, t - n:] = loss
    return right, right_loss, left, left_loss


def test_sequence_logprobs_matches_forward_and_padding_side():
    config = tiny_config()
    rng = np.random.default_rng(1)
    # Random params of `llama.init`'s shapes and scale, drawn by NumPy: `llama.init` itself spends
    # seconds compiling its per-leaf random draws on CPU.
    params = jax.tree_util.tree_map_with_path(
        lambda path, shape: np.ones(shape, np.float32) if "norm" in jax.tree_util.keystr(path)
        else (0.02 * rng.normal(size=shape)).astype(np.float32),
        llama.param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    lengths, t = [9, 5, 2, 7], 9
    right, right_loss, left, left_loss = _right_and_left_batches(rng, lengths, t, config.vocab_size)
    fn = jax.jit(functools.partial(losses.sequence_logprobs, config=config))

    lp_r, mask_r = fn(params, right["tokens"], right["positions"], right["segment_ids"], right_loss)
    forward = jax.jit(functools.partial(llama.forward, config=config))
    logits, _ = forward(params, right["tokens"], right["positions"], right["segment_ids"])
    ls = np_log_softmax(np.asarray(logits))
    for i, n in enumerate(lengths):
        for j in range(t):
            expected_mask = 1.0 if (1 <= j < n and right_loss[i, j]) else 0.0
            assert mask_r[i, j] == expected_mask, (i, j)
            expected = ls[i, j - 1, right["tokens"][i, j]] if expected_mask else 0.0
            close(lp_r[i, j], expected, atol=1e-5)

    lp_l, mask_l = fn(params, left["tokens"], left["positions"], left["segment_ids"], left_loss)
    for i, n in enumerate(lengths):
        close(mask_l[i, t - n:], mask_r[i, :n], atol=0)
        assert np.all(np.asarray(mask_l[i, :t - n]) == 0)
        close(lp_l[i, t - n:], lp_r[i, :n], atol=1e-5)
    assert np.isfinite(np.asarray(lp_l)).all() and np.asarray(mask_r).sum() > 10

    # Packed rows: the first token of the second sequence is not predicted from the first one.
    seg = np.tile(np.array([1, 1, 1, 2, 2, 2, 2, 0, 0], np.int32), (len(lengths), 1))
    pos = np.tile(np.array([0, 1, 2, 0, 1, 2, 3, 0, 0], np.int32), (len(lengths), 1))
    _, mask_p = fn(params, right["tokens"], pos, seg, np.ones_like(right_loss))
    np.testing.assert_array_equal(np.asarray(mask_p)[0], [0, 1, 1, 0, 1, 1, 1, 0, 0])


def test_sequence_sums_and_sft_loss_match_numpy():
    rng = np.random.default_rng(2)
    lp = -rng.exponential(2.0, size=(4, 7)).astype(np.float32)
    mask = ragged_mask(rng, 4, 7)
    lp_garbage = np.where(mask > 0, lp, np.nan).astype(np.float32)  # padding may hold anything
    close(jax.jit(losses.sequence_sums)(lp_garbage, mask),
          [sum(float(lp[i, j]) for j in range(7) if mask[i, j]) for i in range(4)])

    loss, metrics = jax.jit(losses.sft_loss)(lp_garbage, mask)
    want = -sum(float(lp[i, j]) for i in range(4) for j in range(7) if mask[i, j]) / mask.sum()
    close(loss, want)
    close(metrics["nll"], want)
    assert float(metrics["tokens"]) == mask.sum()

    empty_loss, _ = losses.sft_loss(lp, np.zeros_like(mask))
    assert float(empty_loss) == 0.0
    grad = jax.grad(lambda x: losses.sft_loss(x, mask)[0])(jnp.asarray(lp_garbage))
    assert np.isfinite(np.asarray(grad)).all()
    close(grad, -mask / mask.sum())


# ----------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_group_advantages_with_shuffled_arbitrary_ids(scale, ddof):
    rng = np.random.default_rng(3)
    ids = np.array([1000] * 4 + [-7] * 3 + [42] * 4 + [5])  # a singleton group too
    perm = rng.permutation(len(ids))
    ids = ids[perm]
    rewards = rng.normal(size=len(ids)).astype(np.float32) * 3 + 1
    want = np_group_advantages(rewards, ids, scale, 1e-6, ddof)
    fn = jax.jit(functools.partial(losses.group_advantages, num_groups=4, scale=scale, ddof=ddof))
    close(fn(rewards, ids), want)
    close(losses.group_advantages(rewards, ids, scale=scale, ddof=ddof), want)  # num_groups=None
    close(fn(rewards, ids, eps=0.5), np_group_advantages(rewards, ids, scale, 0.5, ddof))  # eps placement
    single = int(np.flatnonzero(ids == 5)[0])
    assert float(fn(rewards, ids)[single]) == 0.0
    if scale == "std":  # normalised groups of >1 members: unit std
        adv = np.asarray(fn(rewards, ids), np.float64)
        for g in (1000, -7, 42):
            assert abs(adv[ids == g].std(ddof=ddof) - 1) < 1e-4


def test_group_advantages_mask_and_too_few_groups():
    rewards = np.array([1.0, 2.0, 3.0, np.nan, 5.0, 7.0], np.float32)  # padding may hold anything
    ids = np.array([0, 0, 0, 0, 1, 1])
    mask = np.array([1, 1, 1, 0, 1, 1])
    got = losses.group_advantages(rewards, ids, scale="none", mask=mask)
    close(got, [-1.0, 0.0, 1.0, 0.0, -1.0, 1.0])
    got = jax.jit(losses.group_advantages)(rewards, ids, mask=mask)
    close(got, [-1.5 ** 0.5, 0.0, 1.5 ** 0.5, 0.0, -1.0, 1.0])  # population std: sqrt(2/3), 1
    with pytest.raises(ValueError, match="num_groups"):
        losses.group_advantages(rewards, ids, num_groups=1)


def _against_numpy(loss_fn, np_fn, inputs, garbage, kwargs):
    """Checks loss_fn's loss and metrics against np_fn on inputs (padding filled with garbage that
    must not leak in); returns (metrics with "loss", gradient w.r.t. the log-probs)."""
    lp, old, ref, adv, mask = inputs
    fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, metrics), grad = fn(lp + garbage, old - garbage, ref + garbage, adv, mask)
    want_loss, want = np_fn(lp, old, ref, adv, mask, **kwargs)
    close(loss, want_loss)
    for key, value in want.items():
        close(metrics[key], value, atol=1e-6)
    assert 0 < float(metrics["clip_fraction"]) < 1
    return {**metrics, "loss": loss}, grad


def _grpo_inputs(seed=4, n=5, t=8):
    rng = np.random.default_rng(seed)
    old = -rng.exponential(1.5, size=(n, t)).astype(np.float32)
    lp = (old + rng.normal(scale=0.3, size=(n, t))).astype(np.float32)  # some ratios beyond 1 ± 0.2
    ref = (old + rng.normal(scale=0.5, size=(n, t))).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    mask = ragged_mask(rng, n, t)
    return lp, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("kl", losses.KL_ESTIMATORS)
@pytest.mark.parametrize("clip_high", [None, 0.28])
def test_grpo_loss_matches_numpy(aggregation, kl, clip_high):
    lp, old, ref, adv, mask = _grpo_inputs()
    # padding positions hold garbage that must not leak into the loss
    garbage = np.where(mask > 0, 0, 1e4).astype(np.float32)
    kwargs = dict(clip_eps=0.2, clip_eps_high=clip_high, beta=0.04, kl=kl, aggregation=aggregation,
                  max_tokens=8.0 if aggregation == "sequence-sum-norm" else None)
    metrics, grad = _against_numpy(functools.partial(losses.grpo_loss, **kwargs), np_grpo,
                                   (lp, old, ref, adv, mask), garbage, kwargs)
    assert np.isfinite(np.asarray(grad)).all()
    assert np.all(np.asarray(grad)[mask == 0] == 0) and np.any(np.asarray(grad) != 0)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_grpo_fully_masked_batch_is_zero_and_finite(aggregation):
    lp, old, ref, adv, _ = _grpo_inputs()
    empty = np.zeros_like(lp)
    fn = jax.jit(jax.value_and_grad(functools.partial(
        losses.grpo_loss, aggregation=aggregation, max_tokens=8.0), has_aux=True))
    (loss, metrics), grad = fn(lp, old, ref, adv, empty)
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 0.0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert np.all(np.asarray(grad) == 0)


def test_grpo_asymmetric_clip_changes_the_loss():
    lp, old, ref, adv, mask = _grpo_inputs()
    sym = losses.grpo_loss(lp, old, ref, adv, mask, clip_eps=0.2)[0]
    asym = losses.grpo_loss(lp, old, ref, adv, mask, clip_eps=0.2, clip_eps_high=0.28)[0]
    assert abs(float(sym) - float(asym)) > 1e-4


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_grpo_gradient_at_ratio_one_is_reinforce(aggregation):
    rng = np.random.default_rng(5)
    n, t, v = 4, 6, 5
    theta = jnp.asarray(rng.normal(size=(n, t, v)), jnp.float32)
    targets = rng.integers(0, v, size=(n, t))
    adv = jnp.asarray([1.5, -0.5, 0.7, -2.0], jnp.float32)
    mask = ragged_mask(rng, n, t)
    max_tokens = 6.0 if aggregation == "sequence-sum-norm" else None

    def logp(theta):
        return losses.token_logprobs(theta, targets)

    def grpo(theta, old_is_same_array):
        lp = logp(theta)
        old = lp if old_is_same_array else jax.lax.stop_gradient(lp)
        return losses.grpo_loss(lp, old, None, adv, mask, beta=0.0, aggregation=aggregation,
                                max_tokens=max_tokens)[0]

    def reinforce(theta):  # -A * log p, aggregated from scratch
        per_token = -adv[:, None] * logp(theta) * mask
        lengths = mask.sum(1)
        rows = lengths > 0
        if aggregation == "token-mean":
            return per_token.sum() / mask.sum()
        if aggregation == "sequence-mean":
            return jnp.sum(per_token.sum(1)[rows] / lengths[rows]) / rows.sum()
        return per_token.sum() / (rows.sum() * max_tokens)

    want = jax.grad(reinforce)(theta)
    assert np.abs(np.asarray(want)).max() > 1e-3
    for same in (False, True):
        got = jax.jit(jax.grad(grpo), static_argnums=1)(theta, same)
        close(got, want, atol=1e-6)


def test_grpo_clip_fraction():
    lp, old, ref, adv, mask = _grpo_inputs()
    _, m = jax.jit(losses.grpo_loss)(old, old, ref, adv, mask)
    assert float(m["clip_fraction"]) == 0.0 and abs(float(m["ratio_mean"]) - 1) < 1e-6
    # ratio e^{+1} where A > 0 and e^{-1} where A < 0: every token clipped
    far = old + np.sign(adv)[:, None].astype(np.float32)
    _, m = losses.grpo_loss(far, old, ref, adv, mask)
    assert float(m["clip_fraction"]) == 1.0
    # the opposite directions are never clipped (the min keeps the unclipped, worse term)
    far = old - np.sign(adv)[:, None].astype(np.float32)
    _, m = losses.grpo_loss(far, old, ref, adv, mask)
    assert float(m["clip_fraction"]) == 0.0
    # clip-higher: r = 1.25 with A > 0 is clipped at 0.2, not at 0.28
    r = np.float32(np.log(1.25))
    pos = np.abs(adv)
    assert float(losses.grpo_loss(old + r, old, ref, pos, mask)[1]["clip_fraction"]) == 1.0
    assert float(losses.grpo_loss(old + r, old, ref, pos, mask, clip_eps_high=0.28)[1]
                 ["clip_fraction"]) == 0.0


@pytest.mark.parametrize("kl", ["k2", "k3"])
def test_kl_estimators_nonnegative_and_zero_at_reference(kl):
    lp, old, ref, adv, mask = _grpo_inputs(seed=6)
    zero_adv = np.zeros_like(adv)
    _, m = losses.grpo_loss(lp, old, ref, zero_adv, mask, kl=kl)
    assert float(m["kl"]) > 1e-3
    # per token: a single masked token at a time
    for i, j in zip(*np.nonzero(mask)):
        one = np.zeros_like(mask)
        one[i, j] = 1
        loss, m = losses.grpo_loss(lp, old, ref, zero_adv, one, kl=kl, beta=1.0)
        assert float(m["kl"]) >= 0 and float(loss) >= 0
    loss, m = losses.grpo_loss(lp, old, lp, zero_adv, mask, kl=kl)
    assert float(m["kl"]) == 0.0 and float(loss) == 0.0


def test_grpo_without_reference():
    lp, old, ref, adv, mask = _grpo_inputs()
    no_kl, m0 = losses.grpo_loss(lp, old, None, adv, mask, beta=0.0)
    assert float(m0["kl"]) == 0.0
    no_kl2, _ = losses.grpo_loss(lp, old, None, adv, mask, kl="none")
    with_ref, m1 = losses.grpo_loss(lp, old, ref, adv, mask, beta=0.0)
    close(no_kl, with_ref)
    close(no_kl2, with_ref)
    assert float(m1["kl"]) > 0  # still reported when a reference is given
    with pytest.raises(ValueError, match="ref_logprobs"):
        losses.grpo_loss(lp, old, None, adv, mask, beta=0.04)


def test_losses_cast_bf16_to_f32():
    lp, old, ref, adv, mask = _grpo_inputs()
    b = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    loss, m = jax.jit(losses.grpo_loss)(b(lp), b(old), b(ref), b(adv), mask)
    want, _ = losses.grpo_loss(*(np.asarray(b(x), np.float32) for x in (lp, old, ref, adv)), mask)
    assert loss.dtype == jnp.float32 and m["kl"].dtype == jnp.float32
    close(loss, want)
    s = jnp.asarray([-3.0, -4.0])
    dl, _ = losses.dpo_loss(b(s), b(s - 1), b(s), b(s), beta=0.1)
    assert dl.dtype == jnp.float32
    assert losses.sft_loss(b(lp), mask)[0].dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------

def _dpo_inputs(seed=7, n=6):
    rng = np.random.default_rng(seed)
    return tuple((-rng.exponential(20.0, size=n)).astype(np.float32) for _ in range(4))


@pytest.mark.parametrize("kind,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_loss_matches_numpy(kind, smoothing):
    pc, pr, rc, rr = _dpo_inputs()
    beta = 0.1
    fn = jax.jit(functools.partial(losses.dpo_loss, beta=beta, kind=kind, label_smoothing=smoothing))
    loss, m = fn(pc, pr, rc, rr)
    pc64, pr64, rc64, rr64 = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    h = (pc64 - rc64) - (pr64 - rr64)
    if kind == "sigmoid":
        want = np.mean(-(1 - smoothing) * np_log_sigmoid(beta * h) - smoothing * np_log_sigmoid(-beta * h))
    else:
        want = np.mean((h - 1 / (2 * beta)) ** 2)
    close(loss, want)
    cr, rj = beta * (pc64 - rc64), beta * (pr64 - rr64)
    close(m["chosen_reward"], cr.mean())
    close(m["rejected_reward"], rj.mean())
    close(m["reward_margin"], (cr - rj).mean())
    close(m["accuracy"], np.mean(cr > rj))
    assert 0 < float(m["accuracy"]) < 1

    # padding pairs (mask 0) leave the loss of the real pairs unchanged
    pad = np.float32(np.nan)
    padded = [np.append(x, pad) for x in (pc, pr, rc, rr)]
    loss_p, _ = losses.dpo_loss(*padded, beta=beta, kind=kind, label_smoothing=smoothing,
                                mask=np.array([1] * len(pc) + [0]))
    close(loss_p, want)


@pytest.mark.parametrize("kind,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_gradient_pushes_chosen_up_and_rejected_down(kind, smoothing):
    pc, pr, rc, rr = (np.array([-10.0, -12.0, -8.0], np.float32) + d for d in (0.0, 0.0, 0.5, -0.5))
    # margins are negative here, below IPO's target 1/(2 beta) too
    f = functools.partial(losses.dpo_loss, beta=0.1, kind=kind, label_smoothing=smoothing)
    g_c, g_r, g_rc = jax.grad(lambda c, r, ref_c: f(c, r, ref_c, rr)[0], argnums=(0, 1, 2))(pc, pr, rc)
    assert np.isfinite(np.asarray(g_c)).all() and np.isfinite(np.asarray(g_r)).all()
    assert np.all(np.asarray(g_c) < 0) and np.all(np.asarray(g_r) > 0)
    assert np.all(np.asarray(g_rc) == 0)  # the reference is a constant


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,bad", [
    (lambda a: losses.group_advantages(a["r"], a["g"], scale="zscore"), "zscore"),
    (lambda a: losses.grpo_loss(*a["grpo"], kl="k4"), "k4"),
    (lambda a: losses.grpo_loss(*a["grpo"], aggregation="seq-mean"), "seq-mean"),
    (lambda a: losses.dpo_loss(*a["dpo"], kind="hinge"), "hinge"),
])
def test_bad_options_raise_value_error(call, bad):
    args = {"r": np.zeros(4, np.float32), "g": np.zeros(4, np.int32), "grpo": _grpo_inputs(),
            "dpo": _dpo_inputs()}
    with pytest.raises(ValueError) as info:
        call(args)
    message = str(info.value)
    assert repr(bad) in message and "expected one of" in message


def test_bad_numeric_options_raise_value_error():
    lp, old, ref, adv, mask = _grpo_inputs()
    with pytest.raises(ValueError, match="max_tokens"):
        losses.grpo_loss(lp, old, ref, adv, mask, aggregation="sequence-sum-norm")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(*_dpo_inputs(), kind="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(*_dpo_inputs(), label_smoothing=0.5)


def test_chunked_head_and_remat_give_the_plain_values_and_gradients():
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(3))
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 37)), jnp.int32)
    seg = jnp.asarray(np.r_[[1] * 37, [1] * 30 + [0] * 7].reshape(2, 37), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (2, 37)), jnp.float32)

    def total(p, **kw):
        lp, m = losses.sequence_logprobs(p, tokens, None, seg, mask, config=cfg, **kw)
        return jnp.sum(lp * m), lp

    (plain, lp0), g0 = jax.value_and_grad(total, has_aux=True)(params, remat=False, chunk=0)
    (chunked, lp1), g1 = jax.value_and_grad(total, has_aux=True)(params, remat=True, chunk=8)
    # 36 target positions in chunks of 8: the last chunk is padded
    np.testing.assert_allclose(lp1, lp0, rtol=1e-5, atol=1e-5)
    assert float(chunked) == pytest.approx(float(plain), rel=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)
    # the same against logits of the plain forward
    logits, _ = llama.forward(params, tokens, None, seg, config=cfg)
    ref = jax.nn.log_softmax(logits[:, :-1], -1)
    want = np.take_along_axis(np.asarray(ref), np.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
    m = np.asarray(lp0[:, 1:] != 0)
    np.testing.assert_allclose(np.asarray(lp1[:, 1:])[m], want[m], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["sparse", "one-row-empty", "all", "none"])
def test_head_at_masked_positions_only_gives_the_plain_values_and_gradients(layout):
    """The LM head runs only on each row's masked positions (gathered to the row's front, later
    chunks skipped); values and gradients equal the head over every position."""
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(5))
    rng = np.random.default_rng(5)
    b, t = 3, 45
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    seg = np.ones((b, t), np.int32)
    seg[1, 20:] = 2                       # two packed sequences in row 1
    seg[2, -9:] = 0                       # right padding in row 2
    mask = np.zeros((b, t), np.float32)
    if layout == "sparse":                # short replies scattered over the rows
        mask[0, 30:36] = 1
        mask[1, [5, 6, 7, 25, 26, 40]] = 1
        mask[2, 3:5] = 1
    elif layout == "one-row-empty":       # only row 0 counts, past the first chunk
        mask[0, 12:44] = 1
    elif layout == "all":
        mask[:] = 1
    seg, mask = jnp.asarray(seg), jnp.asarray(mask)

    def total(p, chunk):
        lp, m = losses.sequence_logprobs(p, tokens, None, seg, mask, config=cfg, remat=False, chunk=chunk)
        return jnp.sum(lp * m), (lp, m)

    (v0, (lp0, m0)), g0 = jax.value_and_grad(total, has_aux=True)(params, 0)
    (v1, (lp1, m1)), g1 = jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=1)(params, 8)
    np.testing.assert_array_equal(m1, m0)
    np.testing.assert_allclose(lp1, lp0, rtol=1e-5, atol=1e-5)
    assert float(v1) == pytest.approx(float(v0), rel=1e-5, abs=1e-6)
    jax.tree_util.tree_map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6), g0, g1)
    if layout == "none":                  # nothing counted: no gradient at all
        assert float(v1) == 0.0
        assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(g1))
    else:
        assert float(jnp.abs(g1["lm_head"]).max()) > 0 and float(jnp.abs(g1["embed"]).max()) > 0


# ----- GSPO, SimPO, ORPO (issue: post-training variants) -----------------------------------------

def np_gspo(lp, old, ref, adv, mask, clip_eps, clip_eps_high, beta, kl, aggregation, max_tokens):
    """GSPO's sequence-level objective, written from the paper's formula; KL as in np_grpo."""
    lp, old, adv, mask = (np.asarray(a, np.float64) for a in (lp, old, adv, mask))
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    terms, clipped, ratios = [], [], []
    for i in range(lp.shape[0]):
        m = mask[i] > 0
        if not m.any():
            continue
        s = np.exp(np.mean(lp[i, m] - old[i, m]))   # geometric mean of the token ratios
        unclipped, clipped_s = s * adv[i], min(max(s, 1 - clip_eps), 1 + hi) * adv[i]
        terms.append(-min(unclipped, clipped_s))
        clipped.append(float(clipped_s < unclipped))
        ratios.append(s)
    # the KL part alone: np_grpo with zero advantages has surrogate -r*0 = 0
    _, kl_metrics = np_grpo(lp, old, ref, np.zeros_like(adv), mask, clip_eps, clip_eps_high, beta, kl,
                            aggregation, max_tokens)
    kl_only, _ = np_grpo(lp, old, ref, np.zeros_like(adv), mask, clip_eps, clip_eps_high, beta, kl,
                         aggregation, max_tokens)
    return np.mean(terms) + kl_only, {"clip_fraction": np.mean(clipped), "ratio_mean": np.mean(ratios),
                                      "kl": kl_metrics["kl"]}


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("clip_high", [None, 0.3])
def test_gspo_sequence_ratio_matches_numpy(aggregation, clip_high):
    lp, old, ref, adv, mask = _grpo_inputs(seed=11, n=6, t=9)
    shift = np.array([[0.5], [-0.4], [0.05], [-0.05], [0.3], [-0.3]])   # per-sequence log-ratio shifts
    lp = (lp + shift).astype(np.float32)   # some sequence ratios beyond the clip range, some within
    garbage = np.where(mask > 0, 0, 1e4).astype(np.float32)
    kwargs = dict(clip_eps=0.2, clip_eps_high=clip_high, beta=0.04, kl="k3", aggregation=aggregation,
                  max_tokens=9.0 if aggregation == "sequence-sum-norm" else None)
    metrics, grad = _against_numpy(functools.partial(losses.grpo_loss, ratio_level="sequence", **kwargs),
                                   np_gspo, (lp, old, ref, adv, mask), garbage, kwargs)
    loss = metrics["loss"]
    g = np.asarray(grad)
    assert np.isfinite(g).all() and np.all(g[mask == 0] == 0) and np.any(g != 0)
    # it differs from token-level GRPO on the same inputs
    token_loss, _ = losses.grpo_loss(lp, old, ref, adv, mask, **kwargs)
    assert abs(float(token_loss) - float(loss)) > 1e-4
    with pytest.raises(ValueError, match="one advantage per sequence"):
        losses.grpo_loss(lp, old, ref, np.ones_like(lp), mask, ratio_level="sequence")


def _reference_free_inputs(seed=5, n=6):
    rng = np.random.default_rng(seed)
    tc, tr = (rng.integers(1, 30, size=n).astype(np.float32) for _ in range(2))
    pc = (-rng.uniform(0.2, 3.0, size=n) * tc).astype(np.float32)
    pr = (-rng.uniform(0.2, 3.0, size=n) * tr).astype(np.float32)
    return pc, pr, tc, tr


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_reference_free_preference_losses_match_numpy(kind):
    pc, pr, tc, tr = _reference_free_inputs()
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
    pc_bad = np.where(mask > 0, pc, np.nan).astype(np.float32)   # a padding pair may hold anything
    beta, gamma = (2.0, 0.8) if kind == "simpo" else (0.25, 0.0)
    fn = functools.partial(losses.dpo_loss, beta=beta, kind=kind, gamma=gamma, mask=mask)
    (loss, m), grads = jax.value_and_grad(
        lambda c, r: fn(c, r, None, None, chosen_tokens=tc, rejected_tokens=tr), argnums=(0, 1),
        has_aux=True)(pc_bad, pr)
    a_w, a_l = (np.asarray(x, np.float64) / np.asarray(t, np.float64) for x, t in ((pc, tc), (pr, tr)))
    keep = mask > 0
    if kind == "simpo":
        per = -np_log_sigmoid(beta * (a_w - a_l) - gamma)
    else:
        def log_odds(a):
            p = np.exp(a)
            return np.log(p / (1 - p))

        ratio = log_odds(a_w) - log_odds(a_l)
        per = -a_w - beta * np_log_sigmoid(ratio)
        close(m["log_odds_ratio"], ratio[keep].mean())
        close(m["sft_loss"], (-a_w)[keep].mean())
    close(loss, per[keep].mean())
    close(m["accuracy"], np.mean((a_w > a_l)[keep]))
    close(m["chosen_reward"], (beta * a_w)[keep].mean())
    g_c, g_r = (np.asarray(g) for g in grads)
    assert np.isfinite(g_c).all() and np.isfinite(g_r).all()
    assert np.all(g_c[keep] < 0) and np.all(g_r[keep] > 0)   # chosen pushed up, rejected down
    assert g_c[~keep].item() == 0 and g_r[~keep].item() == 0
    with pytest.raises(ValueError, match="token counts"):
        losses.dpo_loss(pc, pr, None, None, kind=kind)
    with pytest.raises(ValueError, match="reference log-probs"):
        losses.dpo_loss(pc, pr, None, None, kind="sigmoid")
