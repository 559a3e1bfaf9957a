"""LoRA adapters (Hu et al. 2021) as pure functions of (frozen base params, adapter params).

A target projection W gets two small matrices A (its input axes x rank) and B (rank x its output
axes); the layer computes  x W + (alpha / rank) * dropout(x) A B  without ever forming W + s A B, so
training differentiates only A and B (the optimizer holds state for them alone), and sampling uses
the base weights as they are held: float, or quantized for QLoRA (`models.quant`), dequantized
inside the forward. A is drawn uniform in +-1/sqrt(fan_in), B starts at zero: the adapted model
starts as the base.

adapters = {"wq": {"a": [L, D, r], "b": [L, r, H, Dh]}, "wo": {"a": [L, H, Dh, r], "b": [L, r, D]},
            ...}                    (one entry per target, stacked over layers like the base)
`attach(base, adapters, spec)` gives the params tree `models.llama.forward` runs: the base with a
"lora" entry in `layers` (the adapters, the scale and optional dropout keys). `merge` folds the
adapters into plain float weights for an HF export; `save_peft` / `load_peft` write and read the
PEFT layout (adapter_config.json + adapter_model.safetensors), so `peft.PeftModel.from_pretrained`
loads the adapters onto the transformers model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import quant
from models.config import LlamaConfig
from models.errors import CheckpointError

# our projection name -> the HF module name (PEFT's target_modules) and its HF parent module
TARGETS = {"wq": ("q_proj", "self_attn"), "wk": ("k_proj", "self_attn"), "wv": ("v_proj", "self_attn"),
           "wo": ("o_proj", "self_attn"), "w_gate": ("gate_proj", "mlp"), "w_up": ("up_proj", "mlp"),
           "w_down": ("down_proj", "mlp")}
_BY_HF = {hf: ours for ours, (hf, _) in TARGETS.items()}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple          # our names, in TARGETS order
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)

    @classmethod
    def parse(cls, rank: int, alpha: float, targets: str | Sequence[str], dropout: float = 0.0) -> "LoraSpec":
        """targets: "all", or HF module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
        down_proj) or ours (wq, ..., w_down), comma-separated or as a list."""
        names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
        names = [t for t in names if t]
        if names == ["all"]:
            names = list(TARGETS)
        bad = [t for t in names if t not in TARGETS and t not in _BY_HF]
        if bad or not names:
            raise ValueError(f"lora targets {bad or names!r}: expected 'all' or some of "
                             f"{', '.join(hf for hf, _ in TARGETS.values())}")
        ours = {_BY_HF.get(t, t) for t in names}
        if int(rank) < 1 or not float(alpha) > 0 or not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"lora: need rank >= 1, alpha > 0, 0 <= dropout < 1; got {rank}, {alpha}, "
                             f"{dropout}")
        return cls(int(rank), float(alpha), tuple(t for t in TARGETS if t in ours), float(dropout))


def _io_shapes(config: LlamaConfig) -> dict:
    """Per target: (input axes' sizes, output axes' sizes, input logical axes, output logical axes)."""
    c = config
    D, H, K, Dh, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    return {
        "wq": ((D,), (H, Dh), ("embed",), ("heads", "head_dim")),
        "wk": ((D,), (K, Dh), ("embed",), ("kv_heads", "head_dim")),
        "wv": ((D,), (K, Dh), ("embed",), ("kv_heads", "head_dim")),
        "wo": ((H, Dh), (D,), ("heads", "head_dim"), ("embed",)),
        "w_gate": ((D,), (F,), ("embed",), ("mlp",)),
        "w_up": ((D,), (F,), ("embed",), ("mlp",)),
        "w_down": ((F,), (D,), ("mlp",), ("embed",)),
    }


def param_shapes(config: LlamaConfig, spec: LoraSpec) -> dict:
    io, L, r = _io_shapes(config), config.num_layers, spec.rank
    return {t: {"a": (L, *io[t][0], r), "b": (L, r, *io[t][1])} for t in spec.targets}


def param_axes(config: LlamaConfig, spec: LoraSpec) -> dict:
    """Logical axes of the adapter leaves: the base weight's input / output axes, rank unsplit."""
    io = _io_shapes(config)
    return {t: {"a": ("layers", *io[t][2], None), "b": ("layers", None, *io[t][3])} for t in spec.targets}


