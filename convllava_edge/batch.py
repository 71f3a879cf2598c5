"""``convllava-edge batch``: answers for many images, one JSON line per (image, question), resumable.

The work is a list of ``Item`` (an image path and a question); ``AnswerLog`` is the output JSONL, which a rerun
reads to skip what is already answered; ``answer_line`` answers one item with a loaded Model (the local loop
here and each Ray actor, ray_batch.py, call it, so both write the same lines). An unreadable image or a prompt
the context cannot hold becomes an error line; any other failure (the bundle, an LLM server down) stops the job.

The log is append-only: each line goes out in one ``write`` of the whole line, and begins with a fixed marker
(``{"convllava_edge_batch": 1, ``), so a killed run leaves at most a last line of ours without its newline, which
the next run cuts off (that item is answered again); a file with any line that is not ours is refused, untouched.
An image whose file name is not UTF-8 is an error line naming it with escapes (``bad\\xff.png``); the others
are answered.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .backends.base import ContextOverflowError
from .errors import ConfigError, ImageError
from .files import LineTooLong, open_log, read_lines, read_text_file, shown
from .prompt import checked_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_QUESTIONS_LINE = 1 << 20  # a questions file's line: far above any question, far below a runaway file
MAX_QUESTIONS_BYTES = 64 << 20  # and the whole file: ~100,000 questions
# Every line the log holds begins with this field (AnswerLog.write puts it first): a line without it is not
# ours, and only a tail that begins with it is ever cut off. Logs written before it was added are refused.
MARKER_FIELD = "convllava_edge_batch"
LOG_VERSION = 1
MARKER = f'{{"{MARKER_FIELD}": {LOG_VERSION}, '.encode()
# An answer line holds the answer, its token ids and timings: kilobytes. Past this it is not a line of ours
# (and a log without newlines is not read whole into memory); the log as a whole has no cap.
MAX_LOG_LINE = 16 << 20


@dataclass(frozen=True)
class Item:
    image: str | tuple[str, ...]  # the path as found (folder + name, or as given); several: a question's images
    question: str

    @property
    def key(self) -> tuple:
        """As the log holds it: a name that is not UTF-8 as its escapes (files.shown)."""
        return (_shown_images(self.image), self.question)

    def to_json(self) -> str:
        return json.dumps([self.image if isinstance(self.image, str) else list(self.image), self.question])

    @classmethod
    def from_json(cls, text: str) -> "Item":
        image, question = json.loads(text)
        return cls(image if isinstance(image, str) else tuple(image), question)


def _shown_images(image: str | tuple[str, ...] | list) -> str | tuple[str, ...]:
    return shown(image) if isinstance(image, str) else tuple(shown(i) for i in image)


def _image_field(image: str | tuple[str, ...]) -> dict:
    """A line's image(s): ``"image"`` for one, ``"images"`` for a question about several."""
    return {"image": image} if isinstance(image, str) else {"images": list(image)}


