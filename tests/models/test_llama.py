"""The forward pass against transformers' LlamaForCausalLM, and against itself (cache, packing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama, loader
from tests.conftest import tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_model(cfg, path, seed=0):
    """A random transformers Llama with `cfg`'s shape, saved as an HF checkpoint at `path`."""
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf())
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norms away from 1 so that their weights matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def left_padded_batch(rng, vocab, lengths):
    t = max(lengths)
    tokens = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        tokens[i, t - n:] = rng.integers(3, vocab, n)
        mask[i, t - n:] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return tokens, mask, positions


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_with_padding(tmp_path, tied):
    cfg = tiny_config(tie_word_embeddings=tied)
    model = hf_model(cfg, tmp_path)
    _, params = loader.load_hf(str(tmp_path))
    tokens, mask, positions = left_padded_batch(np.random.default_rng(1), cfg.vocab_size, [11, 7, 3])
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits.numpy()
    logits, cache = llama.forward(params, jnp.asarray(tokens), jnp.asarray(positions),
                                  jnp.asarray(mask), config=cfg)
    assert cache is None and logits.dtype == jnp.float32
    real = mask.astype(bool)
    diff = np.abs(np.asarray(logits)[real] - ref[real]).max()
    assert diff <= 1e-4, diff


def test_llama3_rope_scaling_matters(tmp_path):
    """Positions past the original context exercise the llama3 frequency scaling."""
    cfg = tiny_config()
    model = hf_model(cfg, tmp_path)
    _, params = loader.load_hf(str(tmp_path))
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(llama.forward(params, jnp.asarray(tokens), config=cfg)[0])
    unscaled = np.asarray(llama.forward(params, jnp.asarray(tokens),
                                        config=cfg.replace(rope_scaling=None))[0])
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(unscaled - ref).max() > 1e-3  # the test would notice scaling being ignored


def test_kv_cache_matches_full_forward():
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    tokens, mask, positions = left_padded_batch(rng, cfg.vocab_size, [9, 5])
    full, _ = llama.forward(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask),
                            config=cfg)
    # Prefill 6 tokens, then a chunk of 2, then one at a time.
    cache = llama.init_cache(cfg, 2, 16)
    outs = []
    for a, b in [(0, 6), (6, 8), (8, 9)]:
        out, cache = llama.forward(params, jnp.asarray(tokens[:, a:b]), jnp.asarray(positions[:, a:b]),
                                   jnp.asarray(mask[:, a:b]), cache, config=cfg)
        outs.append(np.asarray(out))
    cached = np.concatenate(outs, axis=1)
    real = mask.astype(bool)
    assert int(cache["index"]) == 9
    assert np.abs(cached[real] - np.asarray(full)[real]).max() <= 1e-4


def test_unstacked_layers_match_stacked_with_and_without_cache():
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(3))
    loose = llama.unstack_layers(params)
    assert isinstance(loose["layers"], list) and len(loose["layers"]) == cfg.num_layers
    tokens, mask, positions = left_padded_batch(np.random.default_rng(6), cfg.vocab_size, [6, 4])
    args = (jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    full = np.asarray(llama.forward(params, *args, config=cfg)[0])
    assert np.abs(np.asarray(llama.forward(loose, *args, config=cfg)[0]) - full).max() <= 1e-5
    cache = llama.init_cache(cfg, 2, 8, per_layer=True)
    out1, cache = llama.forward(loose, *(a[:, :4] for a in args), cache, config=cfg)
    out2, cache = llama.forward(loose, *(a[:, 4:] for a in args), cache, config=cfg)
    cached = np.concatenate([np.asarray(out1), np.asarray(out2)], axis=1)
    assert isinstance(cache["k"], tuple) and int(cache["index"]) == 6
    assert np.abs(cached[mask.astype(bool)] - full[mask.astype(bool)]).max() <= 1e-4


def test_packed_segments_equal_separate_sequences():
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(1))
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, cfg.vocab_size, 5), rng.integers(0, cfg.vocab_size, 7)
    packed = np.concatenate([a, b])[None]
    segments = np.array([[1] * 5 + [2] * 7])
    positions = np.array([list(range(5)) + list(range(7))])
    out = np.asarray(llama.forward(params, jnp.asarray(packed), jnp.asarray(positions),
                                   jnp.asarray(segments), config=cfg)[0])
    sep_a = np.asarray(llama.forward(params, jnp.asarray(a[None]), config=cfg)[0])
    sep_b = np.asarray(llama.forward(params, jnp.asarray(b[None]), config=cfg)[0])
    assert np.abs(out[0, :5] - sep_a[0]).max() <= 1e-5
    assert np.abs(out[0, 5:] - sep_b[0]).max() <= 1e-5


