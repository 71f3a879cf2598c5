"""Issue 12 (hardening): the embedding cache deletes only what it wrote and never serves a damaged
entry; image files and manifests cannot make us read, allocate or decode without bound.

Each test breaks the way it says if the guard it covers is taken out: user files would be deleted,
a damaged entry would come back as data, a 3 GB file would be read, a 60000x1 strip would exhaust
memory, a mistyped manifest would raise KeyError/TypeError instead of one ConfigError line.

Long module: one issue's guards on what reaches the runtime from disk, one section each.
"""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convllava_edge import cache as cache_mod
from convllava_edge import image as image_mod
from convllava_edge import preprocess as preprocess_mod
from convllava_edge.cache import DiskCache
from convllava_edge.errors import ConfigError, ImageError
from convllava_edge.image import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, open_image, read_image_bytes
from convllava_edge.preprocess import MAX_IMAGE_SIDE, PreprocessConfig, preprocess

KEYS = [f"{i:064x}" for i in range(8)]
EMBEDS = np.arange(6 * 32, dtype=np.float32).reshape(6, 32) / 7  # [n, d] image embeddings
ROOT = Path(__file__).resolve().parents[2]


def _png(size=(16, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 200, 30) if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


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


# -- image files -------------------------------------------------------------------------------------------
def _peak_bytes(fn) -> tuple[int, BaseException | None]:
    """Peak Python allocation while ``fn`` runs, and what it raised."""
    tracemalloc.start()
    try:
        fn()
        error = None
    except BaseException as e:  # noqa: BLE001 - returned for the caller to check
        error = e
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, error


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", [read_image_bytes, open_image])
def test_a_3_gb_file_is_refused_without_being_read(tmp_path, reader):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.write(_png())
        f.truncate(3 << 30)  # sparse: 3 GB to stat, nothing on disk
    t0 = time.perf_counter()
    peak, error = _peak_bytes(lambda: reader(path))
    assert isinstance(error, ImageError), error
    assert str(path) in str(error) and f"{3 << 30:,}" in str(error) and f"{MAX_IMAGE_BYTES:,}" in str(error)
    assert peak < 1 << 20 and time.perf_counter() - t0 < 5  # reading it would take 3 GB and seconds


@pytest.mark.timeout(60)
def test_a_large_non_image_file_is_refused_from_its_header(tmp_path):
    path = tmp_path / "movie.png"
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x00\x20ftypisom" + b"\x00" * 100)
        f.truncate(64 << 20)  # under the byte limit: only the header says it is no image
    peak, error = _peak_bytes(lambda: open_image(path))
    assert isinstance(error, ImageError) and "not an image" in str(error), error
    assert peak < 4 << 20  # 64 MB were not read
    # read_image_bytes without sniff reads it (video.py's path): the size check alone lets it through
    assert len(read_image_bytes(path)[1]) == 64 << 20


@pytest.mark.timeout(30)
def test_the_byte_limit_applies_to_paths_and_bytes_alike(tmp_path, monkeypatch):
    data = _png((64, 64))
    monkeypatch.setattr(image_mod, "MAX_IMAGE_BYTES", len(data) - 1)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(ImageError, match=f"{len(data):,} bytes"):
            open_image(source)
    monkeypatch.setattr(image_mod, "MAX_IMAGE_BYTES", len(data))
    assert open_image(path).size == open_image(data).size == (64, 64)


@pytest.mark.timeout(30)
def test_fifos_devices_and_folders_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(ImageError, match="not a file"):
            open_image(path)


@pytest.mark.timeout(30)
def test_only_the_listed_encodings_are_decoded(tmp_path):
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    for fmt, ok in (("PNG", True), ("BMP", True), ("TIFF", True), ("PPM", False), ("TGA", False), ("PCX", False)):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        if ok:
            assert open_image(buf.getvalue()).getpixel((0, 0)) == (1, 2, 3), fmt
        else:
            with pytest.raises(ImageError, match="not an image file"):
                open_image(buf.getvalue())
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"  # would run Ghostscript on load
    with pytest.raises(ImageError, match="not an image file"):
        open_image(eps)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, IHDR and IEND: PIL opens it lazily and knows its size without any pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.timeout(30)
def test_a_lazily_opened_pil_image_over_the_pixel_limit_is_refused_before_decoding():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        lazy = Image.open(io.BytesIO(_png_header_only(20000, 5000)))  # 100 MP: PIL itself only warns
    peak, error = _peak_bytes(lambda: open_image(lazy))
    assert isinstance(error, ImageError) and "100,000,000 pixels, more than" in str(error), error
    assert peak < 1 << 20  # 100 MP of RGB were never allocated


# -- preprocessing bounds ----------------------------------------------------------------------------------
CONVLLAVA = PreprocessConfig(image_size=1536, crop_size=(1536, 1536))
MINI = PreprocessConfig(image_size=336, crop_size=(336, 336), stride=14)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("aspect,config,message", [
    ("pad", CONVLLAVA, "60000x60000 = 3,600,000,000 pixels"),
    ("crop", MINI, "20160000x336"),
])
def test_a_strip_image_is_refused_before_padding_or_resizing(aspect, config, message):
    strip = Image.new("RGB", (60000, 1), (5, 6, 7))
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=message) as info:
        preprocess(strip, config, aspect)
    assert f"{MAX_IMAGE_PIXELS:,}" in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - t0 < 2
    tall = strip.transpose(Image.Transpose.ROTATE_90)  # 1x60000: the same in the other orientation
    with pytest.raises(ImageError):
        preprocess(tall, config, aspect)


