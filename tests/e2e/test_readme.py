"""The README's commands that need no download, run as a newcomer would type them (from the repository's root, the
demo model): every `convllava-edge ...` line of its bash blocks and its Python block. A block whose first line says
it needs a checkpoint or is a server (`# needs ...`, `# a server: ...`, `# with the server above running`) is
covered where that line says. Its first two commands are `make` targets: CI runs them."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, re.S)
ELSEWHERE = ("# needs", "# a server", "# with the server")


def runnable(lang: str) -> list[str]:
    return [body for kind, body in BLOCKS if kind == lang and not body.startswith(ELSEWHERE)]


COMMANDS = [line.split("  #")[0].strip() for body in runnable("bash") for line in body.splitlines()
            if line.startswith("convllava-edge ")]
CHAT_INPUT = "How many shapes are there?\nWhat shape is the green one?\n\n"


def run(args: list[str], tmp_path: Path, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "CONVLLAVA_EDGE_CACHE": str(tmp_path / "cache")}
    return subprocess.run(args, cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=900)


def test_the_readme_names_its_commands():
    assert README.startswith("# convllava-edge\n\n```bash\nmake ask") and "\nmake test" in README[:400]
    assert {c.split()[1] for c in COMMANDS} >= {"ask", "chat", "check"}, COMMANDS
    assert len(README.splitlines()) <= 200


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_runs(command, tmp_path):
    args = shlex.split(command)
    proc = run([sys.executable, "-m", "convllava_edge.cli.main", *args[1:]], tmp_path,
               CHAT_INPUT if args[1] == "chat" else "")
    assert proc.returncode == 0, proc.stderr[-2000:]
    if args[1] == "ask" and "--json" in args:
        assert json.loads(proc.stdout)["answer"] == "green"
    elif args[1] == "ask":
        line = next(line for body in runnable("bash") for line in body.splitlines() if line.startswith(command))
        assert proc.stdout.strip() == re.search(r"# -> (\w+)", line)[1]  # what the README's comment says
    elif args[1] == "chat":
        assert proc.stderr.count("you>") >= 2


@pytest.mark.timeout(300)
def test_the_readme_python_block_runs(tmp_path):
    (code,) = runnable("python")
    proc = run([sys.executable, "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[:2] == ["3", "green"], proc.stdout  # the ask, then the streamed answer
