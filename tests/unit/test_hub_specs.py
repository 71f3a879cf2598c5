"""Repo ids and the hub cache's layout (hub.py), without the network or a model."""

from __future__ import annotations

import os

import pytest

from convllava_edge.errors import BundleError
from convllava_edge.hub import is_repo_spec, parse_spec, served_name
from convllava_edge.manifest import resolve_inside


@pytest.mark.parametrize("spec, parsed", [
    ("ConvLLaVA/ConvLLaVA-sft-1536", ("ConvLLaVA/ConvLLaVA-sft-1536", None)),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@" + "a" * 40, ("org/name", "a" * 40)),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("name-only", None), ("a/b/c", None), ("./org/name", None), ("/abs/org", None), ("org/name@", None),
    ("-org/name", None), ("org/na me", None),
])
def test_what_reads_as_a_repo_id(spec, parsed):
    assert parse_spec(spec) == parsed


def test_a_local_folder_of_the_same_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_repo_spec("org/name")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_repo_spec("org/name") and served_name("org/name") == "name"
    assert served_name("other/bundle@v2") == "bundle"  # a repo: its name part


def test_a_cached_bundle_may_link_into_its_own_blobs_only(tmp_path):
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / ("c" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "e1").write_bytes(b"x")
    (snapshot / "f.bin").symlink_to(os.path.relpath(repo / "blobs" / "e1", snapshot))
    assert resolve_inside(snapshot, "f.bin") == (repo / "blobs" / "e1").resolve()
    (tmp_path / "secret").write_text("s")
    (snapshot / "g.bin").symlink_to(tmp_path / "secret")
    with pytest.raises(BundleError, match="leads outside the bundle"):
        resolve_inside(snapshot, "g.bin")
    elsewhere = tmp_path / "plain" / "snapshots" / "x"  # not a hub cache's repo folder: its own files only
    elsewhere.mkdir(parents=True)
    (tmp_path / "plain" / "blobs").mkdir()
    (tmp_path / "plain" / "blobs" / "e").write_bytes(b"y")
    (elsewhere / "h.bin").symlink_to(tmp_path / "plain" / "blobs" / "e")
    with pytest.raises(BundleError, match="leads outside the bundle"):
        resolve_inside(elsewhere, "h.bin")
