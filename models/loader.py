"""Checkpoints <-> params: HF safetensors directories and GGUF files, streamed leaf by leaf.

Loading builds each param leaf with `jax.make_array_from_callback`: every device's block is read
straight from the file (only the rows that block needs), transposed, cast, and put on its device.
Host memory beyond the params themselves therefore peaks at about two copies of one device block of
one leaf, never at a second copy of the model (README, "Loading checkpoints", has the numbers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from models import llama
from models.config import LlamaConfig
from models.errors import CheckpointError
from models.safetensors_file import SafetensorsDir, write_dir


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How one param leaf comes from an HF tensor: HF axes split into `groups`, then `perm`."""

    name: str  # HF tensor name; `{i}` is the layer index for stacked leaves
    groups: tuple  # per HF axis, the sizes it splits into, e.g. ((H, Dh), (D,))
    perm: tuple  # our axis j is split-axis perm[j]

    @property
    def hf_shape(self) -> tuple:
        return tuple(int(np.prod(g)) for g in self.groups)


def _specs(c: LlamaConfig) -> dict:
    H, K, Dh, D, F, V = (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size,
                         c.intermediate_size, c.vocab_size)
    p = "model.layers.{i}."
    specs = {
        ("embed",): _Spec("model.embed_tokens.weight", ((V,), (D,)), (0, 1)),
        ("final_norm",): _Spec("model.norm.weight", ((D,),), (0,)),
        ("layers", "attn_norm"): _Spec(p + "input_layernorm.weight", ((D,),), (0,)),
        ("layers", "wq"): _Spec(p + "self_attn.q_proj.weight", ((H, Dh), (D,)), (2, 0, 1)),
        ("layers", "wk"): _Spec(p + "self_attn.k_proj.weight", ((K, Dh), (D,)), (2, 0, 1)),
        ("layers", "wv"): _Spec(p + "self_attn.v_proj.weight", ((K, Dh), (D,)), (2, 0, 1)),
        ("layers", "wo"): _Spec(p + "self_attn.o_proj.weight", ((D,), (H, Dh)), (1, 2, 0)),
        ("layers", "mlp_norm"): _Spec(p + "post_attention_layernorm.weight", ((D,),), (0,)),
        ("layers", "w_gate"): _Spec(p + "mlp.gate_proj.weight", ((F,), (D,)), (1, 0)),
        ("layers", "w_up"): _Spec(p + "mlp.up_proj.weight", ((F,), (D,)), (1, 0)),
        ("layers", "w_down"): _Spec(p + "mlp.down_proj.weight", ((D,), (F,)), (1, 0)),
    }
    if not c.tie_word_embeddings:
        specs[("lm_head",)] = _Spec("lm_head.weight", ((V,), (D,)), (1, 0))
    return specs


