"""The disk cache's entries: it deletes only what it wrote (a tagged folder of its own, entry names only),
round trips every dtype and shape within its cap, and never serves a damaged entry (truncated, a flipped bit,
an edited header, NaN): a miss, removed, rewritten by the next put. Each test breaks the way it says if the guard
it covers is taken out."""

from __future__ import annotations

import errno
import json
import os
import time

import numpy as np
import pytest

from convllava_edge import cache as cache_mod
from convllava_edge.cache import DiskCache

KEYS = [f"{i:064x}" for i in range(8)]
EMBEDS = np.arange(6 * 32, dtype=np.float32).reshape(6, 32) / 7  # [n, d] image embeddings


# -- the cache deletes only its own entries ------------------------------------------------------------
@pytest.mark.timeout(30)
def test_users_files_survive_eviction_in_the_folder_and_in_the_owned_subfolder(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=10**9)
    for key in KEYS[:3]:
        cache.put(key, EMBEDS)
    user = {  # what a user may keep where $CONVLLAVA_EDGE_CACHE points, including names close to ours
        tmp_path / "photo-embeddings.npy": b"user data 1",
        tmp_path / "ab" / f"{KEYS[5]}.npy": b"the old layout's name, not ours to delete",
        cache.root / "notes.npy": b"user data 2",
        cache.root / f"{KEYS[6]}.npy": b"an entry's key, another suffix",
        cache.root / f"{'AB' * 32}.cle": b"upper-case hex is not our naming",
        cache.root / f"{KEYS[6]}.cle.bak": b"our name with a suffix added",
        cache.root / "sub" / f"{KEYS[7]}.cle": b"our naming one level down is not ours",
        cache.root / f".{KEYS[7]}.tmp": b"a fresh temporary-looking file",
    }
    for path, data in user.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    assert cache.entries() == 3
    cache.max_bytes = 0
    assert cache.evict() == 3  # every entry went: eviction did run
    assert cache.entries() == 0 and all(cache.get(k) is None for k in KEYS[:3])
    for path, data in user.items():
        assert path.read_bytes() == data, path


@pytest.mark.timeout(30)
def test_a_symlink_named_like_an_entry_is_neither_followed_nor_deleted(tmp_path):
    cache = DiskCache(tmp_path / "cache", max_bytes=10**9)
    cache.put(KEYS[0], EMBEDS)
    victim = tmp_path / "precious.bin"
    victim.write_bytes(b"x" * 4096)
    link = cache._path(KEYS[1])
    link.symlink_to(victim)
    assert cache.get(KEYS[1]) is None
    cache.max_bytes = 0
    assert cache.evict() == 1  # KEYS[0], the only entry
    assert link.is_symlink() and victim.read_bytes() == b"x" * 4096


@pytest.mark.timeout(30)
def test_the_owned_subfolder_carries_a_cachedir_tag_and_nothing_is_deleted_without_it(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=10**9)
    cache.put(KEYS[0], EMBEDS)
    tag = (cache.root / "CACHEDIR.TAG").read_bytes()
    assert tag.startswith(b"Signature: 8a477f597d28d172789f06886806bc55")
    assert cache_mod.TAG_OWNER_LINE in tag.splitlines()
    # a standard tag without our own line: another program's cache, not ours
    (cache.root / "CACHEDIR.TAG").write_bytes(b"Signature: 8a477f597d28d172789f06886806bc55\n")
    cache.max_bytes = 0
    assert cache.evict() == 0 and cache.entries() == 0
    assert cache._path(KEYS[0]).exists()
    cache.put(KEYS[1], EMBEDS)  # and puts do not write into it
    assert not cache._path(KEYS[1]).exists()


@pytest.mark.timeout(30)
def test_a_users_folder_with_our_subfolders_name_is_never_written_or_emptied(tmp_path):
    theirs = tmp_path / cache_mod.ROOT_NAME
    theirs.mkdir()
    (theirs / f"{KEYS[0]}.cle").write_bytes(b"someone else's file")
    cache = DiskCache(tmp_path, max_bytes=10**9)
    cache.put(KEYS[1], EMBEDS)
    cache.max_bytes = 0
    assert cache.evict() == 0
    assert sorted(p.name for p in theirs.iterdir()) == [f"{KEYS[0]}.cle"]
    assert (theirs / f"{KEYS[0]}.cle").read_bytes() == b"someone else's file"


@pytest.mark.timeout(30)
def test_a_temporary_file_left_by_a_dead_writer_is_cleaned_only_when_stale(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=10**9)
    cache.put(KEYS[0], EMBEDS)
    stale, fresh = cache.root / f".{KEYS[1]}.abc_1234.tmp", cache.root / f".{KEYS[2]}.xyz_5678.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"half an entry")
    old = time.time() - cache_mod.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    cache.evict()
    assert not stale.exists() and fresh.exists()


# -- round trips, sizes ----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_entries_round_trip_exactly_and_are_counted(tmp_path):
    cache = DiskCache(tmp_path / "new", max_bytes=10**9)
    assert cache.entries() == 0 and cache.size_bytes() == 0
    assert not cache.folder.exists()  # asking the size creates nothing
    rng = np.random.default_rng(0)
    values = {
        KEYS[0]: EMBEDS,
        KEYS[1]: rng.standard_normal((3, 5, 16)).astype(np.float32),  # [frames, n, d] video
        KEYS[2]: rng.integers(0, 256, 24 << 20, dtype=np.uint8),  # a 24 MB llama.cpp KV state blob
        KEYS[3]: np.zeros((0, 8), np.float32),
    }
    for key, value in values.items():
        cache.put(key, value)
    for key, value in values.items():
        got = cache.get(key)
        assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value)
        got[...] = 0  # writable, as np.load's arrays were (callers may modify what they get)
    assert cache.entries() == len(values)
    assert cache.size_bytes() == sum(p.stat().st_size for p in cache.root.glob("*.cle"))
    assert cache.size_bytes() > sum(v.nbytes for v in values.values())


