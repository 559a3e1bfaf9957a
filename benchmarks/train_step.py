"""GRPO train step throughput and where a GRPO iteration's time goes.

    python -m benchmarks.train_step                    # embedded SmolLM2-135M-Instruct, f32, CPU
    python -m benchmarks.train_step --random_preset=llama-3.2-1b --dtype=bfloat16 \\
        --sizes=4x512,8x512,16x512 --beta0_size=8x512 --repeats=3 --iterations=0   # one GPU

The default sizes are small because a step of the 135M model takes seconds on a 2-core CPU (the
default run takes 3 to 6 minutes there); `--quick` is a smoke run of a few seconds' work.

Part 1, the train step. For each ROWSxSEQ size: ROWS random GRPO rows of exactly SEQ tokens (a
random prompt and a reply of min(64, SEQ/2) tokens, the sampler's old log-probs, an advantage per
row) packed as one micro-batch (`batch.micro_batch` = ROWS), the step of `train.step` with the loss
of `train.grpo` built from configs/grpo.py, compiled ahead of time once, then called `--repeats`
times; the time of a size is the best of those calls (each waits for the new state; the first call
is one of them, there is no separate warm-up). tokens/s counts
every non-pad token, through forward and backward. MFU = `train.loop.train_flops_per_token` x tokens
/ s over the FLOP/s of a large square matmul of the model's dtype measured in the same run (2048² on
CPU, 8192² on GPU), times the number of devices. That FLOP count is the policy's forward and
backward; with the default beta = 0.04 the step also runs the frozen reference's forward, a third
more work that MFU does not count. The same step with beta = 0 (no reference forward) is timed at
`--beta0_size`.

The peer is a bare LM training step: `jax.value_and_grad` of the mean next-token cross-entropy of
`models.llama.forward` over the same tokens plus `optax.adamw`, in one jit with donated buffers,
timed the same way right after ours. `vs_bare_lm_step` is our step time over the bare step time
(the lowest over the sizes): the cost of the reference forward, the GRPO loss, the gradient
accumulation scan, clipping and the non-finite guard. With `--torch`, transformers'
LlamaForCausalLM (same weights, f32, `labels=` loss) + torch.optim.AdamW is timed too; `vs_torch`
is the torch step time over ours (the highest over the sizes; above 1: ours is faster).

Part 2, the iteration. `--iterations` GRPO iterations of configs/grpo.py (the embedded model, or
`--model`, in `--dtype`, also with `--random_preset`, whose random weights have no tokenizer;
`--override KEY=VALUE` changes the config) run through `train.loop.Run` in a temporary run
directory, without evals or checkpoints. Each iteration's `rollout_seconds`, `update_seconds` (the
compiled step's calls only) and `compile_seconds` (the step's ahead-of-time compile) come from the
loop's own metrics. The rollout (`grpo.collect`) and the learner policy's
calls (chat encoding, sampling, decoding) are wrapped to time them and the JAX compilations inside
them (`jax.monitoring` compile events: mostly the sampler's per-shape executables). Over all
iterations, compilation left out:

    iteration = step seconds - step compile - rollout compile
    rollout   = rollout seconds - rollout compile         rollout_share = rollout / iteration
    update    = update seconds                            update_share  = update / iteration
    env       = rollout - (policy seconds - policy compile)   env_share = env / rollout

`env` is everything in the rollout outside the learner's calls: the game masters, the programmatic
partner (the strong player answers inside the environment), the environment's bookkeeping and
`grpo.collect`'s advantages and rows; all of it is host work. What is neither rollout nor update
(packing, moving the batch to the device) is the rest of the iteration. With
`grpo.drop_zero_variance` (the default) an iteration whose groups all have equal rewards trains on
no rows and has no update.

The last line printed is JSON with `tokens_per_second` and `mfu` (by size), `best_mfu`,
`vs_bare_lm_step`, `reference_forward_share`, `rollout_share`, `update_share`, `env_share` and the
raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.forward import matmul_roof
from models import llama, registry
from models.config import preset
from playpen_jax import buffers
from playpen_jax import sharding as shd
from playpen_jax.config import ConfigError, apply_override, load_file, validate
from playpen_jax.rollout import ModelPolicy
from train import grpo, loop
from train import step as train_step

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "grpo.py")
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
QUICK_OVERRIDES = ("grpo.groups_per_step=1", "grpo.group_size=2", "rollout.max_new_tokens=16")


class BenchmarkError(ValueError):
    """A benchmark argument is malformed."""


def parse_sizes(text: str) -> list:
    sizes = []
    for part in text.split(","):
        rows, _, seq = part.strip().partition("x")
        if not (rows.isdigit() and seq.isdigit()) or int(rows) < 1 or int(seq) < 2:
            raise BenchmarkError(f"--sizes: {part!r} is not ROWSxSEQ with ROWS >= 1 and SEQ >= 2")
        sizes.append((int(rows), int(seq)))
    return sizes


def grpo_config(overrides=()):
    """configs/grpo.py with KEY=VALUE overrides, checked."""
    c = load_file(CONFIG)
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise BenchmarkError(f"--override {item!r}: expected KEY=VALUE (e.g. grpo.beta=0)")
        apply_override(c, key, value)
    return validate(c)


def random_rows(rows: int, seq: int, vocab: int, rng: np.random.Generator) -> list:
    """GRPO rows of exactly `seq` tokens: a random prompt, a reply of min(64, seq // 2) tokens."""
    reply = min(64, seq // 2)
    out = []
    for _ in range(rows):
        tokens = rng.integers(0, vocab, seq).tolist()
        old = (-rng.exponential(1.0, reply)).tolist()
        out.append(buffers.completion(tokens[:seq - reply], tokens[seq - reply:], old,
                                      advantage=float(rng.normal())))
    return out


def timed_calls(call, repeats: int) -> list:
    """Seconds of each of `repeats` calls; `call()` must wait for its results."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


class GrpoStep:
    """Our train step on a mesh of all devices, with its state, for packed batches of any size."""

    def __init__(self, cfg, params, c, mesh):
        self.cfg, self.c, self.mesh = cfg, c, mesh
        self.optimizer = train_step.make_optimizer(c.optimizer, 1000)
        param_sh = train_step.param_shardings(cfg, mesh)
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        self.shardings = train_step.state_shardings(param_sh, self.optimizer, abstract, mesh)
        self.ref = jax.device_put(params, param_sh)  # the frozen reference, never donated
        copy = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=param_sh)
        self.state = train_step.init_state(copy(self.ref), self.optimizer, self.shardings)
        self._fns: dict = {}

    def run(self, seqs: list, beta: float, repeats: int) -> dict:
        """Compiles the step for this batch once, then times `repeats` calls."""
        c = self.c.copy_and_resolve_references()
        c.grpo.beta = float(beta)
        rows, seq = len(seqs), len(seqs[0].tokens)
        batch = buffers.pack(seqs, micro_batch=rows, rows_multiple=buffers.rows_multiple(self.mesh),
                             max_len=seq, length=seq, weight_by="tokens")
        device_batch = buffers.to_device(batch, self.mesh)
        uses_ref = grpo.uses_reference(c)
        if uses_ref not in self._fns:
            loss_fn = grpo.make_loss_fn(self.cfg, c, int(c.rollout.max_new_tokens))
            self._fns[uses_ref] = train_step.make_train_step(loss_fn, self.optimizer, self.shardings)
        extra = {"ref_params": self.ref} if uses_ref else None
        t = time.perf_counter()
        compiled = self._fns[uses_ref].lower(self.state, device_batch, extra).compile()
        compile_s = time.perf_counter() - t
        metrics = {}

        def call():
            nonlocal metrics
            self.state, metrics = compiled(self.state, device_batch, extra)
            jax.block_until_ready((self.state, metrics))

        times = timed_calls(call, repeats)
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(f"the GRPO step at {rows}x{seq} gave a non-finite loss {loss}")
        return {"times": times, "compile_s": compile_s,
                "tokens": int((batch["segment_ids"] != 0).sum())}


class BareStep:
    """Mean next-token cross-entropy + AdamW, one jit on the default device: a bare LM step."""

    def __init__(self, cfg, params):
        self.cfg = cfg
        self.optimizer = optax.adamw(1e-6)
        self.params = jax.tree_util.tree_map(jnp.copy, params)
        self.opt_state = self.optimizer.init(self.params)

        def step(params, opt_state, tokens):
            def loss_fn(p):
                logits, _ = llama.forward(p, tokens, config=cfg)
                lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
                return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1))

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._step = jax.jit(step, donate_argnums=(0, 1))

    def run(self, tokens: np.ndarray, repeats: int) -> dict:
        tok = jnp.asarray(tokens, jnp.int32)
        compiled = self._step.lower(self.params, self.opt_state, tok).compile()

        def call():
            self.params, self.opt_state, loss = compiled(self.params, self.opt_state, tok)
            jax.block_until_ready((self.params, loss))

        return {"times": timed_calls(call, repeats)}


class TorchStep:
    """transformers' LlamaForCausalLM with the same weights: `labels=` loss, backward, AdamW."""

    def __init__(self, cfg, params, on_gpu: bool):
        import torch
        import transformers

        from models import loader

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch, self.on_gpu = torch, on_gpu
        with tempfile.TemporaryDirectory() as tmp:
            loader.save_hf(params, cfg, tmp)
            self.model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        self.model = self.model.to("cuda" if on_gpu else "cpu").train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6, weight_decay=0.0)

    def run(self, tokens: np.ndarray, repeats: int) -> dict:
        torch = self.torch
        ids = torch.tensor(tokens, dtype=torch.long, device=self.model.device)

        def call():
            self.opt.zero_grad(set_to_none=True)
            self.model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            self.opt.step()
            if self.on_gpu:
                torch.cuda.synchronize()

        call()  # warm-up: allocates the gradients and the optimizer state
        return {"times": timed_calls(call, repeats)}


# ----- Part 2 --------------------------------------------------------------------------------------

class CompileClock:
    """Seconds JAX has spent tracing, lowering and compiling since it was installed."""

    def __init__(self):
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_):
        if event in COMPILE_EVENTS:
            self.seconds += duration

    def close(self):
        jax.monitoring.unregister_event_duration_listener(self._on_event)


