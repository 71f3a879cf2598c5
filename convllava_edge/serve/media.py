"""file:// image URLs, read from inside ``serve --media-dir`` and nowhere else.

The folder is opened once, when the app is built (it may itself be reached through a symlink: that
link is followed then, once). Every request then walks its URL's path from the folder's descriptor,
one component at a time, with ``openat`` and ``O_NOFOLLOW``, and reads the file from the descriptor
it opened. Nothing is resolved by name and re-opened, so a file swapped for a symlink between a check
and the read cannot send us outside: there is no such gap (a check-then-open of the name answered
about an outside file ~1% of the time under a swapping writer, issue 32).

Links inside the media folder are refused, whether they point inside or out (a symlink at any depth
is ELOOP or ENOTDIR under ``O_NOFOLLOW``); so are ``..`` components, non-regular files (a FIFO is
opened with ``O_NONBLOCK`` so that it cannot stall the request before fstat refuses it), and every
path or URL the OS cannot take (a NUL byte, a name too long, no permission): a MediaError naming the
URL, never an OSError. Hard links are files like any other: whoever can write the media folder
chooses what it serves.
"""

from __future__ import annotations

import errno
import os
import stat
import weakref
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

from ..errors import ConfigError

SCHEME = "file://"
# RFC 8089: "file:///p" and "file://localhost/p" both name the local path /p; any other host is remote.
LOCAL_HOSTS = ("", "localhost")
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_STEP_FLAGS = _FOLDER_FLAGS | os.O_NOFOLLOW
# O_NONBLOCK: a FIFO swapped in opens at once (and fstat refuses it); a regular file ignores the flag.
_LEAF_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
# What the OS says when a component is a symlink under O_NOFOLLOW: ELOOP for the last component
# (open(2)); for an intermediate one with O_DIRECTORY Linux says ENOTDIR (as for a plain file) or ELOOP.
_LINK_ERRNOS = (errno.ELOOP, errno.EMLINK)  # EMLINK: FreeBSD's O_NOFOLLOW answer
_READ_CHUNK = 1 << 20


class MediaError(Exception):
    """A file:// URL that cannot be served: the message names it; ``too_large`` for the size cap (413)."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


class MediaDir:
    """The media folder, open for the app's lifetime; ``read(url, max_bytes)`` is safe from many threads."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.fd = os.open(self.folder, _FOLDER_FLAGS)
        except (OSError, ValueError) as e:  # ValueError: a NUL in the name
            raise ConfigError(f"--media-dir {folder}: cannot open the folder: {getattr(e, 'strerror', None) or e}") from None
        weakref.finalize(self, os.close, self.fd)
        # A URL may name a file by the folder's real path or by the path it was given as; both are only
        # prefixes to strip here: what is read is reached from self.fd, whatever those names point at now.
        given = os.fsencode(os.path.abspath(self.folder))
        real = os.fsencode(os.path.realpath(self.folder))
        self.prefixes = tuple(dict.fromkeys(_parts(p) for p in (real, given)))

    def read(self, url: str, max_bytes: int) -> bytes:
        """The bytes of the regular file ``url`` names inside the folder, at most ``max_bytes`` of them."""
        parts = self._relative(url)
        fd = self._open(url, parts)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise MediaError(f"{url} is not a regular file")
            if st.st_size > max_bytes:
                raise _too_large(max_bytes)
            data = _read_at_most(fd, max_bytes + 1)  # bounded: the file may grow after the fstat
        except OSError as e:
            raise MediaError(f"{url}: cannot read: {e.strerror or e}") from None
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise _too_large(max_bytes)
        return data

    def _relative(self, url: str) -> tuple[bytes, ...]:
        """The URL's path components below the folder; MediaError for anything else."""
        if not url.startswith(SCHEME):
            raise MediaError(f"{url} is not a file:// URL")
        try:
            split = urlsplit(url)
        except ValueError as e:  # e.g. an unbalanced [ in the host part
            raise MediaError(f"{url} is not a valid file:// URL ({e})") from None
        if split.netloc.lower() not in LOCAL_HOSTS:
            raise MediaError(f"{url} names another host ({split.netloc}): only local paths are read")
        if split.query or split.fragment:
            raise MediaError(f"{url} has a query or fragment: write ? as %3F and # as %23 in a file name")
        path = unquote_to_bytes(split.path)  # %20 and other escapes, as Path.as_uri() writes them
        if b"\0" in path:
            raise MediaError(f"{url} contains a NUL byte")
        parts = _parts(path)
        if b".." in parts:
            raise MediaError(f"{url} has a '..' component: name the file by its path inside the media folder")
        for prefix in self.prefixes:
            if parts[:len(prefix)] == prefix and len(parts) > len(prefix):
                return parts[len(prefix):]
        raise MediaError(f"{url} is not a file inside the media folder")

    def _open(self, url: str, parts: tuple[bytes, ...]) -> int:
        """The last component's descriptor, each component opened from its parent's without following links."""
        where = self.fd
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                fd = os.open(name, _LEAF_FLAGS if last else _STEP_FLAGS, dir_fd=where)
            except OSError as e:
                raise _refusal(url, name, e, last) from None
            finally:  # the parent is done with either way; the folder's own descriptor stays open
                if where != self.fd:
                    os.close(where)
            where = fd
        return where


def _parts(path: bytes) -> tuple[bytes, ...]:
    """Components of an absolute path; empty ones (//) and '.' dropped, as the OS drops them."""
    return tuple(p for p in path.split(b"/") if p not in (b"", b"."))


def _refusal(url: str, name: bytes, e: OSError, last: bool) -> MediaError:
    shown = os.fsdecode(name)
    if e.errno in _LINK_ERRNOS or (e.errno == errno.ENOTDIR and not last):
        return MediaError(f"{url}: {shown!r} is a link or not a folder: links inside the media folder are refused")
    if e.errno == errno.ENOENT:
        return MediaError(f"{url} is not a file inside the media folder")
    return MediaError(f"{url}: cannot open {shown!r}: {e.strerror or e}")


def _too_large(max_bytes: int) -> MediaError:
    return MediaError(f"the image is over {max_bytes:,} bytes (--max-image-bytes)", too_large=True)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, total = [], 0
    while total < limit:
        chunk = os.read(fd, min(_READ_CHUNK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
