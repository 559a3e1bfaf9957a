"""DPO from branching rollouts: preference pairs of the learner's replies at one turn.

A round of pair collection:
1. `prefix_episodes` training instances are played with the policy (sampling) and the partner.
2. In each, one of the learner's sampled turns is chosen (uniformly, from the seed). The policy
   samples `branches` replies to that turn's prompt, and the strong programmatic player of that role
   adds `teacher_branches` replies.
3. Every branch is an episode that replays the recorded prefix (the game masters are
   deterministic), gives its reply at the branching turn, and is played to its end by the policy and
   the partner (`games.env.BatchedGameEnv` scripts).
4. The best branch by reward is paired against the worst; equal rewards give no pair. A pair is the
   turn's prompt ids with each reply's ids (the sampled tokens for a policy reply, the chat template's
   encoding for a teacher reply). The frozen reference's log-probs of both are computed once, here.

Rounds are saved to run_dir/dpo_pairs/round_<k>.json, so a resumed run trains on the same pairs.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from games import registry
from games.env import BatchedGameEnv
from playpen_jax import buffers, distributed
from playpen_jax.rollout import play
from train import losses


def make_loss_fn(model_config, d):
    beta, kind, smoothing, gamma = float(d.beta), d.kind, float(d.label_smoothing), float(d.gamma)

    def loss_fn(params, mb, extra):
        def sums(prefix):
            lp, mask = losses.sequence_logprobs(params, mb[prefix + "tokens"], mb[prefix + "positions"],
                                                mb[prefix + "segment_ids"], mb[prefix + "loss_mask"],
                                                config=model_config)
            return losses.sequence_sums(lp, mask), jnp.sum(mask, axis=-1)

        (chosen, n_chosen), (rejected, n_rejected) = sums("c_"), sums("r_")
        return losses.dpo_loss(chosen, rejected, mb["c_ref_logprob"], mb["r_ref_logprob"],
                               beta=beta, kind=kind, label_smoothing=smoothing, mask=mb["c_valid"],
                               chosen_tokens=n_chosen, rejected_tokens=n_rejected, gamma=gamma)

    return loss_fn


def _teacher_sequence(tokenizer, messages, reply: str):
    enc = tokenizer.encode_chat(list(messages) + [{"role": "assistant", "content": reply}])
    if not enc.turns:
        return None
    _, start, end = enc.turns[-1]
    mask = [0] * len(enc.ids)
    mask[start:end] = [1] * (end - start)
    # the end-of-turn token that follows the reply is part of the reply
    if end < len(enc.ids) and enc.assistant_mask[end]:
        mask[end] = 1
    return buffers.TokenSequence(list(enc.ids), mask)


def collect_pairs(r, round_index: int) -> tuple[list, dict]:
    """One round of preference pairs [(chosen, rejected) TokenSequences] and its metrics."""
    c, d = r.c, r.c.dpo
    seed = int(c.seed)
    rng = np.random.default_rng([seed, round_index, 3])
    pool = [registry.instances(g, "train", seed) for g in r.games]
    picks = []
    for _ in range(int(d.prefix_episodes)):
        g = int(rng.integers(len(pool)))
        picks.append(pool[g][int(rng.integers(len(pool[g])))])
    roles = r.learner_roles(r.games)
    partner = r.env_partner()
    policy = r.policy
    policy.params = r.state["params"]
    policy._key = jax.random.fold_in(jax.random.PRNGKey(seed + 17), round_index)
    policy._calls = 0
    env = BatchedGameEnv(iter([(ep, k) for k, ep in enumerate(picks)]), batch_size=len(picks),
                         learner_roles=roles, partner=partner, reward=r.reward, seed=seed + round_index)
    prefix_runs = play(env, policy, r.partner_policy)

    # Choose each episode's branching turn and sample its branch replies in one call.
    branch_points = []
    for f, traces in sorted(prefix_runs, key=lambda x: x[0].episode_id):
        sampled = [i for i, t in enumerate(f.turns) if t.learner and not t.scripted]
        usable = [k for k, i in enumerate(sampled) if k < len(traces) and traces[k] is not None]
        if not usable:
            continue
        k = usable[int(rng.integers(len(usable)))]
        branch_points.append((f, sampled[k], traces[k]))
    nb, nt = int(d.branches), int(d.teacher_branches)
    requests = [f.turns[i].messages for f, i, _ in branch_points for _ in range(nb)]
    replies = policy(requests) if requests else []
    out = policy.last
    sources, meta = [], []
    for j, (f, i, trace) in enumerate(branch_points):
        turn = f.turns[i]
        prefix = [t.reply for t in f.turns[:i]]
        options = []
        for b in range(nb):
            q = j * nb + b
            seq = None
            if out is not None and out.prompt_ids[q] is not None and out.tokens[q]:
                seq = buffers.completion(out.prompt_ids[q], out.tokens[q])
            options.append((replies[q], seq))
        for b in range(nt):
            player = registry.make_player(f.episode.game, "strong", turn.role, f.episode, seed=seed + b)
            text = player(list(turn.messages))
            options.append((text, _teacher_sequence(r.model.tokenizer, turn.messages, text)))
        for text, seq in options:
            sources.append((f.episode, len(meta), prefix + [text]))
            meta.append(seq)
    if not sources:
        return [], {"prefix_episodes": len(prefix_runs), "branch_points": 0, "pairs": 0}
    benv = BatchedGameEnv(iter(sources), batch_size=len(sources), learner_roles=roles, partner=partner,
                          reward=r.reward, seed=seed + round_index)
    branches = sorted(play(benv, policy, r.partner_policy), key=lambda x: x[0].tag)
    rewards = [f.reward for f, _ in branches]
    pairs, ties = [], 0
    per = nb + nt
    for j in range(len(branch_points)):
        idx = [j * per + b for b in range(per) if meta[j * per + b] is not None]
        if len(idx) < 2:
            continue
        best = max(idx, key=lambda q: rewards[q])
        worst = min(idx, key=lambda q: rewards[q])
        if rewards[best] == rewards[worst]:
            ties += 1
            continue
        pairs.append((meta[best], meta[worst]))
    pairs = [p for p in pairs if max(len(p[0].tokens), len(p[1].tokens)) <= int(c.batch.max_seq_len)]
    metrics = {"prefix_episodes": len(prefix_runs), "branch_points": len(branch_points),
               "branch_episodes": len(branches), "pairs": len(pairs), "tied_branch_points": ties,
               "branch_reward": float(np.mean(rewards))}
    return pairs, metrics


def add_reference_logprobs(r, pairs: list) -> None:
    """Sets each sequence's `ref_logprob`: log p_ref of its reply tokens (reference-free losses:
    none is computed, and the run holds no reference model)."""
    if not pairs or r.c.dpo.kind in losses.REFERENCE_FREE:
        return
    seqs = [s for p in pairs for s in p]
    # replicated output: every process reads all sums (the rows are sharded over processes)
    fn = jax.jit(lambda p, t, pos, seg, m: losses.sequence_sums(
        *losses.sequence_logprobs(p, t, pos, seg, m, config=r.mcfg)),
        out_shardings=jax.sharding.NamedSharding(r.mesh, jax.sharding.PartitionSpec()))
    chunk = max(int(r.c.batch.micro_batch), 1)
    for start in range(0, len(seqs), chunk):
        part = seqs[start:start + chunk]
        b = buffers.pack(part, micro_batch=chunk, rows_multiple=r.rows_multiple,
                         max_len=int(r.c.batch.max_seq_len), pad_id=r.pad_id, micro_batches=1)
        db = buffers.to_device({k: b[k] for k in ("tokens", "positions", "segment_ids", "loss_mask")},
                               r.mesh)
        sums = np.asarray(jax.device_get(fn(r.ref_params, db["tokens"][0], db["positions"][0],
                                            db["segment_ids"][0], db["loss_mask"][0])))
        for s, v in zip(part, sums):
            s.ref_logprob = float(v)


def _save_round(path: str, pairs: list, metrics: dict) -> None:
    def enc(s):
        return {"tokens": s.tokens, "loss_mask": s.loss_mask, "ref_logprob": s.ref_logprob}

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"metrics": metrics, "pairs": [[enc(a), enc(b)] for a, b in pairs]}, f)
    os.replace(tmp, path)


def _load_round(path: str, vocab_size: int):
    """The pairs and metrics of a saved round; CheckpointError when the file is not one."""
    from playpen_jax.checkpoint import CheckpointError

    def bad(why: str):
        return CheckpointError(f"{path}: {why}; delete it to collect the round again")

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not a readable JSON file ({e})") from None

    def dec(x):
        if not isinstance(x, dict):
            raise bad("a pair's sequence is not an object")
        tokens, mask, ref = x.get("tokens"), x.get("loss_mask"), x.get("ref_logprob")
        if not (isinstance(tokens, list) and tokens and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in tokens)):
            raise bad(f"'tokens' must be a non-empty list of token ids below {vocab_size}")
        if not (isinstance(mask, list) and len(mask) == len(tokens) and all(m in (0, 1) for m in mask)):
            raise bad("'loss_mask' must be 0/1 values, one per token")
        if isinstance(ref, bool) or not isinstance(ref, (int, float)) or not np.isfinite(ref):
            raise bad("'ref_logprob' must be a finite number")
        return buffers.TokenSequence(tokens, mask, ref_logprob=float(ref))

    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list) \
            or not isinstance(data.get("metrics"), dict):
        raise bad("expected an object with a 'pairs' list and a 'metrics' object")
    pairs = []
    for p in data["pairs"]:
        if not isinstance(p, list) or len(p) != 2:
            raise bad("each pair must be [chosen, rejected]")
        pairs.append((dec(p[0]), dec(p[1])))
    return pairs, data["metrics"]


def pack_pairs(r, pairs: list) -> dict:
    c = r.c
    chosen, rejected = [p[0] for p in pairs], [p[1] for p in pairs]
    length = buffers.length_bucket(max(len(s.tokens) for s in chosen + rejected), int(c.batch.max_seq_len))
    cb = buffers.pack(chosen, micro_batch=int(c.batch.micro_batch), rows_multiple=r.rows_multiple,
                      max_len=int(c.batch.max_seq_len), pad_id=r.pad_id, weight_by="sequences",
                      length=length)
    rb = buffers.pack(rejected, micro_batch=int(c.batch.micro_batch), rows_multiple=r.rows_multiple,
                      max_len=int(c.batch.max_seq_len), pad_id=r.pad_id, weight_by="sequences",
                      length=length, micro_batches=cb["tokens"].shape[0])
    keys = ("tokens", "positions", "segment_ids", "loss_mask", "ref_logprob", "valid")
    batch = {f"c_{k}": cb[k] for k in keys}
    batch.update({f"r_{k}": rb[k] for k in keys})
    batch["weight"] = cb["weight"]
    return batch


def make_step(r):
    c, d = r.c, r.c.dpo
    loss_fn = make_loss_fn(r.mcfg, d)
    folder = os.path.join(c.run_dir, "dpo_pairs")
    current = {"round": None, "pairs": [], "metrics": {}}

    def round_of(i: int) -> int:
        return i // int(d.refresh_every) if int(d.refresh_every) else 0

    def ensure_round(k: int) -> None:
        if current["round"] == k:
            return
        path = os.path.join(folder, f"round_{k}.json")
        saved = os.path.exists(path)
        if jax.process_count() > 1:   # process 0's view, so that all collect (a collective) or none
            saved = bool(distributed.allgather(np.int32(saved))[0])
        if saved:
            pairs, metrics = _load_round(path, r.mcfg.vocab_size)
        else:
            pairs, metrics = collect_pairs(r, k)
            add_reference_logprobs(r, pairs)
            if r.is_main:
                os.makedirs(folder, exist_ok=True)
                _save_round(path, pairs, metrics)
                print(f"dpo: round {k}: {metrics.get('pairs', 0)} pairs from "
                      f"{metrics.get('branch_points', 0)} branch points "
                      f"({metrics.get('tied_branch_points', 0)} tied)", file=sys.stderr)
        current.update(round=k, pairs=pairs, metrics=metrics)

    def dpo_step(i: int) -> dict:
        k = round_of(i)
        ensure_round(k)
        pairs = current["pairs"]
        metrics = {f"round_{key}": v for key, v in current["metrics"].items()}
        if not pairs:
            metrics["skipped_empty"] = 1.0
            return metrics
        per_round = (int(d.refresh_every) or int(c.steps))
        j = i - k * per_round if int(d.refresh_every) else i
        n, b = len(pairs), int(d.pairs_per_step)
        per_epoch = max(1, -(-n // b))
        epoch, pos = divmod(j, per_epoch)
        order = np.random.default_rng([int(c.seed), k, epoch, 5]).permutation(n)
        chosen = [pairs[int(q)] for q in order[pos * b:(pos + 1) * b]]
        r._update_packed(pack_pairs(r, chosen), loss_fn, None, metrics)
        return metrics

    return dpo_step
