"""Episodes -> padded, bucketed device arrays. The losses never see text.

A `TokenSequence` is one row of training data: token ids, a loss mask (1 on the tokens that the
objective counts, i.e. the learner's own reply tokens), and per-token extras (the sampler's log-probs
of those tokens for GRPO) plus per-sequence scalars (advantage, reward, group id).

`pack` lays a list of sequences out as [M, n, T] arrays: M micro-batches of n rows of T tokens, each
sequence starting at position 0 of its own row and right-padded with segment id 0. n is the
configured micro-batch rounded up to a multiple of the data-parallel size, or, for a batch of fewer
rows than that, its row count rounded up to a power of two (and to that multiple), so that a small
batch is not padded with rows that would cost a full forward and backward; T is the longest sequence
rounded up to a power-of-two bucket (at most `max_len`); M is rounded up to a power of two. So a
jitted step compiles once per (M, n, T) bucket, a handful of times over a run. Padding rows have an
all-zero loss mask and count nowhere; a micro-batch of padding rows only is skipped by the step.

Each micro-batch carries its `weight`: its share of the normaliser of the whole batch's loss (its
share of the counted tokens for a token mean, of the sequences for a mean over sequences). The step
sums weight x micro-batch loss, which equals the loss of the batch taken at once.

With several processes, each process packs only the sequences it produced (`pack_shard`): the
processes agree on T and M, each fills its own block of every micro-batch's rows, the weights are
computed from every process's counts, and `to_device` assembles the global batch from the blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from playpen_jax import sharding as shd


@dataclasses.dataclass
class TokenSequence:
    tokens: list
    loss_mask: list
    old_logprobs: Optional[list] = None   # aligned with tokens; only read where loss_mask is 1
    advantage: float = 0.0
    reward: float = 0.0
    group: int = 0
    ref_logprob: float = 0.0   # the frozen reference's log-prob of the counted tokens (DPO)
    turns: int = 1             # the learner turns whose replies the loss counts (GRPO metrics)

    def __post_init__(self):
        if len(self.loss_mask) != len(self.tokens):
            raise ValueError(f"loss_mask has {len(self.loss_mask)} entries for {len(self.tokens)} tokens")
        if self.old_logprobs is not None and len(self.old_logprobs) != len(self.tokens):
            raise ValueError(f"old_logprobs has {len(self.old_logprobs)} entries for "
                             f"{len(self.tokens)} tokens")

    @property
    def counted(self) -> int:
        """Tokens the loss counts (the first token of a row has no prefix and never counts)."""
        return int(sum(self.loss_mask[1:]))


def completion(prompt_ids: Sequence[int], reply_ids: Sequence[int],
               reply_logprobs: Optional[Sequence[float]] = None, **scalars) -> TokenSequence:
    """A prompt and the model's reply as one row; the loss counts the reply tokens only."""
    tokens = list(prompt_ids) + list(reply_ids)
    mask = [0] * len(prompt_ids) + [1] * len(reply_ids)
    old = None
    if reply_logprobs is not None:
        if len(reply_logprobs) != len(reply_ids):
            raise ValueError(f"{len(reply_logprobs)} log-probs for {len(reply_ids)} reply tokens")
        old = [0.0] * len(prompt_ids) + [float(x) for x in reply_logprobs]
    return TokenSequence(tokens, mask, old, **scalars)


