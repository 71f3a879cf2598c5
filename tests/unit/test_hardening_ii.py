"""Issue 32 (the second hostile sweep), the guards that need no model: a size the preprocessing refuses is refused
from the header, before decoding (defect 14); native records stay inside the cache's tagged folder (14); request
bodies are walked for text that is not text and for depth (7, 8); the command line's files are regular files
read with caps (3); check's own input files too. The serve, batch and CLI sides: tests/e2e/test_serve_hardening.py,
tests/unit/test_batch_log.py, tests/e2e/test_hardening_cli.py, tests/unit/test_media_dir.py."""

from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image, WebPImagePlugin

from convllava_edge import preprocess, records
from convllava_edge.cache import ROOT_NAME
from convllava_edge.check.inputs import load_inputs
from convllava_edge.errors import ConfigError, ImageError
from convllava_edge.files import check_output_file, read_text_file, shown
from convllava_edge.image import open_image
from convllava_edge.preprocess import PreprocessConfig, size_check
from convllava_edge.prompt import checked_text
from convllava_edge.serve.wire import MAX_JSON_DEPTH, ApiError, check_json

CONFIG = PreprocessConfig.from_dict({"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64},
                                     "image_mean": [0.5] * 3, "image_std": [0.5] * 3})


# -- 14: the padded square refused from the header -----------------------------------------------------------
@pytest.fixture
def decodes(monkeypatch):
    """How many times a WebP's pixels were decoded."""
    calls = []
    real = WebPImagePlugin.WebPImageFile.load
    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "load", lambda self: calls.append(1) or real(self))
    return calls


def webp(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(out, "WEBP", lossless=True)
    return out.getvalue()


def test_a_size_the_padding_refuses_is_refused_before_decoding(monkeypatch, decodes):
    # The sweep's 16383x5000 WebP (1.38 GB decoded) at a scale a test affords: the same rule with a smaller limit.
    monkeypatch.setattr(preprocess, "MAX_IMAGE_PIXELS", 1_000_000)
    data = webp(3000, 100)  # padded: 3000 x 3000 = 9 M pixels > 1 M
    with pytest.raises(ImageError, match=r"wide.webp: image is 3000x100: padding it to a square makes 3000x3000"):
        open_image(data, name="wide.webp", fits=size_check(CONFIG, "pad"))
    assert decodes == []
    with pytest.raises(ImageError, match="resizing its shortest edge"):
        open_image(webp(16000, 8), name="x", fits=size_check(CONFIG, "crop"))
    assert decodes == []
    image = open_image(data, name="wide.webp", fits=size_check(CONFIG, "native"))  # native keeps the ratio: decoded
    assert image.size == (3000, 100) and decodes


def test_the_command_lines_precheck_uses_the_bundles_preprocessing(monkeypatch, decodes, tmp_path):
    from convllava_edge.cli import main as cli_main
    from convllava_edge.default_model import DEMO_BUNDLE

    monkeypatch.setattr(preprocess, "MAX_IMAGE_PIXELS", 1_000_000)
    path = tmp_path / "wide.webp"
    path.write_bytes(webp(3000, 100))
    with pytest.raises(ImageError, match="padding it to a square"):
        cli_main._checked_image(path, DEMO_BUNDLE, None)
    assert decodes == []
    cli_main._checked_image(path, DEMO_BUNDLE, "native")
    assert decodes


# -- 14: records inside the tagged folder only ------------------------------------------------------------------
def test_native_records_stay_inside_the_caches_tagged_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLLAVA_EDGE_CACHE", str(tmp_path))  # the sweep's CONVLLAVA_EDGE_CACHE=/ at a safe place
    (tmp_path / "mine.txt").write_text("the user's")
    records.write_record("probe-test.json", {"ok": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == [ROOT_NAME, "mine.txt"]
    assert (tmp_path / ROOT_NAME / "CACHEDIR.TAG").is_file()
    assert (tmp_path / ROOT_NAME / records.RECORDS / "probe-test.json").is_file()
    assert records.read_record("probe-test.json")["ok"] is True
    theirs = tmp_path / "theirs"
    (theirs / ROOT_NAME).mkdir(parents=True)  # a folder under our name without our tag: never written into
    monkeypatch.setenv("CONVLLAVA_EDGE_CACHE", str(theirs))
    records.write_record("probe-test.json", {"ok": True})
    assert [p.name for p in theirs.iterdir()] == [ROOT_NAME] and list((theirs / ROOT_NAME).iterdir()) == []
    assert records.read_record("probe-test.json") is None


# -- 7, 8: request bodies walked for text and depth ---------------------------------------------------------------
def refused(value) -> ApiError:
    with pytest.raises(ApiError) as caught:
        check_json(value)
    assert caught.value.status == 400
    return caught.value


def test_every_string_of_a_body_must_be_text():
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "a\ud800"}]}]}
    e = refused(body)
    assert e.param == "messages[0].content[1].text" and e.code == "invalid_text" and "character 1" in e.message
    e = refused({"model": "x", "options": {"\udcff": 1}})
    assert e.param == "options" and "a key of options" in e.message
    e = refused("\udfff")
    assert e.param is None and "the request body" in e.message
    check_json({"messages": [{"role": "user", "content": "é 😀 \u2028"}], "n": [1, 2.5, None, True]})


def test_depth_is_bounded_and_the_walk_does_not_recurse():
    check_json(json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH))
    e = refused(json.loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)))
    assert e.code == "too_deep"
    deep: list = []
    for _ in range(50_000):  # far past the recursion limit: an iterative walk stops at the limit all the same
        deep = [deep]
    assert refused(deep).code == "too_deep"


def test_the_message_for_a_lone_surrogate_does_not_raise_itself():
    with pytest.raises(ConfigError, match=r"the question is not valid UTF-8 \(at character 2: \\ud800\)"):
        checked_text("ab\ud800", "the question")
    with pytest.raises(ConfigError, match=r"at character 0: b'\\xff'"):  # a non-UTF-8 argument: its byte
        checked_text("\udcff", "the question")


# -- 3: the command line's files ----------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_the_checks_files_are_regular_and_bounded(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for path, fragment in ((tmp_path / "fifo", "is a FIFO"), ("/dev/zero", "is a device")):
        with pytest.raises(ConfigError, match=fragment):
            load_inputs(None, path, None)
        with pytest.raises(ConfigError, match=fragment):
            load_inputs(None, None, path)


def test_reading_a_text_file_has_caps(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"one\ntwo\r\n\xff\n")
    with pytest.raises(ConfigError, match=r"t.txt:3: not UTF-8 text \(byte 0xff at 0\)"):
        read_text_file(f, "--text", 100, 100)
    f.write_bytes(b"one\ntwo")
    assert read_text_file(f, "--text", 100, 100) == [(1, "one"), (2, "two")]
    with pytest.raises(ConfigError, match="more than the 5 allowed"):
        read_text_file(f, "--text", 5, 100)
    with pytest.raises(ConfigError, match="t.txt:1: a line over 2 bytes"):
        read_text_file(f, "--text", 100, 2)


def test_outputs_are_regular_files_or_new_names(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for path, fragment in (("/dev/null", "is a device"), (tmp_path, "is a folder"), (tmp_path / "fifo", "is a FIFO"),
                           (tmp_path / "no" / "x", "does not exist")):
        with pytest.raises(ConfigError, match=fragment):
            check_output_file(path, "--save")
    assert check_output_file(tmp_path / "new.npy") is None
    bad = os.fsdecode(b"bad\xff.png")
    assert shown(bad) == "bad\\xff.png" and shown("good.png") == "good.png"
