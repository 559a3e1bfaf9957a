"""Per-chip memory of a training run, estimated from the model's shape, the mesh and the batch sizes.

The estimate adds up the buffers a run keeps on every chip, leaf by leaf with the same logical-axis
rules as the run itself (`playpen_jax.sharding.DEFAULT_RULES`, `models.llama.param_axes`), so a
dimension that a mesh axis does not divide stays whole, as it does in the run. All numbers are bytes
per chip.

Held for the whole run ("persistent"):

- params: the trained weights in `param_dtype`.
- optimizer: AdamW's first and second moments, each the size of the params and, as optax keeps
  them by default, in the params' dtype (plus its int32 step count); "sgd" keeps nothing.
- reference: the frozen reference params (GRPO with a KL term, DPO), the size of the params.
- rollout_params: with several hosts, each process samples from its own copy of the params, laid
  out over its own chips only (`playpen_jax.distributed.local_mesh`); zero on one host.

Alive during a train step ("train_peak"):

- gradients: the float32 accumulator over micro-batches (`train/step.py`) plus one micro-batch's
  gradient in the params' dtype, both sharded like the params.
- activations: with per-layer remat, every layer's input (layers x rows x seq x hidden, in the
  compute dtype) plus one layer's working set twice over (its recomputed forward and the
  cotangents of the backward); without remat, every layer's forward tensors plus one backward.
  A layer's forward tensors are its normed inputs, q/k/v, the attention output, the MLP's gate, up
  and product (compute dtype) and the attention scores (float32) with their probabilities
  (compute dtype): attention is not fused, so the scores are rows x heads x seq x seq.
- lm_head: the chunked LM head's float32 logits for `lm_head_chunk` positions and their cotangent
  (rows x chunk x vocab x 4 bytes, twice).
- gathered_weights: FSDP all-gathers a layer's weights (and builds their full-size gradient) before
  using them; the larger of one decoder layer and the LM head, in the compute dtype, twice.

Alive while sampling ("rollout_peak"):

- kv_cache: the sampler's cache for `rollout_batch` prompts (rounded up to its batch bucket) of
  bucketed prompt length + bucketed new tokens, in the compute dtype, split over the sampling mesh.
- prefill: the prefill's attention scores (float32) and probabilities over prompt x cache length,
  its MLP intermediates, and one gathered layer (or the LM head) in the compute dtype.
- kept_cache: one earlier call's cache kept by the prefix cache (`rollout.prefix_cache`, on by
  default), counted as large as kv_cache. With two model players taking turns, the calls of both
  previous turns are kept; the one this call continues is freed once its rows are copied, before
  the prefill, the other stays. So rollout_peak = kv_cache + kept_cache + max(kept_cache, prefill).

total = persistent + max(train_peak, rollout_peak). Not counted: XLA's other temporaries, the
batch arrays (a few MB), compiled programs and fragmentation; leave about 10 % of HBM free.

Rows per chip: the rule table splits a batch's rows over the ("data", "fsdp") mesh axes, so a
micro-batch of R rows puts R / (data x fsdp) rows on a chip (the train step and the sampler
constrain the hidden states to that layout, see tpu/README.md). `rows_per_chip` overrides it, for
layouts of one's own.

    python -m tpu.memory --preset llama-3.1-8b --accelerator v5litepod-8 --fsdp 8 --micro-batch 8 \\
        --seq-len 1024 --rollout-batch 64 --prompt-len 896 --new-tokens 128
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from typing import Optional, Union

import jax
from jax.sharding import AbstractMesh

from models import llama
from models.config import PRESETS, LlamaConfig
from models.errors import ConfigError
from playpen_jax import sharding as shd

__all__ = ["Accelerator", "MemoryEstimateError", "accelerator", "estimate", "format_table", "main",
           "resolve_mesh", "verdict"]

GIB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "sgd": 0}
# The sampler's buckets (models/sampler.py, Sampler defaults).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)

PERSISTENT = ("params", "adapters", "optimizer", "reference", "rollout_params")
TRAIN = ("gradients", "activations", "lm_head", "gathered_weights", "dequantized")
ROLLOUT = ("kv_cache", "prefill", "kept_cache")


class MemoryEstimateError(ValueError):
    """A memory estimate was asked for with values that describe no run (the message names them)."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A Cloud TPU slice as the estimate needs it: chips (JAX devices), chips per host, HBM per chip."""

    name: str
    chips: int
    chips_per_host: int
    hbm_bytes: int

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host


