"""Model configuration: one frozen dataclass for the Llama family, readable from HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional

import jax.numpy as jnp

from models.errors import ConfigError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3.x, SmolLM, SmolLM2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = ()
    param_dtype: str = "float32"  # storage dtype of the weights
    dtype: str = "float32"  # compute dtype of activations and matmuls; logits are always f32
    # Inputs of the weight matmuls (projections, LM head) when narrower than `dtype`, e.g. bfloat16
    # under float32 activations: both operands are cast to it, products accumulate in float32 and
    # the result is `dtype` again (norms, rope, softmax, residuals stay in `dtype`). None: `dtype`.
    matmul_dtype: Optional[str] = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model config: num_heads={self.num_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        for name in ("param_dtype", "dtype", "matmul_dtype"):
            if name == "matmul_dtype" and self.matmul_dtype is None:
                continue
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"model config: {name} must be one of {sorted(_DTYPES)}, "
                                  f"got {getattr(self, name)!r}")
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0
                   for x in (self.rope_theta, self.rms_norm_eps)):
            raise ConfigError("model config: rope_theta and rms_norm_eps must be positive finite numbers, "
                              f"got {self.rope_theta!r} and {self.rms_norm_eps!r}")

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def jnp_matmul_dtype(self):
        return _DTYPES[self.matmul_dtype or self.dtype]

    @property
    def mixed_matmuls(self) -> bool:
        """Whether the weight matmuls run in another dtype than the activations."""
        return self.jnp_matmul_dtype != self.jnp_dtype

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Total parameter count (embedding counted once when tied)."""
        d, f, n_layers = self.hidden_size, self.intermediate_size, self.num_layers
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + n_layers * per_layer + d + head

    # --- HF config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> "LlamaConfig":
        """Builds a config from the dict of an HF `config.json` (LlamaForCausalLM family)."""
        if not isinstance(hf, Mapping):
            raise ConfigError(f"model config: config.json holds a {type(hf).__name__}, not an object")
        try:
            return cls._from_hf(hf, **overrides)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            what = f"lacks the key {e.args[0]!r}" if isinstance(e, KeyError) else f"has a bad value ({e})"
            raise ConfigError(f"model config: config.json {what}") from None

    @classmethod
    def _from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> "LlamaConfig":
        arch = hf.get("model_type")
        if arch not in (None, "llama", "mistral"):
            raise ConfigError(f"model config: model_type {arch!r} is not a Llama-family model")
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            kwargs = dict(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
            )
        except KeyError as e:
            raise ConfigError(f"model config: config.json lacks the key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model config: bad value in config.json: {e}") from None
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError("model config: attention_bias/mlp_bias models are not supported")
        scaling = hf.get("rope_scaling")
        rope_scaling = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                )
            elif kind != "default":
                raise ConfigError(f"model config: rope_scaling type {kind!r} is not supported "
                                  "(supported: llama3)")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        bos = hf.get("bos_token_id")
        if not all(_is_int(t) for t in eos_ids) or not (bos is None or _is_int(bos)):
            raise ConfigError(f"model config: bos_token_id / eos_token_id must be token ids, got {bos!r} / "
                              f"{eos!r}")
        kwargs.update(
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_hf_file(cls, path: str, **overrides: Any) -> "LlamaConfig":
        """Reads an HF `config.json` file (or the one inside a checkpoint directory)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"model config: no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"model config: {path} is not valid JSON ({e})") from None
        except OSError as e:
            raise ConfigError(f"model config: cannot read {path} ({e.strerror or e})") from None
        return cls.from_hf(hf, **overrides)

    def to_hf(self) -> dict:
        """The HF `config.json` dict that describes this model (LlamaForCausalLM)."""
        hf = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.param_dtype,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            hf["eos_token_id"] = (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                                  else self.eos_token_ids[0])
        return hf


_LLAMA3_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)

# Shapes of published checkpoints (from their config.json files).
PRESETS = {
    "llama-3.1-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "llama-3.2-1b": LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING,
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009)),
    "llama-3.2-3b": LlamaConfig(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING,
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009)),
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
}
PRESETS["llama-3.1-8b-instruct"] = PRESETS["llama-3.1-8b"]
PRESETS["llama-3.2-1b-instruct"] = PRESETS["llama-3.2-1b"]
PRESETS["llama-3.2-3b-instruct"] = PRESETS["llama-3.2-3b"]
PRESETS["smollm2-135m-instruct"] = PRESETS["smollm2-135m"]


# x86 feature flags (as /proc/cpuinfo names them) of bf16 matmul units
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_matmul_dtype(value: Optional[str], backend: Optional[str] = None,
                         flags: Optional[frozenset] = None) -> Optional[str]:
    """The weight matmuls' dtype that a run config's `model.matmul_dtype` asks for: "" or None
    give None (the compute dtype); "auto" gives "bfloat16" on a CPU with bf16 matmul units (AVX512-BF16
    or AMX) and None elsewhere (on AVX2 alone, bf16 matmuls made a train step 1.25x slower, and
    accelerators take their precision from `dtype`); a dtype name is returned as given.
    backend / flags: default jax's backend and the host's /proc/cpuinfo flags."""
    if not value:
        return None
    if value != "auto":
        return value
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return None
    if flags is None:
        from models.sampler import cpu_flags

        flags = cpu_flags()
    return "bfloat16" if flags & BF16_CPU_FLAGS else None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def preset(name: str, **overrides: Any) -> LlamaConfig:
    """A published model's shape by name, e.g. `preset("llama-3.1-8b", param_dtype="bfloat16")`."""
    if name not in PRESETS:
        raise ConfigError(f"model config: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides)
