"""`convllava-edge batch` on the demo model: the answers are `ask`'s, unreadable images are error lines, a run
killed mid-way resumes with nothing lost, repeated or torn, and `--ray` on a local Ray cluster (one for the
module, started here and stopped with ray.shutdown()) writes the same lines as the local loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from convllava_edge.cli.main import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
QUESTIONS = ["How many shapes are there?", "Is there a red circle?"]
GREEDY = ["--temperature", "0", "--max-tokens", "8"]


def scenes(folder: Path, n: int) -> Path:
    """``n`` small distinct pictures: a coloured disc and a square on a plain canvas each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (200 + i % 5 * 20, 180), (240 - i, 240, 230))
        draw = ImageDraw.Draw(image)
        draw.ellipse((20 + i, 30, 80 + i, 90), fill=(200, 30 + i, 40))
        draw.rectangle((110, 60 + i % 40, 170, 120 + i % 40), fill=(30, 60, 200))
        image.save(folder / f"scene-{i:03d}.png")
    return folder


def lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def content(rows: list[dict]) -> dict:
    """What must not depend on how the job ran: the answer or error per (image, question)."""
    return {(r["image"], r["question"]): (r.get("answer"), r.get("token_ids"), r.get("error")) for r in rows}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch-images")
    for name in ("shapes-1.png", "shapes-2.png", "probe.jpg"):
        (folder / name).write_bytes((EXAMPLES / name).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    (folder / "cut.png").write_bytes((EXAMPLES / "shapes-3.png").read_bytes()[:300])
    (folder / "notes.txt").write_text("not an image: left out of a folder")
    return folder


@pytest.mark.timeout(180)
def test_answers_are_asks_and_bad_images_are_error_lines(images, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert main(["batch", str(images), *sum([["--question", q] for q in QUESTIONS], []), "--out", str(out),
                 *GREEDY]) == 0
    assert "6 answered, 4 error line(s)" in capsys.readouterr().err
    rows = lines(out)
    assert len(rows) == 5 * len(QUESTIONS) and len(content(rows)) == len(rows)
    assert not any(r["image"].endswith("notes.txt") for r in rows)
    for row in rows:
        if Path(row["image"]).name in ("broken.png", "cut.png"):
            assert row["error"].startswith(row["image"] + ": ") and "\n" not in row["error"] and "answer" not in row
            continue
        capsys.readouterr()
        assert main(["ask", row["image"], row["question"], *GREEDY, "--json"]) == 0
        asked = json.loads(capsys.readouterr().out)
        assert (row["answer"], row["token_ids"]) == (asked["answer"], asked["token_ids"]), row
    assert main(["batch", str(images), *sum([["--question", q] for q in QUESTIONS], []), "--out", str(out),
                 *GREEDY]) == 0
    err = capsys.readouterr().err
    assert "10 already answered" in err and "0 to go" in err and lines(out) == rows  # nothing asked twice


@pytest.mark.timeout(120)
def test_questions_file_globs_and_bad_input(images, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": QUESTIONS[0]}) + "\n\n" +
                         json.dumps({"image": str(images / "probe.jpg"), "question": "What color is the triangle?"}) + "\n")
    out = tmp_path / "a.jsonl"
    assert main(["batch", str(images / "shapes-*.png"), "--questions", str(questions), "--out", str(out), *GREEDY]) == 0
    assert sorted((Path(r["image"]).name, r["question"]) for r in lines(out)) == [
        ("probe.jpg", "What color is the triangle?"), ("shapes-1.png", QUESTIONS[0]), ("shapes-2.png", QUESTIONS[0])]
    capsys.readouterr()
    pair = [str(images / "shapes-1.png"), str(images / "shapes-2.png")]
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"images": pair, "question": QUESTIONS[0]}) + "\n")
    assert main(["batch", "--questions", str(both), "--out", str(tmp_path / "both-a.jsonl"), *GREEDY]) == 0
    (row,) = lines(tmp_path / "both-a.jsonl")
    capsys.readouterr()
    assert main(["ask", *pair, QUESTIONS[0], *GREEDY, "--json"]) == 0  # a line about two images is that ask
    asked = json.loads(capsys.readouterr().out)
    assert row["images"] == pair and row["token_ids"] == asked["token_ids"] and row["n_image_tokens"] == 72
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok?"}\n{"question": 3}\n')
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("a line of something else\n")
    cases = [([str(tmp_path / "nope")], "nope: no such file or folder"),
             ([str(tmp_path / "*.webp")], "no file matches"),
             ([str(images), "--questions", str(bad)], "bad.jsonl:2: expected"),
             ([str(images), "--question", QUESTIONS[0], "--workers", "2"], "add --ray"),
             ([str(images), "--question", QUESTIONS[0], "--out", str(foreign)], "foreign.jsonl:1: not an answer line")]
    for args, fragment in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "x.jsonl")]
        assert main(["batch", *args]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert foreign.read_text() == "a line of something else\n"  # refused, not overwritten


@pytest.mark.timeout(240)
def test_a_killed_run_resumes_with_nothing_lost_repeated_or_torn(tmp_path):
    folder = scenes(tmp_path / "scenes", 40)
    out = tmp_path / "answers.jsonl"
    command = [sys.executable, "-m", "convllava_edge.cli.main", "batch", str(folder), "--question", QUESTIONS[0],
               "--out", str(out), *GREEDY]
    env = {**os.environ, "CONVLLAVA_EDGE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
            assert proc.poll() is None, "finished before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    written = out.read_text().count("\n")
    assert 5 <= written < 40
    with open(out, "a") as f:  # what a kill inside a write would leave: a line without its end
        f.write('{"convllava_edge_batch": 1, "image": "' + str(folder / "scene-039.png") + '", "question": "How many')
    assert subprocess.run(command, env=env, timeout=180, stdout=subprocess.DEVNULL).returncode == 0
    rows = lines(out)
    assert sorted(r["image"] for r in rows) == sorted(str(p) for p in folder.glob("*.png"))  # each once
    clean = tmp_path / "clean.jsonl"
    assert subprocess.run(command[:-len(GREEDY) - 2] + ["--out", str(clean), *GREEDY], env=env, timeout=180,
                          stdout=subprocess.DEVNULL).returncode == 0
    assert content(rows) == content(lines(clean))


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 << 20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.timeout(300)
def test_ray_writes_the_same_lines_as_the_local_loop(ray_cluster, images, tmp_path, capsys):
    asked = sum([["--question", q] for q in QUESTIONS], [])
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert main(["batch", str(images), *asked, "--out", str(local), *GREEDY]) == 0
    assert main(["batch", str(images), *asked, "--out", str(on_ray), *GREEDY, "--ray", "--workers", "2"]) == 0
    assert content(lines(on_ray)) == content(lines(local)) and len(lines(on_ray)) == 10
    assert ray_cluster.is_initialized()  # the test's cluster: batch used it and left it running
    assert main(["batch", str(images), *asked, "--out", str(on_ray), *GREEDY, "--ray"]) == 0  # nothing left to do
    assert "0 to go" in capsys.readouterr().err and len(lines(on_ray)) == 10
