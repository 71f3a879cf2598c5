"""The unit tier: the runtime install only (numpy, pillow, onnxruntime, llama-cpp-python, gguf, jinja2).

A run of this tier alone fails if anything imported torch, transformers or onnx (the runtime never
does: DESIGN.md), and names the first importer. A run of the whole suite imports them in the other
tiers on purpose, so the check applies only when every collected test lives in this folder.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EXPORT_ONLY = ("torch", "transformers", "onnx")  # top-level names; "onnxruntime" is the runtime's own


class _FirstImport:
    """A meta path finder that finds nothing: it only records the stack of the first export-only import."""

    def __init__(self):
        self.name: str | None = None
        self.test = ""  # pytest's PYTEST_CURRENT_TEST then: the test running, or empty during collection
        self.stack: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if self.name is None and name in EXPORT_ONLY:
            self.name, self.test = name, os.environ.get("PYTEST_CURRENT_TEST", "")
            self.stack = [line for line in traceback.format_stack()[:-1]
                          if not any(s in line for s in ("<frozen importlib", "/_pytest/", "/pluggy/"))][-3:]
        return None


_watch = _FirstImport()
if not any(name in sys.modules for name in EXPORT_ONLY):
    sys.meta_path.insert(0, _watch)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    items = getattr(session, "items", [])
    if not items or any(HERE not in Path(item.path).resolve().parents for item in items):
        return
    loaded = [name for name in EXPORT_ONLY if name in sys.modules]
    if not loaded:
        return
    if _watch.name:
        where = f" during {_watch.test or 'collection'}:\n" + "".join(_watch.stack)
    else:
        where = " before tests/unit/conftest.py was loaded"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write_line(f"\nunit tier FAILED: it imported {', '.join(loaded)}, which the runtime never needs; "
                        f"the first import of {_watch.name or loaded[0]} came{where}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
