"""A Hugging Face hub cache laid out as huggingface_hub lays it out, for tests that never reach the network.

``models--ORG--NAME/refs/REVISION`` holds the commit; ``blobs/ETAG`` each file's bytes (the ETag: its SHA-256,
as for LFS files); ``snapshots/COMMIT/PATH`` a relative symbolic link to the blob. huggingface_hub reads its
settings at import: a child process gets ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` in its environment (``env``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def repo_folder(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def write_cached_repo(cache: Path, repo: str, files: dict[str, Path | bytes], revision: str = "main") -> str:
    """The repo's files in the cache under ``revision``; returns the commit (derived from the content)."""
    contents = {name: data if isinstance(data, bytes) else Path(data).read_bytes() for name, data in files.items()}
    commit = hashlib.sha1(b"".join(n.encode() + hashlib.sha256(d).digest() for n, d in sorted(contents.items()))).hexdigest()
    root = repo_folder(cache, repo)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    for name, data in contents.items():
        etag = hashlib.sha256(data).hexdigest()
        (root / "blobs" / etag).write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(root / "blobs" / etag, link.parent))
    return commit


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` by its relative path (what a repo made from the folder holds)."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def env(cache: Path, offline: bool = True, **more: str) -> dict[str, str]:
    """The environment of a child process that uses ``cache`` (and nothing of this machine's own)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    out.update({"HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"})
    if offline:
        out["HF_HUB_OFFLINE"] = "1"
    out.update(more)
    return out
