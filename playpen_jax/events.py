"""TensorBoard event files, written directly: no TensorFlow, no protobuf runtime.

An event file is a sequence of records, each framed as TFRecord frames them:

    uint64 length | uint32 masked CRC-32C of the length bytes | data | uint32 masked CRC-32C of data

(little-endian; the mask rotates the CRC right by 15 bits and adds 0xa282ead8). Each record's data
is one serialized `tensorflow.Event` protocol buffer. Only the few messages a training run needs are
encoded here, by hand, in the protobuf wire format:

    Event        wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
                 summary = 5 (Summary), session_log = 7 (SessionLog)
    Summary      value = 1 (repeated Summary.Value)
    Value        tag = 1, simple_value = 2 (float), tensor = 8 (TensorProto), metadata = 9
    Metadata     plugin_data = 1 (PluginData: plugin_name = 1, content = 2)
    TensorProto  dtype = 1 (DT_STRING = 7), tensor_shape = 2 (dim = 2: size = 1), string_val = 8
    SessionLog   status = 1 (START = 1)

TensorBoard reads the files of a directory in name order; a run that resumes writes a new file that
starts with a SessionLog START at the resumed step, which makes TensorBoard drop the events of that
step and later ones from the files before it.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from typing import Optional

FILE_VERSION = "brain.Event:2"
_INVALID_TAG = re.compile(r"[^-/\w.]")


def _crc32c_table() -> tuple:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord: the length, its masked CRC, the data and its masked CRC."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))


# --- protobuf wire format --------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64   # int64 fields: two's complement in ten bytes
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(int(value))


def _bytes_field(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def _double_field(field: int, value: float) -> bytes:
    return _key(field, 1) + struct.pack("<d", value)


def _float_field(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


def clean_tag(tag: str) -> str:
    """TensorBoard's tag rule: characters other than letters, digits, `_`, `-`, `.` and `/` become
    `_`, and leading slashes go."""
    return _INVALID_TAG.sub("_", tag).lstrip("/")


def scalar_value(tag: str, value: float) -> bytes:
    """A Summary.Value holding one float."""
    return _bytes_field(1, clean_tag(tag).encode()) + _float_field(2, float(value))


def text_value(tag: str, text: str) -> bytes:
    """A Summary.Value that TensorBoard's text plugin shows (as Markdown) under `{tag}/text_summary`."""
    metadata = _bytes_field(1, _bytes_field(1, b"text") + _bytes_field(2, b""))
    tensor = (_int_field(1, 7) + _bytes_field(2, _bytes_field(2, _int_field(1, 1)))
              + _bytes_field(8, text.encode("utf-8")))
    return (_bytes_field(1, clean_tag(tag + "/text_summary").encode()) + _bytes_field(8, tensor)
            + _bytes_field(9, metadata))


def event(step: int, *, wall_time: Optional[float] = None, values: tuple = (),
          file_version: Optional[str] = None, session_start: bool = False) -> bytes:
    """A serialized Event: a summary of `values` (Summary.Value bytes), the file version, or a
    SessionLog START."""
    out = _double_field(1, time.time() if wall_time is None else wall_time) + _int_field(2, step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if values:
        out += _bytes_field(5, b"".join(_bytes_field(1, v) for v in values))
    if session_start:
        out += _bytes_field(7, _int_field(1, 1))
    return out


class EventFileWriter:
    """Appends events to a new file `events.out.tfevents.<seconds>.<host><suffix>` in `logdir`.

    purge_step: the file starts with a SessionLog START at this step, so that TensorBoard hides the
    events at this step and later ones in the directory's earlier files (a resumed run). Each call
    that adds events hands them to the OS at once, so a running TensorBoard sees them.
    """

    def __init__(self, logdir: str, *, filename_suffix: str = "", purge_step: Optional[int] = None):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}{filename_suffix}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        step = 0 if purge_step is None else int(purge_step)
        self._write([event(step, file_version=FILE_VERSION)]
                    + ([event(step, session_start=True)] if purge_step is not None else []))

    def _write(self, events: list) -> None:
        self._file.write(b"".join(frame(e) for e in events))
        self._file.flush()

    def add_scalars(self, step: int, scalars: list) -> None:
        """One event per (tag, value), all at `step`."""
        now = time.time()
        self._write([event(step, wall_time=now, values=(scalar_value(tag, value),))
                     for tag, value in scalars])

    def add_text(self, step: int, tag: str, text: str) -> None:
        self._write([event(step, values=(text_value(tag, text),))])

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()
