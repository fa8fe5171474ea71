"""safetensors files read and written with numpy alone, bfloat16 included, one tensor at a time.

``safetensors.numpy`` cannot hold bfloat16 (numpy has no such dtype) and loads whole files; a merge of a large
checkpoint needs neither limit. This module parses the format itself (an 8-byte little-endian header length, a
JSON header ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``, then the tensor bytes),
memory-maps the data and validates every offset, so a truncated or corrupt file fails with a message naming it.
bfloat16 travels as raw ``uint16`` bit patterns; ``float32_to_bfloat16`` rounds to nearest even as torch does.
"""

from __future__ import annotations

import json
import os
import struct
from typing import BinaryIO, Mapping, Optional, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

# safetensors dtype names -> numpy dtypes; bfloat16 is read as its uint16 bit pattern.
NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_ITEM_SIZES = {name: np.dtype(dtype).itemsize for name, dtype in NUMPY_DTYPES.items()}
_ITEM_SIZES.update({"F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1})
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read (truncated, corrupt, or not safetensors at all)."""


def float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``) of float32 values, rounded to nearest even like ``tensor.bfloat16()``.

    Example:
        >>> float32_to_bfloat16(np.array([1.0, -2.0], np.float32)).tolist()
        [16256, 49152]
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half-way cases to the even neighbour.
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # keep NaNs NaN (a large mantissa could otherwise round into infinity); torch returns 0x7FC0
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact).

    Example:
        >>> bfloat16_to_float32(np.array([16256, 49152], np.uint16)).tolist()
        [1.0, -2.0]
    """
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """A tensor as read by ``SafetensorsFile.array`` converted to float32 (``dtype`` is its safetensors name).

    Example:
        >>> to_float32(np.array([16256], np.uint16), "BF16").tolist()
        [1.0]
    """
    if dtype == "BF16":
        return bfloat16_to_float32(array)
    if dtype not in FLOAT_DTYPES:
        raise SafetensorsError(f"cannot convert a {dtype} tensor to float32")
    return np.asarray(array, dtype=np.float32)


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values cast to safetensors dtype ``dtype`` (round to nearest even), bfloat16 as bit patterns.

    Example:
        >>> from_float32(np.array([1.0], np.float32), "F16").dtype
        dtype('float16')
    """
    if dtype == "BF16":
        return float32_to_bfloat16(values)
    if dtype not in FLOAT_DTYPES:
        raise SafetensorsError(f"cannot cast float values to a {dtype} tensor")
    return np.asarray(values, dtype=np.float32).astype(NUMPY_DTYPES[dtype])


class SafetensorsFile:
    """A safetensors file opened for reading: its header, validated, and memory-mapped tensors.

    Example:
        >>> import tempfile, safetensors.numpy
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> safetensors.numpy.save_file({"w": np.ones((2, 3), np.float32)}, path)
        >>> handle = SafetensorsFile(path)
        >>> handle.shape("w"), handle.dtype("w"), handle.array("w").sum()
        ((2, 3), 'F32', np.float32(6.0))
    """

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        self.header, self.metadata, self._data_start = _read_header(self.path)
        self._data: Optional[np.memmap] = None

    def keys(self) -> list[str]:
        """Tensor names in file order (by data offset)."""
        return sorted(self.header, key=lambda key: self.header[key]["data_offsets"][0])

    def __contains__(self, key: object) -> bool:
        return key in self.header

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape."""
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> str:
        """The tensor's safetensors dtype name (``"F32"``, ``"BF16"`` ...)."""
        return self.header[key]["dtype"]

    def nbytes(self, key: str) -> int:
        """Size of the tensor's data in bytes."""
        begin, end = self.header[key]["data_offsets"]
        return end - begin

    def raw(self, key: str) -> np.ndarray:
        """The tensor's bytes as a read-only ``uint8`` view of the file."""
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = self.header[key]["data_offsets"]
        return self._data[self._data_start + begin : self._data_start + end]

    def array(self, key: str) -> np.ndarray:
        """The tensor as a numpy array (a read-only view; bfloat16 as ``uint16`` bit patterns)."""
        dtype = self.dtype(key)
        if dtype not in NUMPY_DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {key!r} has dtype {dtype}, which numpy cannot hold")
        return self.raw(key).view(NUMPY_DTYPES[dtype]).reshape(self.shape(key))

    def float32(self, key: str) -> np.ndarray:
        """The tensor converted to float32 (a copy for non-float32 tensors)."""
        return to_float32(self.array(key), self.dtype(key))

    def close(self) -> None:
        """Drop the memory map (views handed out earlier keep it alive until they go)."""
        self._data = None


def _read_header(path: str) -> tuple[dict, dict, int]:
    def fail(reason: str) -> SafetensorsError:
        return SafetensorsError(f"{path} is not a readable safetensors file ({reason})")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise fail(f"only {size} bytes: truncated")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER or 8 + length > size:
                raise fail(f"header of {length} bytes does not fit in {size} bytes: truncated or corrupt")
            text = stream.read(length)
    except OSError as error:
        raise SafetensorsError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise fail(f"header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - length
    end_of_data = 0
    for key, entry in header.items():
        try:
            dtype, shape = entry["dtype"], [int(d) for d in entry["shape"]]
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise fail(f"bad header entry for {key!r}") from None
        if not 0 <= begin <= end:
            raise fail(f"bad data offsets for {key!r}")
        if end > data_size:
            raise fail(f"tensor {key!r} ends at byte {end} of the data but the file holds {data_size}: truncated")
        if dtype in _ITEM_SIZES and end - begin != _ITEM_SIZES[dtype] * int(np.prod(shape, dtype=np.int64)):
            raise fail(f"tensor {key!r}: {end - begin} bytes do not hold a {dtype} tensor of shape {tuple(shape)}")
        entry["shape"] = shape
        entry["data_offsets"] = [begin, end]
        end_of_data = max(end_of_data, end)
    if end_of_data != data_size:  # safetensors itself refuses data it has no tensor for, or a short one
        raise fail(f"the header describes {end_of_data} bytes of tensor data but the file holds {data_size} after it")
    return header, metadata, 8 + length


def header_bytes(entries: Mapping[str, Mapping], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The length prefix and JSON header for ``entries`` (``{name: {"dtype", "shape", "data_offsets"}}``).

    Padded with spaces to a multiple of 8 bytes, as the safetensors writer does, so tensors stay aligned.

    Example:
        >>> len(header_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})) % 8
        0
    """
    header = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for key, entry in entries.items():
        header[key] = {"dtype": entry["dtype"], "shape": list(entry["shape"]), "data_offsets": list(entry["data_offsets"])}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_bytes(stream: BinaryIO, data: np.ndarray) -> None:
    """Write an array's bytes (C order) to ``stream`` without an extra copy for contiguous input."""
    stream.write(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data)
