"""batch's pieces without a model: what INPUTS expand to (links followed, no folder twice), the items asked,
the questions file (a bounded regular file, text only), and the answer log's rules: every line starts with
MARKER, a torn last line of ours is cut off, anything else refused with the file left as it was (issue 32)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from convllava_edge import batch
from convllava_edge.batch import MARKER, AnswerLog, Item, expand_images, make_items, read_questions, run_local
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


def test_a_question_line_may_name_several_images(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"images": ["a.png", "b.png"], "question": "Which?"}\n{"images": ["c.png"], "question": "C?"}\n')
    rows = read_questions(q)
    both = (str(tmp_path / "a.png"), str(tmp_path / "b.png"))
    assert make_items([], [], rows) == [Item(both, "Which?"), Item(str(tmp_path / "c.png"), "C?")]
    out = tmp_path / "a.jsonl"
    with AnswerLog(out) as log:
        log.write({"images": list(both), "question": "Which?", "answer": "the first"})
    assert json.loads(out.read_text())["images"] == list(both)
    with AnswerLog(out) as log:  # resumed: the same (images, question) is done
        assert log.done == {Item(both, "Which?").key}
    assert Item.from_json(Item(both, "Which?").to_json()) == Item(both, "Which?")  # as Ray's actors receive it
    for text, fragment in (('{"images": [], "question": "?"}', "non-empty list of paths"),
                           ('{"images": "a.png", "question": "?"}', "non-empty list of paths"),
                           ('{"images": ["a.png", 3], "question": "?"}', "non-empty list of paths"),
                           ('{"image": "a.png", "images": ["b.png"], "question": "?"}', "not both")):
        q.write_text(text)
        with pytest.raises(ConfigError, match=fragment):
            read_questions(q)


def test_the_log_resumes_repairs_and_refuses(tmp_path):
    out = tmp_path / "deep" / "a.jsonl"
    with AnswerLog(out) as log:
        assert log.done == set()
        log.write({"image": "1.png", "question": "A?", "answer": "3"})
        log.write({"image": "2.png", "question": "A?", "error": "2.png: not an image"})
    lines = out.read_bytes().splitlines()
    assert all(line.startswith(MARKER) for line in lines)
    assert [json.loads(line)["image"] for line in lines] == ["1.png", "2.png"]
    torn = MARKER + b'"image": "3.png", "quest'
    with open(out, "ab") as f:
        f.write(torn)  # a kill inside a write
    with AnswerLog(out) as log:
        assert log.done == {("1.png", "A?"), ("2.png", "A?")} and log.repaired == len(torn)
        log.write({"image": "3.png", "question": "A?", "answer": "é"})
    assert out.read_text(encoding="utf-8").endswith('"answer": "é"}\n') and len(out.read_text().splitlines()) == 3
    foreign = tmp_path / "f.jsonl"
    foreign.write_bytes(lines[0] + b'\n["not", "ours"]\n')
    with pytest.raises(ConfigError, match="f.jsonl:2: not an answer line"):
        AnswerLog(foreign)
    assert foreign.read_bytes() == lines[0] + b'\n["not", "ours"]\n'


def test_a_line_of_ours_that_lost_only_its_newline_gets_it_back(tmp_path):
    out = tmp_path / "a.jsonl"
    with AnswerLog(out) as log:
        log.write({"image": "1.png", "question": "A?", "answer": "3"})
    whole = out.read_bytes()
    out.write_bytes(whole[:-1])
    with AnswerLog(out) as log:
        assert log.done == {("1.png", "A?")} and log.repaired == 0
    assert out.read_bytes() == whole


# Defect 1 of issue 32: a user's JSON file was taken for a log with a torn last line and replaced.
@pytest.mark.parametrize("text", [
    json.dumps({"image": "cat.png", "label": "cat"}).encode(),  # json.dump writes no final newline
    b'{"image": "a.png", "label": "a"}\n{"image": "b.png", "lab',  # a two-line file, the last line cut
    b'{"a": 1}',
    MARKER + b'"image": "1.png", "question": "A?"}\nnot ours, no newline',
    MARKER + b'"note": "valid JSON, not an answer"}',  # whole JSON with our marker: not torn, not ours
    b'{"convllava_edge_batch": 1,"image": "x", "quest',  # not the whole marker
], ids=["labels.json", "two-lines", "other-json", "foreign-tail", "marker-not-answer", "part-marker"])
def test_a_file_that_is_not_our_log_is_refused_untouched(tmp_path, text):
    other = tmp_path / "labels.json"
    other.write_bytes(text)
    with pytest.raises(ConfigError, match="not an answer line|earlier convllava-edge"):
        AnswerLog(other)
    assert other.read_bytes() == text


def test_a_log_from_before_the_marker_is_refused_saying_how_to_go_on(tmp_path):
    old = tmp_path / "old.jsonl"
    text = b'{"image": "1.png", "question": "A?", "answer": "3"}\n'
    old.write_bytes(text)
    with pytest.raises(ConfigError) as caught:
        AnswerLog(old)
    message = str(caught.value)
    assert "old.jsonl:1: an answer line of an earlier convllava-edge" in message and "sed -i" in message
    assert old.read_bytes() == text
    command = message.split("resume it: ", 1)[1].rsplit(" (the file", 1)[0]
    subprocess.run(command, shell=True, check=True)  # the command the message gives does what it says
    with AnswerLog(old) as log:
        assert log.done == {("1.png", "A?")}


# Defect 3: FIFOs blocked forever, devices were read whole; defect 13: a folder was "unexpected".
@pytest.mark.timeout(20)
def test_out_must_be_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    for path, fragment in ((tmp_path / "fifo", "is a FIFO"), ("/dev/null", "is a device"), ("/dev/full", "is a device"),
                           (tmp_path / "folder", "is a folder")):
        with pytest.raises(ConfigError, match=fragment) as caught:
            AnswerLog(Path(path))
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.timeout(20)
def test_questions_must_be_a_bounded_regular_file(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "fifo")
    for path, fragment in ((tmp_path / "fifo", "is a FIFO"), ("/dev/zero", "is a device"), (tmp_path, "is a folder"),
                           (tmp_path / "missing.jsonl", "no such file")):
        with pytest.raises(ConfigError, match=fragment):
            read_questions(Path(path))
    long_line = tmp_path / "long.jsonl"
    long_line.write_bytes(b"x" * (batch.MAX_QUESTIONS_LINE + 10))  # no newline at all
    with pytest.raises(ConfigError, match="long.jsonl:1: a line over"):
        read_questions(long_line)
    monkeypatch.setattr(batch, "MAX_QUESTIONS_BYTES", 100)
    big = tmp_path / "big.jsonl"
    big.write_text('{"question": "A?"}\n' * 10)
    with pytest.raises(ConfigError, match="more than the 100 allowed"):
        read_questions(big)


def test_the_log_has_a_cap_per_line_not_on_the_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "MAX_LOG_LINE", 200)
    out = tmp_path / "a.jsonl"
    with AnswerLog(out) as log:
        for i in range(50):  # 50 lines of ~100 bytes: far more than one line's cap in all
            log.write({"image": f"{i}.png", "question": "A?", "answer": "x" * 20})
    with AnswerLog(out) as log:
        assert len(log.done) == 50
    out.write_bytes(MARKER + b"x" * 300)  # a runaway line: refused after the cap, not read whole
    with pytest.raises(ConfigError, match="a line over 200 bytes"):
        AnswerLog(out)


# Defect 7: a lone surrogate in a questions file was "unexpected"
def test_a_question_that_is_not_text_names_its_line(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "A?"}\n{"question": "\\ud800 what?"}\n')
    with pytest.raises(ConfigError, match=r"q.jsonl:2: the question is not valid UTF-8 \(at character 0: \\ud800\)"):
        read_questions(q)
    q.write_text('{"question": "A?", "image": "\\udcff.png"}\n')
    with pytest.raises(ConfigError, match="q.jsonl:1: the image's path is not valid UTF-8"):
        read_questions(q)
    q.write_text("[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="q.jsonl:1: nested too deeply"):
        read_questions(q)


# Defect 4: a file name that is not UTF-8 ended the whole job
def test_a_name_that_is_not_utf8_is_an_error_line_and_the_others_are_answered(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(b"x")
    bad_name = os.path.join(os.fsencode(tmp_path), b"bad\xff.png")
    open(bad_name, "wb").write(b"x")
    images = expand_images([str(tmp_path)])
    assert len(images) == 2

    class Answers:
        def ask(self, image, question, options):
            return type("A", (), dict(text=f"seen {Path(image).name}", token_ids=[1], n_image_tokens=4,
                                      stop_reason="eos", cache_hit=False, timings={}))()

    out = tmp_path / "answers.jsonl"
    items = make_items(images, ["A?"], [])
    with AnswerLog(out) as log:
        run_local(Answers(), items, log, None, lambda row: None)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    errors = [r for r in rows if "error" in r]
    assert [r["answer"] for r in rows if "answer" in r] == ["seen good.png"]
    assert len(errors) == 1 and errors[0]["image"].endswith("bad\\xff.png") and "not UTF-8" in errors[0]["error"]
    with AnswerLog(out) as log:  # a rerun finds both answered: the key is the name as the log holds it
        assert all(item.key in log.done for item in items)


# Defect 13: a recursive glob over a symlink loop answered one image 41 times
def test_links_are_followed_but_no_folder_twice(tmp_path):
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    (tmp_path / "photos" / "a.png").write_bytes(b"x")
    (tmp_path / "photos" / "sub" / "b.png").write_bytes(b"x")
    (tmp_path / "photos" / "sub" / "loop").symlink_to(tmp_path / "photos", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.png").write_bytes(b"x")
    (tmp_path / "photos" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    base = str(tmp_path / "photos")
    for found in (expand_images([base + "/**/*.png"]), expand_images([base])):
        names = [p.removeprefix(base + "/") for p in found]
        assert sorted(names) == ["a.png", "linked/c.png", "sub/b.png"], names
    assert expand_images([base + "/*.png"]) == [base + "/a.png"]  # one level: as glob.glob
    assert expand_images([base + "/s*/*.png"]) == [base + "/sub/b.png"]
    (tmp_path / "photos" / ".hidden.png").write_bytes(b"x")
    assert base + "/.hidden.png" not in expand_images([base + "/**/*.png"])  # glob's rule for dot files
