"""The files the command line reads and writes (files.py): regular files only, checked on the descriptor opened
(FIFOs, devices, sockets, folders refused at once), text read line by line with a cap per line and on the whole,
outputs a regular file or a new name; names that are not UTF-8 shown with escapes."""

from __future__ import annotations

import os

import pytest

from convllava_edge.check.inputs import load_inputs
from convllava_edge.errors import ConfigError
from convllava_edge.files import check_output_file, read_text_file, shown


# -- the command line's files: regular, read with caps -------------------------------------------------------
@pytest.mark.timeout(20)
def test_the_checks_files_are_regular_and_bounded(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for path, fragment in ((tmp_path / "fifo", "is a FIFO"), ("/dev/zero", "is a device")):
        with pytest.raises(ConfigError, match=fragment):
            load_inputs(None, path, None)
        with pytest.raises(ConfigError, match=fragment):
            load_inputs(None, None, path)


def test_reading_a_text_file_has_caps(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"one\ntwo\r\n\xff\n")
    with pytest.raises(ConfigError, match=r"t.txt:3: not UTF-8 text \(byte 0xff at 0\)"):
        read_text_file(f, "--text", 100, 100)
    f.write_bytes(b"one\ntwo")
    assert read_text_file(f, "--text", 100, 100) == [(1, "one"), (2, "two")]
    with pytest.raises(ConfigError, match="more than the 5 allowed"):
        read_text_file(f, "--text", 5, 100)
    with pytest.raises(ConfigError, match="t.txt:1: a line over 2 bytes"):
        read_text_file(f, "--text", 100, 2)


def test_outputs_are_regular_files_or_new_names(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for path, fragment in (("/dev/null", "is a device"), (tmp_path, "is a folder"), (tmp_path / "fifo", "is a FIFO"),
                           (tmp_path / "no" / "x", "does not exist")):
        with pytest.raises(ConfigError, match=fragment):
            check_output_file(path, "--save")
    assert check_output_file(tmp_path / "new.npy") is None
    bad = os.fsdecode(b"bad\xff.png")
    assert shown(bad) == "bad\\xff.png" and shown("good.png") == "good.png"
