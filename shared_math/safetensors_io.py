"""Minimal safetensors reader and writer in numpy, lazy per tensor.

File format: an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets relative to the data
region), then the raw little-endian data.

`SafetensorsFile` memory-maps a file and validates its header when opened (offsets inside the file, sizes that
match dtype x shape), so a truncated or corrupt file fails at once, naming the file, before any data is read.
`read(name)` then decodes one tensor. BF16 is widened exactly to float32 (`uint16 << 16`) and F8_E4M3 / F8_E5M2 are
decoded through a 256-entry table, because numpy has no such dtypes; other dtypes keep their numpy dtype.
`read(name, bf16=dtype)` instead returns BF16 data as a view of the mapped file in a caller's numpy bfloat16 dtype
(e.g. ml_dtypes'), no copy and no widening; `release(name)` drops that tensor's pages from the process (they stay in
the page cache), so a loader that reads a checkpoint tensor by tensor holds about one tensor of it, not the file.

`write_safetensors` writes float32, float16 and bfloat16 (round-to-nearest-even from float32), plus integer arrays
unchanged.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# safetensors dtype -> (numpy storage dtype, bytes per element)
_STORAGE: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
}
# A header larger than this is certainly garbage (real ones are a few MB), and refusing it avoids a huge allocation.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is missing, truncated or corrupt; the message names the file."""