def _leaf(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _set_leaf(tree: dict, path: tuple, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _read_block(source, name: str, spec: _Spec, index: tuple) -> np.ndarray:
    """Our-layout block `index` (slices over our axes) of HF tensor `name`, reading only the
    HF rows/columns it covers."""
    dims = [d for g in spec.groups for d in g]
    ranges = [None] * len(dims)
    for j, s in enumerate(index):
        start, stop, step = s.indices(dims[spec.perm[j]])
        if step != 1:
            raise ValueError("strided blocks are not supported")
        ranges[spec.perm[j]] = (start, stop)
    hf_index, shape, post, k = [], [], [], 0
    for g in spec.groups:
        inner = int(np.prod(g[1:], dtype=np.int64))
        start, stop = ranges[k]
        hf_index.append(slice(start * inner, stop * inner))
        shape.append(stop - start)
        post.append(slice(None))
        for m in range(1, len(g)):
            shape.append(g[m])
            post.append(slice(*ranges[k + m]))
        k += len(g)
    block = np.asarray(source.get(name)[tuple(hf_index)]).reshape(shape)[tuple(post)]
    return np.transpose(block, spec.perm)


def check_source(source, config: LlamaConfig, where: str = "checkpoint") -> None:
    """Fails with one clear message if any tensor the config needs is missing or mis-shaped."""
    for path, spec in _specs(config).items():
        names = ([spec.name.format(i=i) for i in range(config.num_layers)] if path[0] == "layers"
                 else [spec.name])
        for name in names:
            if name not in source:
                raise CheckpointError(f"{where}: lacks tensor {name!r} that the config needs")
            shape = tuple(source.shape(name))
            if shape != spec.hf_shape:
                raise CheckpointError(f"{where}: tensor {name!r} has shape {shape}, but the config "
                                      f"({config.num_layers} layers, hidden {config.hidden_size}, "
                                      f"vocab {config.vocab_size}) needs {spec.hf_shape}")


def load_params(source, config: LlamaConfig, shardings: Optional[dict] = None,
                where: str = "checkpoint") -> dict:
    """Builds the params tree from an HF-named tensor source (SafetensorsDir or GGUFFile).

    shardings: a tree like `llama.param_shapes(config)` of `jax.sharding.Sharding`s (None: the
    default device). Each device's block is read and placed separately.
    """
    check_source(source, config, where)
    shapes = llama.param_shapes(config)
    dtype = np.dtype(config.jnp_param_dtype)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params: dict = {}
    for path, spec in _specs(config).items():
        shape = _leaf(shapes, path)
        sharding = _leaf(shardings, path) if shardings is not None else default
        layered = path[0] == "layers"

        def callback(index, spec=spec, layered=layered, shape=shape):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            if not layered:
                return _read_block(source, spec.name, spec, index).astype(dtype, copy=False)
            layers = range(*index[0].indices(shape[0]))
            return np.stack([_read_block(source, spec.name.format(i=i), spec, index[1:])
                             for i in layers]).astype(dtype, copy=False)

        _set_leaf(params, path, jax.make_array_from_callback(shape, sharding, callback))
    return params


def hf_tensors(params: dict, config: LlamaConfig, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, array in HF layout) one tensor at a time, fetching one layer at a time."""
    for path, spec in _specs(config).items():
        leaf = _leaf(params, path)
        inverse = tuple(np.argsort(spec.perm))
        items = ([(spec.name.format(i=i), leaf[i]) for i in range(config.num_layers)]
                 if path[0] == "layers" else [(spec.name, leaf)])
        for name, block in items:
            arr = np.asarray(jax.device_get(block))
            if dtype is not None:
                arr = arr.astype(dtype)
            yield name, np.transpose(arr, inverse).reshape(spec.hf_shape)


def save_hf(params: dict, config: LlamaConfig, path: str, *, tokenizer_dir: Optional[str] = None,
            max_shard_bytes: int = 2 << 30, dtype=None) -> None:
    """Writes an HF checkpoint directory (config.json + safetensors shards + index) that
    `transformers.LlamaForCausalLM.from_pretrained` reads; copies tokenizer files if given."""
    os.makedirs(path, exist_ok=True)
    out_dtype = np.dtype(dtype) if dtype is not None else None
    write_dir(path, hf_tensors(params, config, out_dtype), max_shard_bytes)
    hf_config = config.to_hf()
    if out_dtype is not None:
        hf_config["torch_dtype"] = "bfloat16" if out_dtype.name == "bfloat16" else out_dtype.name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_dir:
        for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja", "tokenizer.model", "generation_config.json"):
            src = os.path.join(tokenizer_dir, fname)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(path, fname))


def load_hf(path: str, shardings: Optional[Callable[[LlamaConfig], dict]] = None,
            **config_overrides: Any) -> tuple[LlamaConfig, dict]:
    """Config and params of an HF checkpoint directory. `shardings(config)` gives the target
    sharding tree (after the config is known)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (an HF checkpoint is a directory with "
                              "config.json and *.safetensors)")
    config = LlamaConfig.from_hf_file(path, **config_overrides)
    source = SafetensorsDir(path)
    return config, load_params(source, config, shardings(config) if shardings else None, path)


def load_gguf(path: str, shardings: Optional[Callable[[LlamaConfig], dict]] = None,
              **config_overrides: Any) -> tuple[LlamaConfig, dict]:
    """Config and dequantized params of a GGUF file."""
    from models.gguf_file import GGUFFile

    source = GGUFFile(path)
    config = source.config(**config_overrides)
    return config, load_params(source, config, shardings(config) if shardings else None, path)