def spread_picks(n: int, k: int) -> list[int]:
    """k of the indices 0..n-1, evenly spread from the first to the last (all of them if k >= n)."""
    if k >= n:
        return list(range(n))
    if k <= 0:
        return []
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def chat_sequences(turns: Sequence, *, max_len: Optional[int] = None, **scalars) -> list:
    """An episode's sampled turns as few rows as possible: a turn whose prompt starts with the
    tokens of a row built so far (an earlier prompt and its sampled reply, id for id) extends that
    row (the longest such), so each player's whole chat becomes one row with the loss on every
    reply it sampled. In self-play the two players' turns interleave; each extends its own row.

    turns: in play order, each (prompt_ids, reply_ids, reply_logprobs, train); None entries (turns
      the model did not play, e.g. a prompt too long for the context) are skipped. A reply with
      train=False stays in its row as context, with loss mask 0.
    max_len: a turn that would make a row longer starts a new row instead.
    scalars: TokenSequence fields every row gets (advantage, reward, group).

    Causal attention makes this exact: a reply's log-probs in the long row are those of its own
    prompt-and-reply row (its prefix is the same tokens at the same positions), and its mask and old
    log-probs are the same, so a token-mean loss and its gradient equal those of one row per turn,
    for the cost of each chat's last row instead of the sum of its turns' rows. A prompt that
    continues no row (a player whose context is rebuilt, or a reply re-encoded to other ids than
    were sampled) starts a new row. Each row's `turns` counts the replies it trains.
    """
    rows: list = []
    for turn in turns:
        if turn is None:
            continue
        prompt, reply, logprobs, train = turn
        if logprobs is not None and len(logprobs) != len(reply):
            raise ValueError(f"{len(logprobs)} log-probs for {len(reply)} reply tokens")
        prompt, reply = list(prompt), list(reply)
        cur = None
        if max_len is None or len(prompt) + len(reply) <= max_len:
            for row in rows:
                k = len(row.tokens)
                if k <= len(prompt) and (cur is None or k > len(cur.tokens)) and prompt[:k] == row.tokens:
                    cur = row
        if cur is None:
            cur = TokenSequence([], [], [], turns=0, **scalars)
            rows.append(cur)
        added = prompt[len(cur.tokens):]
        counted = bool(train) and bool(reply)
        cur.tokens.extend(added + reply)
        cur.loss_mask.extend([0] * len(added) + [int(counted)] * len(reply))
        lp = [0.0] * len(reply) if logprobs is None or not counted else [float(x) for x in logprobs]
        cur.old_logprobs.extend([0.0] * len(added) + lp)
        cur.turns += int(counted)
    return rows


def length_bucket(n: int, max_len: int, smallest: int = 64) -> int:
    """The power of two >= n (at least `smallest`), capped at max_len."""
    b = smallest
    while b < n:
        b *= 2
    return min(b, max_len)


def _pow2(n: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return b


def split_fitting(seqs: Sequence[TokenSequence], max_len: int) -> tuple[list, int]:
    """(sequences of at most max_len tokens that count at least one token, number left out)."""
    keep = [s for s in seqs if len(s.tokens) <= max_len and s.counted > 0]
    return keep, len(seqs) - len(keep)


def _place(seqs: Sequence[TokenSequence], t: int, packed: bool) -> list:
    """Rows as lists of sequence indices: one per row, or first-fit-decreasing into rows of t."""
    if not packed:
        return [[i] for i in range(len(seqs))]
    rows: list = []
    room: list = []
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i].tokens)):
        k = len(seqs[i].tokens)
        for r, free in enumerate(room):
            if k <= free:
                rows[r].append(i)
                room[r] -= k
                break
        else:
            rows.append([i])
            room.append(t - k)
    return rows


