"""Manifest parsing (from_dict validates, ignores unknown keys) and path safety inside a bundle."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest

from convllava_edge.default_model import DEMO_BUNDLE
from convllava_edge.errors import BundleError
from convllava_edge.manifest import (MANIFEST_NAME, Manifest, check_relative, load_manifest, resolve_inside,
                                     write_manifest)

WHERE = "b/manifest.json"


@pytest.fixture
def data() -> dict:
    """The shipped demo bundle's manifest as JSON data: a valid ConvLLaVA manifest to spoil one value of."""
    return json.loads((DEMO_BUNDLE / MANIFEST_NAME).read_text())


def test_the_demo_manifest_round_trips(data):
    manifest = Manifest.from_dict(data, WHERE)
    assert manifest.family == "convllava" and manifest.n_embd == 256 and manifest.vision_entry().variant == "int8"
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())), WHERE) == manifest


def test_unknown_keys_from_newer_writers_are_ignored(data):
    newer = copy.deepcopy(data)
    newer["added_later"] = {"x": 1}
    newer["files"][0]["mtime"] = 123
    newer["vision"][0]["providers_hint"] = ["cuda"]
    newer["llm"]["rope"] = "yarn"
    assert Manifest.from_dict(newer, WHERE) == Manifest.from_dict(data, WHERE)


def _set(data: dict, path: str, value) -> dict:
    """``data`` with the value at a dotted path (list indices as numbers) replaced, or deleted for DELETE."""
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = data
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()


@pytest.mark.parametrize("path,value,message", [
    ("schema_version", 2, "schema_version 2, this convllava-edge reads 1"),
    ("files", DELETE, "malformed manifest \\(missing key 'files'\\)"),
    ("family", "gpt", "unknown family 'gpt' \\(known: .*convllava"),
    ("name", 7, "name must be str, got int"),
    ("n_embd", "256", "n_embd must be int, got str"),
    ("n_embd", True, "n_embd must be int, got bool"),
    ("n_embd", 0, "n_embd must be in 1..65536, got 0"),
    ("files.0.sha256", "abc", "'vision-int8.onnx' needs a 64-hex sha256"),
    ("files.0.size", -1, "needs a 64-hex sha256 and a size >= 0"),
    ("files.1.path", "../llm-q4_k_m.gguf", "is used but not listed in files"),
    ("tokens_per_image.square", 10**6, "tokens_per_image.square must be in 1..65536"),
    ("preprocess.aspect", "stretch", "preprocess aspect 'stretch'"),
    ("vision", [], "no vision graph"),
    ("vision.0.graph", "other.onnx", "'other.onnx' is used but not listed in files"),
    ("llm.n_ctx_train", 2048.0, "llm.n_ctx_train must be int, got float"),
    ("template.sep", None, "malformed manifest \\(TypeError"),
    ("template", {"kind": "jinja", "name": "t", "chat_template": "{% if %}", "system": "", "bos_token": ""},
     "does not compile"),
])
def test_bad_values_are_one_bundle_error_naming_the_manifest(data, path, value, message):
    with pytest.raises(BundleError, match=message) as e:
        Manifest.from_dict(_set(data, path, value), WHERE)
    assert str(e.value).startswith(WHERE + ": ")


@pytest.mark.parametrize("value", [None, [], "manifest", 3])
def test_a_manifest_must_be_a_json_object(value):
    with pytest.raises(BundleError, match="expected a JSON object"):
        Manifest.from_dict(value, WHERE)


@pytest.mark.parametrize("path", ["../x.gguf", "a/../../x.gguf", "a/..", "/etc/passwd", "C:/x.onnx", "a\\b.onnx", ""])
def test_check_relative_refuses_names_that_leave_the_bundle(path):
    with pytest.raises(BundleError, match="points outside the bundle"):
        check_relative(path, WHERE)


@pytest.mark.parametrize("path", ["llm.gguf", "sub/vision.onnx", "a..b.onnx", "v.onnx.data"])
def test_check_relative_accepts_plain_names_inside(path):
    check_relative(path, WHERE)


def test_resolve_inside_follows_links_that_stay_inside_and_refuses_the_rest(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "sub").mkdir(parents=True)
    (bundle / "sub" / "real.onnx").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink("sub/real.onnx", bundle / "inner.onnx")
    os.symlink(tmp_path / "secret.txt", bundle / "outer.onnx")
    os.symlink("..", bundle / "up")
    assert resolve_inside(bundle, "sub/real.onnx") == (bundle / "sub" / "real.onnx").resolve()
    assert resolve_inside(bundle, "inner.onnx") == (bundle / "sub" / "real.onnx").resolve()
    with pytest.raises(BundleError, match="symbolic link leads outside the bundle"):
        resolve_inside(bundle, "outer.onnx")
    with pytest.raises(BundleError, match="symbolic link leads outside the bundle"):
        resolve_inside(bundle, "up/secret.txt")
    for path in ("../secret.txt", str(tmp_path / "secret.txt")):
        with pytest.raises(BundleError, match="points outside the bundle"):
            resolve_inside(bundle, path)


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A copy of the demo bundle (4 MB) to damage."""
    return Path(shutil.copytree(DEMO_BUNDLE, tmp_path / "demo"))


def test_load_manifest_verifies_sizes_and_hashes(bundle):
    assert load_manifest(bundle) == Manifest.from_dict(json.loads((DEMO_BUNDLE / MANIFEST_NAME).read_text()))
    gguf = bundle / "llm-q4_k_m.gguf"
    raw = bytearray(gguf.read_bytes())
    raw[-1] ^= 1
    gguf.write_bytes(raw)
    assert load_manifest(bundle, verify=False).llm.file == "llm-q4_k_m.gguf"  # without verify: not read
    with pytest.raises(BundleError, match="SHA-256 does not match the manifest"):
        load_manifest(bundle)
    gguf.write_bytes(raw[:-1])
    with pytest.raises(BundleError, match=f"size {len(raw) - 1} bytes, manifest says {len(raw)}"):
        load_manifest(bundle)


def test_load_manifest_refuses_a_listed_file_linked_out_of_the_bundle(bundle, tmp_path):
    outside = tmp_path / "elsewhere.gguf"
    (bundle / "llm-q4_k_m.gguf").rename(outside)
    os.symlink(outside, bundle / "llm-q4_k_m.gguf")
    with pytest.raises(BundleError, match="symbolic link leads outside the bundle"):
        load_manifest(bundle, verify=False)


def test_write_then_load_gives_the_same_manifest(bundle):
    manifest = load_manifest(bundle)
    (bundle / MANIFEST_NAME).unlink()
    write_manifest(bundle, manifest)
    assert load_manifest(bundle) == manifest
