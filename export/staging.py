"""An export's output, written whole or not at all.

Everything goes into a hidden temporary folder beside the target, which is renamed into place only
when complete. A failed or interrupted export removes its temporary folder and never touches an
existing bundle; ``force`` swaps an existing bundle out only after the new one is complete, and
only a folder that is a bundle (our manifest, nothing it does not list), never the checkpoint, the
tower or a folder holding either. Temporary folders carry their owner (PID, its start time, the
boot): those a killed export left behind are removed by the next export to the same place, those
of a live one are not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

from ..errors import ConvLlavaEdgeError, ExportError
from ..manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, check_relative
from ..files import TooManyEntries, apply_default_modes, first_unlisted
from .model_card import CARD_NAME, is_our_card

PARTIAL, OLD = ".partial-", ".old-"  # staging folders: ".OUT.partial-XXXX" (new bundle), ".OUT.old-XXXX" (swapped out)
OWNER_FILE = ".convllava-edge-owner.json"  # inside a staging folder: the export that writes it
MAX_BUNDLE_ENTRIES = 10_000  # a bundle holds tens of files; walking more is not worth it to decide


@contextlib.contextmanager
def staging_folder(out: Path, force: bool, protect: Mapping[str, Path] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, else it is removed.

    ``protect``: {"the checkpoint": folder, ...}, folders ``out`` must neither be nor hold.
    """
    given, shown = out, _shown(out)
    out = Path(os.path.abspath(out))  # ".", ".." and "a/.." become the folder they name, with its own name
    check_out(given, force, protect)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {shown}: cannot create {out.parent}: {e.strerror or e}") from e
    remove_leftovers(out)
    tmp = _staging(out, PARTIAL, shown)
    try:
        _write_owner(tmp)
        yield tmp
        apply_default_modes(tmp)  # mkdtemp's 0700 otherwise: another user could not read the bundle
        check_out(given, force, protect)  # again: the place may have changed during a long export
        # Between this unlink and the rename a SIGKILL would leave an unmarked folder that no later
        # export removes: a window of two system calls, against one as long as the export without markers.
        (tmp / OWNER_FILE).unlink()
        _swap_into_place(tmp, out, shown)
    except BaseException:  # KeyboardInterrupt too: no half bundle is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _staging(out: Path, kind: str, shown: str) -> Path:
    """A new hidden folder ``.OUT<kind>XXXX`` beside ``out`` (kind: PARTIAL or OLD)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}{kind}", dir=out.parent))
    except OSError as e:
        raise ExportError(f"--out {shown}: cannot write in {out.parent}: {e.strerror or e}") from e


def _shown(out: Path) -> str:
    """``out`` as the user wrote it, with the folder it names when that is not obvious ('.', '..')."""
    full = os.path.abspath(out)
    return str(out) if str(out) == full or Path(out).name not in ("", "..") else f"{out} ({full})"


def check_out(out: Path, force: bool, protect: Mapping[str, Path] | None = None) -> None:
    """Refuse an ``--out`` that export must not write: before any work, and again before the swap.

    Inputs are compared by resolved path (symbolic links followed), so a link to the checkpoint or
    to a folder above it is refused too.
    """
    where = Path(os.path.abspath(out))
    shown = _shown(out)
    real = _resolve(where, f"--out {shown}")
    for role, folder in (protect or {}).items():
        source = _resolve(Path(folder), str(folder))
        if real == source or real in source.parents:
            what = "is" if real == source else "holds"
            raise ExportError(f"--out {shown} {what} {role} ({folder}); export never replaces its inputs")
    if os.path.lexists(where):
        if not force:
            raise ExportError(f"{shown} already exists (use --force to replace it)")
        if where.is_symlink():
            raise ExportError(f"{shown} is a symbolic link; --force only replaces bundle folders")
        if not where.is_dir():
            raise ExportError(f"{shown} exists and is not a folder")
        reason = not_a_bundle(where)
        if reason:
            raise ExportError(f"{shown} is not a convllava-edge bundle ({reason}); --force only replaces bundles")
        return
    ancestor = where.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"--out {shown}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"--out {shown}: cannot write in {ancestor} (permission denied)")


def _resolve(path: Path, shown: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symbolic link loop (Python < 3.13)
        raise ExportError(f"{shown}: cannot resolve the path: {getattr(e, 'strerror', None) or e}") from e


def not_a_bundle(folder: Path) -> str | None:
    """Why ``folder`` is not a bundle this tool wrote, in a few words; None when it is one.

    A bundle has our manifest (schema version, created_with) and nothing it does not list: --force
    deletes the whole folder, so a file the user put there makes it not ours. Listed files may be
    missing: replacing a damaged bundle is what --force is for. An empty folder counts as one: it
    holds nothing to lose (a folder made for the bundle beforehand).
    """
    manifest = folder / MANIFEST_NAME
    try:
        with os.scandir(folder) as entries:
            if next(entries, None) is None:
                return None
        info = manifest.lstat()
        if not stat.S_ISREG(info.st_mode):  # a link, a folder, a FIFO that would block the read
            return f"{MANIFEST_NAME} is not a regular file"
        if info.st_size > MAX_MANIFEST_BYTES:
            return f"{MANIFEST_NAME} is {info.st_size} bytes"
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST_NAME}"
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        return f"{MANIFEST_NAME} unreadable: {type(e).__name__}"
    if not isinstance(data, dict) or not str(data.get("created_with", "")).startswith("convllava-edge "):
        return f"{MANIFEST_NAME} was not written by convllava-edge"
    version = data.get("schema_version")
    # Any version this tool (SCHEMA_VERSION) or a later one wrote counts: replacing needs only the file list.
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version:
        return f"{MANIFEST_NAME} has schema_version {version!r}"
    listed = {MANIFEST_NAME}
    if is_our_card(folder / CARD_NAME):  # the model card export writes beside the manifest, which does not list it
        listed.add(CARD_NAME)
    try:
        for record in data["files"]:
            check_relative(record["path"], str(manifest))
            listed.add(record["path"])
    except (KeyError, TypeError, ConvLlavaEdgeError):
        return f"{MANIFEST_NAME} has a malformed file list"
    # Not Manifest.from_dict: it asks whether the bundle can run; here only whose it is matters.
    try:
        extra = first_unlisted(folder, listed, MAX_BUNDLE_ENTRIES)
    except OSError as e:
        return f"cannot list {e.filename}: {e.strerror or e}"
    except TooManyEntries:
        return f"it holds more than {MAX_BUNDLE_ENTRIES} entries"
    return None if extra is None else f"it holds {extra!r}, which its {MANIFEST_NAME} does not list"


def _swap_into_place(tmp: Path, out: Path, shown: str) -> None:
    if not os.path.lexists(out):
        # A folder that appeared since check_out would be replaced if empty (rename's rule): POSIX
        # has no portable "rename unless it exists" for folders (Linux's renameat2 is not in os).
        try:
            os.replace(tmp, out)
        except OSError as e:
            raise ExportError(f"--out {shown}: cannot move the new bundle into place: {e.strerror or e}") from e
        return
    old = _staging(out, OLD, shown)
    try:
        _write_owner(old)
        os.replace(out, old / "bundle")
    except OSError as e:
        shutil.rmtree(old, ignore_errors=True)
        raise ExportError(f"--out {shown}: cannot move the previous bundle aside: {e.strerror or e}") from e
    try:
        os.replace(tmp, out)
    except OSError as e:
        try:
            os.replace(old / "bundle", out)  # the previous bundle goes back where it was
        except OSError:
            (old / OWNER_FILE).unlink()  # no later export may clean it away: it is the only copy
            raise ExportError(f"--out {shown}: cannot move the new bundle into place ({e.strerror or e}), nor "
                              f"the previous one back: it is in {old / 'bundle'}") from e
        shutil.rmtree(old, ignore_errors=True)
        raise ExportError(f"--out {shown}: cannot move the new bundle into place: {e.strerror or e}") from e
    shutil.rmtree(old, ignore_errors=True)


# -- owners of staging folders ---------------------------------------------------------------------
# Linux's /proc is read by hand: psutil would do it but is not a dependency, and two small files
# (/proc/PID/stat, /proc/sys/kernel/random/boot_id) are all that is needed.
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: the process's start, in clock ticks since boot (None: unknown or gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "PID (comm) ", whose comm may hold spaces and ')'
    return fields[19] if len(fields) > 19 else None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _owner_record() -> dict:
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "boot_id": _boot_id(), "pid_namespace": _pid_namespace(),
            "host": socket.gethostname()}


def _write_owner(folder: Path) -> None:
    (folder / OWNER_FILE).write_text(json.dumps(_owner_record()) + "\n", encoding="utf-8")


def owner_alive(record: dict) -> bool:
    """Whether the export that wrote ``record`` may still run; True whenever that cannot be ruled out."""
    pid = record.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return True  # not a record we wrote
    if record.get("host") != socket.gethostname() or record.get("pid_namespace") != _pid_namespace():
        return True  # another machine (a shared folder) or container: its PIDs are not ours to look up
    boot = _boot_id()
    if boot is not None and record.get("boot_id") not in (None, boot):
        return False  # written before the last reboot: every process of that boot is gone
    if boot is not None and record.get("start") is not None:
        return _start_time(pid) == record["start"]  # None: no such process; another start: the PID was reused
    try:  # no /proc (macOS...): the PID alone; a reused PID keeps the folder, which is the safe side
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def remove_leftovers(out: Path) -> list[Path]:
    """Remove ``.OUT.partial-*`` / ``.OUT.old-*`` folders that carry our owner file and whose owner is gone."""
    removed = []
    prefixes = (f".{out.name}{PARTIAL}", f".{out.name}{OLD}")
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return removed  # the export itself will say what is wrong with the folder
    for entry in entries:
        if not entry.name.startswith(prefixes) or not entry.is_dir(follow_symlinks=False):
            continue
        marker = Path(entry.path) / OWNER_FILE
        try:
            if not marker.is_file() or marker.is_symlink() or marker.stat().st_size > 4096:
                continue
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and not owner_alive(record):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed
