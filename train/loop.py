"""The training loop behind `train.main`: SFT, DPO and GRPO steps, evals, checkpoints, metrics."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from games import eval as game_eval
from games import records, registry
from games.env import BatchedGameEnv, RewardConfig
from models import lora, quant, remote
from models import registry as model_registry
from models.config import resolve_matmul_dtype
from models.sampler import Sampler
from playpen_jax import buffers, distributed
from playpen_jax import sharding as shd
from playpen_jax.checkpoint import Checkpointer
from playpen_jax.config import to_json
from playpen_jax.metrics import MetricWriter, plot_curves
from playpen_jax.rollout import ModelPolicy, play
from train import dpo, grpo, losses, sft
from train import step as train_step

# Config keys that may change between a run and its resumption without changing its path.
RESUMABLE_CHANGES = ("resume", "steps", "run_dir", "log", "eval", "checkpoint", "export")


class RunError(RuntimeError):
    """The run cannot start or continue (e.g. a run directory that already holds a run)."""


def measured_peak_flops(dtype=jnp.float32) -> float:
    """Matmul FLOP/s measured on the first device: the roof that MFU is reported against."""
    # Large enough that an accelerator's dispatch overhead does not count (8192^3 on a GPU/TPU).
    n, reps = (8192, 10) if jax.default_backend() != "cpu" else (1024, 1)
    a = (jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32) / n ** 0.5).astype(dtype)
    # a chain of dependent products (a loop, so that none is folded into another)
    f = jax.jit(lambda x: jax.lax.fori_loop(0, reps, lambda i, y: y @ x, x))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return reps * 2 * n ** 3 / best


def train_flops_per_token(cfg, seq: int) -> float:
    """Forward + backward FLOPs per token (3x the forward's matmuls and attention)."""
    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    proj = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f
    attn = 2 * cfg.num_heads * cfg.head_dim * seq / 2
    return 3 * (2 * n * (proj + attn) + 2 * d * cfg.vocab_size)


def _diff(a: dict, b: dict, prefix: str = "") -> list:
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if key.split(".")[0] in RESUMABLE_CHANGES:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


class RolloutPolicy(ModelPolicy):
    """A ModelPolicy whose `params` may be set to the trained (globally sharded) arrays: `convert`
    turns them into the arrays the sampler uses (with several processes, this process's own copy)."""

    def __init__(self, model, *, convert, **kwargs):
        self._convert = convert
        super().__init__(model, **kwargs)

    @property
    def params(self):
        return self._params

    @params.setter
    def params(self, value):
        self._params = self._convert(value)


class Run:
    """Everything a run holds: mesh, model, state, policies, writers.

    With several processes (`playpen_jax.distributed`) every process runs this same program. The
    train state and batches are sharded over the global mesh; each process samples its rollouts on
    its own devices (`rollout_mesh`) from its own copy of the params (`rollout_params`), and feeds
    block `shard` of `shards` of every batch's rows (`buffers.row_shard`).
    """

    def __init__(self, c: ConfigDict):
        self.c = c
        self.is_main = jax.process_index() == 0
        self.mesh = shd.make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor})
        self.shard, self.shards = buffers.row_shard(self.mesh)
        self.rollout_mesh = self.mesh if jax.process_count() == 1 else distributed.local_mesh(self.mesh)
        self._rollout_copy: Optional[tuple] = None
        self._ref_rollout = None
        self.model = model_registry.load(
            c.model.name, tokenizer_path=c.model.tokenizer or None,
            shardings=lambda cfg: train_step.param_shardings(cfg, self.mesh),
            param_dtype=c.model.param_dtype, dtype=c.model.dtype,
            matmul_dtype=resolve_matmul_dtype(c.model.get("matmul_dtype", "")))
        self.mcfg = self.model.config
        if c.model.get("matmul_dtype") == "auto" and self.is_main:
            name = jnp.dtype(self.mcfg.jnp_matmul_dtype).name
            print(f"model.matmul_dtype=auto: the weight matmuls run in {name} on this "
                  f"{jax.default_backend()}", file=sys.stderr)
        self.lora = None
        if int(c.lora.rank) > 0:
            self._setup_lora()
        self.games = registry.resolve_names(c.games.names)
        self.eval_games = registry.resolve_names(c.eval.games)
        updates = c.steps * (c.grpo.updates_per_batch if c.method == "grpo" else 1)
        self.optimizer = train_step.make_optimizer(c.optimizer, max(updates, 1))
        self.schedule = train_step.learning_rate_schedule(c.optimizer, max(updates, 1))
        if self.lora is None:
            param_sh = train_step.param_shardings(self.mcfg, self.mesh)
            abstract_params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                     self.model.params)
        else:   # the trained params are the adapters
            param_sh = shd.tree_shardings(lora.param_axes(self.mcfg, self.lora),
                                          lora.param_shapes(self.mcfg, self.lora), self.mesh)
            abstract_params = jax.eval_shape(self._init_adapters)
        self.shardings = train_step.state_shardings(param_sh, self.optimizer, abstract_params, self.mesh)
        self.abstract = train_step.abstract_state(self.shardings, abstract_params, self.optimizer)
        self.ckpt = Checkpointer(os.path.join(c.run_dir, "checkpoints"), keep=int(c.checkpoint.keep))
        self.start = 0
        self.state = self._init_or_restore(abstract_params)
        needs_ref = (c.games.partner == "reference" or (c.method == "grpo" and grpo.uses_reference(c))
                     or (c.method == "dpo" and c.dpo.kind not in losses.REFERENCE_FREE))
        self.ref_params = self.model.params if needs_ref else None
        if not needs_ref and self.lora is None:
            self.model.params = None  # the state holds the trained copy; free the loaded one
        pad = self.model.tokenizer.eos_id if self.model.tokenizer.eos_id is not None else 0
        self.pad_id = pad
        self.sampler = Sampler(self.mcfg, mesh=self.rollout_mesh, pad_id=pad,
                               cache_dtype=c.rollout.cache_dtype)
        r = c.rollout
        self.policy = self.make_policy(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                       top_k=r.top_k, top_p=r.top_p, params=self.state["params"])
        self.partner_policy = None
        if remote.is_remote(c.games.partner):
            self.partner_policy = self.remote_partner(r.max_new_tokens, r.temperature)
        elif c.games.partner == "reference":
            self.partner_policy = self.make_policy(max_new_tokens=r.max_new_tokens,
                                                   temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                                   params=self.ref_params)
        self.reward = RewardConfig(c.games.reward, float(c.games.abort_penalty))
        # A resumed run drops the metrics logged after its checkpoint (from step 0 on, i.e. all of
        # them, when it starts over: a start eval cut short is played again).
        self.writer = MetricWriter(c.run_dir, tensorboard=bool(c.log.tensorboard), enabled=self.is_main,
                                   resume_step=(self.start or -1) if c.resume else None)
        self.peak = None
        self.stop_requested = False
        self._steps: dict = {}
        self._compiled: dict = {}
        self.rows_multiple = buffers.rows_multiple(self.mesh)

    def remote_partner(self, max_new_tokens: int, temperature: float) -> remote.RemotePolicy:
        q = self.c.remote
        return remote.RemotePolicy(self.c.games.partner, max_new_tokens=max_new_tokens,
                                   temperature=temperature, timeout=float(q.timeout_s),
                                   retries=int(q.retries), backoff=float(q.backoff_s),
                                   requests_per_second=float(q.requests_per_second),
                                   concurrency=int(q.concurrency))

    # ----- LoRA --------------------------------------------------------------------------------
    def _setup_lora(self) -> None:
        """The frozen base (quantized for QLoRA) becomes the model's params; the state will hold
        only the adapters (see models/lora.py)."""
        c = self.c
        self.lora = lora.LoraSpec.parse(int(c.lora.rank), float(c.lora.alpha), c.lora.targets,
                                        float(c.lora.dropout))
        if c.lora.quantize != "none":
            kind, block = c.lora.quantize, int(c.lora.block)
            try:
                self.model.params = jax.jit(lambda p: quant.quantize_params(p, kind, block=block))(
                    self.model.params)
            except ValueError as e:
                raise RunError(f"lora.quantize={kind}: {e}") from None
        self.base = self.model.params

    def _init_adapters(self):
        dtype = self.mcfg.jnp_param_dtype
        return lora.init(self.mcfg, self.lora, jax.random.PRNGKey(int(self.c.seed)), dtype)

    def _lora_loss(self, loss_fn):
        """loss_fn over the adapted model, as a function of the adapters (extra["lora_base"]: the
        frozen base; extra["rng"]: dropout keys)."""
        key = ("lora", loss_fn)
        if key not in self._steps:   # one wrapper per loss, so that its compiled steps are reused
            self._steps[key] = lora.adapted_loss(loss_fn, self.lora)
        return self._steps[key]

    # ----- processes --------------------------------------------------------------------------
    def make_policy(self, **kwargs) -> RolloutPolicy:
        """A policy on this run's sampler. Its kept KV caches are bounded by rollout.prefix_cache_gb,
        or by default a quarter of the memory sampled on, shared by the policies that play at once
        (the learner and, with games.partner=reference, the frozen partner: an eighth each)."""
        r = self.c.rollout
        gb = float(r.get("prefix_cache_gb", 0.0))
        share = 0.25 / (2 if self.c.games.partner == "reference" else 1)
        return RolloutPolicy(self.model, convert=self.rollout_params, batch_size=r.batch_size,
                             sampler=self.sampler, prefix_cache=bool(r.get("prefix_cache", True)),
                             prefix_cache_bytes=int(gb * 2**30) if gb > 0 else None,
                             prefix_cache_share=share, **kwargs)

    def rollout_params(self, params):
        """`params` as this process samples from them: the arrays themselves with one process; with
        several, this process's copy on `rollout_mesh` (a collective that every process must join,
        made once per params object: the frozen reference once, the trained params once per step)."""
        if self.lora is not None and params is not self.ref_params and params is not self.base:
            if jax.process_count() > 1:
                if self._rollout_copy is None or self._rollout_copy[0] is not params:
                    self._rollout_copy = None
                    self._rollout_copy = (params, self._local_copy(params))
                params = self._rollout_copy[1]
            return lora.attach(self.rollout_params(self.base), params, self.lora)
        if jax.process_count() == 1:
            return params
        if params is self.ref_params or (self.lora is not None and params is self.base):
            if self._ref_rollout is None:
                self._ref_rollout = self._local_copy(params)
            return self._ref_rollout
        if self._rollout_copy is None or self._rollout_copy[0] is not params:
            self._rollout_copy = None  # free the previous copy first
            self._rollout_copy = (params, self._local_copy(params))
        return self._rollout_copy[1]

    def _local_copy(self, params):
        if self.lora is None or (params is self.base and self.c.lora.quantize == "none"):
            shardings = train_step.param_shardings(self.mcfg, self.rollout_mesh)
        elif params is self.base:   # quantized leaves: whole on each of this process's devices
            whole = NamedSharding(self.rollout_mesh, PartitionSpec())
            shardings = jax.tree_util.tree_map(lambda _: whole, params)
        else:
            shardings = shd.tree_shardings(lora.param_axes(self.mcfg, self.lora),
                                           lora.param_shapes(self.mcfg, self.lora), self.rollout_mesh)
        return distributed.process_local_copy(params, shardings)

    def global_sum(self, values) -> np.ndarray:
        """Sums per-process counts over the data shards (each shard counted once)."""
        if jax.process_count() == 1:
            return np.asarray(values, np.float64)
        return distributed.shard_sum(values, self.shard)

    # ----- state ------------------------------------------------------------------------------
    def _init_or_restore(self, abstract_params):
        c = self.c
        latest = self.ckpt.latest_step()
        if latest is not None and not c.resume:
            raise RunError(f"{c.run_dir} already holds checkpoints (latest step {latest}); pass "
                           f"--config.resume=true to continue that run, or choose another run_dir")
        if c.resume and latest is not None:
            state, meta, step = self.ckpt.restore(self.abstract)
            self.ckpt.prune(restored=step)
            saved = meta.get("config", {})
            changes = _diff(saved, c.to_dict())
            if changes:
                print("resume: the config differs from the checkpoint's in: " + "; ".join(changes),
                      file=sys.stderr)
            self.start = int(step)
            print(f"resumed from step {step} of {c.run_dir}", file=sys.stderr)
            return state
        if c.resume:
            print(f"resume: no checkpoint in {c.run_dir}; starting from step 0", file=sys.stderr)
        if self.lora is not None:
            params = jax.jit(self._init_adapters, out_shardings=self.shardings["params"])()
            return train_step.init_state(params, self.optimizer, self.shardings)
        # A copy: the state's buffers are donated to the train step, the loaded params may be
        # needed as the frozen reference.
        params = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p),
                         out_shardings=self.shardings["params"])(self.model.params)
        return train_step.init_state(params, self.optimizer, self.shardings)

    def save(self, step: int) -> None:
        meta = {"config": self.c.to_dict(), "step": step, "seed": int(self.c.seed),
                "time": time.time()}
        self.ckpt.save(step, self.state, meta)

    # ----- roles and partners -----------------------------------------------------------------
    def learner_roles(self, games):
        c = self.c
        if c.games.partner == "self" or c.games.learner_roles == "all":
            return "all"
        return game_eval.parse_roles(c.games.learner_roles, games)

    def env_partner(self) -> Optional[str]:
        p = self.c.games.partner
        return p if p in ("strong", "weak") else None

    # ----- eval -------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        c = self.c
        eps = game_eval.episodes_for(self.eval_games, c.eval.split, int(c.seed), c.eval.limit or None)
        env = BatchedGameEnv(iter(eps), batch_size=max(1, len(eps)),
                             learner_roles=self.learner_roles(self.eval_games),
                             partner=self.env_partner(), reward=self.reward, seed=int(c.seed),
                             learner_name=os.path.basename(c.model.name.rstrip("/")),
                             partner_name=None if self.env_partner() else c.games.partner)
        # Every process plays every eval episode (with its own copy of the params); process 0 writes.
        greedy = self.make_policy(max_new_tokens=c.eval.max_new_tokens, temperature=0.0,
                                  params=self.state["params"])
        partner = None
        if remote.is_remote(c.games.partner):
            partner = self.remote_partner(int(c.eval.max_new_tokens), 0.0)
        elif self.partner_policy is not None:
            partner = self.make_policy(max_new_tokens=c.eval.max_new_tokens, temperature=0.0,
                                       params=self.ref_params)
        t = time.perf_counter()
        finished = play(env, greedy, partner)
        per_game: dict = {}
        out = os.path.join(c.run_dir, "eval", f"step_{step}")
        for f, _ in sorted(finished, key=lambda x: x[0].episode_id):
            if self.is_main:
                records.write_episode(out, f.master, f.episode.experiment)
            per_game.setdefault(f.episode.game, []).append(f.master.episode_scores)
        meta = {"model": c.model.name, "step": step, "split": c.eval.split, "partner": c.games.partner,
                "episodes": len(finished)}
        if self.is_main:
            from pathlib import Path

            res = game_eval.write_results(Path(out), per_game, meta, plots=bool(c.log.plots))
        else:
            from games import clemscore

            res = clemscore.aggregate(per_game)
        m = {"clemscore": res["clemscore"], "played": res["played"], "quality": res["quality"],
             "episodes": len(finished), "seconds": time.perf_counter() - t}
        for g, s in res["games"].items():
            m[f"clemscore_{g}"] = s["clemscore"]
        self.writer.write(step, m, split="eval")
        return m

    # ----- one training step ------------------------------------------------------------------
    def _pack(self, seqs: list, weight_by: str) -> Optional[dict]:
        c = self.c
        return buffers.pack_shard(seqs, shard=self.shard, shards=self.shards,
                                  micro_batch=int(c.batch.micro_batch), rows_multiple=self.rows_multiple,
                                  max_len=int(c.batch.max_seq_len), pad_id=self.pad_id, weight_by=weight_by,
                                  packed=bool(c.batch.pack) and weight_by == "tokens")

    def update(self, seqs: list, loss_fn, extra, weight_by: str, metrics: dict, repeats: int = 1,
               aux: Optional[tuple] = None) -> None:
        """One optimizer update (`repeats` of them) on this process's sequences and every other
        process's (a process may have none); skipped when no process has any.

        aux: (sequences, loss_fn, coef): an auxiliary objective added with weight coef to the same
        update, over its own token-mean batch (`train_step.make_train_step`)."""
        batch = self._pack(seqs, weight_by)
        if batch is None:
            metrics["skipped_empty"] = 1.0
            return
        aux_packed = None
        if aux is not None:
            aux_seqs, aux_fn, coef = aux
            aux_batch = self._pack(aux_seqs, "tokens")
            if aux_batch is not None:
                aux_packed = (aux_batch, aux_fn, float(coef))
        self._update_packed(batch, loss_fn, extra, metrics, repeats=repeats, shards=self.shards,
                            aux=aux_packed)

    def _update_packed(self, batch: dict, loss_fn, extra, metrics: dict, repeats: int = 1,
                       shards: int = 1, aux: Optional[tuple] = None) -> None:
        """batch: the full batch on every process (shards=1) or this process's block of its rows.
        aux: (packed batch, loss_fn, coef) of an auxiliary objective, or None."""
        device_batch = buffers.to_device(batch, self.mesh, shards=shards)
        aux_batch, aux_fn, aux_coef = aux if aux is not None else (None, None, 0.0)
        if self.lora is not None:   # the adapters are trained, on the frozen base
            loss_fn = self._lora_loss(loss_fn)
            aux_fn = self._lora_loss(aux_fn) if aux_fn is not None else None
            extra = {**(extra or {}), "lora_base": self.base}
            if self.lora.dropout > 0:
                extra["rng"] = jax.random.PRNGKey(int(self.c.seed) + 7)
        fn_key = (loss_fn, aux_fn, aux_coef)
        fn = self._steps.get(fn_key)
        if fn is None:
            fn = self._steps[fn_key] = train_step.make_train_step(loss_fn, self.optimizer, self.shardings,
                                                                  aux_loss_fn=aux_fn, aux_coef=aux_coef)
        args = (self.state, device_batch, extra)
        if aux_batch is not None:
            args += (buffers.to_device(aux_batch, self.mesh, shards=shards),)
        # Compiled ahead of time once per batch shape, so that update timings exclude compilation.
        key = (fn_key,) + tuple(tuple(sorted((k, v.shape) for k, v in b.items())) for b in
                                (batch, aux_batch) if b is not None)
        compiled = self._compiled.get(key)
        if compiled is None:
            t = time.perf_counter()
            compiled = self._compiled[key] = fn.lower(*args).compile()
            metrics["compile_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        out = {}
        lr = float(self.schedule(int(jax.device_get(self.state["step"]))))
        for _ in range(repeats):
            self.state, out = compiled(self.state, *args[1:])
        out = {k: float(v) for k, v in jax.device_get(out).items()}
        seconds = time.perf_counter() - t
        if self.peak is None:
            self.peak = measured_peak_flops(self.mcfg.jnp_dtype)
        batches = [b for b in (batch, aux_batch) if b is not None]
        tokens = lambda b, name: next(v for k, v in b.items() if k.endswith(name))  # noqa: E731
        counts = [int(np.count_nonzero(tokens(b, "segment_ids"))) for b in batches]   # real tokens
        rows = sum(int(v.sum()) for k, v in batch.items() if k.endswith("valid"))
        if shards > 1:   # one collective for every count
            *counts, rows = (int(x) for x in self.global_sum(counts + [rows]))
        real = repeats * sum(counts)
        flops = repeats * sum(train_flops_per_token(self.mcfg, tokens(b, "tokens").shape[-1]) * n
                              for b, n in zip(batches, counts))
        seq = tokens(batch, "tokens").shape[-1]
        metrics.update(out)
        metrics.update({"learning_rate": lr, "update_seconds": seconds, "tokens_per_second": real / seconds,
                        "mfu": flops / seconds / (self.peak * jax.device_count()),
                        "batch_rows": rows, "batch_length": seq})

    def close(self) -> None:
        self.writer.close()
        self.ckpt.close()


def _reseed(policy: ModelPolicy, seed: int, step: int) -> None:
    """The policy's key for one step: a function of (seed, step) only, so that a resumed run samples
    what the uninterrupted one did. (Each reply's own key also folds in its episode and turn.)"""
    policy._key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    policy._calls = 0


def _global_rollout_metrics(r: Run, ro) -> dict:
    """The metrics of one GRPO step's rollouts over every data shard: the episode metrics (reward,
    played, ...) recomputed from every shard's episodes, and collect's other metrics (counts) summed."""
    import types

    from games.core import BENCH_SCORE, METRIC_ABORTED, METRIC_SUCCESS

    most = int(distributed.allgather(np.int32(len(ro.finished))).max())   # refills vary per shard
    names = sorted(r.games)
    stats = np.zeros((most, 6))   # valid, reward, aborted, main score (nan: none), success, game
    for row, (f, _) in zip(stats, ro.finished):
        es = f.episode_scores
        q = es.get(BENCH_SCORE)
        row[:] = (1.0, f.reward, bool(es.get(METRIC_ABORTED)), np.nan if q is None else float(q),
                  bool(es.get(METRIC_SUCCESS)), names.index(f.episode.game))
    gathered = distributed.allgather(np.concatenate([[r.shard], stats.reshape(-1)]))
    per_shard = {}
    for x in gathered:   # processes of one shard played the same episodes
        per_shard.setdefault(int(x[0]), x[1:].reshape(most, 6))
    episodes = []
    for k in sorted(per_shard):
        for valid, reward, aborted, q, success, game in per_shard[k]:
            if valid:
                scores = {METRIC_ABORTED: bool(aborted), BENCH_SCORE: None if np.isnan(q) else float(q),
                          METRIC_SUCCESS: bool(success)}
                ep = types.SimpleNamespace(game=names[int(game)])
                episodes.append((types.SimpleNamespace(reward=float(reward), episode_scores=scores,
                                                       episode=ep), None))
    out = grpo.episode_metrics(episodes, per_game=True)
    # the counts, summed over shards; every shard has the same keys (the per-game ones, which a
    # shard has only for the games it played, are recomputed above from every shard's episodes)
    counts = sorted(k for k in ro.metrics if k not in out)
    out.update({k: int(v) for k, v in zip(counts, r.global_sum([ro.metrics[k] for k in counts]))})
    return out


class Preempted(Exception):
    """SIGTERM arrived (e.g. TPU maintenance or a preemptible VM's notice); a checkpoint was saved."""


def run(c: ConfigDict) -> None:
    """Runs the config; raises Preempted after saving a checkpoint if SIGTERM arrives mid-run."""
    import signal

    if c.method == "eval":
        c.checkpoint.every = 0
    r = Run(c)
    previous = None
    try:
        if c.method != "eval":
            def on_term(signum, frame):
                r.stop_requested = True

            try:
                previous = signal.signal(signal.SIGTERM, on_term)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                previous = None
        _run(r)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        r.close()


def _run(r: Run) -> None:
    c = r.c
    if r.is_main:
        os.makedirs(c.run_dir, exist_ok=True)
        with open(os.path.join(c.run_dir, "config.json"), "w") as f:
            f.write(to_json(c))
        r.writer.write_text(r.start, "config", "```\n" + to_json(c) + "\n```")
    if c.method == "eval":
        m = r.evaluate(0)
        if r.is_main:
            print(json.dumps({"step": 0, **{k: v for k, v in m.items() if not k.startswith("clemscore_")}}))
        return

    if r.start >= int(c.steps):
        # The final checkpoint is written after the final eval, so only the export can be missing
        # (a run killed while exporting): finish it.
        missing = bool(c.export.hf) and not os.path.isdir(os.path.join(c.run_dir, "hf"))
        if jax.process_count() > 1:   # process 0's view: the export is a collective
            missing = bool(distributed.allgather(np.int32(missing))[0])
        if missing:
            _write_outputs(r)
            if r.is_main:
                print(f"{c.run_dir}: wrote the final export of step {r.start}", file=sys.stderr)
        print(f"{c.run_dir} is complete at step {r.start}; raise --config.steps to train further",
              file=sys.stderr)
        return
    method_state = _method_setup(r)
    if c.eval.at_start and r.start == 0:
        _print_eval(r.evaluate(0), 0)

    steps = range(r.start, int(c.steps))
    bar = None
    if c.log.progress and r.is_main:
        from tqdm import tqdm

        bar = tqdm(total=int(c.steps), initial=r.start, desc=c.method, unit="step", dynamic_ncols=True)
    saved_at = r.start if r.start else None
    for i in steps:
        t0 = time.perf_counter()
        metrics = method_state(i)
        metrics["step_seconds"] = time.perf_counter() - t0
        done = i + 1
        if done % int(c.log.every) == 0 or done == c.steps:
            r.writer.write(done, metrics, split="train")
        if bar is not None:
            shown = {k: metrics[k] for k in ("loss", "reward", "played") if k in metrics}
            bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
            bar.update(1)
        # The eval of a step comes before its checkpoint: a run killed during the eval resumes from
        # the step before and plays it again, so that every eval of the finished run is there.
        if c.eval.every and done % int(c.eval.every) == 0 and done < c.steps:
            _print_eval(r.evaluate(done), done)
        if c.checkpoint.every and done % int(c.checkpoint.every) == 0 and done < c.steps:
            r.save(done)
            saved_at = done
        # With several processes, all stop after the same step (SIGTERM may reach them apart).
        stop = distributed.any_process(r.stop_requested) if jax.process_count() > 1 else r.stop_requested
        if stop and done < c.steps:
            # Finish the step in progress, save, and stop: a resumed run continues exactly from here.
            if saved_at != done:
                r.save(done)
            r.writer.flush()
            if bar is not None:
                bar.close()
            raise Preempted(f"SIGTERM: saved step {done} in {c.run_dir}; continue with --config.resume=true")
    if bar is not None:
        bar.close()
    _print_eval(r.evaluate(int(c.steps)), int(c.steps))
    r.writer.flush()
    r.save(int(c.steps))
    _write_outputs(r)


def _write_outputs(r: Run) -> None:
    """curves.png (with `log.plots`) and the HF export of the final params. The export is written
    beside `hf/` and renamed into place, so `hf/` exists only complete."""
    c = r.c
    # every process takes part in gathering the params; process 0 writes them
    params = r.rollout_params(r.state["params"]) if c.export.hf else None
    if r.is_main:
        if c.log.plots:
            plot_curves(os.path.join(c.run_dir, "metrics.jsonl"), os.path.join(c.run_dir, "curves.png"))
        if c.export.hf:
            final, partial = os.path.join(c.run_dir, "hf"), os.path.join(c.run_dir, "hf.partial")
            shutil.rmtree(partial, ignore_errors=True)
            export(r, partial, params)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)


