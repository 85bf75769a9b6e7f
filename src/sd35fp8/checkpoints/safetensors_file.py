"""One safetensors file (or a sharded set) as a validated, memory-mapped, lazy key -> tensor store.

The header is parsed and checked before anything is mapped: a clear error names the file when it
does not exist, is not a safetensors file (a pickle `.ckpt`, random bytes), or is truncated (an
interrupted download). Shapes and dtypes come from the header without reading any data;
`get` reads ONE tensor through safetensors' `safe_open` (mmap); onto a CUDA device it reads the
tensor's bytes with plain reads through pinned buffers instead (checkpoints/pinned_read.py, ~5x faster).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from sd35fp8.checkpoints import pinned_read
from sd35fp8.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
INDEX_SUFFIX = ".safetensors.index.json"
# transformers/diffusers `variant` shards: model.safetensors.index.fp16.json -> model.fp16-0000N-of-0000M.safetensors
INDEX_NAME = re.compile(r"\.safetensors\.index(\.[A-Za-z0-9_]+)?\.json$")


# A CPU tensor read from the file is a view of the mapped file at the tensor's own offset (safetensors
# aligns the data to 8 bytes at most). oneDNN/MKL's CPU GEMMs pick their kernel (and so their rounding)
# by the operands' alignment: an unaligned weight gave a 1-ulp different CLIP-G projection than the same
# weight in a 64-byte aligned buffer (AVX-512, torch 2.13). Such views are copied to the allocator's
# 64-byte alignment, so a model computes the same bits whatever the file layout or offload packing.
CPU_ALIGN = 64


def is_index(path: str | Path) -> bool:
    """A sharded checkpoint's index (`*.safetensors.index.json`, or a variant's `*.safetensors.index.fp16.json`)."""
    return INDEX_NAME.search(Path(path).name) is not None

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset of the data inside the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _not_safetensors(path: Path, why: str) -> CheckpointError:
    hint = ""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK" or magic[:1] == b"\x80" or path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        hint = " It looks like a PyTorch pickle checkpoint: only .safetensors files are loaded (pickles can run code)."
    return CheckpointError(f"{path} is not a safetensors file: {why}.{hint}", str(path))


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header -> (tensors by key, metadata, data section offset)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}", str(path))
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, expected a .safetensors file", str(path))
    size = path.stat().st_size
    if size < 8:
        raise _not_safetensors(path, f"only {size} bytes")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len < 2 or header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise _not_safetensors(path, f"header length {header_len} is not plausible for a {size}-byte file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _not_safetensors(path, f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "the header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in header.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"malformed header entry for key {key} in {path}: {entry!r}", str(path), [key]) from None
        if dtype_name not in DTYPES:
            raise CheckpointError(f"key {key} in {path} has dtype {dtype_name}, which torch cannot load here",
                                  str(path), [key])
        dtype = DTYPES[dtype_name]
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(f"key {key} in {path}: {end - begin} data bytes for shape {shape} {dtype_name} "
                                  f"(expected {expected}): the header is corrupt", str(path), [key])
        tensors[key] = TensorInfo(dtype, tuple(int(s) for s in shape), int(begin), int(end))
        data_end = max(data_end, int(end))
    expected_size = 8 + header_len + data_end
    if size < expected_size:
        raise CheckpointError(f"{path}: file is truncated: expected {expected_size} bytes, found {size} "
                              "(an interrupted copy or download?)", str(path))
    if size > expected_size:
        raise CheckpointError(f"{path}: file has {size - expected_size} bytes after its last tensor: expected "
                              f"{expected_size} bytes, found {size}", str(path))
    return tensors, dict(metadata), 8 + header_len


class _Shard:
    """One validated .safetensors file; the mmap opens on first read."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors, self.metadata, self.data_offset = read_header(path)
        self.size = path.stat().st_size
        self._handle: Any = None
        self._fd: int | None = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def read_to(self, key: str, device: torch.device) -> torch.Tensor:
        """ONE tensor straight onto a CUDA `device` (pinned_read), no mmap."""
        info = self.tensors[key]
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return pinned_read.pinned_reader().read(self._fd, self.data_offset + info.begin, info.nbytes,
                                                    info.dtype, info.shape, device)
        except OSError as e:
            raise CheckpointError(f"cannot read key {key} from {self.path}: {e}", str(self.path), [key]) from None

    def get(self, key: str) -> torch.Tensor:
        if self._handle is None:
            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot open {self.path}: {e}", str(self.path)) from None
        try:
            return self._handle.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read key {key} from {self.path}: {e}", str(self.path), [key]) from None


class SafetensorsFile:
    """A .safetensors file, or a sharded set given by its `*.safetensors.index.json`, as one logical file."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if is_index(self.path):
            self._shards, self._where = self._open_index(self.path)
        else:
            shard = _Shard(self.path)
            self._shards = [shard]
            self._where = {key: shard for key in shard.tensors}

    @staticmethod
    def _open_index(index: Path) -> tuple[list[_Shard], dict[str, _Shard]]:
        if not index.exists():
            raise CheckpointError(f"checkpoint index not found: {index}", str(index))
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (needs a 'weight_map'): {e}", str(index)) from None
        shards = {name: _Shard(index.parent / name) for name in sorted(set(weight_map.values()))}
        where: dict[str, _Shard] = {}
        for key, name in weight_map.items():
            shard = shards[name]
            if key not in shard.tensors:
                raise CheckpointError(f"{index} maps key {key} to {name}, which does not hold it", str(index), [key])
            where[key] = shard
        for shard in shards.values():
            extra = sorted(set(shard.tensors) - set(where))
            if extra:
                raise CheckpointError(f"{shard.path} holds {len(extra)} keys that {index.name} does not list: "
                                      f"{', '.join(extra[:5])}", str(shard.path), extra)
        return list(shards.values()), where

    # ---- header-only queries ------------------------------------------------------------------
    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(s.path for s in self._shards)

    @property
    def file_size(self) -> int:
        return sum(s.size for s in self._shards)

    @property
    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for shard in self._shards:
            merged.update(shard.metadata)
        return merged

    def keys(self) -> list[str]:
        """All keys, in on-disk order (shard, then data offset) so streaming reads run sequentially."""
        order = {id(s): i for i, s in enumerate(self._shards)}
        return sorted(self._where, key=lambda k: (order[id(self._where[k])], self._where[k].tensors[k].begin))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._where[key].tensors[key]
        except KeyError:
            raise CheckpointError(f"missing key {key} in {self.path}", str(self.path), [key]) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self.info(key).dtype

    def nbytes(self, key: str) -> int:
        return self.info(key).nbytes

    # ---- reading --------------------------------------------------------------------------------
    def get(self, key: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read ONE tensor (mmap), then move/cast it; never materialises other tensors."""
        self.info(key)  # clear error for a missing key
        device = torch.device(device)
        if pinned_read.enabled(device):
            tensor = self._where[key].read_to(key, device)
            return tensor if dtype is None else tensor.to(dtype)
        tensor = self._where[key].get(key)
        if dtype is not None or torch.device(device) != tensor.device:
            tensor = tensor.to(device=device, dtype=dtype)
        if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_ALIGN:
            tensor = tensor.clone()  # mmap view at a file offset: CPU GEMMs round by alignment (see CPU_ALIGN)
        return tensor

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self)} keys, {len(self._shards)} file(s))"