def init(config: LlamaConfig, spec: LoraSpec, rng: jax.Array, dtype=jnp.float32) -> dict:
    """A uniform in +-1/sqrt(fan_in) (PEFT's default bound), B zero."""
    shapes = param_shapes(config, spec)
    out = {}
    for k, t in zip(jax.random.split(rng, len(spec.targets)), spec.targets):
        a_shape = shapes[t]["a"]
        bound = 1.0 / math.sqrt(int(np.prod(a_shape[1:-1])))
        out[t] = {"a": jax.random.uniform(k, a_shape, jnp.float32, -bound, bound).astype(dtype),
                  "b": jnp.zeros(shapes[t]["b"], dtype)}
    return out


def attach(base: dict, adapters: dict, spec: LoraSpec, rng: Optional[jax.Array] = None) -> dict:
    """The params tree of the adapted model, for `llama.forward` (base leaves are not copied).
    rng: dropout keys for training (with spec.dropout > 0); None: no dropout (sampling, eval)."""
    layers = base["layers"]
    stacked = not isinstance(layers, (list, tuple))
    n = (jax.tree_util.tree_leaves(layers)[0].shape[0] if stacked else len(layers))
    lora = {t: adapters[t] for t in spec.targets}
    lora["scale"] = jnp.full((n,), spec.scale, jnp.float32)
    if rng is not None and spec.dropout > 0:
        lora["keep"] = jnp.full((n,), 1.0 - spec.dropout, jnp.float32)
        lora["key"] = jax.random.split(rng, n)
    if stacked:
        return {**base, "layers": {**layers, "lora": lora}}
    per = [jax.tree_util.tree_map(lambda x, i=i: x[i], lora) for i in range(n)]
    return {**base, "layers": [{**lp, "lora": lo} for lp, lo in zip(layers, per)]}


def _mixed_einsum_fwd(spec_str, x, w, matmul_dtype):
    return mixed_einsum(spec_str, x, w, matmul_dtype), (x, w)


