"""The training loop behind `train.main`: SFT, DPO and GRPO steps, evals, checkpoints, metrics."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from games import eval as game_eval
from games import records, registry
from games.env import BatchedGameEnv, RewardConfig
from models import registry as model_registry
from models.sampler import Sampler
from playpen_jax import buffers
from playpen_jax import sharding as shd
from playpen_jax.checkpoint import Checkpointer
from playpen_jax.config import to_json
from playpen_jax.metrics import MetricWriter, plot_curves
from playpen_jax.rollout import ModelPolicy, play
from train import dpo, grpo, sft
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


class Run:
    """Everything a run holds: mesh, model, state, policies, writers."""

    def __init__(self, c: ConfigDict):
        self.c = c
        self.is_main = jax.process_index() == 0
        self.mesh = shd.make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor})
        self.model = model_registry.load(
            c.model.name, tokenizer_path=c.model.tokenizer or None,
            shardings=lambda cfg: train_step.param_shardings(cfg, self.mesh),
            param_dtype=c.model.param_dtype, dtype=c.model.dtype)
        self.mcfg = self.model.config
        self.games = registry.resolve_names(c.games.names)
        self.eval_games = registry.resolve_names(c.eval.games)
        updates = c.steps * (c.grpo.updates_per_batch if c.method == "grpo" else 1)
        self.optimizer = train_step.make_optimizer(c.optimizer, max(updates, 1))
        self.schedule = train_step.learning_rate_schedule(c.optimizer, max(updates, 1))
        param_sh = train_step.param_shardings(self.mcfg, self.mesh)
        abstract_params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                 self.model.params)
        self.shardings = train_step.state_shardings(param_sh, self.optimizer, abstract_params, self.mesh)
        self.abstract = train_step.abstract_state(self.shardings, abstract_params, self.optimizer)
        self.ckpt = Checkpointer(os.path.join(c.run_dir, "checkpoints"), keep=int(c.checkpoint.keep))
        self.start = 0
        self.state = self._init_or_restore(abstract_params)
        needs_ref = (c.games.partner == "reference" or (c.method == "grpo" and grpo.uses_reference(c))
                     or c.method == "dpo")
        self.ref_params = self.model.params if needs_ref else None
        if not needs_ref:
            self.model.params = None  # the state holds the trained copy; free the loaded one
        pad = self.model.tokenizer.eos_id if self.model.tokenizer.eos_id is not None else 0
        self.pad_id = pad
        self.sampler = Sampler(self.mcfg, mesh=self.mesh, pad_id=pad)
        r = c.rollout
        self.policy = ModelPolicy(self.model, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                  top_k=r.top_k, top_p=r.top_p, batch_size=r.batch_size,
                                  sampler=self.sampler, params=self.state["params"])
        self.partner_policy = None
        if c.games.partner == "reference":
            self.partner_policy = ModelPolicy(self.model, max_new_tokens=r.max_new_tokens,
                                              temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                              batch_size=r.batch_size, sampler=self.sampler,
                                              params=self.ref_params)
        self.reward = RewardConfig(c.games.reward, float(c.games.abort_penalty))
        self.writer = MetricWriter(c.run_dir, tensorboard=bool(c.log.tensorboard), enabled=self.is_main,
                                   resume_step=self.start if c.resume else None)
        self.peak = None
        self.stop_requested = False
        self._steps: dict = {}
        self._compiled: dict = {}
        self.rows_multiple = buffers.rows_multiple(self.mesh)

    # ----- state ------------------------------------------------------------------------------
    def _init_or_restore(self, abstract_params):
        c = self.c
        latest = self.ckpt.latest_step()
        if latest is not None and not c.resume:
            raise RunError(f"{c.run_dir} already holds checkpoints (latest step {latest}); pass "
                           f"--config.resume=true to continue that run, or choose another run_dir")
        if c.resume and latest is not None:
            state, meta, step = self.ckpt.restore(self.abstract)
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
        greedy = ModelPolicy(self.model, max_new_tokens=c.eval.max_new_tokens, temperature=0.0,
                             batch_size=c.rollout.batch_size, sampler=self.sampler,
                             params=self.state["params"])
        partner = None
        if self.partner_policy is not None:
            partner = ModelPolicy(self.model, max_new_tokens=c.eval.max_new_tokens, temperature=0.0,
                                  batch_size=c.rollout.batch_size, sampler=self.sampler,
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

            res = game_eval.write_results(Path(out), per_game, meta)
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
    def update(self, seqs: list, loss_fn, extra, weight_by: str, metrics: dict) -> None:
        c = self.c
        if not seqs:
            metrics["skipped_empty"] = 1.0
            return
        batch = buffers.pack(seqs, micro_batch=int(c.batch.micro_batch), rows_multiple=self.rows_multiple,
                             max_len=int(c.batch.max_seq_len), pad_id=self.pad_id, weight_by=weight_by,
                             packed=bool(c.batch.pack) and weight_by == "tokens")
        self._update_packed(batch, loss_fn, extra, metrics)

    def _update_packed(self, batch: dict, loss_fn, extra, metrics: dict, repeats: int = 1) -> None:
        device_batch = buffers.to_device(batch, self.mesh)
        fn = self._steps.get(loss_fn)
        if fn is None:
            fn = self._steps[loss_fn] = train_step.make_train_step(loss_fn, self.optimizer, self.shardings)
        # Compiled ahead of time once per batch shape, so that update timings exclude compilation.
        key = (loss_fn, tuple(sorted((k, v.shape) for k, v in batch.items())))
        compiled = self._compiled.get(key)
        if compiled is None:
            t = time.perf_counter()
            compiled = self._compiled[key] = fn.lower(self.state, device_batch, extra).compile()
            metrics["compile_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        out = {}
        lr = float(self.schedule(int(jax.device_get(self.state["step"]))))
        for _ in range(repeats):
            self.state, out = compiled(self.state, device_batch, extra)
        out = {k: float(v) for k, v in jax.device_get(out).items()}
        seconds = time.perf_counter() - t
        real = sum(int(np.count_nonzero(v)) for k, v in batch.items() if k.endswith("segment_ids")) * repeats
        rows = sum(int(v.sum()) for k, v in batch.items() if k.endswith("valid"))
        seq = next(v for k, v in batch.items() if k.endswith("tokens")).shape[-1]
        if self.peak is None:
            self.peak = measured_peak_flops(self.mcfg.jnp_dtype)
        flops = train_flops_per_token(self.mcfg, seq) * real
        metrics.update(out)
        metrics.update({"learning_rate": lr, "update_seconds": seconds, "tokens_per_second": real / seconds,
                        "mfu": flops / seconds / (self.peak * jax.device_count()),
                        "batch_rows": rows, "batch_length": seq})

    def close(self) -> None:
        self.writer.close()
        self.ckpt.close()


def _reseed(policy: ModelPolicy, seed: int, step: int) -> None:
    policy._key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    policy._calls = 0


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
        print(json.dumps({"step": 0, **{k: v for k, v in m.items() if not k.startswith("clemscore_")}}))
        return

    if r.start >= int(c.steps):
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
        if c.checkpoint.every and done % int(c.checkpoint.every) == 0 and done < c.steps:
            r.save(done)
            saved_at = done
        if c.eval.every and done % int(c.eval.every) == 0 and done < c.steps:
            _print_eval(r.evaluate(done), done)
        if r.stop_requested and done < c.steps:
            # Finish the step in progress, save, and stop: a resumed run continues exactly from here.
            if saved_at != done:
                r.save(done)
            r.writer.flush()
            if bar is not None:
                bar.close()
            raise Preempted(f"SIGTERM: saved step {done} in {c.run_dir}; continue with --config.resume=true")
    if bar is not None:
        bar.close()
    if saved_at != int(c.steps):
        r.save(int(c.steps))
    _print_eval(r.evaluate(int(c.steps)), int(c.steps))
    r.writer.flush()
    if r.is_main:
        plot_curves(os.path.join(c.run_dir, "metrics.jsonl"), os.path.join(c.run_dir, "curves.png"))
        if c.export.hf:
            export(r, os.path.join(c.run_dir, "hf"))


def _print_eval(m: dict, step: int) -> None:
    print(f"eval step {step}: clemscore {m['clemscore']:.2f}, played {m['played']:.1f}%, "
          f"quality {m['quality']:.1f}  ({m['episodes']} episodes)", file=sys.stderr)


def export(r: Run, path: str) -> None:
    from models import loader

    dtype = None if r.c.export.dtype == "float32" else jnp.bfloat16
    src = r.model.path
    tok_dir = src if os.path.isdir(src) else None
    loader.save_hf(r.state["params"], r.mcfg, path, tokenizer_dir=tok_dir, dtype=dtype)
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

        def grpo_step(i: int) -> dict:
            _reseed(r.policy, int(c.seed), i)
            r.policy.params = r.state["params"]
            if r.partner_policy is not None:
                _reseed(r.partner_policy, int(c.seed) + 1, i)
            t = time.perf_counter()
            ro = grpo.collect(pool, c, i, r.policy, r.partner_policy, roles, r.reward,
                              env_partner=r.env_partner())
            metrics = dict(ro.metrics)
            metrics["rollout_seconds"] = time.perf_counter() - t
            if ro.sequences:
                batch = buffers.pack(ro.sequences, micro_batch=int(c.batch.micro_batch),
                                     rows_multiple=r.rows_multiple, max_len=int(c.batch.max_seq_len),
                                     pad_id=r.pad_id, weight_by=weight_by,
                                     packed=bool(c.batch.pack) and weight_by == "tokens")
                r._update_packed(batch, loss_fn, extra, metrics, repeats=int(c.grpo.updates_per_batch))
            else:
                metrics["skipped_empty"] = 1.0
            return metrics

        return grpo_step

    if c.method == "sft":
        rows, info = sft.build_dataset(c, r.model.tokenizer)
        print(f"sft: {info['rows']} rows from {info['episodes_kept']} of {info['episodes']} episodes "
              f"({info['dropped_long']} too long)", file=sys.stderr)
        loss_fn = sft.make_loss_fn(r.mcfg)

        def sft_step(i: int) -> dict:
            seqs = sft.batch_for_step(rows, i, int(c.sft.batch_size), int(c.seed))
            metrics = {"rows_total": len(rows)}
            r.update(seqs, loss_fn, None, "tokens", metrics)
            return metrics

        return sft_step

    if c.method == "dpo":
        return dpo.make_step(r)
    raise RunError(f"unknown method {c.method!r}")
