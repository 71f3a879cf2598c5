"""Models by repo id against a loopback server that speaks the Hub's file protocol (tests/support/fake_hub.py,
checked against the pinned huggingface_hub 2.4.0), reached through ``HF_ENDPOINT``: what offline cannot show.

- ``pull`` downloads a published bundle into the cache, verified; ``ask --model ORG/NAME`` then runs offline, with
  no request to the server.
- A connection cut mid-file is resumed (a ``Range`` request) and the file arrives whole: the client writes whole
  ``DOWNLOAD_CHUNK_SIZE`` chunks, so the child lowers it to 64 KiB to resume inside a small file.
- The Hub's errors (RepoNotFound, GatedRepo, RevisionNotFound), a connection that never completes, a repo that is
  not a bundle: one line naming the repo, exit 1, nothing in ``--out`` and nothing partial in the cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.fake_hub import FakeHub
from support.hub_cache import env, folder_files

BUNDLE = "pub-org/tiny-bundle"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shapes-1.png"
SMALL_CHUNKS = "import huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = 65536; "


def run(hub: FakeHub, cache: Path, *args, offline: bool = False, prelude: str = "") -> subprocess.CompletedProcess:
    code = prelude + ("import sys; from convllava_edge.cli.main import main; "
                      "raise SystemExit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=env(cache, offline=offline, HF_ENDPOINT=hub.url,
                                  CONVLLAVA_EDGE_CACHE=str(cache.parent / "ce")))


@pytest.fixture(scope="module")
def bundle(tiny, exported):
    return exported(tiny.bin_ckpt, vision_types=("fp32",), llm_type="F32")


@pytest.fixture(scope="module")
def hub(bundle):
    files = {name: path.read_bytes() for name, path in folder_files(bundle).items()}
    with FakeHub() as server:
        server.add_repo(BUNDLE, files)
        server.add_repo("pub-org/gated-bundle", files, gated=True)
        server.add_repo("pub-org/words", {"README.md": b"# not a bundle\n"})
        yield server


def test_pull_downloads_a_bundle_and_ask_then_runs_offline(hub, bundle, tmp_path):
    cache = tmp_path / "cache"
    pulled = run(hub, cache, "pull", BUNDLE)
    assert pulled.returncode == 0 and "files verified" in pulled.stdout, pulled.stderr[-2000:]
    before = len(hub.requests)
    ask = ["ask", EXAMPLE, "How many shapes are there?", "--json", "--temperature", "0", "--max-tokens", "6",
           "--no-cache"]
    there = run(hub, cache, *ask, "--model", BUNDLE, offline=True)
    assert there.returncode == 0, there.stderr[-2000:]
    assert len(hub.requests) == before  # from the cache, not a byte from the server
    here = run(hub, cache, *ask, "--model", bundle, offline=True)
    assert json.loads(there.stdout)["token_ids"] == json.loads(here.stdout)["token_ids"]


def test_a_cut_connection_is_resumed_and_the_file_arrives_whole(hub, bundle, tmp_path):
    gguf = next(p.name for p in bundle.iterdir() if p.suffix == ".gguf")
    size = (bundle / gguf).stat().st_size
    assert size > 4 * 65536
    hub.cut_after(gguf, size // 2)
    pulled = run(hub, tmp_path / "cache", "pull", BUNDLE, prelude=SMALL_CHUNKS)
    assert pulled.returncode == 0, pulled.stderr[-2000:]  # pull verified every file's SHA-256
    ranges = [h.get("range") for method, path, h in hub.requests if method == "GET" and path.endswith(gguf)]
    assert any(r and r.startswith("bytes=") and r != "bytes=0-" for r in ranges), ranges


@pytest.mark.parametrize("args, fragment", [
    (["pull", "pub-org/nowhere"], "pub-org/nowhere: no such model repository on the Hub"),
    (["pull", "pub-org/gated-bundle"], "pub-org/gated-bundle: a gated repository"),
    (["pull", f"{BUNDLE}@v9"], f"{BUNDLE}@v9: no revision 'v9'"),
    (["pull", "pub-org/words"], "pub-org/words: not a convllava-edge bundle"),
    (["export", "pub-org/nowhere", "--out", "{out}"], "pub-org/nowhere: no such model repository on the Hub"),
    (["ask", str(EXAMPLE), "hi", "--model", "pub-org/nowhere"], "pub-org/nowhere: no such model repository"),
])
def test_the_hubs_errors_are_one_line_naming_the_repo(hub, tmp_path, args, fragment):
    out = tmp_path / "out"
    result = run(hub, tmp_path / "cache", *[a.format(out=out) for a in args])
    assert result.returncode == 1 and last_line(result).startswith("error: ") and fragment in last_line(result), \
        result.stderr
    assert not out.exists()


def last_line(result: subprocess.CompletedProcess) -> str:
    """The error line, after huggingface_hub's own progress bars (stderr); never a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_download_that_never_completes_leaves_nothing_partial(hub, bundle, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    small = min(manifest["files"], key=lambda f: f["size"])["path"]
    hub.cut_after(small, 10, times=6)  # every try of the client's cut: it gives up
    cache = tmp_path / "cache"
    result = run(hub, cache, "pull", BUNDLE)
    assert result.returncode == 1 and last_line(result).startswith(f"error: {BUNDLE}: the download failed")
    assert not [p for p in cache.rglob("*") if p.name.endswith(".incomplete")]
    assert not [p for p in cache.rglob(small) if p.is_file()]  # no half file under the name
    hub.cut_after(small, 0, times=0)
    assert run(hub, cache, "pull", BUNDLE).returncode == 0  # the next pull completes it