def _mixed_einsum_bwd(spec_str, matmul_dtype, res, g):
    x, w = res
    ins, ys = spec_str.split("->")
    xs, ws = ins.split(",")
    g = g.astype(matmul_dtype)
    dx = jnp.einsum(f"{ys},{ws}->{xs}", g, w.astype(matmul_dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{xs},{ys}->{ws}", x.astype(matmul_dtype), g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def mixed_einsum(spec_str: str, x: jax.Array, w: jax.Array, matmul_dtype) -> jax.Array:
    """einsum(spec_str, x, w) on operands cast to `matmul_dtype`, accumulated and returned in f32,
    and so are both products of its gradient (the cotangent cast to `matmul_dtype`): autodiff of
    the plain form would multiply the f32 cotangent by the narrow operand, a slow mixed-type matmul.
    The gradients come back in x's and w's own dtypes. Every index of spec_str must appear in
    exactly two of its three terms (true of the model's projections)."""
    return jnp.einsum(spec_str, x.astype(matmul_dtype), w.astype(matmul_dtype),
                      preferred_element_type=jnp.float32)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def project(spec_str: str, x: jax.Array, w, lora: Optional[dict], name: str, dtype,
            matmul_dtype=None) -> jax.Array:
    """einsum(spec_str, x, W) of one projection, W float or quantized, plus its adapter's
    scale * (dropout(x) A) B when `lora` (a layer's "lora" entry) has one for `name`.

    matmul_dtype (narrower than dtype): x and W enter the product in it, accumulated in float32,
    and the result is `dtype` (`LlamaConfig.matmul_dtype`); the adapter's path stays in dtype."""
    if matmul_dtype is None:
        w = quant.dequantize(w, dtype) if quant.is_quantized(w) else w.astype(dtype)
        y = jnp.einsum(spec_str, x, w)
    else:
        w = quant.dequantize(w, matmul_dtype) if quant.is_quantized(w) else w
        y = mixed_einsum(spec_str, x, w, matmul_dtype).astype(dtype)
    if lora is None or name not in lora:
        return y
    ins, out = spec_str.split("->")
    xs, ws = ins.split(",")
    contracted = "".join(ch for ch in ws if ch in xs)
    kept = "".join(ch for ch in ws if ch not in xs)
    batch = "".join(ch for ch in xs if ch not in ws)
    if "key" in lora:   # dropout on the adapter's input (as PEFT does)
        key = jax.random.fold_in(lora["key"], list(TARGETS).index(name))
        keep = lora["keep"].astype(x.dtype)
        x = jnp.where(jax.random.bernoulli(key, lora["keep"], x.shape), x / keep, 0).astype(x.dtype)
    a, b = lora[name]["a"].astype(dtype), lora[name]["b"].astype(dtype)
    u = jnp.einsum(f"{xs},{contracted}R->{batch}R", x, a)
    delta = jnp.einsum(f"{batch}R,R{kept}->{out}", u, b)
    return y + (lora["scale"].astype(dtype) * delta).astype(y.dtype)


def adapted_loss(loss_fn, spec: LoraSpec):
    """loss_fn(params, mb, extra) as a function of the adapters: (adapters, mb, extra) with the
    frozen base in extra["lora_base"] and, for dropout, a key in extra["rng"]."""
    def loss(adapters, mb, extra):
        return loss_fn(attach(extra["lora_base"], adapters, spec, rng=extra.get("rng")), mb, extra)

    return loss


def merge(base: dict, adapters: dict, spec: LoraSpec, dtype=None) -> dict:
    """Plain params with W + scale * A B in every target (quantized base weights dequantized first):
    what an HF export of the adapted model holds. dtype: of the merged weights (default: float32)."""
    dtype = dtype or jnp.float32
    base = quant.dequantize_params(base, dtype)
    layers = dict(base["layers"])
    for t in spec.targets:
        a, b = adapters[t]["a"].astype(jnp.float32), adapters[t]["b"].astype(jnp.float32)
        delta = _outer(a, b)
        layers[t] = (layers[t].astype(jnp.float32) + spec.scale * delta).astype(dtype)
    return {**base, "layers": layers}


def _outer(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per layer a [L, in..., r] x b [L, r, out...] -> [L, in..., out...]."""
    L, r = a.shape[0], a.shape[-1]
    a2 = a.reshape(L, -1, r)
    b2 = b.reshape(L, r, -1)
    return jnp.einsum("lir,lro->lio", a2, b2).reshape(a.shape[:-1] + b.shape[2:])


# ----- the PEFT layout ----------------------------------------------------------------------------

def _peft_name(i: int, target: str, which: str) -> str:
    hf, parent = TARGETS[target]
    return f"base_model.model.model.layers.{i}.{parent}.{hf}.lora_{which}.weight"


def save_peft(path: str, adapters: dict, spec: LoraSpec, config: LlamaConfig,
              base_model: str = "") -> None:
    """Writes adapter_config.json and adapter_model.safetensors (float32) in PEFT's layout:
    lora_A [r, in_features], lora_B [out_features, r] per layer and target."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for t in spec.targets:
        a = np.asarray(jax.device_get(adapters[t]["a"]), np.float32)
        b = np.asarray(jax.device_get(adapters[t]["b"]), np.float32)
        L, r = a.shape[0], spec.rank
        for i in range(L):
            tensors[_peft_name(i, t, "A")] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            tensors[_peft_name(i, t, "B")] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
           "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "bias": "none",
           "target_modules": [TARGETS[t][0] for t in spec.targets], "fan_in_fan_out": False,
           "init_lora_weights": True, "use_rslora": False, "use_dora": False, "inference_mode": True,
           "modules_to_save": None, "layers_to_transform": None}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def load_peft(path: str, config: LlamaConfig) -> tuple[dict, LoraSpec]:
    """Reads a PEFT LoRA directory written by `save_peft` or by peft for a Llama model."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    cfg_path = os.path.join(path, "adapter_config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
        if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora"):
            raise ValueError(f"not a plain LoRA adapter (peft_type {cfg.get('peft_type')!r})")
        targets = cfg["target_modules"]
        spec = LoraSpec.parse(int(cfg["r"]), float(cfg["lora_alpha"]),
                              targets if isinstance(targets, list) else str(targets),
                              float(cfg.get("lora_dropout") or 0.0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no adapter_config.json (not a PEFT adapter directory)") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: malformed LoRA config ({e})") from None
    try:
        tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot read adapter_model.safetensors ({e})") from None
    shapes = param_shapes(config, spec)
    out = {}
    for t in spec.targets:
        a_shape, b_shape = shapes[t]["a"], shapes[t]["b"]
        a, b = [], []
        want = {"A": (spec.rank, int(np.prod(a_shape[1:-1]))), "B": (int(np.prod(b_shape[2:])), spec.rank)}
        for i in range(config.num_layers):
            for which, dest in (("A", a), ("B", b)):
                name = _peft_name(i, t, which)
                x = tensors.get(name)
                if x is None:
                    raise CheckpointError(f"{path}: adapter lacks tensor {name!r}")
                if tuple(x.shape) != want[which]:
                    raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(x.shape)}, the model "
                                          f"needs {want[which]}")
                dest.append(np.asarray(x, np.float32))
        out[t] = {"a": jnp.asarray(np.stack([x.T.reshape(a_shape[1:]) for x in a])),
                  "b": jnp.asarray(np.stack([x.T.reshape(b_shape[1:]) for x in b]))}
    return out, spec