def test_bf16_policy_keeps_f32_logits():
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(2))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 12)))
    ref = np.asarray(llama.forward(params, tokens, config=cfg)[0])
    bf = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    params_bf = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    out, _ = jax.jit(llama.forward, static_argnames="config")(params_bf, tokens, config=bf)
    assert out.dtype == jnp.float32
    err = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05  # bf16 really ran (not bit-equal) and stays close


def test_fused_projections_equal_separate_ones():
    """wq/wk/wv and w_gate/w_up fused into two [in, out] matmuls give the same logits and cache;
    layers with adapters keep their separate weights."""
    from models import lora

    cfg = tiny_config()
    params = llama.unstack_layers(llama.init(cfg, jax.random.PRNGKey(8), init_std=0.3))
    fused = llama.fuse_projections(params)
    lp = fused["layers"][0]
    assert "wq" not in lp and "w_up" not in lp and "wo" in lp and "w_down" in lp
    h, k, dh, f, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.hidden_size
    assert lp["wqkv"].shape == (d, (h + 2 * k) * dh) and lp["w_gate_up"].shape == (d, 2 * f)
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    ref, ref_cache = llama.forward(params, tokens, kv_cache=llama.init_cache(cfg, 2, 16, per_layer=True),
                                   config=cfg)
    got, got_cache = llama.forward(fused, tokens, kv_cache=llama.init_cache(cfg, 2, 16, per_layer=True),
                                   config=cfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_cache["k"][1]), np.asarray(ref_cache["k"][1]), atol=1e-5)
    # and in the bf16 decode copy (`matmul_weights`), against the same matmuls unfused
    mixed = cfg.replace(matmul_dtype="bfloat16")
    ref_bf16, _ = llama.forward(llama.matmul_weights(params, mixed), tokens, config=mixed)
    got_bf16, _ = llama.forward(llama.matmul_weights(fused, mixed), tokens, config=mixed)
    np.testing.assert_allclose(np.asarray(got_bf16), np.asarray(ref_bf16), rtol=0, atol=2e-2)
    assert np.abs(np.asarray(got_bf16) - np.asarray(ref)).max() > 0   # it did run in bf16
    with pytest.raises(ValueError, match="per-layer"):
        llama.fuse_projections(llama.init(cfg, jax.random.PRNGKey(8)))
    spec = lora.LoraSpec.parse(2, 4.0, "all")
    adapted = lora.attach(params, lora.init(cfg, spec, jax.random.PRNGKey(1), jnp.float32), spec)
    assert "wq" in llama.fuse_projections(adapted)["layers"][0]


def test_blocked_causal_attention_equals_dense():
    """Query blocks against the keys up to their end give the dense result, values and gradients,
    for packed segments, right padding and a T that is not a multiple of the block."""
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(4), init_std=0.3)
    rng = np.random.default_rng(7)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 37)), jnp.int32)
    seg = np.zeros((2, 37), np.int32)
    seg[0, :20], seg[0, 20:33] = 1, 2           # two packed sequences, then padding
    seg[1, :37] = 1
    pos = np.zeros((2, 37), np.int32)
    pos[0, :20], pos[0, 20:33], pos[1] = np.arange(20), np.arange(13), np.arange(37)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)

    def loss(p, block):
        logits = llama.forward(p, tokens, pos, seg, config=cfg, attention_block=block)[0]
        return (jax.nn.log_softmax(logits) * (seg > 0)[..., None]).sum(), logits

    (_, dense), g_dense = jax.value_and_grad(loss, has_aux=True)(params, 0)
    for block in (8, 16):
        (_, got), g = jax.value_and_grad(loss, has_aux=True)(params, block)
        np.testing.assert_allclose(np.asarray(got), np.asarray(dense), rtol=0, atol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_dense)):
            assert float(jnp.abs(a - b).max()) <= 2e-5 * float(jnp.abs(b).max())   # f32 summation order
    # the blocks really split the work: the jaxpr holds one pair of attention dots per block
    jaxpr = jax.make_jaxpr(lambda p: loss(p, 8)[1])(params)
    dense_dots = len(list(_dots(jax.make_jaxpr(lambda p: loss(p, 0)[1])(params).jaxpr)))
    assert len(list(_dots(jaxpr.jaxpr))) == dense_dots + 2 * (5 - 1)


