"""Reading tensors from a checkpoint folder in the Hugging Face layouts, lazily and safely.

Layouts accepted (safetensors preferred when both are present, as transformers does):
- ``model.safetensors`` or ``model.safetensors.index.json`` + shards;
- ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` + shards (torch pickles, loaded with
  ``weights_only=True`` so no code in a checkpoint ever runs, memory-mapped where the file allows).
Any storage dtype (bf16, fp16, fp32); callers convert what they use.
"""

from __future__ import annotations

import json
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
        self.format, self.index_path, self._key_file = self._discover()
        self._open_file: Path | None = None
        self._open_tensors: dict[str, torch.Tensor] | None = None

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
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
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
        """One tensor, as stored (dtype unchanged)."""
        path = self.file_of(key)
        if self.format == "safetensors":
            with self._safe_open(path) as handle:
                return handle.get_tensor(key)
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
        tensor = self.get(key)
        return TensorInfo(key, path, tuple(tensor.shape), tensor.dtype)

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
        try:
            try:  # zip-format pickles (torch >= 1.6) can be memory-mapped: shards are not read up front
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError, EOFError, zipfile errors...
            raise CheckpointError(f"{path}: cannot read PyTorch weights (corrupt, truncated, or not a "
                                  f"weights-only pickle): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors")
        return data


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def check_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...], path: Path) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {list(tensor.shape)}, expected {list(expected)}")


def write_index(folder: Path, index_name: str, weight_map: dict[str, str], total_size: int) -> None:
    """Write a HF shard index (used by the synthetic checkpoints; the format transformers reads)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
