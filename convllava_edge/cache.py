"""On-disk, content-addressed cache of image embeddings and llama.cpp KV states (``DiskCache``).

Key: SHA-256 of the image's bytes, the preprocessing (config and aspect mode) and the vision
graph's own SHA-256 from the manifest, so a different image, mode or graph can never hit.

Layout: the cache owns one subfolder of the folder it is given (``root``), created whole with a
CACHEDIR.TAG in it (https://bford.info/cachedir/: backup tools skip it) that carries our own line
too. Entries are ``root/<64 hex key>.cle``, written to a temporary name and renamed (a reader sees
a whole file or none: safe with several processes), touched on every hit, and evicted oldest first
when they grow past the cap. Nothing is ever deleted that does not have an entry's name, inside a
root that carries our tag: $CONVLLAVA_EDGE_CACHE may point at a folder holding the user's own files, where
nothing else is written either: native.py keeps its verdicts in ``root/native-checks``, inside the tagged folder.

Entry format (not .npy: it has no room for a checksum; never pickle)::

    CLECACHE1\\n
    {"dtype":"<f4","shape":[576,4096],"sha256":"<64 hex>"}\\n
    <the array's bytes, C order>

The SHA-256 is of ``"<dtype> <shape, comma-separated>\\n"`` followed by the bytes: it covers the
description too, so a header edited into another consistent reading of the same bytes (float16
instead of float32, [32, 6] instead of [6, 32]) fails it like a flipped data bit does. A get that
finds anything but a whole, valid entry (truncated, flipped bit, unknown dtype, a shape that does not
match the data's length, NaN or inf in a float array) is a miss and removes the entry, so the next
put rewrites it. A rename is atomic but not durable without fsync; the checksum makes a file torn by a
power cut a miss instead of wrong embeddings, at a fraction of fsync's cost.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: ~450 full-size 576-token images at n_embd 4096 (9.4 MB each)
ENV_DIR = "CONVLLAVA_EDGE_CACHE"

ROOT_NAME = "convllava-edge-cache"  # the subfolder we own inside the folder we are given
TAG_NAME = "CACHEDIR.TAG"
TAG_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"  # the standard's fixed first 43 bytes
TAG_OWNER_LINE = b"# convllava-edge embedding cache: entries are <64 hex>.cle files, evicted oldest first."
TAG_TEXT = (TAG_SIGNATURE + b"\n" + TAG_OWNER_LINE + b"\n"
            b"# For information about cache directory tags see https://bford.info/cachedir/\n")
MAX_TAG_BYTES = 4096  # ours is ~200 bytes: only this much of a CACHEDIR.TAG is ever read

MAGIC = b"CLECACHE1\n"  # format version 1; any other first line is a miss
SUFFIX = ".cle"
MAX_HEADER_BYTES = 512  # a header with an 8-D shape of 20-digit sizes is < 300 bytes
MAX_NDIM = 8  # entries are 1-D (KV state), 2-D (image) or 3-D (video frames)
_ENTRY_RE = re.compile(r"[0-9a-f]{64}" + re.escape(SUFFIX))
_TMP_RE = re.compile(r"\.[0-9a-f]{64}\.[a-z0-9_]+\.tmp")  # mkstemp(prefix=".<key>.", suffix=".tmp")
_DTYPE_RE = re.compile(r"[<>|][biuf][0-9]{1,2}")  # numpy's canonical dtype.str of plain numbers only
_KEY_RE = re.compile(r"[0-9a-f]{64}")
STALE_TMP_SECONDS = 3600  # a temporary file this old was left by a process that died mid-write
# Open without following a symlink someone put in our folder, and without blocking on a FIFO.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


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


def entry_header(value: np.ndarray) -> bytes:
    """MAGIC + the JSON line that describes ``value`` (C-contiguous); its raw bytes follow it on disk."""
    shape = [int(n) for n in value.shape]
    header = {"dtype": value.dtype.str, "shape": shape, "sha256": entry_digest(value.dtype.str, shape, _raw(value))}
    return MAGIC + json.dumps(header, separators=(",", ":")).encode() + b"\n"


def entry_digest(dtype: str, shape: list[int], data) -> str:
    """SHA-256 of the entry's description and its bytes (see the module docstring)."""
    h = hashlib.sha256(f"{dtype} {','.join(map(str, shape))}\n".encode())
    h.update(data)
    return h.hexdigest()


