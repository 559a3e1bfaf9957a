"""LoRA and QLoRA: the adapted forward, merging, the PEFT layout, and training runs of adapters only."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from models import llama, lora, quant
from models.errors import CheckpointError
from models.sampler import Sampler
from playpen_jax.metrics import read_jsonl
from tests.conftest import tiny_config
from tests.train.helpers import main_args
from tests.train.tiny_model import make_tiny_model
from train import main as train_main

SPEC = lora.LoraSpec.parse(4, 8.0, "all")


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return cfg, llama.init(cfg, jax.random.PRNGKey(0))


def _trained(cfg, spec, seed=1):
    """Adapters as after some training: A as initialised, B random (at init B = 0)."""
    ad = lora.init(cfg, spec, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 2 * len(spec.targets)))
    return {t: {"a": ad[t]["a"], "b": 0.05 * jax.random.normal(next(keys), ad[t]["b"].shape)}
            for t in spec.targets}


def _tokens(cfg, shape=(3, 9)):
    return jax.random.randint(jax.random.PRNGKey(7), shape, 0, cfg.vocab_size)


def test_fresh_adapters_leave_the_model_unchanged(model):
    cfg, params = model
    ad = lora.init(cfg, SPEC, jax.random.PRNGKey(1))
    assert all(float(jnp.abs(ad[t]["a"]).max()) > 0 and float(jnp.abs(ad[t]["b"]).max()) == 0
               for t in SPEC.targets)
    toks = _tokens(cfg)
    base = llama.forward(params, toks, config=cfg)[0]
    np.testing.assert_array_equal(llama.forward(lora.attach(params, ad, SPEC), toks, config=cfg)[0], base)


@pytest.mark.parametrize("targets", ["all", "q_proj,v_proj", "o_proj,down_proj"])
def test_merged_forward_equals_the_adapted_one(model, targets):
    cfg, params = model
    spec = lora.LoraSpec.parse(4, 16.0, targets)
    ad = _trained(cfg, spec)
    toks = _tokens(cfg)
    adapted = llama.forward(lora.attach(params, ad, spec), toks, config=cfg)[0]
    merged = llama.forward(lora.merge(params, ad, spec), toks, config=cfg)[0]
    base = llama.forward(params, toks, config=cfg)[0]
    assert float(jnp.abs(adapted - base).max()) > 1e-2   # the adapters do something
    np.testing.assert_allclose(adapted, merged, atol=1e-5)
    # per-layer (unstacked) params give the same
    unstacked = llama.forward(lora.attach(llama.unstack_layers(params), ad, spec), toks, config=cfg)[0]
    np.testing.assert_allclose(unstacked, adapted, atol=1e-5)
    # merging touches the targets only
    m = lora.merge(params, ad, spec)
    for name in lora.TARGETS:
        same = np.array_equal(m["layers"][name], params["layers"][name])
        assert same == (name not in spec.targets), name
    np.testing.assert_array_equal(m["embed"], params["embed"])


def test_merge_is_w_plus_scaled_ab_per_layer(model):
    cfg, params = model
    ad = _trained(cfg, SPEC)
    m = lora.merge(params, ad, SPEC)
    w, a, b = (np.asarray(x) for x in (params["layers"]["wo"], ad["wo"]["a"], ad["wo"]["b"]))
    L, H, Dh, D = w.shape
    for i in range(L):   # wo: input axes (H, Dh), output D
        want = w[i].reshape(H * Dh, D) + SPEC.scale * a[i].reshape(H * Dh, -1) @ b[i]
        np.testing.assert_allclose(np.asarray(m["layers"]["wo"][i]).reshape(H * Dh, D), want, atol=1e-6)


def test_gradients_reach_only_the_adapters(model):
    cfg, params = model
    ad = _trained(cfg, SPEC)
    toks = _tokens(cfg)

    def loss(adapters, base):
        logits = llama.forward(lora.attach(base, adapters, SPEC), toks, config=cfg)[0]
        picked = jnp.take_along_axis(logits, toks[..., None], -1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - picked)

    g_ad, g_base = jax.grad(loss, argnums=(0, 1))(ad, params)
    for t in SPEC.targets:
        assert float(jnp.abs(g_ad[t]["a"]).max()) > 0 and float(jnp.abs(g_ad[t]["b"]).max()) > 0, t
    # differentiating only the adapters: no gradient tree for the base at all
    g_only = jax.grad(loss)(ad, params)
    assert jax.tree_util.tree_structure(g_only) == jax.tree_util.tree_structure(ad)
    # and the base's gradient is what the full model's would be (the adapters are linear in x)
    assert float(jnp.abs(g_base["layers"]["wq"]).max()) > 0


def test_dropout_only_with_a_key(model):
    cfg, params = model
    spec = lora.LoraSpec.parse(4, 8.0, "all", dropout=0.5)
    ad = _trained(cfg, spec)
    toks = _tokens(cfg)
    plain = llama.forward(lora.attach(params, ad, spec), toks, config=cfg)[0]
    k = jax.random.PRNGKey(3)
    d1 = llama.forward(lora.attach(params, ad, spec, rng=k), toks, config=cfg)[0]
    d2 = llama.forward(lora.attach(params, ad, spec, rng=k), toks, config=cfg)[0]
    d3 = llama.forward(lora.attach(params, ad, spec, rng=jax.random.PRNGKey(4)), toks, config=cfg)[0]
    np.testing.assert_array_equal(d1, d2)
    assert float(jnp.abs(d1 - plain).max()) > 1e-3 and float(jnp.abs(d1 - d3).max()) > 1e-3
    # no dropout configured: a key changes nothing
    ad0 = _trained(cfg, SPEC)
    np.testing.assert_array_equal(llama.forward(lora.attach(params, ad0, SPEC, rng=k), toks, config=cfg)[0],
                                  llama.forward(lora.attach(params, ad0, SPEC), toks, config=cfg)[0])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_qlora_forward_on_a_quantized_base(model, kind):
    cfg, params = model
    qbase = quant.quantize_params(params, kind, block=8)
    ad = _trained(cfg, SPEC)
    toks = _tokens(cfg)
    exact = llama.forward(lora.attach(params, ad, SPEC), toks, config=cfg)[0]
    q = llama.forward(lora.attach(qbase, ad, SPEC), toks, config=cfg)[0]
    # the same as the f32 adapted forward on the dequantized weights ...
    deq = llama.forward(lora.attach(quant.dequantize_params(qbase), ad, SPEC), toks, config=cfg)[0]
    np.testing.assert_allclose(q, deq, atol=1e-5)
    # ... and close to the unquantized one: max |logit error| / max |logit|, measured on this model
    # 0.4-0.55% (int8) and 4.4% (int4, blocks of 8)
    err = float(jnp.abs(q - exact).max()) / float(jnp.abs(exact).max())
    assert err < (1e-2 if kind == "int8" else 1e-1), err
    # merging a quantized base gives float weights with the same forward
    merged = llama.forward(lora.merge(qbase, ad, SPEC), toks, config=cfg)[0]
    np.testing.assert_allclose(merged, q, atol=1e-5)


def test_sampler_decodes_the_adapted_model_without_merging(model):
    cfg, params = model
    ad = _trained(cfg, SPEC, seed=5)
    prompts = [[5, 6, 7, 8], [9, 10]]
    sampler = Sampler(cfg)
    for base in (params, quant.quantize_params(params, "int8")):
        attached = sampler.generate(lora.attach(base, ad, SPEC), prompts, max_new_tokens=6, temperature=0)
        merged = sampler.generate(lora.merge(base, ad, SPEC), prompts, max_new_tokens=6, temperature=0)
        np.testing.assert_array_equal(attached.tokens, merged.tokens)
        np.testing.assert_allclose(attached.logprobs, merged.logprobs, atol=1e-4)
    plain = sampler.generate(params, prompts, max_new_tokens=6, temperature=0)
    # the plain params, sampled with the same sampler, compile their own executables
    assert not np.array_equal(plain.logprobs, attached.logprobs)


# ----- the PEFT layout ----------------------------------------------------------------------------

def test_peft_files_round_trip(model, tmp_path):
    cfg, _ = model
    spec = lora.LoraSpec.parse(4, 8.0, "q_proj,o_proj,down_proj", dropout=0.05)
    ad = _trained(cfg, spec)
    lora.save_peft(str(tmp_path), ad, spec, cfg, base_model="tiny")
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8.0 and conf["peft_type"] == "LORA"
    assert conf["target_modules"] == ["q_proj", "o_proj", "down_proj"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    D, H, Dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, D)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (H * Dh, 4)
    assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, H * Dh)
    back, spec2 = lora.load_peft(str(tmp_path), cfg)
    assert spec2 == spec
    for t in spec.targets:
        np.testing.assert_array_equal(back[t]["a"], ad[t]["a"])
        np.testing.assert_array_equal(back[t]["b"], ad[t]["b"])


def test_bad_peft_directories_give_one_line(model, tmp_path):
    cfg, _ = model
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        lora.load_peft(str(tmp_path), cfg)
    lora.save_peft(str(tmp_path), _trained(cfg, SPEC), SPEC, cfg)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**conf, "target_modules": ["lm_head"]}))
    with pytest.raises(CheckpointError, match="malformed LoRA config"):
        lora.load_peft(str(tmp_path), cfg)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**conf, "r": 8}))
    with pytest.raises(CheckpointError, match="has shape"):
        lora.load_peft(str(tmp_path), cfg)
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        lora.load_peft(str(tmp_path), cfg)


def test_peft_loads_our_adapters_onto_the_transformers_model(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from models import loader

    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(0))
    spec = lora.LoraSpec.parse(4, 8.0, "all")
    ad = _trained(cfg, spec)
    loader.save_hf(params, cfg, str(tmp_path / "base"))
    lora.save_peft(str(tmp_path / "adapter"), ad, spec, cfg)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32).eval()
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    toks = np.asarray(_tokens(cfg))
    with torch.no_grad():
        theirs = hf(torch.tensor(toks)).logits.numpy()
    ours = np.asarray(llama.forward(lora.attach(params, ad, spec), jnp.asarray(toks), config=cfg)[0])
    plain = np.asarray(llama.forward(params, jnp.asarray(toks), config=cfg)[0])
    assert np.abs(ours - plain).max() > 1e-2
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


# ----- training runs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_sft_trains_only_the_adapters(tiny_dir, tmp_path, quantize):
    run = tmp_path / "sft"
    argv = main_args(tiny_dir, run, "configs/sft.py", **{
        "steps": 8, "sft.episodes_per_game": 4, "sft.batch_size": 4, "optimizer.learning_rate": 0.1,
        "eval.at_start": False, "eval.limit": 1, "lora.rank": 8, "lora.alpha": 16,
        "lora.targets": "q_proj,v_proj,up_proj", "lora.quantize": quantize, "lora.block": 8,
        "lora.dropout": 0.05, "checkpoint.every": 4, "log.tensorboard": False})
    assert train_main.main(argv) == 0
    train = [m for m in read_jsonl(str(run / "metrics.jsonl")) if m["split"] == "train"]
    # The tiny random model's logits are bounded by its small embedding, which the adapters do not
    # train: its loss falls from ln(vocab) by a few tenths (full fine-tuning reaches 0.1).
    assert train[-1]["loss"] < train[0]["loss"] - 0.15, [round(m["loss"], 3) for m in train]
    start = load_file(os.path.join(tiny_dir, "model.safetensors"))
    out = load_file(str(run / "hf" / "model.safetensors"))
    # merged export: the targets moved, every other tensor is the base's (dequantized for QLoRA)
    for name, x in start.items():
        moved = float(np.abs(out[name] - x).max())
        target = any(p in name for p in ("q_proj", "v_proj", "up_proj"))
        if target:
            assert moved > 1e-3, name
        elif quantize == "none" or not any(p in name for p in ("k_proj", "o_proj", "gate_proj", "down_proj")):
            assert moved == 0.0, name
        else:   # a frozen projection of a quantized base: its int4 round trip
            assert 0 < moved < 0.1 * float(np.abs(x).max()), name
    # the adapters alone, in PEFT's layout
    conf = json.loads((run / "hf" / "adapter" / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["q_proj", "v_proj", "up_proj"] and conf["r"] == 8
    # checkpoints hold the adapters and their optimizer state only (the leaves listed by checksum)
    leaves = json.loads((run / "checkpoints" / "4" / "checksums" / "metadata").read_text())
    params = sorted(k for k in leaves if k.startswith("params/"))
    assert params == [f"params/{t}/{x}" for t in ("w_up", "wq", "wv") for x in "ab"]
    moments = {k.split("/", 4)[-1] for k in leaves if "/mu/" in k or "/nu/" in k}
    assert moments == {p.split("/", 1)[1] for p in params}


@pytest.mark.slow
def test_grpo_with_lora_resumes_exactly(tiny_dir, tmp_path):
    common = {"grpo.group_size": 4, "grpo.groups_per_step": 1, "optimizer.learning_rate": 0.03,
              "checkpoint.every": 1, "eval.at_start": False, "eval.limit": 1, "lora.rank": 4,
              "lora.dropout": 0.1, "rollout.temperature": 1.0, "grpo.drop_zero_variance": False,
              "log.tensorboard": False}
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_main.main(main_args(tiny_dir, straight, steps=2, **common)) == 0
    assert train_main.main(main_args(tiny_dir, split, steps=1, **common)) == 0
    assert train_main.main(main_args(tiny_dir, split, steps=2, resume="true", **common)) == 0
    a = load_file(str(straight / "hf" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(split / "hf" / "adapter" / "adapter_model.safetensors"))
    assert max(float(np.abs(x).max()) for k, x in a.items() if "lora_B" in k) > 0   # trained
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("over, needle", [
    ({"lora.rank": 4, "lora.targets": "lm_head"}, "lora.targets"),
    ({"lora.quantize": "int4"}, "lora.rank > 0"),
    ({"lora.rank": 4, "lora.quantize": "fp8"}, "lora.quantize"),
    ({"lora.rank": 4, "lora.dropout": 1.0}, "lora.dropout"),
    ({"lora.rank": 4, "lora.block": 3}, "lora.block"),
])
def test_bad_lora_settings_give_one_line(tiny_dir, tmp_path, capsys, over, needle):
    assert train_main.main(main_args(tiny_dir, tmp_path / "r", **over)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_block_that_does_not_divide_gives_one_line(tiny_dir, tmp_path, capsys):
    argv = main_args(tiny_dir, tmp_path / "r", **{"lora.rank": 4, "lora.quantize": "int4", "lora.block": 16})
    assert train_main.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "lora.quantize=int4" in err and "block 16" in err and "Traceback" not in err


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 4, "tensor": 2}])
def test_sharded_adapters_and_quantized_base_give_the_unsharded_loss_and_gradients(model, shape):
    from playpen_jax import sharding as shd

    cfg, params = model
    mesh = shd.make_mesh(shape)
    ad = _trained(cfg, SPEC)
    qbase = quant.quantize_params(params, "int8")
    toks = _tokens(cfg, (4, 9))

    def loss(adapters, base, tokens):
        logits = llama.forward(lora.attach(base, adapters, SPEC), tokens, config=cfg)[0]
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    want_l, want_g = jax.value_and_grad(loss)(ad, qbase, toks)
    ad_sh = shd.tree_shardings(lora.param_axes(cfg, SPEC), lora.param_shapes(cfg, SPEC), mesh)
    sharded = jax.device_put(ad, ad_sh)
    # the adapters are split along their base weight's axes (e.g. wq's B over "tensor" heads)
    assert sharded["wq"]["b"].sharding.spec != jax.sharding.PartitionSpec()
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    base_sh = jax.device_put(qbase, NS(mesh, P()))
    rows = jax.device_put(toks, NS(mesh, P(("data", "fsdp"))))
    got_l, got_g = jax.jit(jax.value_and_grad(loss), out_shardings=(None, ad_sh))(sharded, base_sh, rows)
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5)
    for t in SPEC.targets:
        for x in "ab":
            np.testing.assert_allclose(got_g[t][x], want_g[t][x], atol=1e-5, err_msg=f"{t}.{x}")