def _dots(jaxpr):
    """Every dot_general of a jaxpr, nested ones (scan, custom_vjp, checkpoint) included."""
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            yield e
        for sub in jax.core.jaxprs_in_params(e.params):
            yield from _dots(sub)


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_weight_matmuls_under_f32_activations(tied):
    """matmul_dtype=bfloat16: the projections and the LM head multiply bf16 operands into f32 (seen
    in the jaxpr), everything else stays f32, and the logits stay close to the f32 model's."""
    cfg = tiny_config(tie_word_embeddings=tied)
    params = llama.init(cfg, jax.random.PRNGKey(2))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 12)))
    ref = np.asarray(llama.forward(params, tokens, config=cfg)[0])
    mixed = cfg.replace(matmul_dtype="bfloat16")
    assert mixed.mixed_matmuls and not cfg.mixed_matmuls
    fwd = lambda p: llama.forward(p, tokens, config=mixed)[0]  # noqa: E731
    jaxpr = jax.make_jaxpr(fwd)(params)

    dots = list(_dots(jaxpr.jaxpr))
    narrow = [e for e in dots if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in narrow)
    assert len(narrow) == 7 + 1   # the seven projections (in the layer scan) and the LM head
    wide = [e for e in dots if e not in narrow]
    assert all(v.aval.dtype == jnp.float32 for e in wide for v in e.invars)
    assert len(wide) == 2 + 3   # attention's two dots and the three RMSNorm mean squares stay f32
    out = np.asarray(jax.jit(fwd)(params))
    assert out.dtype == np.float32
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.02
    # The decode copy: matmul weights in bf16, norms and (untied) embedding untouched.
    copy = llama.matmul_weights(params, mixed)
    assert copy["layers"]["wq"].dtype == jnp.bfloat16 and copy["layers"]["attn_norm"].dtype == jnp.float32
    head = copy["lm_head_t"] if tied else copy["lm_head"]   # tied: a separate narrow [V, D] head
    assert copy["embed"] is params["embed"] and head.dtype == jnp.bfloat16
    assert llama.matmul_weights(params, cfg) is params
    np.testing.assert_allclose(np.asarray(jax.jit(fwd)(copy)), out, rtol=0, atol=1e-5)


def test_bf16_weight_matmuls_gradient():
    """The gradient under matmul_dtype=bfloat16 multiplies bf16 operands only (its custom rule),
    comes back in the params' f32, and stays close to the f32 model's gradient."""
    from train import losses

    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(3))
    rng = np.random.default_rng(6)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    ones = jnp.ones((2, 16), jnp.int32)

    def grad(config):
        def loss(p):
            lp, mask = losses.sequence_logprobs(p, tokens, positions, ones, ones.astype(jnp.float32),
                                                config=config)
            return losses.sft_loss(lp, mask)[0]
        return jax.grad(loss), jax.jit(jax.grad(loss))(params)

    _, ref = grad(cfg)
    fn, got = grad(cfg.replace(matmul_dtype="bfloat16"))
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        assert g.dtype == jnp.float32
        err = float(jnp.abs(g - r).max() / (jnp.abs(r).max() + 1e-12))
        assert 0 < err < 0.05
    jaxpr = jax.make_jaxpr(fn)(params)

    mixed = [e for e in _dots(jaxpr.jaxpr) if {v.aval.dtype for v in e.invars} == {jnp.float32, jnp.bfloat16}]
    narrow = [e for e in _dots(jaxpr.jaxpr) if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    assert not mixed and len(narrow) >= 3 * 8   # forward, input and weight gradients of 7 + 1 matmuls


def test_matmul_dtype_is_checked():
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match="matmul_dtype must be one of"):
        tiny_config(matmul_dtype="int8")


def test_auto_matmul_dtype_follows_the_cpu():
    from models.config import resolve_matmul_dtype

    avx2 = frozenset({"avx2", "fma", "f16c"})
    assert resolve_matmul_dtype("auto", "cpu", avx2 | {"avx512_bf16"}) == "bfloat16"
    assert resolve_matmul_dtype("auto", "cpu", avx2 | {"amx_bf16"}) == "bfloat16"
    assert resolve_matmul_dtype("auto", "cpu", avx2 | {"avx512f"}) is None
    assert resolve_matmul_dtype("auto", "gpu", avx2 | {"avx512_bf16"}) is None
    assert resolve_matmul_dtype("", "cpu", avx2) is None and resolve_matmul_dtype(None) is None
    assert resolve_matmul_dtype("bfloat16", "gpu") == "bfloat16"
    # this host: whatever its flags say
    from models.sampler import cpu_flags

    here = resolve_matmul_dtype("auto")
    assert here == ("bfloat16" if jax.default_backend() == "cpu" and {"avx512_bf16", "amx_bf16"} & cpu_flags()
                    else None)


def test_param_axes_cover_every_leaf():
    for tied in (False, True):
        cfg = tiny_config(tie_word_embeddings=tied)
        params = llama.init(cfg, jax.random.PRNGKey(0))
        axes = llama.param_axes(cfg)
        is_leaf = lambda x: isinstance(x, tuple)  # noqa: E731
        assert (jax.tree_util.tree_structure(axes, is_leaf=is_leaf)
                == jax.tree_util.tree_structure(params))
        for ax, p in zip(jax.tree_util.tree_leaves(axes, is_leaf=is_leaf),
                         jax.tree_util.tree_leaves(params)):
            assert len(ax) == p.ndim
