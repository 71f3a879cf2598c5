"""The package builds without setuptools' warnings and carries the demo bundle."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WARNINGS = ("BuildBackendWarning", "SetuptoolsDeprecationWarning", "is importable", "would be ignored",
            "is deprecated")


@pytest.mark.timeout(300)
def test_wheel_builds_without_warnings_and_ships_the_demo(tmp_path):
    # --no-build-isolation: the venv's setuptools (the one CI installs), no download
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    found = [line.strip() for line in log.splitlines() if any(w in line for w in WARNINGS)]
    assert not found, found
    wheel = next(tmp_path.glob("convllava_edge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    demo = ROOT / "convllava_edge" / "models" / "shapes-demo"
    for f in demo.iterdir():
        assert f"convllava_edge/models/shapes-demo/{f.name}" in names
    for module in ("native", "doctor", "buildflags", "cli/main", "export/bundle", "quantize/check"):
        assert f"convllava_edge/{module}.py" in names
    assert "convllava_edge/native_build/gcc_amx_fix.h" in names  # buildflags.py's AMX build needs it