@pytest.mark.timeout(30)
def test_the_bounds_allow_up_to_the_limit_and_refuse_past_it(monkeypatch):
    monkeypatch.setattr(preprocess_mod, "MAX_IMAGE_PIXELS", 200 * 200)  # the comparison, at a cheap scale
    config = PreprocessConfig(image_size=64, crop_size=(64, 64))
    assert preprocess(Image.new("RGB", (200, 3), (9, 9, 9)), config, "pad").shape == (1, 3, 64, 64)
    with pytest.raises(ImageError, match="201x201 = 40,401 pixels, more than the 40,000"):
        preprocess(Image.new("RGB", (201, 3), (9, 9, 9)), config, "pad")
    # crop: the shortest edge 2 goes to 64, the longest 20 to int(64 * 20 / 2) = 640: exactly the limit
    monkeypatch.setattr(preprocess_mod, "MAX_IMAGE_PIXELS", 640 * 64)
    assert preprocess(Image.new("RGB", (20, 2), (9, 9, 9)), config, "crop").shape == (1, 3, 64, 64)
    with pytest.raises(ImageError, match="672x64 = 43,008 pixels"):
        preprocess(Image.new("RGB", (21, 2), (9, 9, 9)), config, "crop")


STRIP_SCRIPT = textwrap.dedent("""
    import io, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # 2 GiB: the unbounded pad needs 14 GB
    from PIL import Image
    from convllava_edge.errors import ImageError
    from convllava_edge.image import open_image
    from convllava_edge.preprocess import PreprocessConfig, preprocess

    buf = io.BytesIO()
    Image.new("RGB", (60000, 1), (5, 6, 7)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 1000, len(buf.getvalue())
    image = open_image(buf.getvalue())
    convllava = PreprocessConfig(image_size=1536, crop_size=(1536, 1536))
    mini = PreprocessConfig(image_size=336, crop_size=(336, 336), stride=14)
    t0 = time.perf_counter()
    for aspect, config in (("pad", convllava), ("crop", mini), ("pad", mini), ("crop", convllava)):
        try:
            preprocess(image, config, aspect)
        except ImageError as e:
            print(aspect, "refused:", e)
        else:
            sys.exit(f"{aspect}: no ImageError")
    # native keeps its own bound (W' * H' <= the crop's area): a valid, small array
    pixels = preprocess(image, convllava, "native")
    assert pixels.shape[2] * pixels.shape[3] <= 1536 * 1536, pixels.shape
    print("native", pixels.shape, f"{time.perf_counter() - t0:.2f} s")
""")


@pytest.mark.timeout(120)
def test_a_60000x1_png_fails_fast_with_bounded_memory_in_every_mode():
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", STRIP_SCRIPT], capture_output=True, text=True, timeout=100,
                            cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("refused:") == 4


# -- manifest values ---------------------------------------------------------------------------------------
GOOD = PreprocessConfig(image_size=336, crop_size=(336, 336), stride=14).to_dict()


