"""The docs cannot drift from the code: docs/cli.md is what tools/cli_reference.py generates from the Typer app
now, and every page the README links to exists (the module map's own check: tests/unit/test_layout.py)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
cli_reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli_reference)


def test_the_cli_reference_is_current():
    generated = cli_reference.render()
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == generated, \
        "docs/cli.md is not current: run python tools/cli_reference.py"
    for command in ("ask", "chat", "encode", "export", "serve", "batch", "check", "deploy triton", "doctor"):
        assert f"## `convllava-edge {command}`" in generated


def test_every_linked_page_exists():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
