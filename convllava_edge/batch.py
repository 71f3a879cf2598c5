"""``convllava-edge batch``: answers for many images, one JSON line per (image, question), resumable.

The work is a list of ``Item`` (an image path and a question); ``AnswerLog`` is the output JSONL, which a rerun
reads to skip what is already answered; ``answer_line`` answers one item with a loaded Model (the local loop
here and each Ray actor, ray_batch.py, call it, so both write the same lines). An unreadable image or a prompt
the context cannot hold becomes an error line; any other failure (the bundle, an LLM server down) stops the job.

The log is append-only: each line goes out in one ``write`` of the whole line, so a killed run leaves at most a
last line without its newline, which the next run cuts off (that item is answered again); a line that is not
JSON elsewhere is refused rather than overwritten.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .backends.base import ContextOverflowError
from .errors import ConfigError, ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_QUESTIONS_LINE = 1 << 20  # a questions file's line: far above any question, far below a runaway file
LINE_START = b'{"image": '  # how every line of the log begins (AnswerLog.write: the image first)


@dataclass(frozen=True)
class Item:
    image: str  # the path as found (folder + name, or as given)
    question: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.image, self.question)


def expand_images(inputs: Iterable[str]) -> list[str]:
    """Folders (their image files, recursively, sorted), glob patterns (sorted matches) and files, in the order
    given, each once. An input that names nothing is an error: a typo must not make an empty job."""
    found: dict[str, None] = {}
    for text in inputs:
        path = Path(text)
        if glob.has_magic(text):
            matches = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise ConfigError(f"{text}: no file matches this pattern")
            found.update(dict.fromkeys(matches))
        elif path.is_dir():
            files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise ConfigError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found.update(dict.fromkeys(files))
        elif path.is_file():
            found[str(path)] = None
        else:
            raise ConfigError(f"{path}: no such file or folder")
    return list(found)


def read_questions(path: Path) -> list[dict]:
    """A JSONL file: ``{"question": ...}`` asks every image; ``{"image": ..., "question": ...}`` asks that image
    (a relative path is taken from the file's folder)."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the questions file ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line) if len(line) <= MAX_QUESTIONS_LINE else None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ConfigError(f'{path}:{n}: expected {{"question": "...", "image": "..." (optional)}}')
        if "image" in row:
            if not isinstance(row["image"], str):
                raise ConfigError(f"{path}:{n}: \"image\" must be a path")
            row = {**row, "image": str(path.parent / row["image"])}
        out.append(row)
    if not out:
        raise ConfigError(f"{path}: no questions in this file")
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
    """The output JSONL: what it already holds (``done``), and one line appended per answer."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.done: set[tuple[str, str]] = set()
        self.repaired = 0  # bytes of a torn last line cut off
        if self.path.exists():
            self._read()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _read(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        lines = data[:end].splitlines()
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                self.done.add((row["image"], row["question"]))
            except (ValueError, KeyError, TypeError):
                raise self._foreign(n) from None
        if end < len(data):  # a run killed mid-write: its last line has no newline; that item runs again
            if not data[end:].startswith(LINE_START):  # only ever a start of ours is cut off, never another file's text
                raise self._foreign(len(lines) + 1)
            self.repaired = len(data) - end
            os.truncate(self.path, end)

    def _foreign(self, n: int) -> ConfigError:
        return ConfigError(f"{self.path}:{n}: not an answer line of this tool; give another --out "
                           "(the file is left as it is)")

    def write(self, row: dict) -> None:
        row = {"image": row["image"], "question": row["question"], **row}  # the line starts as LINE_START says
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        while data:  # one write unless the disk fills; a kill in between leaves a torn line, cut off on resume
            data = data[os.write(self._fd, data):]
        self.done.add((row["image"], row["question"]))

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "AnswerLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def answer_line(model, item: Item, options) -> dict:
    """One item's line: the answer, its token ids, image tokens and timings; or the one-line error of an image
    that cannot be read or a prompt the context cannot hold."""
    row = {"image": item.image, "question": item.question}
    try:
        answer = model.ask(item.image, item.question, options)
    except (ImageError, ContextOverflowError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        return {**row, "error": message if message.startswith(item.image) else f"{item.image}: {message}"}
    return {**row, "answer": answer.text, "token_ids": answer.token_ids, "n_image_tokens": answer.n_image_tokens,
            "stop_reason": answer.stop_reason, "cache_hit": answer.cache_hit, "timings": answer.timings}


def run_local(model, items: list[Item], log: AnswerLog, options, advance: Callable[[dict], None]) -> None:
    """The plain loop: each item not yet in the log, answered and written at once."""
    for item in items:
        if item.key not in log.done:
            row = answer_line(model, item, options)
            log.write(row)
            advance(row)


__all__ = ["AnswerLog", "Item", "answer_line", "expand_images", "make_items", "read_questions", "run_local"]