def _with(**changes):
    out = {**GOOD, **changes}
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP = object()
BAD_MANIFESTS = [
    None, [], "preprocess", _with(image_size=_DROP), _with(stride=_DROP), _with(crop_size=_DROP),
    _with(image_size="336"), _with(image_size=[336]), _with(image_size={"a": [1]}), _with(image_size=None),
    _with(image_size=0), _with(image_size=-336), _with(image_size=336.5), _with(image_size=True),
    _with(image_size=MAX_IMAGE_SIDE + 1), _with(image_size=10**400), _with(image_size=float("nan")),
    _with(crop_size=336), _with(crop_size=[336]), _with(crop_size=[336, "x"]), _with(crop_size=[0, 0]),
    _with(crop_size=[337, 336]), _with(crop_size=[8190, 8190], stride=_DROP), _with(crop_size={"h": 1}),
    _with(stride=0), _with(stride=-14), _with(stride="14"), _with(stride=MAX_IMAGE_SIDE * 2),
    _with(image_mean=[float("nan"), 0.4, 0.4]), _with(image_mean="abc"), _with(image_mean=[0.5, 0.5]),
    _with(image_mean=[2.0, 0.4, 0.4]), _with(image_mean=[[0.5], 0.4, 0.4]), _with(image_mean=None),
    _with(image_std=[0.0, 0.3, 0.3]), _with(image_std=[float("inf"), 0.3, 0.3]), _with(image_std=[-1, 1, 1]),
    _with(rescale_factor=0), _with(rescale_factor=float("nan")), _with(rescale_factor="1/255"),
    _with(rescale_factor=10**400), _with(rescale_factor=2.0), _with(rescale_factor=[1]),
    _with(resample=99), _with(resample="bicubic"), _with(resample=True), _with(resample=3.5),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("manifest", BAD_MANIFESTS, ids=range(len(BAD_MANIFESTS)))
def test_bad_manifest_preprocess_values_are_one_config_error(manifest):
    with pytest.raises(ConfigError) as info:
        PreprocessConfig.from_manifest(manifest)
    assert "\n" not in str(info.value)


@pytest.mark.timeout(30)
def test_good_manifest_values_round_trip():
    assert PreprocessConfig.from_manifest(GOOD).to_dict() == GOOD
    # the default aspect mode is part of the config now (issue 33); unknown keys are still dropped
    assert PreprocessConfig.from_manifest({**GOOD, "aspect": "crop", "unknown": [1]}).to_dict() == {**GOOD, "aspect": "crop"}
    assert PreprocessConfig.from_manifest({k: v for k, v in GOOD.items() if k != "aspect"}).aspect == "pad"
    with pytest.raises(ConfigError, match="unknown preprocess aspect 'wide'"):
        PreprocessConfig.from_manifest({**GOOD, "aspect": "wide"})
    as_floats = PreprocessConfig.from_manifest(_with(image_size=336.0, stride=14.0))  # integral floats are sizes
    assert as_floats.image_size == 336 and type(as_floats.image_size) is int


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cfg", [
    [], {"size": "abc"}, {"size": {"shortest_edge": [1]}}, {"size": {"height": 2, "width": 3}},
    {"size": 336, "crop_size": {"height": 336}}, {"size": 336, "crop_size": "x"}, {"size": 10**9},
    {"size": 336, "image_mean": [1, 2]}, {"size": 336, "resample": "nearest"}, {"size": 336, "rescale_factor": None},
])
def test_bad_preprocessor_configs_are_one_config_error(cfg):
    with pytest.raises(ConfigError) as info:
        PreprocessConfig.from_dict(cfg, stride=16)
    assert "\n" not in str(info.value)


@pytest.mark.timeout(30)
def test_every_image_error_names_what_the_caller_called_the_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    for source in (path, b"hello", _png_header_only(20000, 20000)):
        with pytest.raises(ImageError) as info:
            open_image(source, name="photo.jpg")
        assert str(info.value).startswith("photo.jpg: "), info.value


def test_encoder_outputs_own_their_memory():
    """ORT's output arrays are views of its buffers: one kept alive (the cache, the pipeline's recent images,
    an export's reference embeddings) kept the whole session's memory (2 GB for the 1536 px tower) after
    the session was gone, and an export of a real ConvLLaVA-1536 was killed for memory. Outputs are copies."""
    from convllava_edge.default_model import DEMO_BUNDLE
    from convllava_edge.families.convllava import ConvLlavaEncoder

    encoder = ConvLlavaEncoder.from_file(next(DEMO_BUNDLE.glob("*.onnx")), "cpu", 1)
    for out in (encoder.encode(np.zeros((1, 3, 256, 256), np.float32)),
                *encoder.encode_both(np.zeros((1, 3, 256, 256), np.float32))):
        root = out
        while root.base is not None:
            root = root.base
        assert isinstance(root, np.ndarray) and root.flags.owndata, type(root)
