import jax
import pytest
from jax.sharding import PartitionSpec as P

from models import llama
from models.config import preset
from playpen_jax import sharding


def test_mesh_shapes():
    mesh = sharding.make_mesh({"fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="needs 6 devices, but there are 8"):
        sharding.make_mesh({"data": 3, "tensor": 2})
    with pytest.raises(ValueError, match="unknown axis 'model'"):
        sharding.make_mesh({"model": 8})


def test_rules_map_llama_8b_params():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    cfg = preset("llama-3.1-8b")
    specs = jax.tree_util.tree_map(
        lambda ax, shape: sharding.logical_to_spec(ax, shape, mesh), llama.param_axes(cfg),
        llama.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    assert specs["layers"]["wq"] == P(None, "fsdp", "tensor", None)
    assert specs["layers"]["w_down"] == P(None, "tensor", "fsdp")
    assert specs["embed"] == P("tensor", "fsdp")
    assert specs["final_norm"] == P(None)


def test_indivisible_dims_stay_replicated():
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    # SmolLM2 has 3 KV heads: not divisible by 4
    assert sharding.logical_to_spec(("embed", "kv_heads"), (576, 3), mesh) == P(None, None)
    assert sharding.logical_to_spec(("batch", "seq"), (8, 16), mesh) == P("data", None)
    with pytest.raises(ValueError, match="no entry for logical axis 'experts'"):
        sharding.logical_to_spec(("experts",), (8,), mesh)
