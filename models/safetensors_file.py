"""The safetensors format: lazy reads of tensor row blocks, and sharded writes.

A file is an 8-byte little-endian header length N, N bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the raw
little-endian tensor bytes, offsets counted from the end of the header.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from models.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One `.safetensors` file; its header is checked against the file size on open."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                          f"(header length {n}, file size {size})")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such safetensors file") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries = {}
        for name, e in header.items():
            try:
                dtype = DTYPES[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: bad header entry for tensor {name!r}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape "
                                      f"{shape} {e['dtype']}")
            if self._start + end > size:
                raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte "
                                      f"{self._start + end} of a {size}-byte file")
            self._entries[name] = (dtype, shape, begin)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple:
        return self._entries[name][1]

    def get(self, name: str) -> "LazyTensor":
        """A lazy view: indexing it reads only the rows it needs from the file."""
        dtype, shape, begin = self._entries[name]
        return LazyTensor(self.path, self._start + begin, dtype, shape)


class LazyTensor:
    """A tensor on disk. `t[rows, ...]` reads the rows' bytes with one pread (no memory map, so
    nothing stays resident after the block is dropped); `np.asarray(t)` reads it all."""

    def __init__(self, path: str, offset: int, dtype: np.dtype, shape: tuple):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, shape
        self.ndim = len(shape)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if not self.shape:
            return self._read(0, self.dtype.itemsize).reshape(())[index]
        first = index[0] if index else slice(None)
        if isinstance(first, int):
            first = slice(first, first + 1) if first >= 0 else slice(first, first + 1 or None)
            squeeze = True
        else:
            squeeze = False
        start, stop, step = first.indices(self.shape[0])
        if step != 1:
            raise ValueError("LazyTensor reads row ranges with step 1 only")
        row = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        block = self._read(start * row, max(stop - start, 0) * row)
        block = block.reshape((max(stop - start, 0),) + tuple(self.shape[1:]))
        rest = block[(slice(None),) + tuple(index[1:])]
        return rest[0] if squeeze else rest

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self[()] if not self.shape else self[:])
        return arr if dtype is None else arr.astype(dtype)

    def _read(self, begin: int, nbytes: int) -> np.ndarray:
        buf = np.empty(nbytes, np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [memoryview(buf)], self.offset + begin) if nbytes else 0
        finally:
            os.close(fd)
        if got != nbytes:
            raise CheckpointError(f"{self.path}: truncated while reading (wanted {nbytes} bytes "
                                  f"at {self.offset + begin}, got {got})")
        return buf.view(self.dtype)


def write_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] = None):
    """Writes one safetensors file (to a temporary name first, so a crash leaves no half file)."""
    header, offset = {}, 0
    arrays = {}
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {arr.dtype} to safetensors")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        arrays[name] = arr
        offset += arr.nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays.values():
            f.write(arr.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)


class SafetensorsDir:
    """All tensors of an HF checkpoint directory: one file, or shards listed in an index."""

    def __init__(self, path: str):
        index_path = os.path.join(path, "model.safetensors.index.json")
        self.files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_path}: not a valid safetensors index "
                                      "(needs a 'weight_map')") from None
            for name, fname in weight_map.items():
                if fname not in self.files:
                    self.files[fname] = SafetensorsFile(os.path.join(path, fname))
                self._where[name] = fname
            for fname, sf in self.files.items():
                missing = [n for n, f in self._where.items() if f == fname and n not in sf._entries]
                if missing:
                    raise CheckpointError(f"{os.path.join(path, fname)}: lacks tensor {missing[0]!r} "
                                          "that the index places there")
        else:
            names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            if not names:
                raise CheckpointError(f"{path}: no *.safetensors files and no "
                                      "model.safetensors.index.json")
            for fname in names:
                sf = SafetensorsFile(os.path.join(path, fname))
                self.files[fname] = sf
                for name in sf.keys():
                    self._where[name] = fname

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def shape(self, name: str) -> tuple:
        return self.files[self._where[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        return self.files[self._where[name]].get(name)


def write_dir(path: str, tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int) -> list[str]:
    """Writes (name, array) pairs into shards of at most `max_shard_bytes` (one file if they fit),
    with `model.safetensors.index.json` when there is more than one. Holds one shard in memory."""
    os.makedirs(path, exist_ok=True)
    shards, current, current_bytes, weight_map, total = [], {}, 0, {}, 0

    def flush():
        nonlocal current, current_bytes
        if current:
            tmp_name = f"shard-{len(shards):05d}.safetensors"
            write_file(os.path.join(path, tmp_name), current)
            shards.append((tmp_name, list(current)))
            current, current_bytes = {}, 0

    for name, arr in tensors:
        arr = np.asarray(arr)
        if current and current_bytes + arr.nbytes > max_shard_bytes:
            flush()
        current[name] = arr
        current_bytes += arr.nbytes
        total += arr.nbytes
    flush()
    n = len(shards)
    files = []
    for i, (tmp_name, names) in enumerate(shards):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(path, tmp_name), os.path.join(path, final))
        files.append(final)
        for name in names:
            weight_map[name] = final
    index_path = os.path.join(path, "model.safetensors.index.json")
    if n > 1:
        with open(index_path, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    elif os.path.exists(index_path):
        os.remove(index_path)
    return files