class TimedPolicy(ModelPolicy):
    """A ModelPolicy that adds up the seconds of its calls and of the compilations inside them."""

    def __init__(self, *args, clock: CompileClock, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock, self.seconds, self.compile_seconds = clock, 0.0, 0.0

    def __call__(self, requests, seeds=None):
        t, compiled = time.perf_counter(), self.clock.seconds
        try:
            return super().__call__(requests, seeds=seeds)
        finally:
            self.seconds += time.perf_counter() - t
            self.compile_seconds += self.clock.seconds - compiled


def iteration_breakdown(model: str, dtype: str, iterations: int, overrides=()) -> dict:
    """Runs GRPO iterations through `train.loop.Run` and splits their time (module docstring)."""
    clock = CompileClock()
    inside = {"seconds": 0.0, "compile_seconds": 0.0}
    collect = grpo.collect

    def timed_collect(*args, **kwargs):  # the loop's rollout phase, with its compilations
        t, compiled = time.perf_counter(), clock.seconds
        try:
            return collect(*args, **kwargs)
        finally:
            inside["seconds"] += time.perf_counter() - t
            inside["compile_seconds"] += clock.seconds - compiled

    its = []
    with tempfile.TemporaryDirectory() as tmp:
        c = grpo_config((f"model.name={model}", f"model.param_dtype={dtype}", f"model.dtype={dtype}",
                         f"steps={iterations}", "eval.at_start=false", "log.tensorboard=false",
                         "log.progress=false", "export.hf=false", f"run_dir={tmp}") + tuple(overrides))
        r = loop.Run(c)
        grpo.collect = timed_collect
        try:
            ro = c.rollout
            r.policy = TimedPolicy(r.model, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                                   top_k=ro.top_k, top_p=ro.top_p, batch_size=ro.batch_size,
                                   sampler=r.sampler, params=r.state["params"], clock=clock)
            step = loop._method_setup(r)
            for i in range(iterations):
                before = (r.policy.seconds, r.policy.compile_seconds, inside["compile_seconds"])
                t = time.perf_counter()
                m = step(i)
                m["step_seconds"] = time.perf_counter() - t
                m["policy_seconds"] = r.policy.seconds - before[0]
                m["policy_compile_seconds"] = r.policy.compile_seconds - before[1]
                m["rollout_compile_seconds"] = inside["compile_seconds"] - before[2]
                its.append(m)
        finally:
            grpo.collect = collect
            r.close()
            clock.close()
    keys = ("step_seconds", "rollout_seconds", "rollout_compile_seconds", "policy_seconds",
            "policy_compile_seconds", "update_seconds", "compile_seconds", "rows", "batch_rows",
            "batch_length", "episodes", "learner_turns", "sampled_tokens", "dropped_long",
            "zero_variance_groups")
    its = [{k: float(m.get(k, 0.0)) for k in keys} for m in its]
    total = {k: sum(m[k] for m in its) for k in keys}
    iteration = total["step_seconds"] - total["compile_seconds"] - total["rollout_compile_seconds"]
    rollout = total["rollout_seconds"] - total["rollout_compile_seconds"]
    policy = total["policy_seconds"] - total["policy_compile_seconds"]
    return {"iterations": its, "iteration_seconds": iteration, "rollout_seconds": rollout,
            "policy_seconds": policy, "update_seconds": total["update_seconds"],
            "env_seconds": rollout - policy, "rollout_share": rollout / iteration,
            "update_share": total["update_seconds"] / iteration, "env_share": (rollout - policy) / rollout}


# ----- main ----------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a name or path (default: the embedded model)")
    p.add_argument("--random_preset", default=None, help="part 1 on random weights of a preset shape")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--matmul_dtype", default="", choices=("", "float32", "bfloat16"),
                   help="part 1: the weight matmuls (and their gradients) on operands of this dtype, "
                        "f32 accumulation, under --dtype activations (default: --dtype)")
    p.add_argument("--sizes", default="2x128,2x256,4x256", help="ROWSxSEQ list for part 1")
    p.add_argument("--beta0_size", default=None, help="ROWSxSEQ to time beta=0 at (default: the last)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per size (the best is kept)")
    p.add_argument("--iterations", type=int, default=2, help="GRPO iterations for part 2 (0: skip)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a configs/grpo.py override for both parts (repeatable)")
    p.add_argument("--torch", action="store_true", help="also time transformers + torch AdamW")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: one 2x64 size, one call each, one small GRPO iteration")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.iterations = "2x64", 1, min(args.iterations, 1)
        args.override = list(QUICK_OVERRIDES) + args.override
    if args.repeats < 1 or args.iterations < 0:
        raise BenchmarkError(f"--repeats={args.repeats} must be >= 1 and --iterations={args.iterations} "
                             f">= 0")
    sizes = parse_sizes(args.sizes)
    beta0_size = parse_sizes(args.beta0_size)[0] if args.beta0_size else sizes[-1]
    model_name = args.model or registry.DEFAULT_MODEL
    c = grpo_config(args.override)

    if args.random_preset:
        cfg = preset(args.random_preset, param_dtype=args.dtype, dtype=args.dtype,
                     matmul_dtype=args.matmul_dtype or None)
        params = llama.init(cfg, jax.random.PRNGKey(0))
        name = f"{args.random_preset} (random weights)"
    else:
        model = registry.load(model_name, param_dtype=args.dtype, dtype=args.dtype,
                              matmul_dtype=args.matmul_dtype or None)
        cfg, params, name = model.config, model.params, model_name
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    roof = matmul_roof(cfg.jnp_matmul_dtype, 8192 if on_gpu else 2048) * jax.device_count()
    mesh = shd.make_mesh({"data": -1})

    ours = GrpoStep(cfg, params, c, mesh)
    bare = BareStep(cfg, params)
    peer = TorchStep(cfg, params, on_gpu) if args.torch else None
    params = None
    rng = np.random.default_rng(0)
    rows = []
    # Each size times ours, then the peers, back to back: drift in a shared machine's speed then
    # affects both sides of a ratio alike.
    for n, seq in sizes:
        seqs = random_rows(n, seq, cfg.vocab_size, rng)
        r = ours.run(seqs, float(c.grpo.beta), args.repeats)
        tokens = np.asarray([s.tokens for s in seqs], np.int32)
        b = bare.run(tokens, args.repeats)
        s, bs = min(r["times"]), min(b["times"])
        row = {"rows": n, "seq": seq, "tokens": r["tokens"], "seconds": s,
               "median_seconds": statistics.median(r["times"]), "compile_seconds": r["compile_s"],
               "tokens_per_second": r["tokens"] / s,
               "mfu": loop.train_flops_per_token(cfg, seq) * r["tokens"] / s / roof,
               "bare_seconds": bs, "vs_bare_lm_step": s / bs}
        if (n, seq) == beta0_size:
            z = ours.run(seqs, 0.0, args.repeats)
            row["beta0_seconds"] = min(z["times"])
        if peer is not None:
            row["torch_seconds"] = min(peer.run(tokens, args.repeats)["times"])
            row["vs_torch"] = row["torch_seconds"] / s
        rows.append(row)
    if not any("beta0_seconds" in r for r in rows):
        seqs = random_rows(*beta0_size, cfg.vocab_size, rng)
        rows.append({"rows": beta0_size[0], "seq": beta0_size[1],
                     "seconds": min(ours.run(seqs, float(c.grpo.beta), args.repeats)["times"]),
                     "beta0_seconds": min(ours.run(seqs, 0.0, args.repeats)["times"])})
    ours = bare = peer = None

    part2 = None
    if args.iterations:
        part2 = iteration_breakdown(model_name, args.dtype, args.iterations, args.override)

    mm = f" ({args.matmul_dtype} weight matmuls)" if cfg.mixed_matmuls else ""
    print(f"\n{name}, {args.dtype}{mm}, {jax.device_count()} x {device.device_kind} "
          f"({platform.machine()}, {os.cpu_count()} cores), matmul roof {roof / 1e9:.1f} GFLOP/s, "
          f"best of {args.repeats} calls\n")
    print("| rows x seq | tokens | ours s | ours tok/s | MFU | bare LM step s | ours / bare |"
          + (" torch s | torch / ours |" if args.torch else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.torch else ""))
    timed = [r for r in rows if "tokens_per_second" in r]
    for r in timed:
        line = (f"| {r['rows']}x{r['seq']} | {r['tokens']} | {r['seconds']:.2f} | "
                f"{r['tokens_per_second']:.1f} | {100 * r['mfu']:.1f}% | {r['bare_seconds']:.2f} | "
                f"{r['vs_bare_lm_step']:.2f} |")
        if args.torch:
            line += f" {r['torch_seconds']:.2f} | {r['vs_torch']:.2f} |"
        print(line)
    b0 = next(r for r in rows if "beta0_seconds" in r)
    ref_share = 1.0 - b0["beta0_seconds"] / b0["seconds"]
    print(f"\nbeta={float(c.grpo.beta):g} vs beta=0 at {b0['rows']}x{b0['seq']}: {b0['seconds']:.2f} s vs "
          f"{b0['beta0_seconds']:.2f} s: the reference forward takes {100 * ref_share:.0f}% of the step")

    summary = {
        "model": name, "dtype": args.dtype, "matmul_dtype": cfg.matmul_dtype or args.dtype,
        "device": device.device_kind, "devices": jax.device_count(),
        "roof_gflops": roof / 1e9, "repeats": args.repeats, "rows": rows,
        "tokens_per_second": {f"{r['rows']}x{r['seq']}": r["tokens_per_second"] for r in timed},
        "mfu": {f"{r['rows']}x{r['seq']}": r["mfu"] for r in timed},
        "best_mfu": max(r["mfu"] for r in timed),
        "vs_bare_lm_step": min(r["vs_bare_lm_step"] for r in timed),
        "reference_forward_share": ref_share,
    }
    if args.torch:
        summary["vs_torch"] = max(r["vs_torch"] for r in timed)
    if part2 is not None:
        print(f"\nGRPO iterations of configs/grpo.py ({model_name}"
              + (f"; {', '.join(args.override)}" if args.override else "") + "):\n")
        print("| iteration | sequences in rows x length | rollout s | policy s | rollout compile s | "
              "update s | step compile s | iteration s |")
        print("|---|---|---|---|---|---|---|---|")
        for i, m in enumerate(part2["iterations"]):
            shape = (f"{int(m['rows'])} in {int(m['batch_rows'])}x{int(m['batch_length'])}" if m["rows"]
                     else "none")
            print(f"| {i} | {shape} | "
                  f"{m['rollout_seconds']:.1f} | {m['policy_seconds']:.1f} | "
                  f"{m['rollout_compile_seconds']:.1f} | {m['update_seconds']:.1f} | "
                  f"{m['compile_seconds']:.1f} | {m['step_seconds']:.1f} |")
        print(f"\nwithout compilation: rollout {100 * part2['rollout_share']:.0f}%, update "
              f"{100 * part2['update_share']:.0f}% of {part2['iteration_seconds']:.1f} s; the env's "
              f"Python is {100 * part2['env_share']:.1f}% of the rollout")
        summary.update({"rollout_share": part2["rollout_share"], "update_share": part2["update_share"],
                        "env_share": part2["env_share"], "iterations": part2})
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (BenchmarkError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