def _f8_table(exp_bits: int, man_bits: int, bias: int, fn: bool) -> np.ndarray:
    """All 256 float8 values as float32. `fn`: E4M3FN style (no infinities, only S.1111.111 is NaN)."""
    out = np.empty(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exp = (code >> man_bits) & ((1 << exp_bits) - 1)
        man = code & ((1 << man_bits) - 1)
        top = (1 << exp_bits) - 1
        if fn and exp == top and man == (1 << man_bits) - 1:
            val = math.nan
        elif not fn and exp == top:
            val = math.inf * sign if man == 0 else math.nan
        elif exp == 0:  # subnormal
            val = sign * man / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            val = sign * (1 + man / (1 << man_bits)) * 2.0 ** (exp - bias)
        out[code] = val
    return out


F8_E4M3_TABLE = _f8_table(4, 3, 7, fn=True)  # float8_e4m3fn, what DeepSeek-V3 FP8 checkpoints store
F8_E5M2_TABLE = _f8_table(5, 2, 15, fn=False)


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype as spelled in the file, shape, and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """A memory-mapped safetensors file. Opening validates the header; `read(name)` decodes one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SafetensorsError(f"{self.path}: no such safetensors file")
        size = self.path.stat().st_size
        if size < 8:
            raise SafetensorsError(f"{self.path}: {size} bytes, too short for a safetensors file (truncated?)")
        with open(self.path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError(
                    f"{self.path}: header length {n} does not fit in the file of {size} bytes "
                    "(truncated, or not a safetensors file)")
            raw = fh.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: corrupt header, not valid UTF-8 JSON ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt header, expected a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self._infos[name] = self._check_entry(name, entry, data_size)
        self._mmap: mmap.mmap | None = None

    def _check_entry(self, name: str, entry: object, data_size: int) -> TensorInfo:
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as err:
            raise SafetensorsError(f"{self.path}: corrupt header entry for tensor {name!r}: {entry!r}") from err
        if dtype not in _STORAGE:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} has dtype {dtype!r}; supported: {', '.join(_STORAGE)}")
        want = math.prod(shape) * _STORAGE[dtype].itemsize
        if not (0 <= b <= e) or e - b != want:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) has data_offsets [{b}, {e}] "
                f"but needs {want} bytes (corrupt header)")
        if e > data_size:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} ends at byte {e} of the data region, which holds only "
                f"{data_size} bytes: the file is truncated")
        return TensorInfo(name, dtype, shape, self._data_start + b, self._data_start + e)

    # ---- header queries (no data read) ----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    # ---- data -----------------------------------------------------------------------------------------------------
    def read_raw(self, name: str) -> np.ndarray:
        """The stored elements without decoding (BF16 and F8 as uint16 / uint8 bits), flat, read-only."""
        info = self.info(name)
        if self._mmap is None:
            with open(self.path, "rb") as fh:
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        # frombuffer copes with offsets that are not a multiple of the itemsize (allowed by the format)
        return np.frombuffer(self._mmap, dtype=_STORAGE[info.dtype], count=math.prod(info.shape), offset=info.begin)

    def read(self, name: str, *, bf16: np.dtype | None = None) -> np.ndarray:
        """Decode one tensor into a fresh native-endian array (BF16 -> float32, F8 -> float32). With `bf16` (a numpy
        bfloat16 dtype such as ml_dtypes.bfloat16), BF16 tensors come back as that dtype: a read-only view of the
        mapped file, exact and at half the bytes of float32."""
        info = self.info(name)
        storage = _STORAGE[info.dtype]
        raw = self.read_raw(name)
        if info.dtype == "BF16" and bf16 is not None:
            arr = raw.view(bf16)
        elif info.dtype == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        elif info.dtype == "F8_E4M3":
            arr = F8_E4M3_TABLE[raw]
        elif info.dtype == "F8_E5M2":
            arr = F8_E5M2_TABLE[raw]
        else:
            arr = raw.astype(storage.newbyteorder("="), copy=True)
        return arr.reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop tensor `name`'s pages of the mapping from this process's memory (madvise DONTNEED; the data stays
        readable: a later access reads it again from the page cache or the disk). Without it, every tensor read
        stays resident and a whole checkpoint ends up counted in the process's memory. No-op where the platform has
        no madvise."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.info(name)
        start = info.begin - info.begin % mmap.PAGESIZE  # madvise wants a page-aligned start
        if info.end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def close(self) -> None:
        self._mmap = None

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._infos)} tensors)"


# ---- writing ---------------------------------------------------------------------------------------------------------
def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the raw uint16 bits. NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)  # carries into the exponent as it should
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)  # keep sign, force a quiet NaN
    return rounded


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 values exactly representable in bfloat16: what writing as BF16 and reading back gives."""
    return (float32_to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32).reshape(np.shape(x))


_WRITE_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_INT_DTYPES = {np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
               np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def _encode(arr: np.ndarray, dtype: str | None) -> tuple[str, bytes]:
    arr = np.asarray(arr)
    if arr.dtype in _INT_DTYPES:
        return _INT_DTYPES[arr.dtype], np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"cannot write arrays of dtype {arr.dtype} to safetensors")
    target = dtype or str(arr.dtype)
    if target not in _WRITE_DTYPES:
        raise ValueError(f"cannot write dtype {target!r}; choose one of {', '.join(_WRITE_DTYPES)}")
    if target == "bfloat16":
        # float64 input is first rounded to float32; that double rounding is irrelevant for weights
        return "BF16", float32_to_bf16_bits(arr.astype(np.float32)).astype("<u2").tobytes()
    return _WRITE_DTYPES[target], np.ascontiguousarray(arr, dtype=np.dtype(target).newbyteorder("<")).tobytes()


def fsync_path(path: str | Path) -> None:
    """Flush a file's data (or a folder's entries) to disk: what makes a rename after it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], *, dtype: str | None = None,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` to `path`. Floating arrays are cast to `dtype` ("float32", "float16", "bfloat16", or None to
    keep each array's dtype); integer arrays are written as they are. Returns the path."""
    path = Path(path)
    encoded = {name: (_encode(arr, dtype), tuple(np.shape(arr))) for name, arr in tensors.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    # widest elements first keeps every tensor aligned to its itemsize (the data region starts 8-aligned)
    order = sorted(encoded, key=lambda k: (-_STORAGE[encoded[k][0][0]].itemsize, k))
    for name in order:
        (st_dtype, blob), shape = encoded[name]
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in order:
            fh.write(encoded[name][0][1])
    return path
