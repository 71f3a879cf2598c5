"""Models by Hugging Face repo id, offline: a hub cache laid out as huggingface_hub lays it out
(tests/support/hub_cache.py), every command in a child process with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` in its
environment (the library reads its settings at import). Nothing reaches the network: downloads, resumption and
the Hub's errors are in test_hub_server.py, against a loopback server.

- ``export ORG/NAME`` (the tower found through config.json's mm_vision_tower) gives the bundle ``export FOLDER
  --vision-tower TOWER`` gives: the same file hashes; its manifest records each repo and commit; its README.md is a
  model card (library_name, base_model, the checkpoint card's license).
- ``pull`` + ``ask --model ORG/NAME`` answers as the local bundle does; ``serve`` names it by the repo's name part;
  a tampered cached file is refused (and removed from the cache); a local folder of the repo's name wins.
- Bad input: one line naming the repo, exit 1, nothing in ``--out``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.hub_cache import env, folder_files, repo_folder, write_cached_repo

from convllava_edge.manifest import load_manifest

CHECKPOINT, TOWER, BUNDLE = "test-org/tiny-convllava", "test-org/tiny-tower", "test-org/tiny-bundle"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shapes-1.png"
CARD = "---\nlicense: apache-2.0\n---\n# a tiny checkpoint\n"
FAST = ["--vision-type", "fp32", "--llm-type", "F32"]


def run(cache: Path, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convllava_edge.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env=env(cache, CONVLLAVA_EDGE_CACHE=str(cache.parent / "ce")))


def hashes(bundle: Path) -> dict[str, str]:
    return {f.path: f.sha256 for f in load_manifest(bundle, verify=False).files}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny):
    """The cache (the checkpoint with its config naming the tower's repo, the tower), and a local copy of the same
    checkpoint in a folder of the repo's name part."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    local = root / "local" / CHECKPOINT.split("/")[1]
    shutil.copytree(tiny.bin_ckpt, local)
    config = json.loads((local / "config.json").read_text())
    (local / "config.json").write_text(json.dumps({**config, "mm_vision_tower": TOWER}))
    (local / "README.md").write_text(CARD)
    (local / "optimizer.pt").write_bytes(b"not read by the export")  # a file the export must not fetch
    write_cached_repo(cache, CHECKPOINT, folder_files(local))
    write_cached_repo(cache, TOWER, folder_files(tiny.tower))
    (local / "optimizer.pt").unlink()
    return root, cache, local


@pytest.fixture(scope="module")
def exports(hub, tiny):
    root, cache, local = hub
    by_folder, by_repo = root / "by-folder", root / "by-repo"
    made = run(cache, "export", local, "--vision-tower", tiny.tower, "--out", by_folder, *FAST)
    assert made.returncode == 0, made.stderr[-2000:]
    made = run(cache, "export", CHECKPOINT, "--out", by_repo, *FAST)
    assert made.returncode == 0, made.stderr[-2000:]
    return by_folder, by_repo


def test_export_by_repo_id_gives_the_same_bundle_as_by_folder(hub, exports):
    root, cache, _ = hub
    by_folder, by_repo = exports
    assert hashes(by_repo) == hashes(by_folder)  # GGUF and ONNX byte for byte
    source = json.loads((by_repo / "manifest.json").read_text())["source"]
    commits = {h["role"]: (h["repo"], h["commit"]) for h in source["hub"]}
    snapshot = lambda repo: next((repo_folder(cache, repo) / "snapshots").iterdir()).name
    assert commits == {"checkpoint": (CHECKPOINT, snapshot(CHECKPOINT)), "vision_tower": (TOWER, snapshot(TOWER))}
    card = (by_repo / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: convllava-edge" in front and f"base_model: {CHECKPOINT}" in front
    assert "license: apache-2.0" in front and "tags:" in front
    assert "## Accuracy measured at export" in card and "vision fp32 against PyTorch" in card
    assert "convllava-edge pull" in card


def test_a_llava_mini_checkpoint_exports_by_repo_id_with_its_clip_from_mm_vision_tower(mini, tmp_path):
    sft, clip = mini
    cache = tmp_path / "cache"
    write_cached_repo(cache, "test-org/tiny-mini", folder_files(sft))  # config: openai/clip-vit-large-patch14-336
    write_cached_repo(cache, "openai/clip-vit-large-patch14-336", folder_files(clip))
    local = tmp_path / "tiny-mini"
    shutil.copytree(sft, local)
    by_folder, by_repo = tmp_path / "a", tmp_path / "b"
    assert run(cache, "export", local, "--vision-tower", clip, "--out", by_folder, *FAST).returncode == 0
    made = run(cache, "export", "test-org/tiny-mini", "--out", by_repo, *FAST)
    assert made.returncode == 0, made.stderr[-2000:]
    assert hashes(by_repo) == hashes(by_folder)
    roles = [h["role"] for h in json.loads((by_repo / "manifest.json").read_text())["source"]["hub"]]
    assert roles == ["checkpoint", "vision_tower"]


def test_pull_then_ask_by_repo_id_answers_as_the_local_bundle(hub, exports, tmp_path):
    _, cache, _ = hub
    by_folder, _ = exports
    write_cached_repo(cache, BUNDLE, folder_files(by_folder))
    pulled = run(cache, "pull", BUNDLE)
    assert pulled.returncode == 0 and "files verified" in pulled.stdout, pulled.stderr
    ask = ["ask", EXAMPLE, "How many shapes are there?", "--json", "--temperature", "0", "--max-tokens", "8",
           "--no-cache"]
    here = run(cache, *ask, "--model", by_folder)
    there = run(cache, *ask, "--model", BUNDLE)
    assert there.returncode == 0, there.stderr
    assert json.loads(there.stdout)["token_ids"] == json.loads(here.stdout)["token_ids"]
    info = run(cache, "info", BUNDLE, "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["verified"]
    names = subprocess.run([sys.executable, "-c", "from convllava_edge.serve.options import served_names; "
                            f"print(sorted(served_names([{BUNDLE!r}])))"], capture_output=True, text=True,
                           env=env(cache), timeout=120)
    assert names.stdout.strip() == "['tiny-bundle']", names.stderr  # serve names it by the repo's name part


def test_a_local_folder_of_the_repo_name_wins(hub, exports, tmp_path):
    _, cache, _ = hub
    by_folder, _ = exports
    shutil.copytree(by_folder, tmp_path / "other-org" / "mine")
    result = run(tmp_path / "empty-cache", "info", "other-org/mine", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr  # no cache at all: the folder was read


def test_a_tampered_cached_file_is_refused_and_removed(hub, exports, tmp_path):
    _, cache, _ = hub
    by_folder, _ = exports
    repo = "test-org/tampered"
    write_cached_repo(cache, repo, folder_files(by_folder))
    snapshot = next((repo_folder(cache, repo) / "snapshots").iterdir())
    gguf = next(p for p in snapshot.iterdir() if p.suffix == ".gguf")
    blob = gguf.resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = run(cache, "pull", repo)
    err = result.stderr.strip()
    assert result.returncode == 1 and len(err.splitlines()) == 1 and err.startswith(f"error: {repo}: "), err
    assert "SHA-256 does not match" in err and "removed from the cache" in err
    assert not blob.exists() and not gguf.exists()  # nothing corrupt left for the next use
    asked = run(cache, "ask", EXAMPLE, "hi", "--model", repo)
    assert asked.returncode == 1 and "missing" in asked.stderr  # refused before any answer


@pytest.mark.parametrize("args, fragment", [
    (["export", "test-org/nowhere", "--out", "{out}"], "test-org/nowhere: not in the Hugging Face cache"),
    (["export", "test-org/not-a-checkpoint", "--out", "{out}"], "test-org/not-a-checkpoint: not a checkpoint this exports"),
    (["pull", "test-org/not-a-bundle"], "test-org/not-a-bundle: not a convllava-edge bundle"),
    (["pull", "test-org/nowhere@v9"], "test-org/nowhere@v9: not in the Hugging Face cache"),
    (["ask", str(EXAMPLE), "hi", "--model", "test-org/nowhere"], "test-org/nowhere: not in the Hugging Face cache"),
])
def test_bad_repos_are_one_line_and_leave_nothing(hub, tmp_path, args, fragment):
    _, cache, _ = hub
    write_cached_repo(cache, "test-org/not-a-checkpoint", {"config.json": b'{"model_type": "bert"}'})
    write_cached_repo(cache, "test-org/not-a-bundle", {"README.md": b"# words\n"})
    out = tmp_path / "out"
    result = run(cache, *[a.format(out=out) for a in args])
    err = result.stderr.strip()
    assert result.returncode == 1 and len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()