@pytest.mark.timeout(30)
def test_a_hit_makes_an_entry_recent_so_eviction_takes_another(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=10**9)
    for key in KEYS[:3]:
        cache.put(key, EMBEDS)
    for i, key in enumerate(KEYS[:3]):
        os.utime(cache._path(key), (100 + i, 100 + i))  # KEYS[0] oldest
    assert cache.get(KEYS[0]) is not None  # ... until it is used
    cache.max_bytes = 2 * cache._path(KEYS[0]).stat().st_size
    assert cache.evict() == 1
    assert cache.get(KEYS[1]) is None and cache.get(KEYS[0]) is not None and cache.get(KEYS[2]) is not None


# -- damaged entries are misses, removed, and rewritten by the next put ----------------------------------
def _damage(kind: str, data: bytes) -> bytes:
    header_end = data.index(b"\n", len(cache_mod.MAGIC)) + 1
    if kind == "empty":
        return b""
    if kind == "truncated":
        return data[:-5]
    if kind == "flipped data byte":
        i = header_end + 37
        return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]
    if kind == "flipped header byte":
        return data[:3] + bytes([data[3] ^ 0x01]) + data[4:]
    if kind == "extra byte":
        return data + b"\0"
    header = json.loads(data[len(cache_mod.MAGIC):header_end])
    body = data[header_end:]
    if kind == "nan":  # a well-formed entry, checksum right, holding a NaN
        value = EMBEDS.copy()
        value[2, 3] = np.nan
        return cache_mod.entry_header(value) + value.tobytes()
    if kind == "wrong shape":  # checksum right, shape not matching the data's length
        header["shape"] = [7, 32]
    elif kind == "same bytes as float16":  # consistent with the length, the data's bytes untouched
        header["shape"], header["dtype"] = [6, 64], "<f2"
    elif kind == "transposed shape":
        header["shape"] = [32, 6]
    elif kind == "object dtype":
        header["dtype"] = "|O"
    elif kind == "huge shape":
        header["shape"] = [10**30, 10**30]
    elif kind == "not json":
        return cache_mod.MAGIC + b"{" * 400 + b"\n" + body
    return cache_mod.MAGIC + json.dumps(header).encode() + b"\n" + body


DAMAGE = ["empty", "truncated", "flipped data byte", "flipped header byte", "extra byte", "nan", "wrong shape",
          "same bytes as float16", "transposed shape", "object dtype", "huge shape", "not json"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_entry_is_a_miss_removed_and_rewritten_by_the_next_put(tmp_path, kind):
    cache = DiskCache(tmp_path, max_bytes=10**9)
    cache.put(KEYS[0], EMBEDS)
    path = cache._path(KEYS[0])
    path.write_bytes(_damage(kind, path.read_bytes()))
    assert cache.get(KEYS[0]) is None
    assert not path.exists()
    cache.put(KEYS[0], EMBEDS)
    assert np.array_equal(cache.get(KEYS[0]), EMBEDS)


@pytest.mark.timeout(30)
def test_only_the_header_and_data_written_together_are_accepted(tmp_path):
    # The control for the damage cases: an entry written by hand the documented way is a hit.
    cache = DiskCache(tmp_path, max_bytes=10**9)
    cache.put(KEYS[1], EMBEDS)  # creates the root
    value = np.arange(12, dtype=np.uint8).reshape(3, 4)
    cache._path(KEYS[0]).write_bytes(cache_mod.entry_header(value) + value.tobytes())
    assert np.array_equal(cache.get(KEYS[0]), value)
    assert cache_mod.entry_header(value).startswith(cache_mod.MAGIC + b'{"dtype":"|u1","shape":[3,4],"sha256":"')


@pytest.mark.timeout(30)
def test_a_read_only_cache_still_hits(tmp_path, monkeypatch):
    cache = DiskCache(tmp_path, max_bytes=10**9)
    cache.put(KEYS[0], EMBEDS)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_mod.os, "utime", refuse)
    assert np.array_equal(cache.get(KEYS[0]), EMBEDS)
    monkeypatch.undo()
    cache.root.chmod(0o555)  # also for real (as root, permissions do not stop writes: the monkeypatch above does)
    cache._path(KEYS[0]).chmod(0o444)
    try:
        assert np.array_equal(DiskCache(tmp_path).get(KEYS[0]), EMBEDS)
        DiskCache(tmp_path).put(KEYS[1], EMBEDS)  # skipped silently when the folder refuses it
    finally:
        cache.root.chmod(0o755)


@pytest.mark.timeout(30)
def test_a_full_disk_on_put_is_skipped_silently_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    cache = DiskCache(tmp_path, max_bytes=10**9)
    cache.put(KEYS[0], EMBEDS)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "replace", full)
    cache.put(KEYS[1], EMBEDS)
    assert sorted(p.name for p in cache.root.iterdir()) == sorted(["CACHEDIR.TAG", f"{KEYS[0]}.cle"])
    assert cache.get(KEYS[1]) is None


@pytest.mark.timeout(30)
def test_a_non_finite_array_is_not_cached(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=10**9)
    value = EMBEDS.copy()
    value[0, 0] = np.inf
    cache.put(KEYS[0], value)
    assert cache.entries() == 0
