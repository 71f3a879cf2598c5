"""Models by Hugging Face repo id: checkpoints to export and published bundles, through ``huggingface_hub``.

Everything goes through huggingface_hub's own cache and settings (``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``,
``HF_ENDPOINT``; resumable downloads with its progress bars): this module only says what to fetch, turns the
library's exceptions into one line naming the repo, and checks a bundle's files against its manifest. A spec is
``ORG/NAME`` or ``ORG/NAME@REVISION``; an existing local folder of that name always wins.

A pulled bundle lives in the hub cache as the library lays it out (``models--ORG--NAME/snapshots/COMMIT/``, each
file a link into ``blobs/``): manifest.resolve_inside accepts links into the repo's own ``blobs`` folder. Every file
is verified against the manifest's SHA-256 when pulled (and, as for any bundle, when a Model loads it); a file that
does not match is removed from the cache, so the next pull fetches it again.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .errors import BundleError, ConvLlavaEdgeError

# ORG/NAME[@REVISION]: the Hub's names (letters, digits, - _ .), one slash; a revision is a branch, tag or commit
_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[\w./-]{1,200}))?$")
MANIFEST = "manifest.json"
CARD = "README.md"


class HubError(ConvLlavaEdgeError):
    """A repo id that cannot be resolved: missing, gated, no such revision, offline and not cached, not a bundle."""


@dataclass(frozen=True)
class Resolved:
    """A repo's files on this machine: the snapshot folder, and what it is (for manifests and messages)."""

    path: Path
    repo: str
    revision: str | None  # as asked (None: the default branch)
    commit: str  # the snapshot's commit sha

    @property
    def name(self) -> str:
        """The repo's name part: what a bundle exported or served from it is called."""
        return self.repo.split("/", 1)[1]

    def to_dict(self, role: str) -> dict:
        return {"role": role, "repo": self.repo, "revision": self.revision or "main", "commit": self.commit}


def parse_spec(spec: str) -> tuple[str, str | None] | None:
    """(repo, revision or None) when ``spec`` reads as a repo id, else None."""
    text = str(spec)
    if text.startswith((".", "/", "~")) or os.sep == "\\" and "\\" in text:
        return None
    match = _SPEC.match(text)
    return (match["repo"], match["rev"]) if match else None


def is_repo_spec(spec: str | os.PathLike) -> bool:
    """A repo id, and no local file or folder of that name (a local one always wins)."""
    return not Path(spec).exists() and parse_spec(str(spec)) is not None


def _library():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401 - submodules the package does not load by itself
        import huggingface_hub.errors  # noqa: F401
    except ImportError:
        raise HubError("models by repo id need huggingface_hub: pip install 'convllava-edge[hub]'") from None
    return huggingface_hub


