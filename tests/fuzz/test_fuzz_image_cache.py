"""Fuzzing what reaches us from disk: mutated image files and mutated cache entries (issue 12).

In process, derandomized (the same examples on every run), each target well under a minute on two
cores. Image files: either a valid [1, 3, 64, 64] float32 array or ImageError/ConfigError, nothing
else. Cache entries: ``get`` returns None or exactly the array that was stored, and never raises.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from convllava_edge.cache import DiskCache
from convllava_edge.errors import ConfigError, ImageError
from convllava_edge.image import open_image
from convllava_edge.preprocess import ASPECTS, PreprocessConfig, preprocess

CONFIG = PreprocessConfig(image_size=64, crop_size=(64, 64))  # stride 64: every mode gives 64 x 64
KEY = "ab" * 32


def _seeds() -> list[bytes]:
    """Small valid encodings: the decoders the mutations will reach."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    out = []
    for image, fmt, kwargs in ((rgb, "PNG", {}), (rgba, "PNG", {}), (rgb.convert("P"), "PNG", {}),
                               (rgb, "JPEG", {"quality": 80}), (rgb, "JPEG", {"progressive": True}),
                               (rgb.convert("P"), "GIF", {}), (rgb, "WEBP", {"quality": 80}),
                               (rgba, "WEBP", {"lossless": True}), (rgb, "BMP", {}), (rgb, "TIFF", {})):
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kwargs)
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()

# One mutation: (kind, position as a fraction of the length, a byte value, a length).
MUTATION = st.tuples(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "splice", "big"]),
                     st.floats(0, 1), st.integers(0, 255), st.integers(1, 16))


def _mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, where, byte, length in mutations:
        i = min(int(where * len(out)), max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[i] ^= 1 << (byte % 8)
        elif kind == "set" and out:
            out[i] = byte
        elif kind == "truncate":
            del out[i:]
        elif kind == "insert":
            out[i:i] = bytes([byte]) * length
        elif kind == "delete":
            del out[i:i + length]
        elif kind == "splice":  # another format's header over ours
            other = SEEDS[byte % len(SEEDS)]
            out[:length * 4] = other[:length * 4]
        elif kind == "big":  # a size field turned huge: 0xff.. over a few bytes
            out[i:i + length % 4 + 1] = b"\xff" * (length % 4 + 1)
    return bytes(out)


@pytest.mark.timeout(120)
@settings(derandomize=True, deadline=5000, max_examples=5000, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.integers(0, len(SEEDS) - 1), mutations=st.lists(MUTATION, min_size=1, max_size=4),
       aspect=st.sampled_from(ASPECTS))
def test_mutated_image_files_give_pixels_or_one_clear_error(seed, mutations, aspect):
    data = _mutate(SEEDS[seed], mutations)
    try:
        pixels = preprocess(open_image(data), CONFIG, aspect)
    except (ImageError, ConfigError) as e:
        assert str(e) and "\n" not in str(e)
        return
    assert pixels.dtype == np.float32 and pixels.shape == (1, 3, 64, 64)
    assert np.isfinite(pixels).all()


def _stored(tmp_path_factory):
    cache = DiskCache(tmp_path_factory.mktemp("fuzz-cache"), max_bytes=1 << 20)
    values = [np.linspace(-3, 3, 2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8),
              np.arange(300, dtype=np.uint8) * 7 % 251]
    entries = []
    for value in values:
        cache.put(KEY, value)
        entries.append((value, cache._path(KEY).read_bytes()))
    return cache, entries


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    return _stored(tmp_path_factory)


@pytest.mark.timeout(120)
@settings(derandomize=True, deadline=2000, max_examples=3000, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(which=st.integers(0, 1), mutations=st.lists(MUTATION, min_size=1, max_size=4),
       replace=st.one_of(st.none(), st.binary(max_size=300)))
def test_mutated_cache_entries_are_misses_or_exactly_the_stored_array(stored, which, mutations, replace):
    cache, entries = stored
    value, original = entries[which]
    data = replace if replace is not None else _mutate(original, mutations)
    path = cache._path(KEY)
    path.write_bytes(data)
    got = cache.get(KEY)
    if data == original:
        assert got is not None
    if got is None:
        assert not path.exists(), "a damaged entry is ours: removed so the next put rewrites it"
    else:
        assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value)


@pytest.mark.timeout(60)
def test_the_mutator_does_damage(stored):
    # The targets above would pass vacuously if every mutation left the bytes intact or every file decoded.
    _, entries = stored
    value, original = entries[0]
    assert _mutate(original, [("flip", 0.9, 3, 1)]) != original
    assert _mutate(SEEDS[0], [("truncate", 0.5, 0, 1)]) == SEEDS[0][:len(SEEDS[0]) // 2]
    for seed in SEEDS:  # and the unmutated seeds do decode
        assert preprocess(open_image(seed), CONFIG, "pad").shape == (1, 3, 64, 64)
