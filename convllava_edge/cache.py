"""On-disk, content-addressed cache of image embeddings.

Key: SHA-256 of the image's bytes, the preprocessing (config and aspect mode) and the vision
graph's own SHA-256 from the manifest, so a different image, mode or graph can never hit. Values
are .npy files under the user's cache folder, written to a temporary name and renamed (a reader
sees a whole file or none: safe with several processes), touched on every hit, and evicted oldest
first when the folder grows past its cap.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: ~450 full-size 576-token images at n_embd 4096 (9.4 MB each)
ENV_DIR = "CONVLLAVA_EDGE_CACHE"


def default_cache_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "convllava-edge" / "embeddings"


def cache_key(image_digest: str, preprocess: dict[str, Any], aspect: str, graph_sha256: str) -> str:
    h = hashlib.sha256()
    h.update(image_digest.encode())
    h.update(json.dumps(preprocess, sort_keys=True).encode())
    h.update(aspect.encode())
    h.update(graph_sha256.encode())
    return h.hexdigest()


class EmbeddingCache:
    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        try:
            value = np.load(path, allow_pickle=False)
            os.utime(path)  # least recently used = oldest mtime
            return value
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # unreadable or half-deleted by another process: a miss
            return None

    def put(self, key: str, value: np.ndarray) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".npy.tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(value), allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            return  # a read-only or full disk must not stop an answer
        self.evict()

    def evict(self) -> int:
        """Delete the least recently used entries until the folder fits; returns how many went."""
        entries = []
        for path in self.folder.glob("*/*.npy"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass  # another process evicted it first
            total -= size
        return removed
