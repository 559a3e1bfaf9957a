"""HF safetensors directories: round trips, sharded streaming loads, and bad input."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama, loader
from models.config import LlamaConfig
from models.errors import CheckpointError, ConfigError
from models.safetensors_file import SafetensorsFile
from playpen_jax import sharding
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tree_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_with_shards(tmp_path, param_dtype):
    cfg = tiny_config(param_dtype=param_dtype)
    params = llama.init(cfg, jax.random.PRNGKey(0))
    loader.save_hf(params, cfg, str(tmp_path), max_shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    cfg2, params2 = loader.load_hf(str(tmp_path), param_dtype=param_dtype)
    assert cfg2 == cfg
    assert jax.tree_util.tree_structure(params2) == jax.tree_util.tree_structure(params)
    assert all(x.dtype == jnp.dtype(param_dtype) for x in jax.tree_util.tree_leaves(params2))
    assert tree_equal(params, params2)


def test_transformers_reads_our_export(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(3))
    loader.save_hf(params, cfg, str(tmp_path), max_shard_bytes=30_000)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(llama.forward(params, jnp.asarray(tokens), config=cfg)[0])
    assert np.abs(ours - ref).max() <= 1e-4


def test_load_streams_into_target_sharding(tmp_path):
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(1))
    loader.save_hf(params, cfg, str(tmp_path))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    target = lambda c: sharding.tree_shardings(llama.param_axes(c), llama.param_shapes(c), mesh)  # noqa
    _, sharded = loader.load_hf(str(tmp_path), shardings=target)
    wq = sharded["layers"]["wq"]  # [L, D, H, Dh]: embed over fsdp, heads over tensor
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(wq.addressable_shards) == 8
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)
    assert tree_equal(params, sharded)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 6)))
    fwd = jax.jit(llama.forward, static_argnames="config")
    a = np.asarray(fwd(params, tokens, config=cfg)[0])
    b = np.asarray(fwd(sharded, tokens, config=cfg)[0])
    assert np.abs(a - b).max() <= 1e-5


def test_loading_keeps_one_copy_of_the_model(tmp_path):
    """Peak host memory of a load stays near the params' own size (on CPU the params live in host
    RAM) plus a few leaf blocks, far below the two copies that load-then-convert would need."""
    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_layers=12,
                      num_heads=8, num_kv_heads=4, head_dim=64)
    params = llama.init(cfg, jax.random.PRNGKey(0))
    loader.save_hf(params, cfg, str(tmp_path))
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    largest = max(x.nbytes for x in jax.tree_util.tree_leaves(params))
    script = textwrap.dedent(f"""
        import re, sys, jax
        sys.path.insert(0, {REPO!r})
        from models import loader
        def peak():  # VmHWM: this process's peak resident memory (ru_maxrss survives exec)
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
        jax.numpy.zeros(1).block_until_ready()
        before = peak()
        _, p = loader.load_hf(sys.argv[1])
        jax.block_until_ready(p)
        print(before, peak())
    """)
    # A fresh process, so that its peak comes from this load alone.
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, env={**os.environ, "XLA_FLAGS": ""}, check=True)
    before, after = map(int, out.stdout.split())
    grown = after - before
    assert grown >= 0.9 * total  # the params really are in host memory
    assert grown <= total + 3 * largest, (grown / total, largest / total)


def test_missing_or_corrupt_files_give_clear_errors(tmp_path):
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(0))
    with pytest.raises(CheckpointError, match="not a directory"):
        loader.load_hf(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no config.json"):
        loader.load_hf(str(tmp_path))
    loader.save_hf(params, cfg, str(tmp_path))
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        loader.load_hf(str(tmp_path))
    st.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="no header"):
        loader.load_hf(str(tmp_path))
    st.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors header"):
        SafetensorsFile(str(st))
    st.unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        loader.load_hf(str(tmp_path))


def test_config_weights_mismatch_names_the_tensor(tmp_path):
    cfg = tiny_config()
    loader.save_hf(llama.init(cfg, jax.random.PRNGKey(0)), cfg, str(tmp_path))
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight' has shape \(64, 32\)"):
        loader.load_hf(str(tmp_path))
    hf["intermediate_size"], hf["num_hidden_layers"] = 64, 3
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="lacks tensor 'model.layers.2"):
        loader.load_hf(str(tmp_path))


def test_index_pointing_at_missing_shard(tmp_path):
    cfg = tiny_config()
    loader.save_hf(llama.init(cfg, jax.random.PRNGKey(0)), cfg, str(tmp_path), max_shard_bytes=20_000)
    victim = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / victim)
    with pytest.raises(CheckpointError, match=f"{victim}: no such safetensors file"):
        loader.load_hf(str(tmp_path))
