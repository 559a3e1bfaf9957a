"""Training objectives as pure JAX functions over arrays: SFT, DPO and GRPO.

Conventions shared by every function here:
- Token-level arrays are [B, T] and aligned with the token ids: position t holds
  log p(tokens[t] | tokens[<t]) (see `sequence_logprobs`), and a mask of 1 marks a token that the
  loss counts. Position 0 of a sequence has no prefix, so it is always masked.
- Everything is computed in float32, whatever the input dtype (bf16 log-probs are cast first).
- Options are plain strings, checked eagerly (before any tracing) with a ValueError naming the bad
  value and the allowed ones; pass them as static arguments when jitting a caller
  (`jax.jit(f, static_argnames=...)`) or close over them.
- Masked positions may hold anything finite or not: they are replaced by zeros before any
  arithmetic, so they never turn a loss or a gradient into NaN.
- `old_logprobs`, `ref_logprobs`, advantages and reference log-probs are constants of the objective:
  gradients are stopped through them here, so `grpo_loss(lp, lp, ...)` is the on-policy objective.
- Rows whose mask is all zero (bucket padding) count nowhere: not in token counts, not in the number
  of sequences that a mean over sequences divides by.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import LlamaConfig

ADVANTAGE_SCALES = ("std", "none")
KL_ESTIMATORS = ("k1", "k2", "k3", "none")
AGGREGATIONS = ("token-mean", "sequence-mean", "sequence-sum-norm")
DPO_KINDS = ("sigmoid", "ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")   # preference losses that need no reference model
RATIO_LEVELS = ("token", "sequence")


def _check_option(name: str, value, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not a valid option; expected one of "
                         f"{', '.join(repr(a) for a in allowed)}")


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _is_concrete_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den is 0 (an empty mask gives a zero loss, not NaN)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------

def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[..., targets]: [..., V] logits and [...] int targets -> [...] f32.

    Computed as logits[target] - logsumexp(logits) with the max subtracted inside the logsumexp,
    so that large logits neither overflow nor lose the target's precision.
    """
    logits = _f32(logits)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def sequence_logprobs(
    params,
    tokens: jax.Array,
    positions: Optional[jax.Array],
    segment_ids: Optional[jax.Array],
    loss_mask: Optional[jax.Array],
    *,
    config: LlamaConfig,
    remat: bool = True,
    chunk: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs of each token given its prefix, from one forward pass.

    Memory: with `remat` each layer is recomputed in the backward pass, and the LM head and its
    log-softmax run over `chunk` positions at a time (recomputed in the backward pass too), so
    neither the attention scores of every layer nor the [B, T, V] logits are ever held at once.
    Work: with chunk > 0 the LM head runs only at the positions the mask counts (rounded up to
    whole chunks of the row with the most), not at every position (`_head_logprobs`).
    The values are those of the plain forward.

    tokens, positions, segment_ids, loss_mask: [B, T]. Segment id 0 marks padding (left, right, or
    between packed sequences); positions count from 0 at each sequence's first real token.
    loss_mask (1 = count this token as a target, e.g. the model's own reply tokens; None = all) is
    aligned with `tokens`, like the output.

    Returns (logprobs, mask), both [B, T] f32, with
        logprobs[b, t] = log p(tokens[b, t] | tokens[b, <t])   where mask[b, t] = 1, else 0,
        mask[b, t]     = loss_mask[b, t] and segment_ids[b, t] != 0
                         and segment_ids[b, t - 1] == segment_ids[b, t]   (and 0 at t = 0),
    i.e. the first token of every sequence (no prefix to predict it from) is never a target. A
    sequence's tokens must be contiguous in its row.
    """
    b, t = tokens.shape
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    hidden, _ = llama.forward(params, tokens, positions, segment_ids, config=config, remat=remat,
                              return_hidden=True)
    same_seq = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    if loss_mask is not None:
        same_seq = same_seq & (loss_mask[:, 1:] != 0)
    # hidden states at t - 1 predict tokens[t]
    next_lp = _head_logprobs(params, hidden[:, :-1], tokens[:, 1:], same_seq, config, chunk)
    mask = jnp.concatenate([jnp.zeros((b, 1), bool), same_seq], axis=1)
    lp = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), next_lp], axis=1)
    return jnp.where(mask, lp, 0.0), mask.astype(jnp.float32)


def _head_logprobs(params, hidden: jax.Array, targets: jax.Array, mask: jax.Array,
                   config: LlamaConfig, chunk: int) -> jax.Array:
    """token_logprobs(lm_head(hidden), targets) where `mask` is set, [B, N] (anything elsewhere).

    With chunk > 0 the LM head only runs where it is needed: each row's masked positions are
    gathered to its front (a stable sort, local to the row, so a batch sharded over rows stays
    so), the gathered positions go through the head `chunk` at a time, and a chunk past every row's
    last masked position is skipped (`lax.cond`), in the backward pass too. Replies are a small part
    of a chat's tokens, so most of the head's matmul and log-softmax over the vocabulary is saved.
    """

    def piece(h, tgt):
        return token_logprobs(llama.lm_head(params, h, config), tgt)

    b, n = targets.shape
    if chunk <= 0:
        return piece(hidden, targets)
    order = jnp.argsort(~mask, axis=1, stable=True)          # each row's masked positions first
    needed = jnp.max(jnp.sum(mask, axis=1))                  # positions the widest row needs
    h = jnp.take_along_axis(hidden, order[..., None], axis=1)
    tgt = jnp.take_along_axis(targets, order, axis=1)
    pad = -n % chunk
    k = (n + pad) // chunk
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, k, chunk, -1).swapaxes(0, 1)
    tgt = jnp.pad(tgt, ((0, 0), (0, pad))).reshape(b, k, chunk).swapaxes(0, 1)
    starts = jnp.arange(k) * chunk
    head = jax.checkpoint(piece)

    def step(carry, xs):
        hc, tc, start = xs
        out = jax.lax.cond(start < needed, head, lambda hh, tt: jnp.zeros(tt.shape, jnp.float32), hc, tc)
        return carry, out

    _, out = jax.lax.scan(step, None, (h, tgt, starts))
    out = out.swapaxes(0, 1).reshape(b, k * chunk)[:, :n]
    # back to the positions' own order
    return jnp.zeros((b, n), jnp.float32).at[jnp.arange(b)[:, None], order].set(out)


def sequence_sums(token_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_t mask[n, t] * token_logprobs[n, t]: [N, T] -> [N] f32 (log p of each masked span)."""
    mask = _f32(mask)
    return jnp.sum(jnp.where(mask != 0, _f32(token_logprobs), 0.0) * mask, axis=-1)


# ----------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------

def sft_loss(logprobs: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
    """Supervised fine-tuning: mean negative log-likelihood over all masked tokens of the batch,
        L = -sum_{b,t} m[b,t] log p[b,t] / sum_{b,t} m[b,t]     (0 when no token is masked).

    Every token weighs the same (a long sequence counts more than a short one). Returns
    (loss, {"tokens": number of masked tokens, "nll": the same mean NLL}).
    """
    mask = _f32(mask)
    lp = jnp.where(mask != 0, _f32(logprobs), 0.0)
    tokens = jnp.sum(mask)
    nll = _safe_div(-jnp.sum(lp * mask), tokens)
    return nll, {"tokens": tokens, "nll": nll}


# ----------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------

def group_advantages(
    rewards: jax.Array,
    group_ids: jax.Array,
    *,
    num_groups: Optional[int] = None,
    scale: str = "std",
    eps: float = 1e-6,
    ddof: int = 0,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath, "outcome supervision"):
        scale="std":  A_i = (r_i - mean_g(r)) / (std_g(r) + eps)
        scale="none": A_i =  r_i - mean_g(r)           (Dr. GRPO, Liu et al. 2025: no std division,
                                                        which biases toward too easy/hard groups)
    where g is the group (the completions of one prompt) of sample i.

    std_g is the population standard deviation (ddof=0: divide by the group size). The paper writes
    "std(r)" without saying which; TRL and verl call torch.std, the Bessel-corrected sample std
    (ddof=1), which gives advantages smaller by sqrt((G-1)/G). Pass ddof=1 to match them. A group
    of one (or all-equal rewards) gets advantage 0.

    rewards: [N]. group_ids: [N] integers of any values (need not be contiguous or sorted).
    num_groups: static upper bound on the number of distinct ids; None uses N, always enough.
    mask: optional [N], 0 for padding samples: they get advantage 0 and do not enter the group
    statistics. Jit-able: ids are mapped to 0..num_groups-1 with a fixed-size `jnp.unique`, and the
    statistics are segment sums.
    """
    _check_option("scale", scale, ADVANTAGE_SCALES)
    rewards = _f32(rewards)
    n = rewards.shape[0]
    size = n if num_groups is None else int(num_groups)
    if size < 1:
        raise ValueError(f"num_groups={num_groups!r} must be at least 1")
    if not isinstance(group_ids, jax.core.Tracer):
        distinct = len(np.unique(np.asarray(group_ids)))
        if distinct > size:
            raise ValueError(f"group_ids hold {distinct} distinct ids, more than num_groups={size}")
    _, index = jnp.unique(group_ids, size=size, return_inverse=True, fill_value=None)
    index = index.reshape(n)
    weight = jnp.ones_like(rewards) if mask is None else (_f32(mask) != 0).astype(jnp.float32)
    rewards = jnp.where(weight != 0, rewards, 0.0)

    def per_group_sum(x):
        return jax.ops.segment_sum(x * weight, index, num_segments=size)

    count = per_group_sum(jnp.ones_like(rewards))
    mean = _safe_div(per_group_sum(rewards), count)
    centered = rewards - mean[index]
    if scale == "std":
        var = _safe_div(per_group_sum(centered * centered), jnp.maximum(count - ddof, 0.0))
        centered = centered / (jnp.sqrt(var)[index] + eps)
    return centered * weight


def _kl_per_token(logprobs: jax.Array, ref_logprobs: jax.Array, kl: str) -> jax.Array:
    """Schulman's estimators of KL(pi_theta || pi_ref) from samples of pi_theta, with
    log_r = log pi_ref - log pi_theta:  k1 = -log_r,  k2 = log_r^2 / 2,  k3 = exp(log_r) - log_r - 1.
    k3 (used by GRPO) is unbiased and never negative; k2 is biased but low-variance."""
    log_r = ref_logprobs - logprobs
    if kl == "k1":
        return -log_r
    if kl == "k2":
        return 0.5 * log_r * log_r
    return jnp.expm1(log_r) - log_r


def _aggregate(per_token: jax.Array, mask: jax.Array, aggregation: str,
               max_tokens: Optional[float]) -> jax.Array:
    """Reduce a [N, T] per-token quantity over the masked tokens (see `grpo_loss`)."""
    masked = per_token * mask
    if aggregation == "token-mean":
        return _safe_div(jnp.sum(masked), jnp.sum(mask))
    lengths = jnp.sum(mask, axis=-1)
    num_seqs = jnp.sum((lengths > 0).astype(jnp.float32))
    if aggregation == "sequence-mean":
        return _safe_div(jnp.sum(_safe_div(jnp.sum(masked, axis=-1), lengths)), num_seqs)
    return _safe_div(jnp.sum(masked), num_seqs * max_tokens)


def grpo_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    ref_logprobs: Optional[jax.Array],
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: Optional[float] = None,
    beta: float = 0.04,
    kl: str = "k3",
    aggregation: str = "token-mean",
    max_tokens: Optional[float] = None,
    ratio_level: str = "token",
) -> tuple[jax.Array, dict]:
    """The GRPO objective (Shao et al. 2024, DeepSeekMath), negated to be minimised.

    logprobs (of the policy being trained), old_logprobs (of the policy that sampled), ref_logprobs
    (of the frozen reference), mask: [N, T]; advantages: [N] (one per sequence, broadcast over its
    tokens) or [N, T]. Per masked token, with r = exp(logprobs - old_logprobs):
        surrogate = min(r * A, clip(r, 1 - clip_eps, 1 + clip_eps_high) * A)       (PPO clip)
        loss_t    = -surrogate + beta * KL_t
    clip_eps_high=None uses clip_eps; a larger one is DAPO's "clip-higher" (Yu et al. 2025).
    KL_t is the `kl` estimator of KL(pi_theta || pi_ref) (Schulman, "Approximating KL divergence"),
    with log_r = ref_logprobs - logprobs:
        "k1": -log_r     "k2": log_r^2 / 2     "k3": exp(log_r) - log_r - 1   (GRPO's choice)
    "none" or beta == 0 drops the term, and then ref_logprobs may be None.

    aggregation of loss_t over the masked tokens:
        "token-mean":        sum_{i,t} loss / sum_{i,t} m                        (DAPO)
        "sequence-mean":     1/N' sum_i (sum_t loss_i,t / |o_i|)                   (original GRPO)
        "sequence-sum-norm": sum_{i,t} loss / (N' * max_tokens)                   (Dr. GRPO)
    where N' counts the sequences with at least one masked token, and max_tokens is a constant
    (e.g. the generation budget), required by "sequence-sum-norm".

    ratio_level="sequence" is GSPO (Zheng et al. 2025): one ratio per sequence, the geometric mean
    of its token ratios, s_i = exp(1/|o_i| sum_t (logprobs - old_logprobs)), clipped per sequence:
        pg_loss = -1/N' sum_i min(s_i A_i, clip(s_i, 1 - clip_eps, 1 + clip_eps_high) A_i)
    (advantages must be [N]; the KL part is aggregated as above; clip_fraction and ratio_mean are
    then over sequences).

    At r = 1 (one update per batch) the gradient of the surrogate part is the REINFORCE gradient
    -A * grad log pi, aggregated as above. Returns (loss, metrics), metrics over masked tokens:
    "clip_fraction" (share of tokens where the clip is active, i.e. r < 1 - clip_eps with A < 0 or
    r > 1 + clip_eps_high with A > 0, so the token gets no gradient), "kl" (token-mean KL_t, 0 when
    not computed), "ratio_mean" (token-mean r), "advantage_mean" (mean A over the N' sequences, or
    token-mean for [N, T] advantages), "tokens", and "pg_loss", "kl_loss" (the two parts of the
    loss, aggregated).
    """
    _check_option("kl", kl, KL_ESTIMATORS)
    _check_option("aggregation", aggregation, AGGREGATIONS)
    _check_option("ratio_level", ratio_level, RATIO_LEVELS)
    if ratio_level == "sequence" and jnp.ndim(advantages) != 1:
        raise ValueError("ratio_level='sequence' (GSPO) needs one advantage per sequence: [N]")
    if aggregation == "sequence-sum-norm":
        if max_tokens is None or (_is_concrete_number(max_tokens) and max_tokens <= 0):
            raise ValueError(f"aggregation='sequence-sum-norm' needs a positive max_tokens, "
                             f"got {max_tokens!r}")
    beta_is_zero = _is_concrete_number(beta) and beta == 0
    use_kl_loss = kl != "none" and not beta_is_zero
    if use_kl_loss and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is None but kl={kl!r} with beta={beta!r}; pass reference "
                         f"log-probs, or kl='none' / beta=0")
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high

    mask = _f32(mask)
    on = mask != 0
    logprobs = jnp.where(on, _f32(logprobs), 0.0)
    old_logprobs = jnp.where(on, jax.lax.stop_gradient(_f32(old_logprobs)), 0.0)
    advantages = jax.lax.stop_gradient(_f32(advantages))
    adv = advantages[:, None] if advantages.ndim == 1 else advantages

    ratio = jnp.exp(logprobs - old_logprobs)
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))

    if kl != "none" and ref_logprobs is not None:
        ref = jnp.where(on, jax.lax.stop_gradient(_f32(ref_logprobs)), 0.0)
        kl_t = _kl_per_token(logprobs, ref, kl)
    else:
        kl_t = jnp.zeros_like(logprobs)

    if ratio_level == "sequence":
        lengths = jnp.sum(mask, axis=-1)
        has = (lengths > 0).astype(jnp.float32)
        seq_ratio = jnp.exp(_safe_div(jnp.sum((logprobs - old_logprobs) * mask, axis=-1), lengths))
        seq_surrogate = jnp.minimum(seq_ratio * advantages,
                                    jnp.clip(seq_ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages)
        pg_loss = _safe_div(jnp.sum(-seq_surrogate * has), jnp.sum(has))
        seq_clipped = (((seq_ratio < 1.0 - eps_low) & (advantages < 0))
                       | ((seq_ratio > 1.0 + eps_high) & (advantages > 0))).astype(jnp.float32)
    else:
        pg_loss = _aggregate(-surrogate, mask, aggregation, max_tokens)
    kl_loss = _aggregate(kl_t, mask, aggregation, max_tokens) if use_kl_loss else jnp.float32(0.0)
    loss = pg_loss + (beta * kl_loss if use_kl_loss else 0.0)

    tokens = jnp.sum(mask)

    def token_mean(x):
        return _safe_div(jnp.sum(x * mask), tokens)

    if advantages.ndim == 1:
        has_tokens = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
        advantage_mean = _safe_div(jnp.sum(advantages * has_tokens), jnp.sum(has_tokens))
    else:
        advantage_mean = token_mean(advantages)
    if ratio_level == "sequence":
        clip_fraction = _safe_div(jnp.sum(seq_clipped * has), jnp.sum(has))
        ratio_mean = _safe_div(jnp.sum(seq_ratio * has), jnp.sum(has))
    else:
        clip_fraction, ratio_mean = token_mean(clipped.astype(jnp.float32)), token_mean(ratio)
    metrics = {
        "clip_fraction": clip_fraction,
        "kl": token_mean(kl_t),
        "ratio_mean": ratio_mean,
        "advantage_mean": advantage_mean,
        "tokens": tokens,
        "pg_loss": pg_loss,
        "kl_loss": kl_loss,
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------

def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: Optional[jax.Array],
    ref_rejected: Optional[jax.Array],
    *,
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    mask: Optional[jax.Array] = None,
    chosen_tokens: Optional[jax.Array] = None,
    rejected_tokens: Optional[jax.Array] = None,
    gamma: float = 0.5,
) -> tuple[jax.Array, dict]:
    """Preference losses over per-sequence log-probs [N] (see `sequence_sums`) of N pairs.

    With the margin h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):
        "sigmoid": -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
                   DPO (Rafailov et al. 2023); e = label_smoothing > 0 is "conservative DPO"
                   (Mitchell 2023), for labels flipped with probability e (0 <= e < 0.5).
        "ipo":     (h - 1 / (2 beta))^2       IPO (Azar et al. 2023, "A General Theoretical
                   Paradigm...": their empirical loss with h = h_pi and tau = beta). The paper's h
                   uses whole-sequence log-probs; some libraries (TRL) pass per-token means
                   instead: that is the caller's choice of inputs.
    Reference-free kinds (ref_chosen / ref_rejected unused, may be None), which need the counted
    tokens of each sequence, chosen_tokens / rejected_tokens [N]; with the per-token means
    a_w = policy_chosen / chosen_tokens and a_l = policy_rejected / rejected_tokens:
        "simpo":   -log sigmoid(beta (a_w - a_l) - gamma)     SimPO (Meng et al. 2024), margin gamma
        "orpo":    -a_w - beta log sigmoid(log odds_w - log odds_l)
                   ORPO (Hong et al. 2024): the SFT loss on the chosen reply plus beta (their
                   lambda) times the odds-ratio term, with odds(y) = P / (1 - P) of the
                   length-normalised P = exp(a), so log odds = a - log(1 - exp(a)).
    averaged over the pairs (mask: optional [N], 0 for padding pairs). Metrics (means over pairs),
    with the implicit rewards chosen_reward = beta (policy_chosen - ref_chosen) and likewise for
    rejected (reference-free kinds: beta a_w and beta a_l): "chosen_reward", "rejected_reward",
    "reward_margin" (their difference), "accuracy" (share of pairs with chosen_reward >
    rejected_reward); ORPO adds "sft_loss" and "log_odds_ratio".
    """
    _check_option("kind", kind, DPO_KINDS)
    free = kind in REFERENCE_FREE
    if free and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"kind={kind!r} needs chosen_tokens and rejected_tokens (token counts)")
    if not free and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"kind={kind!r} needs the reference log-probs ref_chosen and ref_rejected")
    if _is_concrete_number(beta) and beta <= 0:
        raise ValueError(f"beta={beta!r} must be positive")
    if _is_concrete_number(label_smoothing):
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 0.5)")
        if kind != "sigmoid" and label_smoothing != 0:
            raise ValueError(f"label_smoothing is only defined for kind='sigmoid', not kind={kind!r}")
    n = jnp.shape(policy_chosen)[0]
    weight = jnp.ones((n,), jnp.float32) if mask is None else (_f32(mask) != 0).astype(jnp.float32)
    pairs = jnp.sum(weight)

    def real(x):  # padding pairs may hold anything: zeros before any arithmetic
        return jnp.where(weight != 0, _f32(x), 0.0)

    def mean(x):
        return _safe_div(jnp.sum(x * weight), pairs)

    extra = {}
    if free:
        def per_token(sums, count):
            return real(sums) / jnp.maximum(jnp.where(weight != 0, _f32(count), 1.0), 1.0)

        chosen_logratio = per_token(policy_chosen, chosen_tokens)     # a_w
        rejected_logratio = per_token(policy_rejected, rejected_tokens)   # a_l
        if kind == "simpo":
            losses = -jax.nn.log_sigmoid(beta * (chosen_logratio - rejected_logratio) - gamma)
        else:
            def log_odds(a):   # log(P / (1 - P)) with P = exp(a), a < 0; clamped below 0 for safety
                a = jnp.minimum(a, -1e-6)
                return a - jnp.log(-jnp.expm1(a))

            ratio = log_odds(chosen_logratio) - log_odds(rejected_logratio)
            sft = -chosen_logratio
            losses = sft - beta * jax.nn.log_sigmoid(ratio)
            extra = {"sft_loss": mean(sft), "log_odds_ratio": mean(ratio)}
    else:
        chosen_logratio = real(policy_chosen) - jax.lax.stop_gradient(real(ref_chosen))
        rejected_logratio = real(policy_rejected) - jax.lax.stop_gradient(real(ref_rejected))
        margin = chosen_logratio - rejected_logratio
        if kind == "sigmoid":
            z = beta * margin
            losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
                      - label_smoothing * jax.nn.log_sigmoid(-z))
        else:
            losses = (margin - 1.0 / (2.0 * beta)) ** 2

    chosen_reward = jax.lax.stop_gradient(beta * chosen_logratio)
    rejected_reward = jax.lax.stop_gradient(beta * rejected_logratio)
    metrics = {
        "chosen_reward": mean(chosen_reward),
        "rejected_reward": mean(rejected_reward),
        "reward_margin": mean(chosen_reward - rejected_reward),
        "accuracy": mean((chosen_reward > rejected_reward).astype(jnp.float32)),
        "pairs": pairs,
        **extra,
    }
    return mean(losses), metrics
