"""The files the tool reads and writes, and what it may replace.

Reading: what a command-line option names (``--questions``, ``batch --out``'s log) gets the image path's
treatment (image.py): opened without blocking (a FIFO would otherwise stall the open itself), then the
descriptor's ``fstat`` says whether it is a regular file, and only that descriptor is read; devices
(``/dev/zero``), FIFOs, sockets and folders are refused in one line naming the path. Text is read line by
line with a cap on each line, so a file without newlines cannot fill the memory; files with a known
small size (a questions file) also get a cap on the whole.
Writing files: exactly the path given (NumPy's ``np.save`` adds ``.npy`` to a name, so writers get an open file),
whole or not at all (a temporary file beside it, synced, renamed over it), and only where a regular file
is or may be: a folder, a device (``/dev/full``, ``/dev/null``) or a FIFO is refused before any work.
Folders: made with ``mkdtemp`` (0700 whatever the umask), they get the modes ``mkdir``/``open`` would
give, so that another user (a Triton server, a web server) can read them as any folder the user makes;
a folder is replaced only when it holds nothing beyond what the tool's own record of it lists
(``first_unlisted``: export's manifest, deploy's marker).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, Iterator

from .errors import ConfigError

DIR_MODE, FILE_MODE = 0o777, 0o666  # what mkdir(2) and open(2) ask for by default; the umask takes from these


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


# -- reading -----------------------------------------------------------------------------------------
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_READ_FLAGS = os.O_RDONLY | _NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
# A log the tool appends to and reads back (batch --out): created when missing, never truncated here.
_LOG_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | _NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def shown(path: str | os.PathLike) -> str:
    """A path as messages and JSON show it: itself when it is text, else its bytes with Python's escapes
    (``bad\\xff.png``): a name that is not UTF-8 reaches Python as lone surrogates, which no encoder takes."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def open_regular(path: str | os.PathLike, what: str, flags: int = _READ_FLAGS, mode: int = 0o666) -> int:
    """A descriptor on ``path``, which must be a regular file (``what``: the option naming it, e.g.
    "--questions"); ConfigError in one line otherwise. The check is of the descriptor opened, not the name:
    a file swapped for a FIFO or a device after a check by name is still refused."""
    name = f"{what} {shown(path)}".strip()
    try:
        fd = os.open(path, flags, mode)
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file" + ("" if Path(path).parent.is_dir() else
                          f" (folder {shown(Path(path).parent)} does not exist)")) from None
    except IsADirectoryError:
        raise ConfigError(f"{name} is a folder; expected a file") from None
    except OSError as e:  # ENXIO: a FIFO opened for writing with no reader; EACCES, ELOOP, ENOTDIR
        raise ConfigError(f"{name}: cannot open: {e.strerror or e}") from None
    except ValueError:  # a NUL in the name
        raise ConfigError(f"{name}: not a valid path") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{name} is {_kind(info.st_mode)}; expected a regular file")
        if _NONBLOCK:
            os.set_blocking(fd, True)  # a regular file never blocks; writes must not come back short with EAGAIN
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_log(path: str | os.PathLike, what: str) -> int:
    """``path`` opened to read and append, created (with the umask's mode) when missing; a regular file only."""
    return open_regular(path, what, _LOG_FLAGS, FILE_MODE)


class LineTooLong(ConfigError):
    """A line over the cap: the file is not what the option expects."""


def read_lines(f: BinaryIO, max_line: int, name: str) -> Iterator[tuple[int, bytes, bool]]:
    """(line number from 1, the line without its newline, whether it had one) for each line of the open
    binary file ``f``; LineTooLong for a line over ``max_line`` bytes (nothing past the cap is read)."""
    n = 0
    while True:
        line = f.readline(max_line + 2)  # the line, its newline, and one byte to tell "over the cap"
        if not line:
            return
        n += 1
        ended = line.endswith(b"\n")
        body = line[:-1] if ended else line
        if len(body) > max_line:
            raise LineTooLong(f"{name}:{n}: a line over {max_line:,} bytes")
        yield n, body, ended