def _print_eval(m: dict, step: int) -> None:
    if jax.process_index() != 0:
        return
    print(f"eval step {step}: clemscore {m['clemscore']:.2f}, played {m['played']:.1f}%, "
          f"quality {m['quality']:.1f}  ({m['episodes']} episodes)", file=sys.stderr)


def export(r: Run, path: str, params=None) -> None:
    """Writes the policy as an HF directory. params: arrays this process can read whole (default: the
    train state's, which holds only with one process; see `Run.rollout_params`)."""
    from models import loader

    dtype = None if r.c.export.dtype == "float32" else jnp.bfloat16
    src = r.model.path
    tok_dir = src if os.path.isdir(src) else None
    params = r.rollout_params(r.state["params"]) if params is None else params
    layers = params["layers"]
    if r.lora is not None and isinstance(layers, dict) and "lora" in layers:
        # the adapted model merged into plain weights, and the adapters alone in PEFT's layout
        adapters = {t: layers["lora"][t] for t in r.lora.targets}
        base = {**params, "layers": {k: v for k, v in layers.items() if k != "lora"}}
        lora.save_peft(os.path.join(path, "adapter"), adapters, r.lora, r.mcfg, base_model=r.c.model.name)
        params = lora.merge(base, adapters, r.lora)
    loader.save_hf(params, r.mcfg, path, tokenizer_dir=tok_dir, dtype=dtype)
    if tok_dir is None and hasattr(r.model.tokenizer, "save"):
        r.model.tokenizer.save(path)


