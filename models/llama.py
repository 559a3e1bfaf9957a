"""The Llama-family decoder as pure functions over a params pytree.

params = {
  "embed":      [V, D]
  "layers": {   stacked over layers so that the forward is one `lax.scan`
    "attn_norm": [L, D], "wq": [L, D, H, Dh], "wk": [L, D, K, Dh], "wv": [L, D, K, Dh],
    "wo": [L, H, Dh, D], "mlp_norm": [L, D], "w_gate": [L, D, F], "w_up": [L, D, F],
    "w_down": [L, F, D]},
  "final_norm": [D],
  "lm_head":    [D, V]   (absent when the embedding is tied)
}
A projection weight may also be held quantized (`models.quant.QuantizedWeight`, dequantized right
before its matmul), and `layers` may carry a "lora" entry of adapters (`models.lora.attach`).
`param_axes(config)` gives the same tree with a tuple of logical axis names per leaf; the mesh rules in
`playpen_jax.sharding` turn those into PartitionSpecs. Nothing here decides a sharding: the hidden
states [B, T, D] between blocks are named ("batch", "seq", None) and passed through the function that
`activation_layout` installs while a computation is traced (`playpen_jax.sharding.constrain_activations`
gives a sharding constraint), and left alone without one.

Attention masking is by segment ids and positions: token i attends to key j iff both carry the same
non-zero segment id and pos[j] <= pos[i]; without a cache also j <= i (positions increase along each
segment in every layout used here, so this only makes the causal order explicit). Segment 0 marks
padding, so left or right padding and packed sequences all work, with or without a KV cache.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from models.config import LlamaConfig
from models.lora import mixed_einsum, project
from models.quant import PROJECTION_AXES

Params = dict
KVCache = dict

ATTENTION_BLOCK = 256   # `forward`'s default query block on CPU
_NEG_INF = -1e30  # finite, so that fully masked (padding) rows give a uniform softmax, not NaN


def param_axes(config: LlamaConfig) -> Params:
    """Logical axis names of every param leaf (same tree structure as `init`)."""
    axes = {
        "embed": ("vocab", "embed"),
        "layers": {
            "attn_norm": ("layers", "norm"),
            "wq": ("layers", "embed", "heads", "head_dim"),
            "wk": ("layers", "embed", "kv_heads", "head_dim"),
            "wv": ("layers", "embed", "kv_heads", "head_dim"),
            "wo": ("layers", "heads", "head_dim", "embed"),
            "mlp_norm": ("layers", "norm"),
            "w_gate": ("layers", "embed", "mlp"),
            "w_up": ("layers", "embed", "mlp"),
            "w_down": ("layers", "mlp", "embed"),
        },
        "final_norm": ("norm",),
    }
    if not config.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(config: LlamaConfig) -> Params:
    """Shape of every param leaf (same tree structure as `init`)."""
    c = config
    L, D, F, H, K, Dh, V = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads,
                            c.num_kv_heads, c.head_dim, c.vocab_size)
    shapes = {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D), "wq": (L, D, H, Dh), "wk": (L, D, K, Dh), "wv": (L, D, K, Dh),
            "wo": (L, H, Dh, D), "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F),
            "w_down": (L, F, D),
        },
        "final_norm": (D,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init(config: LlamaConfig, rng: jax.Array, init_std: float = 0.02) -> Params:
    """Random params: normal(0, init_std) weights and unit norm scales, in `config.param_dtype`."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    keys = jax.random.split(rng, len(leaves))
    out = []
    for key, path, shape in zip(keys, paths, leaves):
        if "norm" in path:
            out.append(jnp.ones(shape, config.jnp_param_dtype))
        else:
            out.append((init_std * jax.random.normal(key, shape, jnp.float32)).astype(
                config.jnp_param_dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def unstack_layers(params: Params) -> Params:
    """The same params with `layers` as a list of per-layer dicts.

    `forward` then runs the layers as a Python loop over separate arrays. Slower to compile, but
    on CPU it avoids copying each layer's weights out of the stacked arrays at every decode step.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree_util.tree_map(lambda a, i=i: a[i], layers)
                                 for i in range(n)]}


def fuse_projections(params: Params) -> Params:
    """Per-layer params (`unstack_layers`) in a decode layout: wq, wk, wv as one [D, (H + 2K) * Dh]
    weight "wqkv" and w_gate, w_up as one [D, 2F] weight "w_gate_up": two matmuls where there were
    five, for decoding, where every op's fixed cost counts. The weights stay input-major, [in, out],
    the layout XLA:CPU's dot kernels take: given [out, in] weights it transposes them once per
    call of the decode loop (hoisted out of the loop), which costs about 0.1-0.3 s a call for
    SmolLM2-135M. Layers with adapters or a quantized projection are left as they are."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        raise ValueError("fuse_projections takes per-layer params (see unstack_layers)")

    def fuse(lp: dict) -> dict:
        if "lora" in lp or not all(isinstance(lp[n], jax.Array) for n in PROJECTION_AXES):
            return lp
        d = lp["wq"].shape[0]
        fused = ("wq", "wk", "wv", "w_gate", "w_up")
        out = {k: v for k, v in lp.items() if k not in fused}
        out["wqkv"] = jnp.concatenate([lp[n].reshape(d, -1) for n in ("wq", "wk", "wv")], axis=-1)
        out["w_gate_up"] = jnp.concatenate([lp["w_gate"], lp["w_up"]], axis=-1)
        return out

    return {**params, "layers": [fuse(lp) for lp in layers]}


def matmul_weights(params: Params, config: LlamaConfig) -> Params:
    """params with the weights that only enter matmuls (projections; the LM head, or the embedding
    when tied) cast to `config.matmul_dtype` where that is narrower: a copy to decode from, so each
    step reads the narrow weights instead of casting the wide ones. Unchanged otherwise."""
    if not config.mixed_matmuls:
        return params
    mm = config.jnp_matmul_dtype

    def cast(x):
        if isinstance(x, jax.Array) and jnp.dtype(x.dtype).itemsize > jnp.dtype(mm).itemsize:
            return x.astype(mm)
        return x

    narrow = set(PROJECTION_AXES) | {"wqkv", "w_gate_up"}

    def layer(lp: dict) -> dict:
        return {k: cast(v) if k in narrow else v for k, v in lp.items()}

    out = dict(params)
    layers = params["layers"]
    out["layers"] = ([layer(lp) for lp in layers] if isinstance(layers, (list, tuple))
                     else layer(layers))
    if config.tie_word_embeddings:   # a separate narrow [V, D] head; the lookup keeps the wide table
        out["lm_head_t"] = params["embed"].astype(mm)
    else:
        out["lm_head"] = cast(params["lm_head"])
    return out


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None,
               per_layer: bool = False) -> KVCache:
    """An empty KV cache for `batch` rows of up to `max_len` tokens. per_layer: k and v as tuples
    of per-layer arrays (for unstacked params) instead of arrays stacked over layers.

    Layouts: v [L, B, K, S, Dh], k [L, B, K, Dh, S] (slots last). Heads come before slots, so
    attention's dots batch over the leading (B, K) axes, and with the keys' slots last both dots
    are plain [G, Dh] x [Dh, S] and [G, S] x [S, Dh] matmuls: XLA:CPU ran the transposed-operand
    form of the score dot about 1.3x slower at decode."""
    dtype = dtype or config.jnp_dtype
    v_shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    k_shape = (config.num_layers, batch, config.num_kv_heads, config.head_dim, max_len)
    if per_layer:
        k = tuple(jnp.zeros(k_shape[1:], dtype) for _ in range(config.num_layers))
        v = tuple(jnp.zeros(v_shape[1:], dtype) for _ in range(config.num_layers))
    else:
        k, v = jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype)
    return {
        "k": k,
        "v": v,
        "positions": jnp.zeros((batch, max_len), jnp.int32),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),  # 0 = empty slot
        "index": jnp.zeros((), jnp.int32),  # next slot to write
    }


