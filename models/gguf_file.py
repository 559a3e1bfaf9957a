"""GGUF files (llama.cpp's format): model config, dequantized tensors in HF layout, tokenizer data.

Tensors are dequantized with the `gguf` package and renamed to their HF names, and the rows of Q and
K are put back in HF order: llama.cpp's converter interleaves the two rotary halves of each head
(`permute`), which this module undoes, so that the forward pass is the same for both sources.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any, Optional

import numpy as np

from models.config import LlamaConfig, RopeScaling
from models.errors import CheckpointError

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> Optional[str]:
    """The HF name of a GGUF tensor name, or None for tensors without one (e.g. rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation: per head, rows (Dh/2, 2) -> (2, Dh/2)."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


class GGUFFile:
    """A GGUF checkpoint, presented as HF-named tensors in HF layout (`get`, `shape`, `keys`)."""

    cache_bytes = 1 << 30

    def __init__(self, path: str):
        import gguf  # imported here: only GGUF users pay for it

        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such GGUF file")
        try:
            self._reader = gguf.GGUFReader(path, "r")
            self._tensors = {t.name: t for t in self._reader.tensors}
        except Exception as e:  # the gguf reader raises many types on truncated/corrupt files
            raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self._gguf = gguf
        arch = self.field("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
        self._by_hf = {}
        for name in self._tensors:
            hn = hf_name(name)
            if hn is not None:
                self._by_hf[hn] = name
        # Dequantized tensors, most recent last: a sharded load asks for each tensor once per
        # device, so recent ones are kept up to a byte budget instead of being recomputed.
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def field(self, key: str, default: Any = None) -> Any:
        f = self._reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise CheckpointError(f"{self.path}: unreadable GGUF field {key!r} ({e})") from None

    def _required(self, key: str) -> Any:
        value = self.field(key)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata lacks {key!r}")
        return value

    def config(self, **overrides: Any) -> LlamaConfig:
        """The model config from the GGUF metadata."""
        heads = int(self._required("llama.attention.head_count"))
        hidden = int(self._required("llama.embedding_length"))
        tokens = self.field("tokenizer.ggml.tokens")
        vocab = self.field("llama.vocab_size") or (len(tokens) if tokens else None)
        if vocab is None:
            vocab = int(self._tensors["token_embd.weight"].shape[-1])
        eos = self.field("tokenizer.ggml.eos_token_id")
        eot = self.field("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None))
        kwargs = dict(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._required("llama.feed_forward_length")),
            num_layers=int(self._required("llama.block_count")),
            num_heads=heads,
            num_kv_heads=int(self.field("llama.attention.head_count_kv") or heads),
            head_dim=int(self.field("llama.attention.key_length")
                         or self.field("llama.rope.dimension_count") or hidden // heads),
            rope_theta=float(self.field("llama.rope.freq_base", 10000.0)),
            rms_norm_eps=float(self.field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(self.field("llama.context_length", 8192)),
            tie_word_embeddings="output.weight" not in self._tensors,
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos_ids,
            rope_scaling=self._rope_scaling(),
        )
        kwargs.update(overrides)
        return LlamaConfig(**kwargs)

    def _rope_scaling(self) -> Optional[RopeScaling]:
        """Llama 3.x GGUFs store the scaled frequencies as factors (`rope_freqs.weight`); they are
        matched back to the llama3 scaling parameters, which are the same for every release."""
        if "rope_freqs.weight" not in self._tensors:
            return None
        factors = np.asarray(self._dequantize("rope_freqs.weight"), np.float64).reshape(-1)
        ctx = int(self.field("llama.rope.scaling.original_context_length", 8192))
        scaling = RopeScaling(factor=float(factors.max()), low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=ctx)
        from models.llama import rope_frequencies  # local: llama imports config only

        base = LlamaConfig(vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1,
                           num_heads=1, num_kv_heads=1, head_dim=2 * factors.size,
                           rope_theta=float(self.field("llama.rope.freq_base", 10000.0)))
        plain = rope_frequencies(base)
        scaled = rope_frequencies(base.replace(rope_scaling=scaling))
        if not np.allclose(plain / scaled, factors, rtol=1e-3):
            raise CheckpointError(f"{self.path}: rope_freqs do not follow llama3 scaling")
        return scaling

    def _dequantize(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        try:
            return self._gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} "
                                  f"({type(e).__name__}: {e})") from None

    # --- HF-named tensor source -----------------------------------------------------------
    def keys(self):
        return self._by_hf.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._by_hf

    def shape(self, name: str) -> tuple:
        return tuple(int(d) for d in reversed(self._tensors[self._by_hf[name]].shape))

    def get(self, name: str) -> np.ndarray:
        """The f32 tensor in HF layout (dequantized; recent ones are cached)."""
        if name not in self._by_hf:
            raise CheckpointError(f"{self.path}: GGUF lacks tensor for {name!r}")
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        w = self._dequantize(self._by_hf[name]).reshape(self.shape(name))
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, int(self._required("llama.attention.head_count")))
        elif name.endswith("k_proj.weight"):
            heads = self._required("llama.attention.head_count")
            w = unpermute_rows(w, int(self.field("llama.attention.head_count_kv") or heads))
        self._cache[name] = w
        while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return w