class BadEntry(Exception):
    """An entry file that is ours by name but not a whole, valid entry (internal: a get turns it into a miss)."""


def read_entry(f, size: int, max_bytes: int) -> np.ndarray:
    """Parse an entry from the binary file ``f`` of ``size`` bytes; BadEntry unless it is whole and valid.

    Nothing larger than the header is read before the data's length is checked against ``size``.
    """
    if f.read(len(MAGIC)) != MAGIC:
        raise BadEntry("not a cache entry")
    line = f.readline(MAX_HEADER_BYTES + 1)
    if not line.endswith(b"\n"):
        raise BadEntry(f"header longer than {MAX_HEADER_BYTES} bytes or cut short")
    try:
        header = json.loads(line)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadEntry(f"header is not JSON: {e}") from e
    if not isinstance(header, dict) or set(header) != {"dtype", "shape", "sha256"}:
        raise BadEntry("header keys are not dtype, shape, sha256")
    dtype, shape, digest = header["dtype"], header["shape"], header["sha256"]
    if not isinstance(dtype, str) or not _DTYPE_RE.fullmatch(dtype):
        raise BadEntry(f"dtype {dtype!r} is not a plain number type")
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise BadEntry(f"dtype {dtype!r}: {e}") from e
    if dt.str != dtype:  # e.g. "<b1" for bool: numpy's own spelling is "|b1"
        raise BadEntry(f"dtype {dtype!r} is not in numpy's canonical form {dt.str!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(type(n) is int and n >= 0 for n in shape)):
        raise BadEntry(f"shape {shape!r} is not a list of at most {MAX_NDIM} sizes")
    if not isinstance(digest, str) or not _KEY_RE.fullmatch(digest):
        raise BadEntry("sha256 is not 64 lowercase hex digits")
    nbytes = math.prod(shape) * dt.itemsize  # Python ints: a hostile shape cannot overflow
    data_at = len(MAGIC) + len(line)
    if size - data_at != nbytes:
        raise BadEntry(f"shape {shape} of {dtype} is {nbytes} bytes, the file holds {size - data_at}")
    if nbytes > max_bytes:
        raise BadEntry(f"{nbytes} bytes is more than the cache's cap {max_bytes}")
    buf = bytearray(nbytes)  # a bytearray, so the array handed back is writable, as np.load's is
    if f.readinto(buf) != nbytes:
        raise BadEntry("data cut short")
    if entry_digest(dtype, shape, buf) != digest:
        raise BadEntry("checksum mismatch")
    value = np.frombuffer(buf, dtype=dt).reshape(shape)
    if dt.kind == "f" and not np.isfinite(value).all():
        raise BadEntry("non-finite values")
    return value


class DiskCache:
    """``get(key)`` / ``put(key, array)`` of numeric arrays by 64-hex key, under ``folder/ROOT_NAME``: image
    embeddings (embedding.py) and llama.cpp's KV states (kv_cache.py) alike, so one cap and one switch hold both."""

    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"cache max_bytes must be a non-negative integer, got {max_bytes!r}")
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.max_bytes = max_bytes

    @property
    def root(self) -> Path:
        """The subfolder this cache owns (marked by its CACHEDIR.TAG); entries live directly in it."""
        return self.folder / ROOT_NAME

    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"cache key must be 64 lowercase hex digits, got {key!r}")  # a programming error
        return self.root / f"{key}{SUFFIX}"

    # -- reading -----------------------------------------------------------------------------------
    def get(self, key: str) -> np.ndarray | None:
        """The array stored under ``key``, or None (absent, unreadable or damaged: damaged entries are removed)."""
        path = self._path(key)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError:  # absent, a symlink, or unreadable: a miss
            return None
        with os.fdopen(fd, "rb") as f:
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return None  # not a file we wrote: leave it alone
                value = read_entry(f, st.st_size, self.max_bytes)
            except BadEntry:
                self._remove_damaged(path, st)
                return None
            except OSError:  # a read error says nothing about the entry: a miss, nothing removed
                return None
            try:
                # least recently used = oldest mtime; through the descriptor, so a symlink swapped in since
                # the open is not followed. A read-only cache cannot record it: still a hit.
                os.utime(fd if os.utime in os.supports_fd else path)
            except OSError:
                pass
        return value

    def _remove_damaged(self, path: Path, opened: os.stat_result) -> None:
        """Unlink a damaged entry, if it is still the file we read (another process may have rewritten it)."""
        if not self._owned():
            return
        try:
            now = os.stat(path, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino) and stat.S_ISREG(now.st_mode):
                path.unlink()
        except OSError:
            pass  # gone already, or a read-only cache: the next get misses again

    # -- writing -----------------------------------------------------------------------------------
    def put(self, key: str, value: np.ndarray) -> None:
        """Store ``value`` (a numeric array) under ``key``; a full or read-only disk skips it silently."""
        path = self._path(key)
        value = np.ascontiguousarray(value)
        if value.dtype.kind not in "biuf" or value.ndim > MAX_NDIM:
            raise ValueError(f"the cache stores plain numeric arrays of at most {MAX_NDIM} dimensions, "
                             f"got {value.dtype} {value.shape}")  # a programming error
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return  # get would refuse it: do not cache a broken result
        header = entry_header(value)
        if len(header) + value.nbytes > self.max_bytes or not self.ensure_root():
            return
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.root)
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(_raw(value))
            os.replace(tmp, path)
            tmp = None
        except OSError:
            return  # a read-only or full disk must not stop an answer
        finally:
            if tmp is not None:
                _unlink_quietly(Path(tmp))
        self.evict()

    def ensure_root(self) -> bool:
        """Create ``root`` with its tag if absent; True when it is ours. The tag is written into a temporary
        folder renamed into place, so no process ever sees our root without it."""
        if self._owned():
            return True
        if self.root.exists() or self.root.is_symlink():
            return False  # someone else's folder under our name: never write into it
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{ROOT_NAME}.", suffix=".tmp", dir=self.folder))
        except OSError:
            return False
        try:
            (staging / TAG_NAME).write_bytes(TAG_TEXT)
            os.rename(staging, self.root)
            return True
        except OSError:  # another process created it first (or the disk is full): use theirs if it is ours
            _unlink_quietly(staging / TAG_NAME)
            try:
                staging.rmdir()
            except OSError:
                pass
            return self._owned()

    def _owned(self) -> bool:
        """Does ``root`` carry our CACHEDIR.TAG (the standard signature first, then our own line)?"""
        try:
            fd = os.open(self.root / TAG_NAME, _OPEN_FLAGS)
        except OSError:
            return False
        with os.fdopen(fd, "rb") as f:
            try:
                text = f.read(MAX_TAG_BYTES)
            except OSError:
                return False
        return text.startswith(TAG_SIGNATURE) and TAG_OWNER_LINE in text.splitlines()

    # -- size --------------------------------------------------------------------------------------
    def _scan(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry: regular files with an entry's name, in a root that is ours."""
        if not self._owned():
            return []
        entries = []
        now = time.time()
        try:
            listing = list(os.scandir(self.root))
        except OSError:
            return []
        for item in listing:
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue  # removed by another process meanwhile
            if not stat.S_ISREG(st.st_mode):
                continue
            if _ENTRY_RE.fullmatch(item.name):
                entries.append((st.st_mtime, st.st_size, Path(item.path)))
            elif _TMP_RE.fullmatch(item.name) and now - st.st_mtime > STALE_TMP_SECONDS:
                _unlink_quietly(Path(item.path))  # left by a process that died mid-write: our name, our folder
        return entries

    def size_bytes(self) -> int:
        """Bytes the entries take on disk (0 when there is no cache yet)."""
        return sum(size for _, size, _ in self._scan())

    def entries(self) -> int:
        """How many entries the cache holds."""
        return len(self._scan())

    def evict(self) -> int:
        """Delete the least recently used entries until they fit in ``max_bytes``; returns how many went."""
        entries = self._scan()
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
            except OSError:
                break  # a read-only cache cannot shrink
            total -= size
        return removed


def _raw(value: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (0-d and empty arrays included)."""
    return memoryview(value.reshape(-1).view(np.uint8))


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
