"""Cache keys (every input that changes the embeddings changes the key) and the cache's size bound.

The cache's guards (hostile folders, damaged entries of every kind, concurrency) is in
test_cache_entries.py; here the contract a caller relies on.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from convllava_edge.cache import DiskCache, cache_key

IMAGE = "1" * 64  # SHA-256 of the image's bytes
PREPROCESS = {"image_size": 256, "crop_size": [256, 256], "stride": 64}
GRAPH = "2" * 64  # the vision graph's SHA-256 from the manifest
ROWS = np.arange(16 * 32, dtype=np.float32).reshape(16, 32)  # 2 KiB of embeddings


def test_cache_key_is_64_hex_and_ignores_the_order_of_preprocess_keys():
    key = cache_key(IMAGE, PREPROCESS, "pad", GRAPH)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert cache_key(IMAGE, dict(reversed(PREPROCESS.items())), "pad", GRAPH) == key


@pytest.mark.parametrize("change", ["image", "preprocess value", "preprocess key", "aspect", "graph"])
def test_cache_key_changes_with_each_input(change):
    args = {"image_digest": IMAGE, "preprocess": dict(PREPROCESS), "aspect": "pad", "graph_sha256": GRAPH}
    if change == "image":
        args["image_digest"] = "3" * 64
    elif change == "preprocess value":
        args["preprocess"]["image_size"] = 336
    elif change == "preprocess key":
        args["preprocess"]["resample"] = 3
    elif change == "aspect":
        args["aspect"] = "native"
    else:
        args["graph_sha256"] = "4" * 64
    assert cache_key(**args) != cache_key(IMAGE, PREPROCESS, "pad", GRAPH)


def _key(i: int) -> str:
    return cache_key(f"{i:064x}", PREPROCESS, "pad", GRAPH)


def test_a_put_past_the_cap_evicts_the_least_recently_used(tmp_path):
    probe = DiskCache(tmp_path / "probe")
    probe.put(_key(0), ROWS)
    entry = probe.size_bytes()  # header + data of one entry
    cache = DiskCache(tmp_path, max_bytes=2 * entry + entry // 2)  # room for two entries
    for i in range(2):
        cache.put(_key(i), ROWS + i)
        os.utime(cache._path(_key(i)), (1000 + i, 1000 + i))  # _key(0) is the oldest
    cache.put(_key(2), ROWS + 2)
    assert cache.entries() == 2 and cache.size_bytes() <= cache.max_bytes
    assert cache.get(_key(0)) is None
    assert np.array_equal(cache.get(_key(1)), ROWS + 1) and np.array_equal(cache.get(_key(2)), ROWS + 2)


def test_an_array_larger_than_the_cap_is_not_stored(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=ROWS.nbytes)  # the header does not fit as well
    cache.put(_key(0), ROWS)
    assert cache.get(_key(0)) is None and cache.entries() == 0


@pytest.mark.parametrize("damage", ["flip a data bit", "truncate"])
def test_a_corrupt_entry_is_a_miss_and_the_next_put_rewrites_it(tmp_path, damage):
    cache = DiskCache(tmp_path)
    cache.put(_key(0), ROWS)
    path = cache._path(_key(0))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        del data[-4:]
    else:
        data[-1] ^= 0x01
    path.write_bytes(data)
    assert cache.get(_key(0)) is None and not path.exists()
    cache.put(_key(0), ROWS)
    assert np.array_equal(cache.get(_key(0)), ROWS)
