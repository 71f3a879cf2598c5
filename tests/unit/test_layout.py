"""The layout's rules (tools/layout.py) hold for the tree: no import cycle between product modules, no
branch on a model family outside the family modules, no long module without a stated reason, and the
README's map names exactly the product's modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("layout", ROOT / "tools" / "layout.py")
layout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layout)


def test_no_import_cycle_between_product_modules():
    assert layout.cycles() == []


def test_the_checker_finds_a_cycle_and_a_family_branch_where_there_is_one(tmp_path, monkeypatch):
    pkg = tmp_path / "convllava_edge"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def x(m):\n    from .a import y\n    return m.family == 'llava-mini'\n")
    monkeypatch.setattr(layout, "ROOT", tmp_path)
    monkeypatch.setattr(layout, "PACKAGES", {"convllava_edge": "convllava_edge"})
    assert layout.cycles() == [["convllava_edge.a", "convllava_edge.b"]]
    assert [b.split(":")[0] for b in layout.family_branches()] == ["convllava_edge/b.py"]


def test_no_family_branch_outside_the_family_modules():
    assert layout.family_branches() == []


def test_no_backend_branch_outside_backends():
    assert layout.backend_branches() == []


def test_the_checker_finds_a_backend_branch_where_there_is_one(tmp_path, monkeypatch):
    pkg = tmp_path / "convllava_edge"
    (pkg / "backends").mkdir(parents=True)
    (pkg / "a.py").write_text("def f(o, kind):\n    if o.llm_backend == x:\n        pass\n"
                              "    return (kind, 'fp32') != ('onnxruntime', 'fp32')\n")
    (pkg / "b.py").write_text("def g(name):\n    return name in ('vllm',)\n")
    (pkg / "backends" / "c.py").write_text("def h(name):\n    return name == 'vllm'\n")  # the registry may
    (pkg / "doctor.py").write_text("def h(name):\n    return name == 'openvino'\n")  # exempt by name
    monkeypatch.setattr(layout, "ROOT", tmp_path)
    monkeypatch.setattr(layout, "PACKAGES", {"convllava_edge": "convllava_edge"})
    found = layout.backend_branches()
    assert [b.split(": ")[0] for b in found] == ["convllava_edge/a.py:2", "convllava_edge/a.py:4", "convllava_edge/b.py:2"]


def test_long_modules_state_why():
    every = layout.product_files() + sorted(p for folder in ("tests", "benchmarks", "demo", "tools")
                                            for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    assert layout.long_modules(every) == []


def test_the_readme_map_matches_the_modules():
    assert layout.map_mismatches() == []


def test_no_two_test_modules_share_a_name():
    """pytest imports test modules by their basename (rootdir-relative packages are not used here): two of one
    name in different tiers stop the whole collection of `pytest tests/` (it did, with test_serve_guard.py)."""
    names: dict[str, list[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        names.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