def cache_axes() -> KVCache:
    """Logical axis names of the (stacked) KV cache leaves."""
    return {"k": ("layers", "batch", "kv_heads", "head_dim", "cache_seq"),
            "v": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
            "positions": ("batch", "cache_seq"), "segment_ids": ("batch", "cache_seq"), "index": ()}


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2], with Llama 3.x scaling applied when configured."""
    dh = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    s = config.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates halves (HF layout). x: [B, T, N, Dh]; cos, sin: [B, T, Dh/2] f32."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if jax.default_backend() == "cpu":
        # As a dot with a ones vector: XLA:CPU runs small row reductions far slower than the
        # equivalent matrix-vector product.
        ones = jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], jnp.float32)
        mean_sq = jnp.matmul(x32 * x32, ones, precision=jax.lax.Precision.HIGHEST)
    else:
        mean_sq = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed = x32 * jax.lax.rsqrt(mean_sq + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


# A prefill into a KV cache whose attention scores ([B, H, T, S] in float32) would take more than
# this many bytes takes its queries in blocks (at most _MAX_QUERY_BLOCKS), each against every slot,
# so that one block's scores are live at a time. SmolLM2-135M prefilling four 2560-token prompts
# (0.9 GB of scores per layer) peaked at 5.2 GB resident on CPU whole, 3.7 GB in blocks.
SCORES_BYTES = 1 << 28
_MAX_QUERY_BLOCKS = 16


def _attention(q, k, v, mask, causal_block: int = 0, slots_last: bool = False, split: bool = True):
    """q: [B, T, H, Dh]; k: [B, K, S, Dh], or [B, K, Dh, S] with slots_last (the cache's layout);
    v: [B, K, S, Dh]; mask: [B, T, S] bool -> [B, T, H, Dh].

    causal_block > 0 (no cache, S == T, and the mask false above the diagonal): queries are taken
    `causal_block` at a time, each block against the keys up to its own end only, which skips the
    masked upper blocks' work (about 3/8 of it at 4 blocks). With slots_last, queries whose scores
    would exceed `SCORES_BYTES` are taken in blocks against every slot."""
    t, s = q.shape[1], v.shape[2]
    per_query = q.shape[0] * q.shape[2] * s * 4
    if split and slots_last and t > 1 and t * per_query > SCORES_BYTES:
        block = max(SCORES_BYTES // per_query, -(-t // _MAX_QUERY_BLOCKS), 1)
        if block < t:
            return jnp.concatenate(
                [_attention(q[:, lo:lo + block], k, v, mask[:, lo:lo + block], slots_last=True,
                            split=False) for lo in range(0, t, block)], axis=1)
    if causal_block and not slots_last and s == t and t >= 2 * causal_block:
        return jnp.concatenate(
            [_attention(q[:, lo:lo + causal_block], k[:, :, :lo + causal_block], v[:, :, :lo + causal_block],
                        mask[:, lo:lo + causal_block, :lo + causal_block])
             for lo in range(0, t, causal_block)], axis=1)
    b, t, h, dh = q.shape
    kv_heads = k.shape[1]
    score_dims = "bkds" if slots_last else "bksd"
    if t == 1:  # decode: without the unit T axis the dots map onto plain batched matmuls
        q = q.reshape(b, kv_heads, h // kv_heads, dh)
        scores = jnp.einsum(f"bkgd,{score_dims}->bkgs", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, 0][:, None, None, :], scores / math.sqrt(dh), _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(b, 1, h, dh)
    # The query heads of one KV head and the positions as one axis [B, K, G*T, Dh]: both dots are
    # then plain batched matmuls over (B, K) with no transposed output, which XLA:CPU runs 2-4x
    # faster than the same contractions with T between the head axes; the two small transposes
    # are of q and of the output only.
    g = h // kv_heads
    q = q.reshape(b, t, kv_heads, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, dh)
    scores = jnp.einsum(f"bkqd,{score_dims}->bkqs", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv_heads, g, t, -1) / math.sqrt(dh)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, g * t, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kv_heads, g, t, dh)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


HIDDEN_AXES = ("batch", "seq", None)   # logical axes of the hidden states between blocks
LOOKUP_AXES = ("vocab", None)          # the embedding table as the token lookup reads it (whole rows)
_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("activation_layout", default=None)


@contextlib.contextmanager
def activation_layout(fn: Optional[Callable]) -> Iterator[None]:
    """While active, forwards traced here pass their hidden states through fn(x, axes) (axes:
    `HIDDEN_AXES`), e.g. a sharding constraint that keeps the batch split over the data axes even
    where the weights are split over the same devices (FSDP). The token lookup reads the embedding
    table laid out by fn(table, `LOOKUP_AXES`): whole rows, gathered like every FSDP weight before
    its use. None: no constraint."""
    token = _LAYOUT.set(fn)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def _laid_out(x, axes=HIDDEN_AXES):
    fn = _LAYOUT.get()
    return x if fn is None else fn(x, axes)


def _layer(config: LlamaConfig, x, lp, cos, sin, mask, cache, index, causal_block: int = 0):
    """One decoder block. x: [B, T, D]. cache: None; (k, v, layer) with k, v the whole stacked
    [L, B, K, S, Dh] cache, updated in place at this layer's slots index..index+T-1; or
    (k, v, None) with this layer's own [B, K, S, Dh] arrays."""
    dt = config.jnp_dtype
    mm = config.jnp_matmul_dtype if config.mixed_matmuls else None
    lo = lp.get("lora")
    h = _rms_norm(x, lp["attn_norm"], config.rms_norm_eps)
    if "wqkv" in lp:   # fused (see `fuse_projections`)
        nq, nk, dh = config.num_heads, config.num_kv_heads, config.head_dim
        qkv = project("btd,de->bte", h, lp["wqkv"], None, "wqkv", dt, mm)
        b_, t_ = qkv.shape[:2]
        q = qkv[..., :nq * dh].reshape(b_, t_, nq, dh)
        k = qkv[..., nq * dh:(nq + nk) * dh].reshape(b_, t_, nk, dh)
        v = qkv[..., (nq + nk) * dh:].reshape(b_, t_, nk, dh)
    else:
        q = project("btd,dhk->bthk", h, lp["wq"], lo, "wq", dt, mm)
        k = project("btd,dhk->bthk", h, lp["wk"], lo, "wk", dt, mm)
        v = project("btd,dhk->bthk", h, lp["wv"], lo, "wv", dt, mm)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    v = v.transpose(0, 2, 1, 3)   # [B, K, T, Dh]
    if cache is None:
        k = k.transpose(0, 2, 1, 3)
    else:
        k = k.transpose(0, 2, 3, 1)   # [B, K, Dh, T]: the cache's keys have their slots last
    if cache is not None and cache[2] is None:  # this layer's own arrays
        k_c, v_c, _ = cache
        k_c = jax.lax.dynamic_update_slice(k_c, k.astype(k_c.dtype), (0, 0, 0, index))
        v_c = jax.lax.dynamic_update_slice(v_c, v.astype(v_c.dtype), (0, 0, index, 0))
        k, v = k_c.astype(dt), v_c.astype(dt)
        cache = (k_c, v_c)
    elif cache is not None:
        k_all, v_all, layer = cache
        k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), (layer, 0, 0, 0, index))
        v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), (layer, 0, 0, index, 0))
        k, v = k_all[layer].astype(dt), v_all[layer].astype(dt)
        cache = (k_all, v_all)
    attn = _attention(q, k, v, mask, causal_block, slots_last=cache is not None)
    x = x + project("bthk,hkd->btd", attn, lp["wo"], lo, "wo", dt, mm)
    h = _rms_norm(x, lp["mlp_norm"], config.rms_norm_eps)
    if "w_gate_up" in lp:
        gate_up = project("btd,df->btf", h, lp["w_gate_up"], None, "w_gate_up", dt, mm)
        gate, up = jnp.split(gate_up, 2, axis=-1)
    else:
        gate = project("btd,df->btf", h, lp["w_gate"], lo, "w_gate", dt, mm)
        up = project("btd,df->btf", h, lp["w_up"], lo, "w_up", dt, mm)
    x = x + project("btf,fd->btd", jax.nn.silu(gate) * up, lp["w_down"], lo, "w_down", dt, mm)
    return _laid_out(x), cache