# generation -> (TensorCores per chip in the type's number, chips per host, HBM GiB per chip)
_TPU_GENERATIONS = {
    "v4": (2, 4, 32),
    "v5litepod": (1, 8, 16),
    "v5p": (2, 4, 95),
}


def accelerator(name: str) -> Accelerator:
    """The slice behind an accelerator type such as "v5litepod-8", "v5p-64" or "v4-32".

    The number in a v4 or v5p type counts TensorCores (two per chip, one JAX device per chip); in a
    v5litepod type it counts chips. A slice smaller than a host's chip count has one host.
    """
    m = re.fullmatch(r"(v4|v5litepod|v5p)-(\d+)", name.strip())
    if not m:
        raise MemoryEstimateError(f"accelerator type {name!r}: expected v4-N, v5litepod-N or v5p-N")
    cores, per_host, hbm_gib = _TPU_GENERATIONS[m.group(1)]
    n = int(m.group(2))
    if n < cores or n % cores:
        raise MemoryEstimateError(f"accelerator type {name!r}: the number must be a multiple of {cores}")
    chips = n // cores
    per_host = min(per_host, chips)
    if chips % per_host:
        raise MemoryEstimateError(f"accelerator type {name!r}: {chips} chips do not fill hosts of {per_host}")
    return Accelerator(name=name, chips=chips, chips_per_host=per_host, hbm_bytes=hbm_gib * GIB)


