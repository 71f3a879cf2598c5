"""batch's pieces without a model: what INPUTS expand to, the items asked, and the answer log's resume rules
(a torn last line cut off, a foreign line refused with the file left as it was, appends in one write)."""

from __future__ import annotations

import json

import pytest

from convllava_edge.batch import AnswerLog, Item, expand_images, make_items, read_questions
from convllava_edge.errors import ConfigError


def test_inputs_expand_in_order_each_once(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/2.png", "a/1.JPG", "a/notes.txt", "b.webp", "c.gif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "deep").mkdir()
    (tmp_path / "a" / "deep" / "3.png").write_bytes(b"x")
    found = expand_images([str(tmp_path / "b.webp"), str(tmp_path / "a"), str(tmp_path / "*.webp"),
                           str(tmp_path / "c.gif")])
    names = [p.removeprefix(str(tmp_path) + "/") for p in found]
    assert names == ["b.webp", "a/1.JPG", "a/2.png", "a/deep/3.png", "c.gif"]
    for bad, fragment in ((tmp_path / "nope", "no such file"), (tmp_path / "*.bmp", "no file matches")):
        with pytest.raises(ConfigError, match=fragment):
            expand_images([str(bad)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no image files"):
        expand_images([str(tmp_path / "empty")])


def test_questions_and_items(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "A?"}\n\n{"image": "x.png", "question": "B?"}\n')
    rows = read_questions(q)
    assert rows == [{"question": "A?"}, {"image": str(tmp_path / "x.png"), "question": "B?"}]
    items = make_items(["1.png", "2.png"], ["C?", "A?"], rows)
    assert items == [Item("1.png", "C?"), Item("1.png", "A?"), Item("2.png", "C?"), Item("2.png", "A?"),
                     Item(str(tmp_path / "x.png"), "B?")]
    assert make_items(["1.png"], ["A?", "A?"], []) == [Item("1.png", "A?")]  # each (image, question) once
    with pytest.raises(ConfigError, match="nothing to ask"):
        make_items(["1.png"], [], [])
    for text, fragment in (("{nope", "q.jsonl:1: not a JSON line"), ('{"q": 1}', "q.jsonl:1: expected"),
                           ('{"question": "?", "image": 3}', "must be a path"), ("\n", "no questions")):
        q.write_text(text)
        with pytest.raises(ConfigError, match=fragment):
            read_questions(q)


def test_the_log_resumes_repairs_and_refuses(tmp_path):
    out = tmp_path / "deep" / "a.jsonl"
    with AnswerLog(out) as log:
        assert log.done == set()
        log.write({"image": "1.png", "question": "A?", "answer": "3"})
        log.write({"image": "2.png", "question": "A?", "error": "2.png: not an image"})
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == ["1.png", "2.png"]
    with open(out, "ab") as f:
        f.write(b'{"image": "3.png", "quest')  # a kill inside a write
    with AnswerLog(out) as log:
        assert log.done == {("1.png", "A?"), ("2.png", "A?")} and log.repaired == len(b'{"image": "3.png", "quest')
        log.write({"image": "3.png", "question": "A?", "answer": "é"})
    assert out.read_text(encoding="utf-8").endswith('"answer": "é"}\n') and len(out.read_text().splitlines()) == 3
    for text in (b'{"a": 1}', b'{"image": "1.png", "question": "A?"}\nnot ours, no newline'):
        other = tmp_path / "other.jsonl"
        other.write_bytes(text)  # another file's last line is never taken for a torn one of ours
        with pytest.raises(ConfigError, match="not an answer line"):
            AnswerLog(other)
        assert other.read_bytes() == text
    foreign = tmp_path / "f.jsonl"
    foreign.write_text('{"image": "1.png", "question": "A?"}\n["not", "ours"]\n')
    with pytest.raises(ConfigError, match="f.jsonl:2: not an answer line"):
        AnswerLog(foreign)
    assert foreign.read_text() == '{"image": "1.png", "question": "A?"}\n["not", "ours"]\n'
