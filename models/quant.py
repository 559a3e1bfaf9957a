"""Quantized weights for QLoRA: the base model's projections stay int8 or packed int4 in memory and are
dequantized inside the forward, right before their matmul.

Two formats, both along one axis of the weight (the contraction axis of its matmul):

- "int8": symmetric per channel. For every index of the other axes, scale = max|w| / 127 over the
  axis (float32, kept as a size-1 axis) and q = round(w / scale) in int8; w ~ q * scale.
  Per element |w - w~| <= scale / 2.
- "int4": blockwise asymmetric, the arithmetic of GGUF's Q4_1. Blocks of `block` consecutive elements
  along the axis each get a minimum m and a step d = (max - m) / 15, both stored as float16, and
  q = clip(round((w - m) / d), 0, 15); w ~ q * d + m. Unlike GGUF, q is computed from the stored
  float16 values and d is rounded up to the next float16, so that per element
  |w - w~| <= d / 2 + |min - m| (the second term: float16 rounding of the block minimum). Two values
  are packed per uint8 along the axis: element 2i in the low nibble, 2i+1 in the high nibble.

Slicing. The layer weights of `models.llama` are stacked over a leading layer axis, and `lax.scan`
or `jax.tree_util.tree_map(lambda a: a[i], w)` removes that axis from every array field. So that a
slice stays valid, `axis` is stored counted from the end (negative), and the static `shape` keeps the
shape given to `quantize`: the shape of a slice is its trailing `q.ndim` entries. Only axes before
`axis` may be sliced away.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from models.errors import ModelError

KINDS = ("int8", "int4")
# Contraction axis of each projection, counted from the end (valid with or without the layer axis).
# wo [.., H, Dh, D] contracts over (H, Dh); its blocks and channels run along Dh.
PROJECTION_AXES = {"wq": -3, "wk": -3, "wv": -3, "wo": -2, "w_gate": -2, "w_up": -2, "w_down": -2}


class QuantError(ModelError):
    """A weight cannot be quantized as asked (kind, axis, block size or dtype)."""


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight (see the module docstring for the formats).

    q: int8 values ("int8", the original shape) or packed uint8 nibbles ("int4", `axis` halved).
    scale: float32 per channel, size 1 along `axis` ("int8"); float16 per block ("int4").
    zero: float16 block minimum ("int4"); None for "int8".
    kind, axis (negative: counted from the end), shape (as given to `quantize`), dtype (name of the
    original dtype) and block (elements per scale along `axis`; the whole axis for "int8") are static.
    """

    q: jax.Array
    scale: jax.Array
    zero: Optional[jax.Array]
    kind: str
    axis: int
    shape: tuple
    dtype: str
    block: int

    @property
    def current_shape(self) -> tuple:
        """The shape this (possibly sliced) weight dequantizes to."""
        return tuple(self.shape[len(self.shape) - self.q.ndim:])


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["q", "scale", "zero"],
                                 meta_fields=["kind", "axis", "shape", "dtype", "block"])


def is_quantized(x: Any) -> bool:
    """Whether x is a `QuantizedWeight` (for `is_leaf` in tree maps)."""
    return isinstance(x, QuantizedWeight)


def _f16_round_up(x: jax.Array) -> jax.Array:
    """The smallest float16 >= x (x >= 0 float32)."""
    h = x.astype(jnp.float16)
    return jnp.where(h.astype(jnp.float32) < x, jnp.nextafter(h, jnp.float16(jnp.inf)), h)


def quantize(w, kind: str, axis: int, *, block: int = 32) -> QuantizedWeight:
    """Quantizes a floating-point array w along `axis` (either sign) as "int8" (one scale per channel;
    `block` unused) or "int4" (blocks of `block` elements: an even number dividing the axis length)."""
    if is_quantized(w):
        raise QuantError("quantize: the weight is already quantized")
    w = jnp.asarray(w)
    shape, nd = tuple(w.shape), w.ndim
    if kind not in KINDS:
        raise QuantError(f"quantize: kind must be one of {KINDS}, got {kind!r}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise QuantError(f"quantize: expected a floating-point weight, got dtype {w.dtype}")
    if not isinstance(axis, (int, np.integer)) or not -nd <= axis < nd:
        raise QuantError(f"quantize: axis {axis!r} is out of range for shape {shape}")
    axis = int(axis) - nd if axis >= 0 else int(axis)
    if kind == "int8":
        q, scale = _int8(w, axis)
        return QuantizedWeight(q, scale, None, kind, axis, shape, w.dtype.name, shape[axis])
    if not isinstance(block, (int, np.integer)) or block <= 0 or block % 2 or shape[axis] % block:
        raise QuantError(f"quantize: int4 needs an even block dividing the axis length; got shape {shape}, "
                         f"axis {axis}, block {block!r}")
    q, d, m = _int4(w, axis, int(block))
    return QuantizedWeight(q, d, m, kind, axis, shape, w.dtype.name, int(block))


@functools.partial(jax.jit, static_argnums=(1,))
def _int8(w, axis):
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=axis, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8), scale