# ----- methods ------------------------------------------------------------------------------------

def _method_setup(r: Run):
    c = r.c
    if c.method == "grpo":
        loss_fn = grpo.make_loss_fn(r.mcfg, c, int(c.rollout.max_new_tokens))
        extra = {"ref_params": r.ref_params} if grpo.uses_reference(c) else None
        pool = [registry.instances(g, "train", int(c.seed)) for g in r.games]
        roles = r.learner_roles(r.games)
        weight_by = "tokens" if c.grpo.aggregation == "token-mean" else "sequences"
        sft_coef = float(c.grpo.sft_coef)
        demos = None
        if sft_coef > 0 and not c.grpo.rollout_only:   # the auxiliary SFT term's demonstrations
            demos, info = sft.build_dataset(c, r.model.tokenizer, names=c.grpo.sft_games.strip() or None)
            sft_fn = sft.make_loss_fn(r.mcfg)
            if r.is_main:
                print(f"grpo: auxiliary SFT (coef {sft_coef:g}) on {info['rows']} rows from "
                      f"{info['episodes_kept']} of {info['episodes']} episodes", file=sys.stderr)

        def grpo_step(i: int) -> dict:
            # Each data shard plays its own block of the step's groups; every episode samples from
            # keys of its own (see playpen_jax.rollout), so the split does not change what is played.
            _reseed(r.policy, int(c.seed), i)
            r.policy.params = r.state["params"]
            if isinstance(r.partner_policy, ModelPolicy):
                _reseed(r.partner_policy, int(c.seed) + 1, i)
            t = time.perf_counter()
            ro = grpo.collect(pool, c, i, r.policy, r.partner_policy, roles, r.reward,
                              env_partner=r.env_partner(), shard=r.shard, shards=r.shards)
            metrics = dict(ro.metrics) if r.shards == 1 else _global_rollout_metrics(r, ro)
            metrics["rollout_seconds"] = time.perf_counter() - t
            if c.grpo.rollout_only:   # a control run: the same draws and keys, no update
                return metrics
            aux = None
            if demos is not None:
                seqs = sft.batch_for_step(demos, i, int(c.sft.batch_size), int(c.seed))
                lo, hi = distributed.share(len(seqs), r.shard, r.shards)   # this data shard's rows
                aux = (seqs[lo:hi], sft_fn, sft_coef)
            r.update(ro.sequences, loss_fn, extra, weight_by, metrics, repeats=int(c.grpo.updates_per_batch),
                     aux=aux)
            return metrics

        return grpo_step

    if c.method == "sft":
        rows, info = sft.build_dataset(c, r.model.tokenizer)
        print(f"sft: {info['rows']} rows from {info['episodes_kept']} of {info['episodes']} episodes "
              f"({info['probe_rows']} of them probe exchanges; {info['dropped_long']} too long)",
              file=sys.stderr)
        loss_fn = sft.make_loss_fn(r.mcfg)

        def sft_step(i: int) -> dict:
            seqs = sft.batch_for_step(rows, i, int(c.sft.batch_size), int(c.seed))
            lo, hi = distributed.share(len(seqs), r.shard, r.shards)   # this data shard's rows
            seqs = seqs[lo:hi]
            metrics = {"rows_total": len(rows)}
            r.update(seqs, loss_fn, None, "tokens", metrics)
            return metrics

        return sft_step

    if c.method == "dpo":
        return dpo.make_step(r)
    raise RunError(f"unknown method {c.method!r}")
