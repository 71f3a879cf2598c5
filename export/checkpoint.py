"""Reading tensors from a checkpoint folder in the Hugging Face layouts, lazily and safely.

Layouts accepted (safetensors preferred when both are present, as transformers does):
- ``model.safetensors`` or ``model.safetensors.index.json`` + shards;
- ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` + shards (torch pickles, loaded with
  ``weights_only=True`` so no code in a checkpoint ever runs, memory-mapped where the file allows).
Any storage dtype (bf16, fp16, fp32); callers convert what they use.

Integrity, as far as files without checksums allow: the index's ``metadata.total_size`` is compared
with the bytes of the tensors the shards hold (when the index states it); every tensor's shape and
dtype must fit the bytes stored for it (safetensors and torch.load check this, except what
memory-mapping skips: ``_check_storage_records``); every floating-point tensor is scanned for
NaN/Inf as it is read. A flipped byte that turns one finite value into another finite value cannot
be caught: that would need a checksum, which the Hugging Face layouts do not carry.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..errors import CheckpointError
from .config import read_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class TensorStore:
    """Name -> tensor access across the shards of one folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder")
        self._total_size: int | None = None  # the index's metadata.total_size, when it has one
        self.format, self.index_path, self._key_file = self._discover()
        self._open_file: Path | None = None
        self._open_tensors: dict[str, torch.Tensor] | None = None
        self._scanned: set[str] = set()  # tensors already found free of NaN/Inf
        if self._total_size is not None:
            self._check_total_size(self._total_size)

    # -- layout ------------------------------------------------------------------------------------
    def _discover(self) -> tuple[str, Path | None, dict[str, Path]]:
        for fmt, index_name, single_name in (("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE),
                                             ("bin", BIN_INDEX, BIN_SINGLE)):
            index = self.folder / index_name
            if index.is_file():
                return fmt, index, self._read_index(index)
            single = self.folder / single_name
            if single.is_file():
                return fmt, None, {name: single for name in self._keys_of(single, fmt)}
        raise CheckpointError(f"{self.folder}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
                              f"{BIN_SINGLE} or {BIN_INDEX})")

    def _read_index(self, index: Path) -> dict[str, Path]:
        data = read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        metadata = data.get("metadata") or {}
        total = metadata.get("total_size") if isinstance(metadata, dict) else None
        if total is not None:
            if isinstance(total, bool) or not isinstance(total, (int, float)) or not float(total).is_integer() \
                    or total < 0:
                raise CheckpointError(f"{index}: metadata.total_size {total!r} is not a byte count")
            self._total_size = int(total)
        key_file: dict[str, Path] = {}
        for key, name in weight_map.items():
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard name {name!r} for {key!r} is not a file in this folder")
            shard = self.folder / name
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {name!r} (holding {key!r}) is missing from {self.folder}")
            key_file[key] = shard
        return key_file

    def _keys_of(self, path: Path, fmt: str) -> list[str]:
        if fmt == "safetensors":
            return list(self._safe_open(path).keys())
        return list(self._load_bin(path).keys())

    # -- access --------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._key_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def file_of(self, key: str) -> Path:
        try:
            return self._key_file[key]
        except KeyError:
            where = self.index_path or self.folder
            raise CheckpointError(f"{where}: missing tensor {key!r}") from None

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._key_file.values()))

    def get(self, key: str) -> torch.Tensor:
        """One tensor, as stored (dtype unchanged), checked free of NaN/Inf."""
        tensor = self._read(key)
        if key not in self._scanned:
            _check_finite(key, tensor, self.file_of(key))
            self._scanned.add(key)
        return tensor

    def _read(self, key: str) -> torch.Tensor:
        path = self.file_of(key)
        if self.format == "safetensors":
            # safetensors itself refuses a header whose offsets do not match a tensor's shape and dtype.
            with self._safe_open(path) as handle:
                try:
                    return handle.get_tensor(key)
                except Exception as e:  # SafetensorError (not exported): key absent, or bytes out of range
                    raise CheckpointError(f"{path}: cannot read tensor {key!r}: {_first_line(e)}") from e
        tensors = self._bin_shard(path)
        if key not in tensors:
            raise CheckpointError(f"{path}: index says it holds {key!r}, but the file does not")
        return tensors[key]

    def get_many(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors, reading each shard once, in shard order."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.file_of(key)].append(key)
        return {key: self.get(key) for path in sorted(by_file) for key in by_file[path]}

    def iter_shards(self, keep=lambda name: True) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
        """Yield (file, {name: tensor}) one shard at a time, so at most one shard is resident."""
        for path in self.files:
            names = [k for k, p in self._key_file.items() if p == path and keep(k)]
            if names:
                yield path, {name: self.get(name) for name in names}
            self._release()

    def info(self, key: str) -> TensorInfo:
        path = self.file_of(key)
        if self.format == "safetensors":
            with self._safe_open(path) as handle:
                sl = handle.get_slice(key)
                shape, dtype = tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32)
            return TensorInfo(key, path, shape, dtype)
        tensor = self._read(key)  # no NaN scan: only the shape and dtype are asked for
        return TensorInfo(key, path, tuple(tensor.shape), tensor.dtype)

    # -- integrity -----------------------------------------------------------------------------------
    def _check_total_size(self, total: int) -> None:
        """The bytes the index's shards hold against its metadata.total_size.

        Counted over every tensor in the shard files, not only the ones the index maps: a tensor
        left out of the weight_map is reported by name where it is needed, which says more.
        """
        counted, shared = 0, 0
        for path in self.files:
            if self.format == "safetensors":
                with self._safe_open(path) as handle:
                    for key in handle.keys():
                        sl = handle.get_slice(key)
                        if sl.get_dtype() not in _SAFETENSORS_ITEMSIZE:
                            return  # a newer (sub-byte) dtype: its size is not ours to guess
                        counted += math.prod(sl.get_shape()) * _SAFETENSORS_ITEMSIZE[sl.get_dtype()]
            elif zipfile.is_zipfile(path):  # memory-mapped: only the pickle is read, not the weights
                seen: set[int] = set()
                for tensor in self._load_bin(path).values():
                    nbytes = tensor.numel() * tensor.element_size()
                    counted += nbytes
                    storage = tensor.untyped_storage().data_ptr()
                    shared += nbytes if storage in seen and nbytes else 0
                    seen.add(storage)
            else:  # a legacy (pre-zip) pickle cannot be memory-mapped: reading it whole here would double the cost
                return
        # transformers counts tensors that share storage (tied weights) once; other writers each time.
        if total not in (counted, counted - shared):
            where = self.index_path or self.folder
            raise CheckpointError(f"{where}: metadata.total_size is {total} bytes, but the shards hold "
                                  f"{counted - shared} bytes of tensors (a shard replaced or altered?)")

    # -- file readers --------------------------------------------------------------------------------
    def _safe_open(self, path: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises SafetensorError (not exported) on bad headers
            raise CheckpointError(f"{path}: cannot read safetensors file (corrupt or truncated?): {e}") from e

    def _bin_shard(self, path: Path) -> dict[str, torch.Tensor]:
        if self._open_file != path:
            self._release()
            self._open_tensors, self._open_file = self._load_bin(path), path
        return self._open_tensors  # type: ignore[return-value]

    def _release(self) -> None:
        self._open_file, self._open_tensors = None, None

    @staticmethod
    def _load_bin(path: Path) -> dict[str, torch.Tensor]:
        mapped = True
        try:
            try:  # zip-format pickles (torch >= 1.6) can be memory-mapped: shards are not read up front
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                mapped = False
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError, EOFError, zipfile errors...
            raise CheckpointError(f"{path}: cannot read PyTorch weights (corrupt, truncated, or not a "
                                  f"weights-only pickle): {_first_line(e)}") from e
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors")
        if mapped:
            _check_storage_records(path, data)
        return data


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
# The storage dtypes of released checkpoints, where torch.isfinite is implemented on the CPU (float8 is not).
_SCANNED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# Bytes per element of each safetensors dtype (its format spec); safe_open reports names, not sizes.
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _check_storage_records(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The storages a memory-mapped .bin declares must be the bytes its zip records hold.

    torch.load refuses a tensor larger than its storage, and a storage larger than its record when
    it reads the file; memory-mapped (torch 2.x), it maps the declared size over whatever follows
    the record instead, so a corrupted size in the pickle would read neighbouring bytes as weights.
    """
    storages: dict[int, int] = {}
    for tensor in tensors.values():
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    try:
        with zipfile.ZipFile(path) as archive:
            # torch.save names each storage's record "<archive>/data/<key>"
            stored = sum(info.file_size for info in archive.infolist()
                         if info.filename.split("/")[-2:-1] == ["data"] and info.filename.rsplit("/", 1)[-1].isdigit())
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: cannot read PyTorch weights (corrupt zip): {_first_line(e)}") from e
    declared = sum(storages.values())
    if declared != stored:
        raise CheckpointError(f"{path}: its tensors' storages declare {declared} bytes, its data records hold "
                              f"{stored} (corrupt pickle?)")


def _check_finite(key: str, tensor: torch.Tensor, path: Path) -> None:
    """No NaN or Inf in a floating-point tensor: released weights never hold one, a corrupted byte often does."""
    if tensor.dtype not in _SCANNED_DTYPES:
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = tensor.numel() - int(finite.sum())
        raise CheckpointError(f"tensor {key!r} in {path} holds {bad} NaN/Inf values (of {tensor.numel()}): "
                              "the shard is corrupt")


def check_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...], path: Path) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {list(tensor.shape)}, expected {list(expected)}")


def write_index(folder: Path, index_name: str, weight_map: dict[str, str], total_size: int) -> None:
    """Write a HF shard index (used by the synthetic checkpoints; the format transformers reads)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