@functools.partial(jax.jit, static_argnums=(1, 2))
def _int4(w, axis, block):
    shape = w.shape
    p, n = w.ndim + axis, shape[axis]
    blocks = w.astype(jnp.float32).reshape(shape[:p] + (n // block, block) + shape[p + 1:])  # elements at p+1
    lo, hi = jnp.min(blocks, axis=p + 1), jnp.max(blocks, axis=p + 1)
    m = lo.astype(jnp.float16)
    d = _f16_round_up((hi - lo) / 15.0)
    d32, m32 = jnp.expand_dims(d.astype(jnp.float32), p + 1), jnp.expand_dims(m.astype(jnp.float32), p + 1)
    x = jnp.where(d32 > 0, (blocks - m32) / jnp.where(d32 > 0, d32, 1.0), 0.0)
    q = jnp.clip(jnp.round(x), 0, 15).astype(jnp.uint8)
    pairs = q.reshape(shape[:p] + (n // 2, 2) + shape[p + 1:])
    low, high = (jax.lax.index_in_dim(pairs, i, p + 1, keepdims=False) for i in (0, 1))
    return low | (high << 4), d, m


def dequantize(qw: QuantizedWeight, dtype=None) -> jax.Array:
    """The weight back in its (current) shape, as `dtype` (default: the original dtype). Computed in
    float32 with elementwise ops only, so XLA can fuse it into the consuming matmul."""
    dtype = jnp.dtype(dtype or qw.dtype)
    shape = qw.current_shape
    p = len(shape) + qw.axis
    if qw.kind == "int8":
        return (qw.q.astype(jnp.float32) * qw.scale).astype(dtype)
    n = shape[p]
    nibbles = jnp.stack([qw.q & 0xF, qw.q >> 4], axis=p + 1)                 # [.., n/2, 2, ..]
    blocks = nibbles.reshape(shape[:p] + (n // qw.block, qw.block) + shape[p + 1:]).astype(jnp.float32)
    d = jnp.expand_dims(qw.scale.astype(jnp.float32), p + 1)
    m = jnp.expand_dims(qw.zero.astype(jnp.float32), p + 1)
    return (blocks * d + m).reshape(shape).astype(dtype)


def _map_layers(params: dict, fn) -> dict:
    """params with fn(name, leaf) applied to the projections of the stacked or per-layer `layers`."""
    def one(layer: dict) -> dict:
        return {k: fn(k, v) if k in PROJECTION_AXES else v for k, v in layer.items()}

    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return {**params, "layers": type(layers)(one(lp) for lp in layers)}
    return {**params, "layers": one(layers)}


def quantize_params(params: dict, kind: str, *, block: int = 32) -> dict:
    """A `models.llama` params tree (stacked or per-layer `layers`) with the seven projection weights
    quantized along their contraction axes (`PROJECTION_AXES`); embedding, norms and head unchanged."""
    def fn(name, w):
        try:
            return quantize(w, kind, PROJECTION_AXES[name], block=block)
        except QuantError as e:
            raise QuantError(f"layers/{name}: {e}") from None

    return _map_layers(params, fn)


def dequantize_params(params, dtype=None):
    """Every `QuantizedWeight` in the tree replaced by its dequantized array; other leaves unchanged."""
    return jax.tree_util.tree_map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, params,
                                  is_leaf=is_quantized)


def nbytes(tree) -> int:
    """Bytes held by all arrays of a tree (a `QuantizedWeight` by its q, scale and zero arrays)."""
    return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "nbytes")))