def read_text_file(path: str | os.PathLike, what: str, max_bytes: int, max_line: int) -> list[tuple[int, str]]:
    """(line number, text) of each line of a small UTF-8 file: a regular file of at most ``max_bytes``."""
    name = f"{what} {shown(path)}".strip()
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise ConfigError(f"{name} is {size:,} bytes, more than the {max_bytes:,} allowed")
        out = []
        try:
            for n, line, _ in read_lines(f, max_line, name):
                try:
                    out.append((n, line.decode("utf-8")))
                except UnicodeDecodeError as e:
                    raise ConfigError(f"{name}:{n}: not UTF-8 text (byte {line[e.start]:#04x} at {e.start})") from None
                if f.tell() > max_bytes:  # it grew after the fstat
                    raise ConfigError(f"{name} is more than the {max_bytes:,} bytes allowed")
        except OSError as e:
            raise ConfigError(f"{name}: cannot read: {e.strerror or e}") from None
    return out


# -- writing -----------------------------------------------------------------------------------------
def check_output_file(path: Path, what: str = "") -> os.stat_result | None:
    """Refuse a ``path`` that is not a regular file nor a new name in an existing folder, in one line naming
    it (``what``: the option, e.g. "--save"). Returns the existing file's stat, None for a new one.
    Links are followed: writing through a link to a file writes that file."""
    shown = f"{what} {path}" if what else str(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as e:  # ENOTDIR (a file used as a folder), ELOOP, EACCES
        raise ConfigError(f"{shown}: cannot use this path: {e.strerror or e}") from None
    if info is not None:
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{shown} is {_kind(info.st_mode)}; expected a regular file or a new name")
        return info
    parent = Path(os.path.realpath(path)).parent
    if not parent.is_dir():
        raise ConfigError(f"{shown}: folder {Path(path).parent} does not exist")
    return None


def write_file_atomically(path: Path, write: Callable[[BinaryIO], None], what: str = "") -> Path:
    """``write(f)`` into a temporary file beside ``path``, synced, then renamed onto it: a reader sees the
    old file or the whole new one, never a part. A replaced file keeps its mode; a new one gets the umask's.
    Returns the file written (through a link, its target)."""
    shown = f"{what} {path}" if what else str(path)
    info = check_output_file(path, what)
    target = Path(os.path.realpath(path))  # os.replace onto a link would replace the link, not the file
    mode = stat.S_IMODE(info.st_mode) if info is not None else FILE_MODE & ~umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as e:
        raise ConfigError(f"{shown}: cannot write in {target.parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp's 0600 otherwise
            write(f)
            f.flush()
            os.fsync(f.fileno())
        check_output_file(path, what)  # again: the place may have become a folder during the work
        os.replace(tmp, target)
    except OSError as e:
        os.unlink(tmp)
        raise ConfigError(f"{shown}: cannot write: {e.strerror or e}") from None
    except BaseException:
        os.unlink(tmp)
        raise
    _sync_folder(target.parent)
    return target


def _sync_folder(folder: Path) -> None:
    """The rename itself on disk (POSIX: fsync of the folder); best effort, some file systems refuse it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask, read without changing it where /proc allows (Linux >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere set-and-restore is the only way: racy if another thread creates files meanwhile,
    # acceptable for a command-line tool.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_default_modes(folder: Path) -> None:
    """The modes mkdir/open give under the umask, on ``folder`` and all it holds (mkdtemp makes it 0700)."""
    mask = umask()
    os.chmod(folder, DIR_MODE & ~mask)
    for root, dirs, files in os.walk(folder):
        for name, mode in [(d, DIR_MODE) for d in dirs] + [(f, FILE_MODE) for f in files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # a link's own mode means nothing; its target is not ours
                os.chmod(path, mode & ~mask)


class TooManyEntries(Exception):
    """A folder holds more entries than are worth walking to decide whether it is ours."""


def first_unlisted(folder: Path, listed: Iterable[str], max_entries: int) -> str | None:
    """The first entry of ``folder`` (a relative POSIX path) that is neither in ``listed`` nor a folder above
    a listed file; None when there is none. Links are not followed (a linked folder is one entry).
    OSError: a folder that cannot be listed; TooManyEntries past ``max_entries``."""
    listed = set(listed)
    parents = {str(parent) for p in listed for parent in PurePosixPath(p).parents}
    seen = 0

    def unreadable(e: OSError):
        raise e

    for root, dirs, files in os.walk(folder, onerror=unreadable):  # lazily: a huge tree stops at max_entries
        for name in dirs + files:
            seen += 1
            rel = (Path(root) / name).relative_to(folder).as_posix()
            is_dir = name in dirs and not os.path.islink(os.path.join(root, name))
            if (rel not in parents) if is_dir else (rel not in listed):
                return rel
            if seen > max_entries:
                raise TooManyEntries(max_entries)
    return None
