"""Run the CLI as a user does, bounded in memory and time, and craft damaged bundles (the CLI's and export's error tests)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from convllava_edge.default_model import DEMO_BUNDLE
from convllava_edge.manifest import MANIFEST_NAME, sha256_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shapes-1.png"
GiB = 1 << 30


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def err_lines(self) -> list[str]:
        return [l for l in self.stderr.splitlines() if l.strip()]

    def assert_one_line_error(self, *needles: str) -> str:
        """Exit 1, no traceback, stderr exactly one line "error: ..." holding every needle."""
        assert self.returncode == 1, (self.returncode, self.stdout[-2000:], self.stderr[-2000:])
        assert len(self.err_lines) == 1 and self.err_lines[0].startswith("error: "), self.stderr[-3000:]
        assert "Traceback" not in self.stdout + self.stderr
        for needle in needles:
            assert needle in self.err_lines[0], (needle, self.err_lines[0])
        return self.err_lines[0]


def cli(*args: str | bytes, env: dict[str, str] | None = None, memory: int = 4 * GiB, timeout: float = 120,
        cwd: Path | None = None) -> Run:
    """``convllava-edge ARGS`` in a child with an address-space limit and a timeout."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    full_env = {**os.environ, **(env or {})}
    full_env.pop("CONVLLAVA_EDGE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "convllava_edge.cli.main", *args], capture_output=True,
                          timeout=timeout, env=full_env, preexec_fn=limit, cwd=cwd, stdin=subprocess.DEVNULL)
    return Run(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))


def copy_demo(dest: Path) -> Path:
    shutil.copytree(DEMO_BUNDLE, dest)
    return dest


def rehash(bundle: Path) -> None:
    """Rewrite the manifest's sizes and SHA-256s to match the files: what an attacker who controls the
    whole bundle does, so only checks beyond the hashes stand in the way."""
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    for record in data["files"]:
        f = bundle / record["path"]
        record["sha256"], record["size"] = sha256_file(f), f.stat().st_size
    path.write_text(json.dumps(data, indent=2))


def gguf_of(bundle: Path) -> Path:
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    return bundle / data["llm"]["file"]


def patch_gguf_scalar(path: Path, key: str, fmt: str, value) -> None:
    """Overwrite the value of a scalar metadata key in place (GGUF: key string, u32 type, value)."""
    data = bytearray(path.read_bytes())
    name = key.encode()
    at = data.find(struct.pack("<Q", len(name)) + name)
    assert at > 0, key
    at += 8 + len(name) + 4  # past the key and its value type
    struct.pack_into("<" + fmt, data, at, value)
    path.write_bytes(bytes(data))