def expand_images(inputs: Iterable[str]) -> list[str]:
    """Folders (their image files, recursively, sorted), glob patterns (sorted matches) and files, in the order
    given, each once. An input that names nothing is an error: a typo must not make an empty job. Linked
    folders are followed, but no folder twice (a link to a parent makes a loop: glob's ``**`` went round it
    until the path was too long, answering one image 41 times)."""
    found: dict[str, None] = {}
    for text in inputs:
        path = Path(text)
        if glob.has_magic(text):
            matches = _glob(text)
            if not matches:
                raise ConfigError(f"{shown(text)}: no file matches this pattern")
            found.update(dict.fromkeys(matches))
        elif path.is_dir():
            files = sorted(p for p in _files_below(text) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ConfigError(f"{shown(path)}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found.update(dict.fromkeys(files))
        elif path.is_file():
            found[text] = None
        else:
            raise ConfigError(f"{shown(path)}: no such file or folder")
    return list(found)


def _files_below(folder: str, max_depth: int | None = None) -> Iterator[str]:
    """Every file under ``folder``, linked folders followed, each folder (by device and inode) once;
    ``max_depth``: folders this many levels down are not entered (0: the folder's own files)."""
    seen: set[tuple[int, int]] = set()
    base_depth = folder.rstrip(os.sep).count(os.sep)
    for root, dirs, files in os.walk(folder, followlinks=True):
        try:
            info = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        if max_depth is not None and root.rstrip(os.sep).count(os.sep) - base_depth >= max_depth:
            dirs[:] = []
        dirs.sort()
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                yield path


def _glob(pattern: str) -> list[str]:
    """The files ``pattern`` matches, as glob.glob(recursive=True) names them, sorted; walked by _files_below,
    so no folder is entered twice (glob itself has no guard against a loop of links)."""
    parts = pattern.split(os.sep)
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = os.sep.join(parts[:first]) or ("" if not pattern.startswith(os.sep) else os.sep)
    rest = parts[first:]
    depth = None if "**" in rest else len(rest) - 1
    start = base or os.curdir
    if not os.path.isdir(start):
        return []
    out = []
    for path in _files_below(start, depth):
        rel = os.path.relpath(path, start).split(os.sep)
        if _matches(rest, rel):
            out.append(path if base else os.path.relpath(path, start))
    return sorted(out)


def _matches(pattern: list[str], parts: list[str]) -> bool:
    """glob's rules, component by component: ``**`` is any number of folders, a leading dot is matched only
    by a pattern that starts with one."""
    if not pattern:
        return not parts
    head = pattern[0]
    if head == "**":
        return any(_matches(pattern[1:], parts[i:]) for i in range(len(parts) + 1)
                   if all(not p.startswith(".") for p in parts[:i]))
    if not parts or (parts[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _matches(pattern[1:], parts[1:])


def read_questions(path: Path) -> list[dict]:
    """A JSONL file: ``{"question": ...}`` asks every image; ``{"image": ..., "question": ...}`` asks that image,
    ``{"images": [...], "question": ...}`` asks about those images together (relative paths are taken from the
    file's folder). A regular file of at most MAX_QUESTIONS_BYTES."""
    out = []
    for n, line in read_text_file(path, "--questions", MAX_QUESTIONS_BYTES, MAX_QUESTIONS_LINE):
        if not line.strip():
            continue
        where = f"{shown(path)}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not a JSON line ({e.msg})") from None
        except RecursionError:
            raise ConfigError(f"{where}: nested too deeply to be a question") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ConfigError(f'{where}: expected {{"question": "...", "image": "..." or "images": [...] (optional)}}')
        checked_text(row["question"], f"{where}: the question")  # "\ud800" parses as JSON, is no text
        if "image" in row and "images" in row:
            raise ConfigError(f'{where}: give "image" or "images", not both')
        if "image" in row:
            if not isinstance(row["image"], str):
                raise ConfigError(f"{where}: \"image\" must be a path")
            checked_text(row["image"], f"{where}: the image's path")
            row = {**row, "image": str(path.parent / row["image"])}
        elif "images" in row:
            images = row.pop("images")
            if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
                raise ConfigError(f'{where}: "images" must be a non-empty list of paths')
            for i in images:
                checked_text(i, f"{where}: an image's path")
            row["image"] = str(path.parent / images[0]) if len(images) == 1 else tuple(str(path.parent / i) for i in images)
        out.append(row)
    if not out:
        raise ConfigError(f"{shown(path)}: no questions in this file")
    return out


def make_items(images: list[str], questions: list[str], rows: list[dict]) -> list[Item]:
    """Every image with every plain question, then the questions that name their image."""
    asked = list(questions) + [r["question"] for r in rows if "image" not in r]
    items = [Item(image, q) for image in images for q in asked]
    items += [Item(r["image"], r["question"]) for r in rows if "image" in r]
    if not items:
        raise ConfigError("nothing to ask: give images and --question (or a --questions file)")
    return list(dict.fromkeys(items))


class AnswerLog:
    """The output JSONL: what it already holds (``done``), and one line appended per answer.

    Every line starts with MARKER. Opening a log reads it line by line: a complete line without the marker,
    or with it but not an answer, is refused with the file untouched; a last line without its newline is cut
    off only when it begins with the whole marker and is not valid JSON (a run killed mid-write); one that is
    whole JSON of ours but lost only its newline gets the newline back."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.done: set[tuple[str, str]] = set()
        self.repaired = 0  # bytes of a torn last line cut off
        if self.path.parent != Path() and not self.path.parent.is_dir():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--out {shown(self.path)}: cannot create its folder: {e.strerror or e}") from None
        self._fd = open_log(self.path, "--out")  # a regular file, or a new one: never a FIFO, device or folder
        try:
            self._read()
        except BaseException:
            os.close(self._fd)
            raise

    def _read(self) -> None:
        name = shown(self.path)
        end = 0
        with os.fdopen(os.dup(self._fd), "rb") as f:
            try:
                for n, line, ended in read_lines(f, MAX_LOG_LINE, name):
                    row = self._row(line)
                    if ended:
                        if row is None:
                            raise self._foreign(n, line)
                        end += len(line) + 1
                    elif row is not None:  # whole and ours, but its newline never written
                        os.write(self._fd, b"\n")
                        end += len(line) + 1
                    elif line.startswith(MARKER) and not _is_json(line):  # killed mid-write: that item runs again
                        self.repaired = len(line)
                        os.ftruncate(self._fd, end)
                    else:  # another file's last line is never taken for a torn one of ours
                        raise self._foreign(n, line)
                    if row is not None:
                        self.done.add(row)
            except LineTooLong as e:
                raise ConfigError(f"{e}: not an answer log of this tool; give another --out (the file is left "
                                  "as it is)") from None
            except OSError as e:
                raise ConfigError(f"--out {name}: cannot read: {e.strerror or e}") from None

    @staticmethod
    def _row(line: bytes) -> tuple[str, str] | None:
        """The (image or images, question) of one of our lines; None for anything else."""
        if not line.startswith(MARKER):
            return None
        try:
            row = json.loads(line)
            if row.get(MARKER_FIELD) != LOG_VERSION:
                return None
            image = row["image"] if "image" in row else tuple(row["images"])
            named = [image] if isinstance(image, str) else list(image)
            return (image, row["question"]) if all(isinstance(i, str) for i in named) else None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None

    def _foreign(self, n: int, line: bytes) -> ConfigError:
        name = shown(self.path)
        if line.startswith(b'{"image": '):
            try:
                old = isinstance(json.loads(line), dict)
            except (ValueError, RecursionError):
                old = False
            if old:
                return ConfigError(
                    f"{name}:{n}: an answer line of an earlier convllava-edge, whose lines lack the "
                    f'"{MARKER_FIELD}" field; give another --out, or mark its lines to resume it: '
                    f"sed -i 's/^{{\"image\": /{{\"{MARKER_FIELD}\": {LOG_VERSION}, \"image\": /' {name} "
                    "(the file is left as it is)")
        return ConfigError(f"{name}:{n}: not an answer line of this tool; give another --out "
                           "(the file is left as it is)")

    def write(self, row: dict) -> None:
        image = row["image"] if "image" in row else tuple(row["images"])
        row = {MARKER_FIELD: LOG_VERSION, **_image_field(image), "question": row["question"], **row}
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        assert data.startswith(MARKER)
        while data:  # one write unless the disk fills; a kill in between leaves a torn line, cut off on resume
            data = data[os.write(self._fd, data):]
        self.done.add((image, row["question"]))

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "AnswerLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except (ValueError, RecursionError):
        return False


def answer_line(model, item: Item, options) -> dict:
    """One item's line: the answer, its token ids, image tokens and timings; or the one-line error of an image
    that cannot be read, is named by a path that is not UTF-8, or makes a prompt the context cannot hold."""
    named = _shown_images(item.image)
    row = {**_image_field(named), "question": item.question}
    names = [named] if isinstance(named, str) else list(named)
    paths = [item.image] if isinstance(item.image, str) else list(item.image)
    for name, path in zip(names, paths):
        if name != path:  # JSON holds text only: the log could not name the file it answered
            return {**row, "error": f"{name}: the file name is not UTF-8 text; rename the file to have it answered"}
    try:
        answer = model.ask(item.image if isinstance(item.image, str) else list(item.image), item.question, options)
    except (ImageError, ContextOverflowError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        return {**row, "error": message if message.startswith(tuple(paths)) else f"{', '.join(paths)}: {message}"}
    constraint = getattr(options, "constraint", None)
    parsed = {"parsed": answer.parsed} if constraint is not None and constraint.is_json else {}
    return {**row, "answer": answer.text, **parsed, "token_ids": answer.token_ids,
            "n_image_tokens": answer.n_image_tokens, "stop_reason": answer.stop_reason, "cache_hit": answer.cache_hit,
            "timings": answer.timings}


def run_local(model, items: list[Item], log: AnswerLog, options, advance: Callable[[dict], None]) -> None:
    """The plain loop: each item not yet in the log, answered and written at once."""
    for item in items:
        if item.key not in log.done:
            row = answer_line(model, item, options)
            log.write(row)
            advance(row)


__all__ = ["AnswerLog", "Item", "answer_line", "expand_images", "make_items", "read_questions", "run_local"]
