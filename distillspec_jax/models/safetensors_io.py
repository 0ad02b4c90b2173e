"""Reading and writing the safetensors format with NumPy memory maps (bfloat16 included).

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and byte range, then the raw little-endian bytes. It holds no code, which is why it is
the only weight format this project loads. The `safetensors` package's NumPy backend cannot
represent bfloat16, the dtype every Qwen3 checkpoint ships in, so this module maps files itself.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import tempfile
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

_HEADER_LEN_BYTES = 8
_ALIGN = 8  # tensor data offsets are kept 8-byte aligned, as the reference writer does

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping name -> array backed by a memory map; nothing is read until indexed."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(_HEADER_LEN_BYTES))
            header = json.loads(f.read(header_len))
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        self._header = header
        self._data_start = _HEADER_LEN_BYTES + header_len
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` to a safetensors file atomically (temporary file, then rename)."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be written to safetensors")
        arrays[name] = arr
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % _ALIGN)
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for arr in arrays.values():
                f.write(arr.reshape(-1).view(np.uint8))  # no copy: a byte view of the array
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
