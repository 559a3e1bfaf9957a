"""The optimizer, the sharded train state, and the jitted train step that every method shares.

State is a pytree {"params", "opt_state", "step"} whose leaves carry NamedShardings derived from the
model's logical axes (`models.llama.param_axes`) and the rule table in `playpen_jax.sharding`; the
optimizer state is sharded like the params it tracks. `make_train_step(loss_fn, ...)` returns a
jitted step that takes a packed batch [M, n, T] (see `playpen_jax.buffers`), accumulates gradients
over its M micro-batches with `lax.scan` (a micro-batch of padding only is skipped), applies one
optimizer update, and donates the old state's buffers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from models import llama
from models.config import LlamaConfig
from playpen_jax import sharding as shd

LossFn = Callable[..., tuple]  # loss_fn(params, micro_batch, extra) -> (loss, metrics dict)


def learning_rate_schedule(c: ConfigDict, total_steps: int) -> optax.Schedule:
    lr, warm = float(c.learning_rate), int(c.warmup_steps)
    decay_steps = max(int(total_steps) - warm, 1)
    if c.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif c.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        main = optax.linear_schedule(lr, 0.0, decay_steps)
    if warm <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(c: ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW with a schedule and optional global-norm clipping, from `config.optimizer`."""
    parts = []
    if c.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(c.grad_clip)))
    parts.append(optax.adamw(learning_rate_schedule(c, total_steps), b1=float(c.b1), b2=float(c.b2),
                             eps=float(c.eps), weight_decay=float(c.weight_decay)))
    return optax.chain(*parts)


def param_shardings(config: LlamaConfig, mesh: Mesh, rules=shd.DEFAULT_RULES):
    return shd.tree_shardings(llama.param_axes(config), llama.param_shapes(config), mesh, rules)


def state_shardings(params_sh, optimizer: optax.GradientTransformation, abstract_params, mesh: Mesh):
    """Shardings of {"params", "opt_state", "step"}: optimizer leaves follow their params."""
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, params_sh,
                                   transform_non_params=lambda _: replicated)
    return {"params": params_sh, "opt_state": opt_sh, "step": replicated}


def init_state(params, optimizer: optax.GradientTransformation, shardings) -> dict:
    """A fresh train state around (already sharded) params."""
    init = jax.jit(lambda p: {"params": p, "opt_state": optimizer.init(p),
                              "step": jnp.zeros((), jnp.int32)},
                   out_shardings=shardings)
    return init(params)


def abstract_state(shardings, params_abstract, optimizer) -> Any:
    """ShapeDtypeStructs with shardings of the state (for restoring a checkpoint)."""
    shapes = jax.eval_shape(lambda p: {"params": p, "opt_state": optimizer.init(p),
                                       "step": jnp.zeros((), jnp.int32)}, params_abstract)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, shardings)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, shardings, *,
                    aux_loss_fn: LossFn | None = None, aux_coef: float = 0.0) -> Callable:
    """jit(step)(state, batch, extra, aux_batch=None) -> (new state, metrics).

    batch: a dict of [M, ...] arrays plus "weight" [M]; loss_fn sees one micro-batch (the [M] axis
    removed) and `extra` (e.g. frozen reference params) and returns (loss, metrics). A key
    extra["rng"] reaches loss_fn folded with the state's step and the micro-batch's index (e.g. for
    dropout), so each update and micro-batch draws its own. The step's
    loss and metrics are the weight-weighted sums over micro-batches; metrics also hold the
    gradient norm before clipping ("grad_norm") and the learning rate is left to the caller.

    With `aux_loss_fn`, the update descends L + aux_coef * L_aux, where L_aux is `aux_loss_fn`'s
    weighted sum over the micro-batches of `aux_batch` (packed like `batch`, with weights of its
    own; e.g. an SFT loss on demonstrations beside GRPO, InstructGPT's "PPO-ptx"). Its loss and
    metrics are reported with an "aux_" prefix; "loss" is the combined objective.
    """

    mesh = next(s.mesh for s in jax.tree_util.tree_leaves(shardings) if isinstance(s, NamedSharding))
    layout = shd.constrain_activations(mesh)

    if aux_loss_fn is None and aux_coef:
        raise ValueError("make_train_step: aux_coef is set but no aux_loss_fn is given")

    def step(state, batch, extra, aux_batch=None):
        if (aux_batch is None) != (aux_loss_fn is None):
            raise ValueError("make_train_step: an aux_batch goes with an aux_loss_fn, and one with the other")
        # hidden states keep the batch's data sharding (see models.llama.activation_layout)
        with llama.activation_layout(layout):
            return _step(state, batch, extra, aux_batch)

    def _accumulate(fn, params, batch, extra, rng):
        """The weighted sums over micro-batches of fn's gradient, loss and metrics."""
        param_sh = shardings["params"]

        def micro(acc, inputs):
            mb, index = inputs
            w = mb["weight"]
            ex = extra if rng is None else {**extra, "rng": jax.random.fold_in(rng, index)}

            def compute(_):
                (loss, metrics), g = jax.value_and_grad(fn, has_aux=True)(params, mb, ex)
                return loss, metrics, g

            shapes = jax.eval_shape(compute, None)

            def skip(_):
                return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

            loss, metrics, g = jax.lax.cond(w > 0, compute, skip, None)
            acc = jax.tree_util.tree_map(lambda a, b: a + w * b.astype(jnp.float32), acc, g)
            acc = jax.lax.with_sharding_constraint(acc, param_sh)
            metrics = {k: w * jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
            return acc, (w * loss, metrics)

        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, param_sh)
        n_micro = jax.tree_util.tree_leaves(batch)[0].shape[0]
        grads, (losses, metrics) = jax.lax.scan(micro, zeros, (batch, jnp.arange(n_micro)))
        return grads, jnp.sum(losses), {k: jnp.sum(v) for k, v in metrics.items()}

    def _step(state, batch, extra, aux_batch):
        params = state["params"]
        rng = extra.get("rng") if isinstance(extra, dict) else None
        if rng is not None:   # one key per update, folded with the micro-batch below
            rng = jax.random.fold_in(rng, state["step"])
        grads, loss, metrics = _accumulate(loss_fn, params, batch, extra, rng)
        if aux_batch is not None:
            aux_rng = None if rng is None else jax.random.fold_in(rng, 1 << 30)
            aux_grads, aux_loss, aux_metrics = _accumulate(aux_loss_fn, params, aux_batch, extra, aux_rng)
            grads = jax.tree_util.tree_map(lambda a, b: a + aux_coef * b, grads, aux_grads)
            grads = jax.lax.with_sharding_constraint(grads, shardings["params"])
            metrics.update({f"aux_{k}": v for k, v in aux_metrics.items()})
            metrics["aux_loss"] = aux_loss
            metrics["main_loss"] = loss
            loss = loss + aux_coef * aux_loss
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient leaves the state as it was (the step is skipped).
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = {"params": jax.tree_util.tree_map(keep, new_params, params),
                     "opt_state": jax.tree_util.tree_map(keep, opt_state, state["opt_state"]),
                     "step": state["step"] + 1}
        metrics["skipped_nonfinite"] = 1.0 - finite.astype(jnp.float32)
        return new_state, metrics

    # Inputs keep the shardings they were placed with (state: `shardings`; batch: the data axes).
    return jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, None))