@contextlib.contextmanager
def _one_line(repo: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions as one HubError naming the repo and what is missing."""
    errors = _library().errors
    import httpx2 as httpx  # huggingface_hub 2.x's HTTP client (a fork of httpx, its own exceptions)

    named = f"{repo}@{revision}" if revision else repo
    try:
        yield
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):  # before EntryNotFoundError: a subclass
        raise HubError(f"{named}: not in the Hugging Face cache ({_cache_dir()}) and the Hub cannot be reached "
                       "(offline: HF_HUB_OFFLINE, or no network)") from None
    except errors.GatedRepoError:  # before RepositoryNotFoundError: a subclass
        raise HubError(f"{named}: a gated repository: accept its terms on the Hub, then set HF_TOKEN "
                       "(or run `hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{named}: no revision {revision or 'main'!r} in this repository") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{named}: no such model repository on the Hub (a private one needs HF_TOKEN)") from None
    except errors.EntryNotFoundError as e:
        raise HubError(f"{named}: a file is missing from the repository ({_first_line(e)})") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{named}: the Hub refused the download: {_first_line(e)}") from None
    except errors.HFValidationError as e:
        raise HubError(f"{named}: not a valid repo id or revision ({_first_line(e)})") from None
    except (httpx.HTTPError, OSError) as e:
        raise HubError(f"{named}: the download failed: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cache_dir() -> str:
    return str(_library().constants.HF_HUB_CACHE)


def download(spec: str, patterns: Sequence[str] | None = None) -> Resolved:
    """The repo's files matching ``patterns`` (None: all) in the hub cache, downloaded where missing."""
    parsed = parse_spec(spec)
    if parsed is None:
        raise HubError(f"{spec}: not a repo id (ORG/NAME or ORG/NAME@REVISION) and no such folder")
    repo, revision = parsed
    hub = _library()
    with _one_line(repo, revision):
        folder = Path(hub.snapshot_download(repo, revision=revision, allow_patterns=list(patterns) if patterns else None))
    return Resolved(folder, repo, revision, folder.name)


def fetch_file(spec: str, filename: str) -> Resolved:
    """One file of the repo (a checkpoint's config.json, a bundle's manifest.json), to look before fetching all."""
    return download(spec, [filename])


def cached(spec: str) -> Resolved | None:
    """The repo's snapshot already in the cache (no network access), or None."""
    parsed = parse_spec(spec)
    if parsed is None:
        return None
    repo, revision = parsed
    hub = _library()
    try:
        folder = Path(hub.snapshot_download(repo, revision=revision, local_files_only=True))
    except (hub.errors.LocalEntryNotFoundError, hub.errors.HfHubHTTPError, OSError, ValueError):
        return None  # not in the cache (or not usable from it): the caller fetches it
    return Resolved(folder, repo, revision, folder.name)


def pull(spec: str) -> Resolved:
    """A published bundle into the hub cache: its manifest first (a repo that is not a bundle costs one small
    file), then exactly the files it lists and its model card, each verified against the manifest's SHA-256."""
    import json

    from .manifest import Manifest

    first = fetch_file(spec, MANIFEST)
    path = first.path / MANIFEST
    if not path.is_file():
        raise HubError(f"{first.repo}: not a convllava-edge bundle (no {MANIFEST})")
    try:
        listed = Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path)).files
    except (BundleError, ValueError, RecursionError) as e:
        raise HubError(f"{first.repo}: not a convllava-edge bundle ({_first_line(e)})") from None
    got = download(spec, [MANIFEST, CARD, *(f.path for f in listed)])
    verify(got)
    return got


def verify(resolved: Resolved) -> None:
    """Every file the manifest lists matches its SHA-256; a file that does not is removed from the cache."""
    from .manifest import load_manifest

    try:
        load_manifest(resolved.path, verify=True)
    except BundleError as e:
        bad = _bad_file(resolved.path, str(e))
        if bad is not None:
            target = bad.resolve()
            bad.unlink(missing_ok=True)  # the snapshot's link (or copy)
            if target != bad and target.is_file():
                target.unlink()  # the blob it pointed to
        raise HubError(f"{resolved.repo}: {e}; the file was removed from the cache, pull again to fetch it") from None


def _bad_file(bundle: Path, message: str) -> Path | None:
    """The file a load_manifest error names (its path comes first), if it is inside the snapshot."""
    for part in message.split(":")[:1]:
        path = Path(part)
        if path.parent == bundle or bundle in path.parents:
            return path
    return None


def bundle_path(spec: str | os.PathLike) -> Path:
    """Where a bundle named by ``spec`` is: a local folder as it is; a repo id from the cache (no network access),
    else pulled (downloaded and verified)."""
    if not is_repo_spec(spec):
        return Path(spec)
    found = cached(str(spec))
    if found is not None and (found.path / MANIFEST).is_file():
        return found.path
    return pull(str(spec)).path


def served_name(spec: str | os.PathLike) -> str:
    """What ``serve`` calls a bundle: its folder's name, or a repo's name part."""
    parsed = parse_spec(str(spec)) if is_repo_spec(spec) else None
    return parsed[0].split("/", 1)[1] if parsed else Path(spec).resolve().name


__all__ = ["HubError", "Resolved", "bundle_path", "cached", "download", "fetch_file", "is_repo_spec", "parse_spec",
           "pull", "served_name", "verify"]
