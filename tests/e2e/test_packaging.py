"""The package builds without setuptools' warnings and carries the demo bundle."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WARNINGS = ("BuildBackendWarning", "SetuptoolsDeprecationWarning", "is importable", "would be ignored",
            "is deprecated")


def _sources(dst: Path) -> Path:
    """The repository without hidden folders and build outputs: setuptools packs whatever an old build/lib
    holds, so a module deleted since the last build would still ship from it."""
    def skipped(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == ROOT
        return [n for n in names if n == "__pycache__" or n.endswith(".egg-info")
                or (top and (n.startswith(".") or n in ("build", "dist")))]

    return Path(shutil.copytree(ROOT, dst, ignore=skipped))


@pytest.mark.timeout(300)
def test_wheel_builds_without_warnings_and_ships_the_demo(tmp_path):
    # --no-build-isolation: the venv's setuptools (the one CI installs), no download
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(_sources(tmp_path / "src"))], capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    found = [line.strip() for line in log.splitlines() if any(w in line for w in WARNINGS)]
    assert not found, found
    wheel = next(tmp_path.glob("convllava_edge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    demo = ROOT / "convllava_edge" / "models" / "shapes-demo"
    for f in demo.iterdir():
        assert f"convllava_edge/models/shapes-demo/{f.name}" in names
    for module in ("native", "doctor", "buildflags", "cli/main", "export/bundle", "export/convllava/__init__",
                   "export/llava_mini/graphs", "check/__init__", "families/convllava", "backends/llm_llamacpp"):
        assert f"convllava_edge/{module}.py" in names
    assert "convllava_edge/native_build/gcc_amx_fix.h" in names  # buildflags.py's AMX build needs it
    for page in ("index.html", "app.js", "style.css"):  # serve's web page
        assert f"convllava_edge/serve/page/{page}" in names
    # the exporter's writer of random checkpoints in the released layouts ships (demo/train.py, the benchmarks
    # and users testing a pipeline without downloading weights use it); scaffolding stays in the repository:
    # the demo's training (demo/), the tests and their support modules (LLaVA-Mini's synthetic checkpoints)
    assert "convllava_edge/export/convllava/synthetic.py" in names
    assert not [n for n in names if n.startswith(("demo/", "tests/", "support/")) or "synthetic_mini" in n
                or "demo_model" in n]