def pack(seqs: Sequence[TokenSequence], *, micro_batch: int, rows_multiple: int = 1, max_len: int,
         pad_id: int = 0, weight_by: str = "tokens", length: Optional[int] = None,
         micro_batches: Optional[int] = None, packed: bool = False) -> dict:
    """[M, n, T] numpy arrays (see the module docstring) for sequences that fit max_len.

    weight_by: "tokens" (a token mean over the batch) or "sequences" (a mean over sequences).
    length / micro_batches: force T / M (e.g. to pack the two sides of preference pairs alike).
    packed: put several sequences in a row (first fit, longest first), told apart by segment ids
      1, 2, ...; per-sequence values then live in the per-token arrays only (token_advantages),
      so use it with token-level objectives (SFT, GRPO with token-mean aggregation).
    Returns tokens, positions, segment_ids, loss_mask, old_logprobs, token_advantages [M, n, T];
    advantages, rewards, groups, ref_logprob, valid [M, n] (per row: meaningful unpacked); weight [M].
    """
    if not seqs:
        raise ValueError("pack: no sequences")
    _check_lengths(seqs, max_len)
    t = length or length_bucket(max(len(s.tokens) for s in seqs), max_len)
    placed = _place(seqs, t, packed)
    n = _rows_per_micro_batch(micro_batch, rows_multiple, len(placed))
    m = micro_batches or _pow2(-(-len(placed) // n))
    if m * n < len(placed):
        raise ValueError(f"pack: {len(placed)} rows do not fit {m} micro-batches of {n}")
    out = _fill(seqs, placed, m, n, t, pad_id)
    out["weight"] = _weights(_micro_batch_counts(out, weight_by, packed))
    return out


def _check_lengths(seqs: Sequence[TokenSequence], max_len: int) -> None:
    too_long = [len(s.tokens) for s in seqs if len(s.tokens) > max_len]
    if too_long:
        raise ValueError(f"pack: a sequence of {max(too_long)} tokens exceeds max_len={max_len}")


def _rows_per_micro_batch(micro_batch: int, rows_multiple: int, rows: int) -> int:
    """n: micro_batch rounded up to a multiple of rows_multiple; for fewer `rows` than that, the
    power of two >= rows rounded up to that multiple."""
    def up(k: int) -> int:
        return -(-k // rows_multiple) * rows_multiple

    return min(up(micro_batch), up(_pow2(max(rows, 1))))


def _fill(seqs: Sequence[TokenSequence], placed: list, m: int, n: int, t: int, pad_id: int) -> dict:
    """The [M, n, T] / [M, n] arrays of `placed` rows (lists of indices into seqs), padded to m x n."""
    rows = m * n
    out = {
        "tokens": np.full((rows, t), pad_id, np.int32),
        "positions": np.zeros((rows, t), np.int32),
        "segment_ids": np.zeros((rows, t), np.int32),
        "loss_mask": np.zeros((rows, t), np.float32),
        "old_logprobs": np.zeros((rows, t), np.float32),
        "token_advantages": np.zeros((rows, t), np.float32),
        "advantages": np.zeros((rows,), np.float32),
        "rewards": np.zeros((rows,), np.float32),
        "groups": np.full((rows,), -1, np.int32),
        "ref_logprob": np.zeros((rows,), np.float32),
        "valid": np.zeros((rows,), np.float32),
    }
    for row, members in enumerate(placed):
        at = 0
        for seg, i in enumerate(members, start=1):
            s = seqs[i]
            k = len(s.tokens)
            span = slice(at, at + k)
            out["tokens"][row, span] = s.tokens
            out["positions"][row, span] = np.arange(k)
            out["segment_ids"][row, span] = seg
            out["loss_mask"][row, span] = s.loss_mask
            out["loss_mask"][row, at] = 0.0  # a sequence's first token has no prefix
            if s.old_logprobs is not None:
                out["old_logprobs"][row, span] = s.old_logprobs
            out["token_advantages"][row, span] = s.advantage
            at += k
        first = seqs[members[0]]
        out["advantages"][row] = first.advantage
        out["rewards"][row] = first.reward
        out["groups"][row] = first.group
        out["ref_logprob"][row] = first.ref_logprob
        out["valid"][row] = 1.0
    return {k: v.reshape((m, n) + v.shape[1:]) for k, v in out.items()}


def _micro_batch_counts(out: dict, weight_by: str, packed: bool) -> np.ndarray:
    """[M]: what each micro-batch adds to the loss's normaliser (counted tokens, or sequences)."""
    if weight_by == "tokens":
        return out["loss_mask"].sum(axis=(1, 2))
    if weight_by == "sequences":
        if packed:
            raise ValueError("pack: weight_by='sequences' needs one sequence per row (packed=False)")
        return (out["loss_mask"].sum(axis=2) > 0).sum(axis=1).astype(np.float32)
    raise ValueError(f"weight_by={weight_by!r}: expected 'tokens' or 'sequences'")


def _weights(per: np.ndarray) -> np.ndarray:
    total = per.sum()
    return (per / total if total > 0 else per).astype(np.float32)


def pack_shard(seqs: Sequence[TokenSequence], *, shard: int, shards: int, micro_batch: int,
               rows_multiple: int = 1, max_len: int, pad_id: int = 0, weight_by: str = "tokens",
               packed: bool = False) -> Optional[dict]:
    """This process's block of rows of a batch that all processes pack together from their own
    sequences; None when no process has a sequence. Every process must call it at the same point.

    The processes agree on T (the bucket of the longest sequence of any process), on n (the global
    micro-batch of `pack` for shards x the most rows any process has) and on M (the most
    micro-batches any process needs), so every process's arrays are [M, n / shards, T]. Block k of every
    micro-batch's rows is fed by the processes of shard k (`row_shard`); processes of one shard must
    pass the same sequences. `weight` is each global micro-batch's share of the global normaliser.
    With one process and one shard this is `pack` (None for no sequences).
    """
    from playpen_jax import distributed

    if jax.process_count() == 1 and shards == 1:
        return pack(seqs, micro_batch=micro_batch, rows_multiple=rows_multiple, max_len=max_len,
                    pad_id=pad_id, weight_by=weight_by, packed=packed) if seqs else None
    if shards < 1 or rows_multiple % shards or not 0 <= shard < shards:
        raise ValueError(f"pack_shard: shard {shard} of {shards} does not divide {rows_multiple} rows")
    _check_lengths(seqs, max_len)
    longest = int(distributed.allgather(max((len(s.tokens) for s in seqs), default=0)).max())
    if longest == 0:
        return None
    t = length_bucket(longest, max_len)
    placed = _place(seqs, t, packed)
    most = int(distributed.allgather(len(placed)).max())
    n = _rows_per_micro_batch(micro_batch, rows_multiple, most * shards) // shards
    m = _pow2(-(-most // n))   # the micro-batches that the process with the most rows needs
    out = _fill(seqs, placed, m, n, t, pad_id)
    per = _micro_batch_counts(out, weight_by, packed)
    out["weight"] = _weights(distributed.shard_sum(per, shard).astype(np.float32))
    return out


def batch_sharding(mesh: Mesh, ndim: int, rules=shd.DEFAULT_RULES) -> NamedSharding:
    """Arrays [M, n, ...]: rows (n) over the mesh's batch axes, the rest replicated."""
    table = dict(rules)
    axes = tuple(a for a in table["batch"] if mesh.shape[a] > 1)
    row = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, PartitionSpec(None, row, *([None] * (ndim - 2))))


def rows_multiple(mesh: Mesh, rules=shd.DEFAULT_RULES) -> int:
    return int(np.prod([mesh.shape[a] for a in dict(rules)["batch"]]))


def row_shard(mesh: Mesh, rules=shd.DEFAULT_RULES) -> tuple[int, int]:
    """(shard, shards): this process's devices hold block `shard` of `shards` equal, contiguous blocks
    of every batch's rows (rows are split over the mesh's batch axes). Processes whose devices hold
    the same rows form one shard; with one process, or rows on every process, this is (0, 1)."""
    n = rows_multiple(mesh, rules)
    spans: dict = {}
    for device, index in batch_sharding(mesh, 2, rules).devices_indices_map((1, n)).items():
        r = index[1]
        spans.setdefault(device.process_index, set()).add((r.start or 0, n if r.stop is None else r.stop))
    blocks = {}
    for p, parts in spans.items():
        parts = sorted(parts)
        if any(a[1] != b[0] for a, b in zip(parts, parts[1:])):
            raise ValueError(f"mesh {dict(mesh.shape)}: the batch rows of process {p} are not one "
                             f"contiguous block ({parts}); choose a mesh whose data axes split by process")
        blocks[p] = (parts[0][0], parts[-1][1])
    distinct = sorted(set(blocks.values()))
    size = distinct[0][1] - distinct[0][0]
    if [b[0] for b in distinct] != list(range(0, n, size)) or any(b[1] - b[0] != size for b in distinct):
        raise ValueError(f"mesh {dict(mesh.shape)}: the processes' batch rows {distinct} are not equal "
                         f"blocks of {n} rows")
    return distinct.index(blocks[jax.process_index()]), len(distinct)


def to_device(batch: dict, mesh: Mesh, *, shards: int = 1) -> dict:
    """Places a packed batch with the data sharding.

    shards=1: every process passes the same full batch. shards > 1: each process passes its block of
    rows (`pack_shard`), and the global batch has `shards` times as many rows. Arrays of fewer than
    two dimensions (the micro-batch weights) must be the same on every process.
    """
    if jax.process_count() == 1 and shards != 1:
        raise ValueError(f"to_device: shards={shards} with one process")
    out = {}
    for k, v in batch.items():
        if v.ndim < 2:
            out[k] = jax.device_put(v, NamedSharding(mesh, PartitionSpec()))
            continue
        sh = batch_sharding(mesh, v.ndim)
        if jax.process_count() == 1:
            out[k] = jax.device_put(v, sh)
        else:
            shape = (v.shape[0], v.shape[1] * shards) + v.shape[2:]
            out[k] = jax.make_array_from_process_local_data(sh, v, shape)
    return out
