"""GGUF files (llama.cpp's format): model config, dequantized tensors in HF layout, tokenizer data.

Tensors are dequantized with the `gguf` package and renamed to their HF names, and the rows of Q and
K are put back in HF order: llama.cpp's converter interleaves the two rotary halves of each head
(`permute`), which this module undoes, so that the forward pass is the same for both sources.

The header (metadata and tensor table) is read by this module's own parser: the `gguf` package's
reader builds a numpy view per array element, which takes seconds for a 49k-token vocabulary.
"""

from __future__ import annotations

import collections
import os
import re
import struct
from typing import Any, NamedTuple, Optional

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


# GGUF metadata value types: scalars by their struct code, then strings (8) and arrays (9).
_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
                 12: "d"}
_STRING, _ARRAY = 8, 9
# Tensor types read as plain numbers; every other type is kept as its raw bytes per row.
_PLAIN_TENSORS = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
                  "I16": np.int16, "I32": np.int32, "I64": np.int64}


class _Tensor(NamedTuple):
    name: str
    tensor_type: Any   # gguf.GGMLQuantizationType
    shape: tuple       # GGUF order: the fastest-varying dimension first
    data: np.ndarray   # a read-only view of the file: numbers, or uint8 rows of quantized blocks


class _Cursor:
    """Reads GGUF's little-endian header fields from a byte buffer; running past the end raises
    ValueError."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, code: str):
        size = struct.calcsize(code)
        if self.pos + size > len(self.buf):
            raise ValueError(f"header ends at byte {len(self.buf)}, inside a field at byte {self.pos}")
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes at byte {self.pos} runs past the end")
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return text

    def value(self, kind: int):
        if kind in _SCALAR_CODES:
            return self.scalar(_SCALAR_CODES[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind} at byte {self.pos}")
        item, n = self.scalar("I"), self.scalar("Q")
        if item in _SCALAR_CODES and item != 7:   # numbers: one view, not n reads
            dtype = np.dtype("<" + _SCALAR_CODES[item])
            if self.pos + n * dtype.itemsize > len(self.buf):
                raise ValueError(f"an array of {n} numbers at byte {self.pos} runs past the end")
            out = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
            self.pos += n * dtype.itemsize
            return out
        return [self.value(item) for _ in range(n)]


def _read_gguf(path: str, gguf) -> tuple:
    """The metadata fields ({key: value}) and tensors ([_Tensor]) of a GGUF file (versions 2 and
    3, little-endian), the tensors as views of a read-only memory map."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm))
    if cur.scalar("I") != 0x46554747:   # b"GGUF"
        raise ValueError("no GGUF magic number")
    version = cur.scalar("I")
    if version not in (2, 3):
        endian = " (a big-endian file)" if version & 0xFFFF == 0 else ""
        raise ValueError(f"GGUF version {version}{endian} is not supported (2 or 3)")
    n_tensors, n_fields = cur.scalar("Q"), cur.scalar("Q")
    fields = {}
    for _ in range(n_fields):
        key = cur.string()
        fields[key] = cur.value(cur.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.scalar("Q") for _ in range(cur.scalar("I")))
        infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
    align = int(fields.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = []
    for name, dims, raw_type, offset in infos:
        qtype = gguf.GGMLQuantizationType(raw_type)
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed(dims))   # numpy order: the slowest dimension first
        if qtype.name in _PLAIN_TENSORS:
            dtype, count = np.dtype(_PLAIN_TENSORS[qtype.name]), int(np.prod(dims))
            nbytes = count * dtype.itemsize
        else:
            if shape[-1] % block:
                raise ValueError(f"tensor {name!r}: rows of {shape[-1]} are not whole blocks of {block}")
            shape = shape[:-1] + (shape[-1] // block * block_bytes,)
            dtype, count = np.dtype(np.uint8), int(np.prod(shape))
            nbytes = count
        at = start + offset
        if at + nbytes > mm.size:
            raise ValueError(f"tensor {name!r} ends at byte {at + nbytes}, past the file's "
                             f"{mm.size} bytes")
        data = np.frombuffer(mm, dtype, count, at).reshape(shape)
        tensors.append(_Tensor(name, qtype, dims, data))
    return fields, tensors


class GGUFFile:
    """A GGUF checkpoint, presented as HF-named tensors in HF layout (`get`, `shape`, `keys`)."""

    cache_bytes = 1 << 30

    def __init__(self, path: str):
        import gguf  # imported here: only GGUF users pay for it

        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such GGUF file")
        try:
            self._fields, tensors = _read_gguf(path, gguf)
            self._tensors = {t.name: t for t in tensors}
            if len(self._tensors) != len(tensors):
                raise ValueError("a tensor name occurs twice")
        except Exception as e:  # truncated or corrupt files fail in many ways (bad types, sizes)
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
        """A metadata value: a number, a string, or a list of them; `default` where it is absent."""
        return self._fields.get(key, default)

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