def lm_head(params: Params, x: jax.Array, config: LlamaConfig) -> jax.Array:
    """Logits (f32) of final hidden states x [..., D]."""
    mm = config.jnp_matmul_dtype
    flat = x.reshape(-1, x.shape[-1])
    if "lm_head_t" in params:   # a tied model's separate narrow [V, D] head (`matmul_weights`)
        logits = mixed_einsum("nd,vd->nv", flat, params["lm_head_t"], mm)
    elif "lm_head" not in params:   # tied
        logits = mixed_einsum("nd,vd->nv", flat, params["embed"], mm)
    else:
        logits = mixed_einsum("nd,dv->nv", flat, params["lm_head"], mm)
    return logits.reshape(x.shape[:-1] + logits.shape[-1:])


def forward(
    params: Params,
    tokens: jax.Array,
    positions: Optional[jax.Array] = None,
    segment_ids: Optional[jax.Array] = None,
    kv_cache: Optional[KVCache] = None,
    *,
    config: LlamaConfig,
    remat: bool = False,
    return_hidden: bool = False,
    attention_block: Optional[int] = None,
) -> tuple[jax.Array, Optional[KVCache]]:
    """Logits [B, T, V] (f32) for tokens [B, T], and the updated KV cache (None if none given).

    remat: recompute each layer's activations in the backward pass instead of keeping them (only
    the layer inputs are saved): training memory no longer grows with attention scores x layers.
    return_hidden: return the final normed hidden states [B, T, D] instead of logits (for a loss
    that applies the LM head chunk by chunk, see `lm_head`).

    positions: [B, T] int, default 0..T-1 (offset by the cache's write index when a cache is given).
    segment_ids: [B, T] int, default all 1; 0 marks padding. With a cache the T new tokens are
    written at slots index..index+T-1 of every row and attend to every valid earlier slot.
    attention_block: without a cache, attention runs `attention_block` queries at a time against
    the keys up to their block's end (the same result, less work for long T); 0 = one dense block.
    Default: 256 on CPU, where the dense T x T work dominates long rows, 0 elsewhere.
    """
    if attention_block is None:
        attention_block = ATTENTION_BLOCK if jax.default_backend() == "cpu" else 0
    b, t = tokens.shape
    offset = kv_cache["index"] if kv_cache is not None else 0
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + offset, (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    positions = positions.astype(jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)

    if kv_cache is not None:
        index = kv_cache["index"]
        key_pos = jax.lax.dynamic_update_slice(kv_cache["positions"], positions, (0, index))
        key_seg = jax.lax.dynamic_update_slice(kv_cache["segment_ids"], segment_ids, (0, index))
    else:
        index, key_pos, key_seg = None, positions, segment_ids
    mask = ((segment_ids[:, :, None] == key_seg[:, None, :]) & (segment_ids[:, :, None] != 0)
            & (key_pos[:, None, :] <= positions[:, :, None]))
    block = 0
    if kv_cache is None:   # causal in index order too (see the module docstring)
        mask = mask & (jnp.arange(t)[None, :, None] >= jnp.arange(t)[None, None, :])
        block = attention_block

    angles = positions[:, :, None].astype(jnp.float32) * jnp.asarray(rope_frequencies(config))
    cos, sin = jnp.cos(angles), jnp.sin(angles)

    x = _laid_out(_laid_out(params["embed"], LOOKUP_AXES).astype(config.jnp_dtype)[tokens])

    if isinstance(params["layers"], (list, tuple)):
        # Unstacked layers (see `unstack_layers`): a Python loop, no slicing of stacked arrays.
        ks, vs = [], []
        for i, lp in enumerate(params["layers"]):
            layer_cache = None if kv_cache is None else (kv_cache["k"][i], kv_cache["v"][i], None)
            x, new = _layer(config, x, lp, cos, sin, mask, layer_cache, index, block)
            if new is not None:
                ks.append(new[0])
                vs.append(new[1])
        k_all, v_all = tuple(ks), tuple(vs)
    elif kv_cache is None:
        def body(x, lp):
            return _layer(config, x, lp, cos, sin, mask, None, None, block)[0], None

        if remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, params["layers"])
    else:
        # The cache rides in the scan carry, so each layer's update is in place (no copy).
        def body(carry, layer_in):
            x, k_all, v_all = carry
            lp, layer = layer_in
            x, (k_all, v_all) = _layer(config, x, lp, cos, sin, mask, (k_all, v_all, layer), index)
            return (x, k_all, v_all), None

        layers = jnp.arange(config.num_layers, dtype=jnp.int32)
        (x, k_all, v_all), _ = jax.lax.scan(body, (x, kv_cache["k"], kv_cache["v"]),
                                            (params["layers"], layers))

    x = _rms_norm(x, params["final_norm"], config.rms_norm_eps)
    logits = x if return_hidden else lm_head(params, x, config)

    new_cache = None
    if kv_cache is not None:
        new_cache = {"k": k_all, "v": v_all, "positions": key_pos, "segment_ids": key_seg,
                     "index": index + t}
    return logits, new_cache
