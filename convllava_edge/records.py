"""Small JSON records the tool keeps between runs (the llama.cpp probe's verdicts and trial loads, vision's
``auto`` choices), each a file written atomically inside the cache's own tagged folder (cache.py), each
carrying a version: a record of another version is not read."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


RECORDS = "native-checks"  # the folder's name (the probe's verdicts were its first records)
RECORD_VERSION = 1  # bump when a record's meaning changes: older records then no longer apply


def state_dir() -> Path:
    """Where records are kept: inside the embedding cache's own marked folder (``$CONVLLAVA_EDGE_CACHE`` moves
    both), never beside it: that variable may name a folder of the user's (``/``, a home), where the tool writes
    nothing but its one tagged subfolder (cache.py)."""
    from .cache import DiskCache

    return DiskCache().root / RECORDS


def read_record(name: str, version: int = RECORD_VERSION) -> dict | None:
    """The record ``name``, or None: missing, unreadable, or of another ``version``."""
    try:
        data = json.loads((state_dir() / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == version else None


def write_record(name: str, data: dict, version: int = RECORD_VERSION) -> None:
    """Atomic write; an unwritable cache, or a folder under the cache's name that is not ours, only means the
    check runs again next time."""
    from .cache import DiskCache

    if not DiskCache().ensure_root():
        return
    folder = state_dir()
    try:
        folder.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({**data, "version": version}, f)
        os.replace(tmp, folder / name)
    except OSError:
        pass


def claim(name: str, pid: int) -> bool:
    """Take the claim ``name`` (a file holding ``pid``) unless a live process holds it: one background job per
    record. A claim whose process is gone is taken over."""
    from .cache import DiskCache

    if not DiskCache().ensure_root():
        return False
    folder = state_dir()
    for _ in range(2):
        try:
            folder.mkdir(exist_ok=True)
            fd = os.open(folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if claim_holder(name) is not None:
                return False
            release(name)  # its process is gone: take it over
            continue
        except OSError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(str(pid))
        return True
    return False


def claim_holder(name: str) -> int | None:
    """The live process holding the claim ``name``, or None."""
    try:
        pid = int((state_dir() / name).read_text().strip())
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        return pid
    except (OSError, ValueError):
        return None
    return pid


def release(name: str) -> None:
    try:
        (state_dir() / name).unlink()
    except OSError:
        pass