def resolve_mesh(chips: int, *, data: Optional[int] = None, fsdp: int = 1, tensor: int = 1) -> dict:
    """Mesh axis sizes {"data", "fsdp", "tensor"} for `chips` devices, as `make_mesh` resolves them.

    One size may be -1 (all remaining chips); `data=None` means "the chips left over", like the
    configs' default `mesh.data=-1` (then neither fsdp nor tensor may be -1).
    """
    if not isinstance(chips, int) or chips < 1:
        raise MemoryEstimateError(f"chips must be a positive integer, got {chips!r}")
    sizes = {"data": -1 if data is None else data, "fsdp": fsdp, "tensor": tensor}
    for axis, v in sizes.items():
        if not isinstance(v, int) or (v < 1 and v != -1):
            raise MemoryEstimateError(f"mesh.{axis} must be a positive integer or -1, got {v!r}")
    if list(sizes.values()).count(-1) > 1:
        raise MemoryEstimateError(f"mesh {sizes}: at most one axis may be -1 (set data=1 with fsdp=-1)")
    if -1 in sizes.values():
        rest = math.prod(v for v in sizes.values() if v != -1)
        if chips % rest:
            raise MemoryEstimateError(f"mesh {sizes}: {chips} chips do not divide into the other axes "
                                      f"({rest})")
        sizes = {a: chips // rest if v == -1 else v for a, v in sizes.items()}
    if math.prod(sizes.values()) != chips:
        raise MemoryEstimateError(f"mesh {sizes} needs {math.prod(sizes.values())} chips, "
                                  f"but there are {chips}")
    return sizes


def _model_config(model: Union[str, LlamaConfig]) -> LlamaConfig:
    if isinstance(model, LlamaConfig):
        return model
    try:
        return PRESETS[model] if model in PRESETS else LlamaConfig.from_hf_file(model)
    except ConfigError as e:
        raise MemoryEstimateError(f"model {model!r}: not a preset ({', '.join(sorted(PRESETS))}) "
                                  f"nor an HF checkpoint directory ({e})") from None


def _leaf_elems(shape, axes, mesh: AbstractMesh) -> int:
    """Elements of one leaf that a chip holds under the rule table."""
    spec = shd.logical_to_spec(axes, shape, mesh)
    n = 1
    for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if part is None else (part if isinstance(part, tuple) else (part,))
        n *= dim // math.prod(mesh.shape[a] for a in names)
    return n


def _tree_elems(axes, shapes, mesh: AbstractMesh) -> int:
    """Elements a chip holds of every leaf of a tree of logical axes and the matching shapes."""
    is_leaf = lambda x: isinstance(x, tuple)  # noqa: E731
    pairs = zip(jax.tree_util.tree_leaves(axes, is_leaf=is_leaf),
                jax.tree_util.tree_leaves(shapes, is_leaf=is_leaf))
    return sum(_leaf_elems(shape, ax, mesh) for ax, shape in pairs)


def _params_elems(config: LlamaConfig, mesh: AbstractMesh) -> int:
    return _tree_elems(llama.param_axes(config), llama.param_shapes(config), mesh)


def _layer_elems(config: LlamaConfig, mesh: AbstractMesh) -> int:
    """Elements of one decoder layer's weights that a chip holds under the rule table."""
    axes = llama.param_axes(config)["layers"]
    shapes = llama.param_shapes(config)["layers"]
    return sum(_leaf_elems(shapes[k][1:], axes[k][1:], mesh) for k in shapes)


_PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def _base_bytes(config: LlamaConfig, mesh: AbstractMesh, pb: int, quantize: str, block: int) -> int:
    """Bytes of the (frozen or trained) params a chip holds; quantized projections: int8 with a
    float32 scale per channel, or 4 bits with a float16 scale and zero per `block` elements."""
    if quantize == "none":
        return _params_elems(config, mesh) * pb
    from models.quant import PROJECTION_AXES

    axes, shapes = llama.param_axes(config), llama.param_shapes(config)
    total = 0.0
    for name, shape in shapes["layers"].items():
        n = _leaf_elems(shape, axes["layers"][name], mesh)
        if name not in _PROJECTIONS:
            total += n * pb
            continue
        along = shape[PROJECTION_AXES[name]]
        total += n * (1 + 4 / along) if quantize == "int8" else n * (0.5 + 4 / block)
    for name in shapes:
        if name != "layers":
            total += _leaf_elems(shapes[name], axes[name], mesh) * pb
    return int(total)


def _lora_elems(config: LlamaConfig, spec, mesh: AbstractMesh) -> int:
    from models import lora

    return _tree_elems(lora.param_axes(config, spec), lora.param_shapes(config, spec), mesh)


def _split(n: int, by: int) -> int:
    """n / by where `by` divides n (the rule table shards it), else n (left whole)."""
    return n // by if by > 1 and n % by == 0 else n


def _round_up(n: int, buckets, step: int) -> int:
    for b in buckets:
        if n <= b:
            return b
    return -(-n // step) * step


def _mesh(sizes: dict) -> AbstractMesh:
    return AbstractMesh(tuple(sizes[a] for a in shd.MESH_AXES), shd.MESH_AXES)


def estimate(model: Union[str, LlamaConfig], *, chips: int, fsdp: int, tensor: int = 1,
             param_dtype: str = "bfloat16", optimizer: str = "adamw", micro_batch_rows: int,
             seq_len: int, reference: bool = True, remat: bool = True, dtype: Optional[str] = None,
             data: Optional[int] = None, lm_head_chunk: int = 256, rollout_batch: int = 0,
             prompt_len: int = 0, new_tokens: int = 0, chips_per_host: Optional[int] = None,
             rows_per_chip: Optional[int] = None, lora_rank: int = 0, lora_targets: str = "all",
             quantize: str = "none", block: int = 32, prefix_cache: bool = True) -> dict:
    """Bytes per chip of each buffer a run keeps (see the module docstring), and their total.

    model: a preset name ("llama-3.1-8b"), an HF checkpoint directory, or a LlamaConfig.
    chips, data, fsdp, tensor: the mesh (`resolve_mesh`). param_dtype: the stored weights' dtype;
    dtype: the compute dtype (default: param_dtype). micro_batch_rows: `batch.micro_batch`, the rows
    of one micro-batch over all chips; seq_len: `batch.max_seq_len`. rollout_batch, prompt_len,
    new_tokens: `rollout.batch_size` prompts per sampler call (per host on several hosts), the
    longest prompt and `rollout.max_new_tokens` (0 leaves out the sampler). chips_per_host: chips
    of one host (default: all chips on one host). lora_rank > 0: LoRA (`models/lora.py`) on
    `lora_targets`; "params" is then the frozen base (with `quantize` "int8" or "int4" in blocks of
    `block`: QLoRA, its projections quantized; split over the chips like the float weights in the
    train state, whole on every chip of a host's sampling copy), the optimizer, gradients and
    "adapters" count the adapters only, the base doubles as the reference (no extra copy), and
    "dequantized" is one layer's projections dequantized to the compute dtype. prefix_cache:
    `rollout.prefix_cache` (a kept cache of the previous turn while sampling).

    Returns a dict of ints: params, optimizer, reference, rollout_params (persistent); gradients,
    activations, lm_head, gathered_weights (train step); kv_cache, prefill (sampling); and
    persistent, train_peak, rollout_peak, total.
    """
    config = _model_config(model)
    dtype = dtype or param_dtype
    for name, value in (("param_dtype", param_dtype), ("dtype", dtype)):
        if value not in DTYPE_BYTES:
            raise MemoryEstimateError(f"{name} must be one of {sorted(DTYPE_BYTES)}, got {value!r}")
    if optimizer not in OPTIMIZER_MOMENTS:
        raise MemoryEstimateError(f"optimizer must be one of {sorted(OPTIMIZER_MOMENTS)}, got {optimizer!r}")
    for name, value, lo in (("micro_batch_rows", micro_batch_rows, 1), ("seq_len", seq_len, 2),
                            ("lm_head_chunk", lm_head_chunk, 0), ("rollout_batch", rollout_batch, 0),
                            ("prompt_len", prompt_len, 0), ("new_tokens", new_tokens, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise MemoryEstimateError(f"{name} must be an integer >= {lo}, got {value!r}")
    if rollout_batch and (prompt_len < 1 or new_tokens < 1):
        raise MemoryEstimateError("rollout_batch > 0 needs prompt_len >= 1 and new_tokens >= 1")
    sizes = resolve_mesh(chips, data=data, fsdp=fsdp, tensor=tensor)
    per_host = chips if chips_per_host is None else chips_per_host
    if not isinstance(per_host, int) or per_host < 1 or chips % per_host:
        raise MemoryEstimateError(f"chips_per_host={chips_per_host!r} must be a positive divisor of "
                                  f"chips={chips}")
    pb, cb = DTYPE_BYTES[param_dtype], DTYPE_BYTES[dtype]
    c = config
    L, D, F, H, K, Dh, V = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads,
                            c.num_kv_heads, c.head_dim, c.vocab_size)
    t = sizes["tensor"]
    th, tk, tf, tv = _split(H, t), _split(K, t), _split(F, t), _split(V, t)  # per-chip sizes

    if not isinstance(lora_rank, int) or lora_rank < 0:
        raise MemoryEstimateError(f"lora_rank must be an integer >= 0, got {lora_rank!r}")
    if quantize not in ("none", "int8", "int4") or (quantize != "none" and not lora_rank):
        raise MemoryEstimateError(f"quantize={quantize!r}: 'none', or 'int8' / 'int4' with lora_rank > 0")
    spec = None
    if lora_rank:
        from models import lora

        try:
            spec = lora.LoraSpec.parse(lora_rank, 1.0, lora_targets)
        except ValueError as e:
            raise MemoryEstimateError(str(e)) from None

    # --- persistent
    mesh = _mesh(sizes)
    elems = _params_elems(config, mesh)
    params = _base_bytes(config, mesh, pb, quantize, block)
    trained = elems
    adapters = 0
    if spec is not None:
        trained = _lora_elems(config, spec, mesh)
        adapters = trained * pb
        reference = False   # the frozen base is the reference
    moments = OPTIMIZER_MOMENTS[optimizer]
    optimizer_bytes = moments * trained * pb + (4 if moments else 0)
    reference_bytes = params if reference else 0
    rollout_params = 0
    hosts = chips // per_host
    if hosts > 1:
        local_t = t if per_host % t == 0 else 1
        rollout_sizes = {"data": 1, "fsdp": per_host // local_t, "tensor": local_t}
        local = _mesh(rollout_sizes)
        whole = _mesh({"data": 1, "fsdp": 1, "tensor": 1})
        rollout_params = (_base_bytes(config, whole if quantize != "none" else local, pb, quantize, block)
                          + (_lora_elems(config, spec, local) * pb if spec is not None else 0))
    else:
        rollout_sizes = sizes

    # --- train step
    gradients = trained * 4 + trained * pb
    batch_shards = sizes["data"] * sizes["fsdp"]
    rows = -(-micro_batch_rows // batch_shards) if rows_per_chip is None else rows_per_chip
    if not isinstance(rows, int) or rows < 1:
        raise MemoryEstimateError(f"rows_per_chip must be a positive integer, got {rows_per_chip!r}")
    T = seq_len
    layer_fwd = rows * T * (3 * D + (2 * th + 2 * tk) * Dh + 3 * tf) * cb
    layer_attn = rows * th * T * T * (4 + cb)
    one_layer = layer_fwd + layer_attn
    if remat:
        activations = L * rows * T * D * cb + 2 * one_layer
    else:
        activations = (L + 1) * one_layer
    positions = T - 1  # hidden states at t - 1 predict token t
    chunk = positions if lm_head_chunk <= 0 or positions <= lm_head_chunk else lm_head_chunk
    lm_head = 2 * rows * chunk * tv * 4
    layer_weights = _layer_elems(config, _mesh({"data": 1, "fsdp": 1, "tensor": t}))
    head_weights = tv * D
    gathered = max(layer_weights, head_weights) * cb
    gathered_weights = 2 * gathered
    dequantized = (layer_weights - 2 * D) * cb if quantize != "none" else 0   # norms stay as they are
    if spec is not None:   # each target's x A ([rows, T, rank]) per layer is kept for the backward
        activations += L * rows * T * lora_rank * len(spec.targets) * cb

    # --- sampling
    kv_cache = prefill = kept_cache = 0
    if rollout_batch:
        mult = rollout_sizes["data"] * rollout_sizes["fsdp"]
        b = _round_up(rollout_batch, [x for x in BATCH_BUCKETS if x % mult == 0], mult)
        srows = b // mult
        plen = _round_up(prompt_len, LENGTH_BUCKETS, LENGTH_BUCKETS[-1])
        S = plen + _round_up(new_tokens, LENGTH_BUCKETS, LENGTH_BUCKETS[-1])
        st = rollout_sizes["tensor"]
        kv_cache = 2 * L * srows * _split(K, st) * S * Dh * cb + 2 * srows * S * 4
        prefill = (srows * _split(H, st) * plen * S * (4 + cb) + 3 * srows * plen * _split(F, st) * cb
                   + gathered)
        kept_cache = kv_cache if prefix_cache else 0

    out = {"params": params, "adapters": adapters, "optimizer": optimizer_bytes,
           "reference": reference_bytes, "rollout_params": rollout_params, "gradients": gradients,
           "activations": activations, "lm_head": lm_head, "gathered_weights": gathered_weights,
           "dequantized": dequantized, "kv_cache": kv_cache, "prefill": prefill,
           "kept_cache": kept_cache}
    out["persistent"] = sum(out[k] for k in PERSISTENT)
    out["train_peak"] = sum(out[k] for k in TRAIN)
    out["rollout_peak"] = kv_cache + kept_cache + max(kept_cache, prefill)   # see the module docstring
    out["total"] = out["persistent"] + max(out["train_peak"], out["rollout_peak"])
    return {k: int(v) for k, v in out.items()}


# --- the table -------------------------------------------------------------------------------------

_LABELS = {
    "params": "params", "adapters": "LoRA adapters", "dequantized": "dequantized layer",
    "optimizer": "optimizer state", "reference": "reference params",
    "rollout_params": "per-host sampling copy", "gradients": "gradients (f32 acc + 1 micro)",
    "activations": "activations (remat)", "lm_head": "LM head chunk", "gathered_weights":
    "gathered weights", "kv_cache": "KV cache", "prefill": "prefill working set",
    "kept_cache": "previous turn's cache (prefix cache)",
    "persistent": "persistent", "train_peak": "train step peak", "rollout_peak": "sampling peak",
    "total": "total",
}


def verdict(total: int, hbm_bytes: int, headroom: float = 0.1) -> str:
    """"fits", "tight" (above 1 - headroom of HBM) or "does not fit", with the share of HBM."""
    share = total / hbm_bytes
    word = "fits" if share <= 1 - headroom else "tight" if share <= 1 else "does not fit"
    return f"{word} ({100 * share:.0f}% of {hbm_bytes / GIB:.0f} GiB)"


def format_table(est: dict, *, hbm_bytes: Optional[int] = None, markdown: bool = False,
                 headroom: float = 0.1) -> str:
    """The estimate as a table in GiB per chip (plain text or Markdown)."""
    rows = []
    for group, keys in (("persistent", PERSISTENT), ("train step", TRAIN), ("sampling", ROLLOUT)):
        for k in keys:
            rows.append((group, _LABELS[k], est[k]))
    rows += [("", _LABELS[k], est[k]) for k in ("persistent", "train_peak", "rollout_peak", "total")]
    lines = []
    if markdown:
        lines += ["| phase | buffer | GiB per chip |", "|---|---|---:|"]
        lines += [f"| {g} | {label} | {v / GIB:.2f} |" for g, label, v in rows]
    else:
        lines += [f"{g:<12}{label:<32}{v / GIB:>9.2f} GiB" for g, label, v in rows]
    if hbm_bytes:
        lines.append(("\n" if markdown else "") + "verdict: " + verdict(est["total"], hbm_bytes, headroom))
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpu.memory",
                                description="Per-chip memory estimate of a training run (bytes from the "
                                "model shape, the mesh and the batch sizes).")
    p.add_argument("--preset", default="llama-3.1-8b",
                   help=f"model shape: one of {', '.join(sorted(PRESETS))}, or an HF checkpoint directory "
                   "(default: %(default)s)")
    p.add_argument("--accelerator", default=None,
                   help="TPU type (v5litepod-8, v5p-64, v4-32): sets --chips, --chips-per-host and --hbm-gib")
    p.add_argument("--chips", type=int, default=None, help="devices (chips) in the mesh")
    p.add_argument("--chips-per-host", type=int, default=None, help="chips per host (default: all)")
    p.add_argument("--hbm-gib", type=float, default=None, help="HBM per chip in GiB, for the verdict")
    p.add_argument("--data", type=int, default=None, help="mesh.data (default: the chips left over)")
    p.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp, -1 = all chips (default: 1)")
    p.add_argument("--tensor", type=int, default=1, help="mesh.tensor (default: 1)")
    p.add_argument("--param-dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_BYTES), help="compute dtype "
                   "(default: --param-dtype)")
    p.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZER_MOMENTS))
    p.add_argument("--micro-batch", type=int, default=8, help="batch.micro_batch (default: 8)")
    p.add_argument("--seq-len", type=int, default=1024, help="batch.max_seq_len (default: 1024)")
    p.add_argument("--rows-per-chip", type=int, default=None,
                   help="activation rows per chip (default: micro-batch / (data x fsdp))")
    p.add_argument("--no-reference", action="store_true", help="no frozen reference (grpo.beta=0)")
    p.add_argument("--no-remat", action="store_true", help="keep every layer's activations")
    p.add_argument("--lm-head-chunk", type=int, default=256)
    p.add_argument("--rollout-batch", type=int, default=64, help="rollout.batch_size (0: no sampler)")
    p.add_argument("--prompt-len", type=int, default=896, help="longest prompt in tokens (default: 896)")
    p.add_argument("--new-tokens", type=int, default=128, help="rollout.max_new_tokens (default: 128)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="rollout.prefix_cache=false: no kept cache of the previous turn")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--lora-targets", default="all", help="LoRA targets (default: all)")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int4"), help="QLoRA base")
    p.add_argument("--block", type=int, default=32, help="int4 block length (default: 32)")
    p.add_argument("--headroom", type=float, default=0.1, help="HBM share to leave free (default: 0.1)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    a = p.parse_args(argv)
    try:
        acc = accelerator(a.accelerator) if a.accelerator else None
        chips = a.chips if a.chips is not None else (acc.chips if acc else None)
        if chips is None:
            raise MemoryEstimateError("give --chips or --accelerator")
        per_host = a.chips_per_host if a.chips_per_host is not None else (acc.chips_per_host if acc else None)
        hbm = int(a.hbm_gib * GIB) if a.hbm_gib else (acc.hbm_bytes if acc else None)
        est = estimate(a.preset, chips=chips, data=a.data, fsdp=a.fsdp, tensor=a.tensor,
                       param_dtype=a.param_dtype, dtype=a.dtype, optimizer=a.optimizer,
                       micro_batch_rows=a.micro_batch, seq_len=a.seq_len, reference=not a.no_reference,
                       remat=not a.no_remat, lm_head_chunk=a.lm_head_chunk, rollout_batch=a.rollout_batch,
                       prompt_len=a.prompt_len, new_tokens=a.new_tokens, chips_per_host=per_host,
                       rows_per_chip=a.rows_per_chip, lora_rank=a.lora_rank, lora_targets=a.lora_targets,
                       quantize=a.quantize, block=a.block, prefix_cache=not a.no_prefix_cache)
        sizes = resolve_mesh(chips, data=a.data, fsdp=a.fsdp, tensor=a.tensor)
    except MemoryEstimateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    hosts = chips // (per_host or chips)
    print(f"{a.preset} on {chips} chips ({hosts} host{'s' if hosts > 1 else ''}), mesh data={sizes['data']} "
          f"fsdp={sizes['fsdp']} tensor={sizes['tensor']}, params {a.param_dtype}, compute "
          f"{a.dtype or a.param_dtype}, micro-batch {a.micro_batch} x {a.seq_len} tokens, "
          f"sampler {a.rollout_batch} x ({a.prompt_len} + {a.new_tokens})")
    print(format_table(est, hbm_bytes=hbm, markdown=a.markdown, headroom=a.headroom))
    return 0


if __name__ == "__main__":
    sys.exit(main())
