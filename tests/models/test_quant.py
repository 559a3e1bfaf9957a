"""Quantized weights: error bounds, the int4 nibble packing and Q4_1 arithmetic against NumPy references
(and the gguf package), slicing under jit and lax.scan, and whole Llama params trees."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from models import llama, quant
from tests.conftest import tiny_config

F16_EPS = 2.0 ** -10  # float16 spacing relative to the value (a bound on its rounding, doubled)
SLACK = 2.0 ** -16  # float32 rounding in quantize and dequantize, as a fraction of the step
# (shape, axis, block): axis of either sign, leading or trailing, int4 block sizes 32 and 16.
CASES = [((64, 24), 0, 32), ((24, 64), 1, 32), ((3, 32, 4, 16), 1, 16), ((2, 5, 96), -1, 32),
         ((2, 3, 16, 48), -2, 16)]
DTYPES = [np.float32, ml_dtypes.bfloat16]


def random_weight(shape, dtype, seed=0, std=0.05):
    w = np.random.default_rng(seed).normal(0.0, std, shape).astype(np.float32)
    w[(0,) * (len(shape) - 1)] += 0.3  # one large entry per leading row: scales differ between channels
    return w.astype(dtype)


def f16_round_up(x):
    h = x.astype(np.float16)
    return np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)


def ref_int8_scale(w, axis):
    """The symmetric per-channel int8 scale in NumPy, kept as a size-1 axis."""
    scale = np.max(np.abs(w.astype(np.float32)), axis=axis, keepdims=True) / np.float32(127)
    return np.where(scale > 0, scale, np.float32(1))


def ref_q4_1(w, axis, block):
    """Q4_1 in NumPy, block by block on rows of the weight moved to the last axis: unpacked q (shape
    of w) and the float16 d and m per block (`axis` holding the blocks)."""
    x = np.moveaxis(w.astype(np.float32), axis, -1)
    rows = x.reshape(-1, block)
    lo, hi = rows.min(axis=1, keepdims=True), rows.max(axis=1, keepdims=True)
    m = lo.astype(np.float16)
    d = f16_round_up((hi - lo) / np.float32(15))
    d32, m32 = d.astype(np.float32), m.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d32 > 0, np.round((rows - m32) / d32), 0)
    q = np.clip(q, 0, 15).astype(np.uint8)
    blocks_shape = x.shape[:-1] + (x.shape[-1] // block,)
    back = lambda a, s: np.moveaxis(a.reshape(s), -1, axis)  # noqa: E731
    return back(q, x.shape), back(d, blocks_shape), back(m, blocks_shape)


def ref_pack(q, axis):
    """Two values per byte along axis: element 2i in the low nibble, 2i+1 in the high nibble."""
    x = np.moveaxis(q.astype(np.uint8), axis, -1)
    return np.moveaxis(x[..., 0::2] | (x[..., 1::2] << 4), -1, axis)


def unpack(packed, axis):
    x = np.moveaxis(np.asarray(packed), axis, -1)
    out = np.stack([x & 0xF, x >> 4], axis=-1).reshape(x.shape[:-1] + (2 * x.shape[-1],))
    return np.moveaxis(out, -1, axis)


def expand_blocks(a, axis, block):
    return np.repeat(np.asarray(a, np.float32), block, axis=axis)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,axis,block", CASES)
def test_int8_round_trip_within_half_a_step(shape, axis, block, dtype):
    w = random_weight(shape, dtype)
    qw = quant.quantize(w, "int8", axis)
    scale_ref = ref_int8_scale(w, axis)
    assert qw.q.dtype == jnp.int8 and qw.zero is None and qw.axis < 0
    # XLA may divide by 127 as a multiplication by its reciprocal: the scale can differ by an ulp.
    np.testing.assert_allclose(np.asarray(qw.scale), scale_ref, rtol=2.5e-7, atol=0)
    # q is a nearest integer to w / scale (up to float32 rounding of the quotient: ties may go either way).
    ratio = w.astype(np.float32) / np.asarray(qw.scale)
    assert np.all(np.abs(np.asarray(qw.q, np.float32) - ratio) <= 0.5 + 1e-5)
    assert np.all(np.max(np.abs(np.asarray(qw.q, np.int32)), axis=axis) == 127)  # the full range is used
    out = quant.dequantize(qw)
    assert out.dtype == jnp.dtype(dtype) and out.shape == shape
    err = np.abs(np.asarray(quant.dequantize(qw, jnp.float32)) - w.astype(np.float32))
    assert np.all(err <= scale_ref * (0.5 + SLACK))
    assert err.max() > scale_ref.min() / 4  # the test can see an error at all


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,axis,block", CASES)
def test_int4_round_trip_within_half_a_step(shape, axis, block, dtype):
    w = random_weight(shape, dtype)
    w32 = w.astype(np.float32)
    qw = quant.quantize(w, "int4", axis, block=block)
    n_blocks = shape[axis] // block
    blocks_shape = tuple(n_blocks if i == axis % len(shape) else s for i, s in enumerate(shape))
    halved = tuple(s // 2 if i == axis % len(shape) else s for i, s in enumerate(shape))
    assert qw.q.dtype == jnp.uint8 and qw.q.shape == halved
    assert qw.scale.dtype == qw.zero.dtype == jnp.float16 and qw.scale.shape == qw.zero.shape == blocks_shape
    # The stored step and minimum are the block's own, up to float16 rounding (d never rounded down).
    x = np.moveaxis(w32, axis, -1).reshape(-1, block)
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = np.moveaxis(np.asarray(qw.scale, np.float32), axis, -1).reshape(-1)
    m = np.moveaxis(np.asarray(qw.zero, np.float32), axis, -1).reshape(-1)
    assert np.all(d >= (hi - lo) / 15) and np.all(d <= (hi - lo) / 15 * (1 + F16_EPS))
    assert np.all(np.abs(m - lo) <= np.abs(lo) * F16_EPS / 2)
    out = quant.dequantize(qw)
    assert out.dtype == jnp.dtype(dtype) and out.shape == shape
    err = np.abs(np.asarray(quant.dequantize(qw, jnp.float32)) - w32)
    d_el = expand_blocks(qw.scale, axis, block)
    m_err = np.abs(expand_blocks(qw.zero, axis, block) - np.repeat(np.moveaxis(
        lo.reshape(np.moveaxis(w32, axis, -1).shape[:-1] + (n_blocks,)), -1, axis), block, axis=axis))
    assert np.all(err <= d_el * (0.5 + SLACK) + m_err)
    assert err.max() > d_el.min() / 4


@pytest.mark.parametrize("kind", quant.KINDS)
def test_constant_block_is_exact_and_zero_channel_has_no_nan(kind):
    w = random_weight((64, 6), np.float32)
    w[:32, 1] = 0.375   # a constant int4 block (float16-representable)
    w[:, 2] = -1.25     # a constant channel
    w[:, 3] = 0.0       # an all-zero channel
    out = np.asarray(quant.dequantize(quant.quantize(w, kind, 0)))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:, 3], 0.0)
    np.testing.assert_array_equal(out[:, 2], -1.25)
    if kind == "int4":
        np.testing.assert_array_equal(out[:32, 1], 0.375)


def test_nibble_order_of_a_known_block():
    # One block whose codes are 0, 1, ..., 15, 15, 14, ..., 0: the bytes are then 0x10, 0x32, ...
    codes = np.concatenate([np.arange(16), np.arange(15, -1, -1)])
    w = (-1.0 + 0.125 * codes).astype(np.float32)  # d = 1.875 / 15 = 0.125, m = -1: all exact in float16
    qw = quant.quantize(w, "int4", 0)
    assert float(qw.scale[0]) == 0.125 and float(qw.zero[0]) == -1.0
    expected = [c0 | (c1 << 4) for c0, c1 in zip(codes[0::2], codes[1::2])]
    assert np.asarray(qw.q).tolist() == expected
    assert expected[:2] == [0x10, 0x32]
    np.testing.assert_array_equal(np.asarray(quant.dequantize(qw)), w)


@pytest.mark.parametrize("shape,axis,block", CASES)
def test_int4_matches_numpy_q4_1_reference(shape, axis, block):
    w = random_weight(shape, np.float32, seed=1)
    qw = quant.quantize(w, "int4", axis, block=block)
    q_ref, d_ref, m_ref = ref_q4_1(w, axis, block)
    np.testing.assert_array_equal(np.asarray(qw.q), ref_pack(q_ref, axis))
    np.testing.assert_array_equal(unpack(qw.q, axis), q_ref)
    np.testing.assert_array_equal(np.asarray(qw.scale), d_ref)
    np.testing.assert_array_equal(np.asarray(qw.zero), m_ref)
    deq_ref = (q_ref.astype(np.float32) * expand_blocks(d_ref, axis, block)
               + expand_blocks(m_ref, axis, block))
    np.testing.assert_allclose(np.asarray(quant.dequantize(qw)), deq_ref, rtol=1e-6, atol=1e-7)


def test_int4_dequantizes_like_gguf_q4_1():
    gguf = pytest.importorskip("gguf")
    w = random_weight((6, 128), np.float32, seed=2)
    qw = quant.quantize(w, "int4", -1)
    # llama.cpp's Q4_1 block: f16 d, f16 m, then 16 bytes holding element j low and j + 16 high.
    q = unpack(qw.q, -1).reshape(-1, 32)
    d = np.asarray(qw.scale).reshape(-1, 1).view(np.uint8)
    m = np.asarray(qw.zero).reshape(-1, 1).view(np.uint8)
    raw = np.concatenate([d, m, q[:, :16] | (q[:, 16:] << 4)], axis=1).reshape(6, -1)
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_allclose(np.asarray(quant.dequantize(qw)), theirs, rtol=1e-6, atol=1e-7)
    # gguf's own quantizer (q from the unrounded step): same minimum, step within a float16 ulp.
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1).reshape(-1, 20)
    np.testing.assert_array_equal(ref[:, 2:4].view(np.float16).ravel(), np.asarray(qw.zero).ravel())
    d_ref = ref[:, 0:2].view(np.float16).astype(np.float32).ravel()
    np.testing.assert_allclose(np.asarray(qw.scale, np.float32).ravel(), d_ref, rtol=F16_EPS)


@pytest.mark.parametrize("kind", quant.KINDS)
def test_slices_of_a_stacked_weight_under_jit_and_scan(kind):
    w = random_weight((3, 32, 16), np.float32, seed=3)  # [L, D, F], contracted over D
    qw = quant.quantize(w, kind, 1, block=16)
    assert qw.axis == -2
    whole = quant.dequantize(qw)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 5, 32)), jnp.float32)

    @jax.jit
    def run(qw, x):
        def body(carry, layer):
            lw, lx = layer
            w_l = quant.dequantize(lw)
            return carry + 1, (w_l, lx @ w_l)
        return jax.lax.scan(body, 0, (qw, x))[1]

    per_layer, y = run(qw, x)
    np.testing.assert_array_equal(np.asarray(per_layer), np.asarray(whole))
    np.testing.assert_allclose(np.asarray(y), np.einsum("ltd,ldf->ltf", x, whole), rtol=1e-5, atol=1e-6)
    for i in range(3):
        sliced = jax.tree_util.tree_map(lambda a, i=i: a[i], qw)
        assert quant.is_quantized(sliced) and sliced.current_shape == (32, 16)
        np.testing.assert_array_equal(np.asarray(quant.dequantize(sliced)), np.asarray(whole[i]))
        np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize)(sliced)), np.asarray(whole[i]))


@functools.lru_cache(maxsize=None)
def init_params(head_dim=8):
    """llama.init of the tiny config (cached: each init compiles a handful of XLA programs)."""
    return llama.init(tiny_config(head_dim=head_dim), jax.random.PRNGKey(0))


def projection_bytes(layers):
    items = layers if isinstance(layers, list) else [layers]
    return sum(quant.nbytes({k: lp[k] for k in quant.PROJECTION_AXES}) for lp in items)


def logits(params, cfg, dequantize=False):
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 12)))
    fn = lambda p, t: llama.forward(quant.dequantize_params(p) if dequantize else p, t, config=cfg)[0]  # noqa: E731
    return np.asarray(jax.jit(fn)(params, tokens))


@functools.lru_cache(maxsize=None)
def reference_logits(head_dim):
    return logits(init_params(head_dim), tiny_config(head_dim=head_dim))


# kind, head_dim, block, expected shrink of the projections vs float32, bound on max|dlogit| / max|logit|,
# per-layer params. int8 scales are one float32 per channel of n elements: 4 / (1 + 4 / n) with n = D, Dh
# or F, computed in the test. int4: 4 bits plus a float16 step and minimum per block of b: 4 / (0.5 + 4 / b).
# Measured logit errors (seeded, so fixed): int8 0.0028, int4 block 32: 0.079, int4 block 8: 0.031 -- in
# line with the weights' own relative RMS error, about 0.7%, 10% and 5% for normal weights.
PARAM_CASES = [("int8", 8, 32, None, 0.01, False), ("int8", 8, 32, None, 0.01, True),
               ("int4", 32, 32, 6.4, 0.15, False), ("int4", 32, 32, 6.4, 0.15, True),
               ("int4", 8, 8, 4 / (0.5 + 4 / 8), 0.08, False)]


@pytest.mark.parametrize("kind,head_dim,block,factor,bound,unstacked", PARAM_CASES)
def test_quantize_params_forward_and_size(kind, head_dim, block, factor, bound, unstacked):
    cfg = tiny_config(head_dim=head_dim)
    params = init_params(head_dim)
    if unstacked:
        params = llama.unstack_layers(params)
    qparams = quant.quantize_params(params, kind, block=block)
    layers = qparams["layers"] if unstacked else [qparams["layers"]]
    for lp in layers:
        assert all(quant.is_quantized(lp[k]) for k in quant.PROJECTION_AXES)
        assert not any(quant.is_quantized(v) for k, v in lp.items() if k not in quant.PROJECTION_AXES)
    for k in ("embed", "final_norm", "lm_head"):
        assert qparams[k] is params[k]
    ref, out = reference_logits(head_dim), logits(qparams, cfg, dequantize=True)
    assert np.abs(out - ref).max() / np.abs(ref).max() < bound

    before, after = projection_bytes(params["layers"]), projection_bytes(qparams["layers"])
    if factor is None:  # int8: per-weight channel lengths differ
        c, shapes = cfg, llama.param_shapes(cfg)["layers"]
        n = {"wq": c.hidden_size, "wk": c.hidden_size, "wv": c.hidden_size, "wo": c.head_dim,
             "w_gate": c.hidden_size, "w_up": c.hidden_size, "w_down": c.intermediate_size}
        expected_after = sum(np.prod(shapes[k]) * (1 + 4 / n[k]) for k in quant.PROJECTION_AXES)
        assert after == expected_after
    else:
        assert before / after == pytest.approx(factor, rel=1e-12)
    assert quant.nbytes(qparams) == quant.nbytes(params) - before + after


@pytest.mark.parametrize("unstacked", [False, True], ids=["stacked", "per_layer"])
def test_forward_takes_quantized_weights_directly(unstacked):
    # The forward dequantizes each QuantizedWeight right before its matmul (per-layer slices in the scan).
    cfg = tiny_config()
    params = init_params()
    qparams = quant.quantize_params(llama.unstack_layers(params) if unstacked else params, "int4", block=8)
    np.testing.assert_allclose(logits(qparams, cfg), logits(qparams, cfg, dequantize=True),
                               rtol=1e-5, atol=1e-6)


def test_bfloat16_params_dequantize_to_bfloat16():
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), init_params())
    qparams = quant.quantize_params(params, "int4", block=8)
    out = quant.dequantize_params(qparams)
    assert out["layers"]["wq"].dtype == jnp.bfloat16 and out["layers"]["wq"].shape == (2, 32, 4, 8)
    assert quant.dequantize_params(qparams, jnp.float32)["layers"]["w_down"].dtype == jnp.float32


def test_bad_inputs_raise_clear_errors():
    w = np.zeros((4, 64), np.float32)
    with pytest.raises(ValueError, match=r"shape \(4, 64\), axis -1, block 24"):
        quant.quantize(w, "int4", 1, block=24)
    with pytest.raises(quant.QuantError, match="block 7"):
        quant.quantize(np.zeros((4, 14), np.float32), "int4", 1, block=7)
    with pytest.raises(quant.QuantError, match=r"axis 2 is out of range for shape \(4, 64\)"):
        quant.quantize(w, "int8", 2)
    with pytest.raises(quant.QuantError, match="kind must be one of"):
        quant.quantize(w, "int3", 1)
    with pytest.raises(quant.QuantError, match="floating-point"):
        quant.quantize(np.zeros((4, 64), np.int32), "int8", 1)
    with pytest.raises(quant.QuantError, match="already quantized"):
        quant.quantize(quant.quantize(w, "int8", 1), "int8", 1)
    with pytest.raises(quant.QuantError, match=r"layers/wo: .*shape \(2, 4, 8, 32\), axis -2, block 32"):
        quant.quantize_params(init_params(), "int4")  # head_dim 8: no blocks of 32 along it
