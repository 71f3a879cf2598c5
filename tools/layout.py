"""The layout's rules, checked over the source with ``ast`` (no imports run):

- no import cycle between the product's modules (every ``import``, at module level or inside a function);
- no branching on a model family outside the family modules (families/ and export's family modules): no
  comparison against a family's name, a manifest's ``.family`` or a ``*_MODEL_TYPES`` table;
- no branching on a backend outside backends/ (the vision and LLM registries): no comparison against a
  backend's name or an ``.llm_backend`` / ``.vision_backend`` setting; exempt by name only what is not a choice
  of ours (BACKEND_EXEMPT);
- no module over MAX_LINES lines without a line "Long module: <reason>" in its docstring;
- the docs' module map (docs/architecture.md) lists every product module, and nothing that is not one.

    python tools/layout.py        # prints each broken rule; exit 1 when one is
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder in the repository -> its package when installed (pyproject's package-dir)
PACKAGES = {"convllava_edge": "convllava_edge", "export": "convllava_edge.export", "quantize": "convllava_edge.quantize",
            "check": "convllava_edge.check", "cli": "convllava_edge.cli"}
FAMILY_NAMES = {"convllava", "llava-mini", "llava_mini"}
# where a family may be named: the runtime family modules, export's family registry and modules, and the
# family-specific readers they call (each reads one family's checkpoint layout and nothing else)
FAMILY_MODULES = ("convllava_edge/families/", "export/families.py", "export/config.py", "export/convllava/",
                  "export/llava_mini/")
BACKEND_NAMES = {"onnxruntime", "openvino", "triton", "llama.cpp", "vllm"}
BACKEND_SETTINGS = {"llm_backend", "vision_backend"}
BACKEND_MODULES = ("convllava_edge/backends/",)
# Not choices of ours: doctor reports each backend by name (its section of the report), and deploy_triton
# compares Triton's own config fields (platform "onnxruntime_onnx", backend "onnxruntime": Triton's names).
BACKEND_EXEMPT = ("convllava_edge/doctor.py", "convllava_edge/deploy_triton.py")
MAX_LINES = 450
LONG_MARK = "Long module:"


def product_files() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Product modules ``path`` imports (a name imported from a package counts as its submodule when it is one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle or several."""
    files = {module_name(p): p for p in product_files()}
    known = set(files)
    graph = {m: imports(p, m, known) for m, p in files.items()}
    # a package's __init__ importing its own submodules is how packages re-export; not a cycle in use
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def family_branches() -> list[str]:
    found = []
    for path in product_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(FAMILY_MODULES):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                named = (isinstance(side, ast.Constant) and side.value in FAMILY_NAMES) \
                    or (isinstance(side, ast.Attribute) and side.attr == "family") \
                    or (isinstance(side, (ast.Name, ast.Attribute)) and
                        (side.id if isinstance(side, ast.Name) else side.attr).endswith("MODEL_TYPES"))
                if named:
                    found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
                    break
    return found


def backend_branches() -> list[str]:
    """Comparisons outside backends/ against a backend's name (also inside a tuple or list compared) or a setting
    that holds one."""
    found = []
    for path in product_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(BACKEND_MODULES) or rel in BACKEND_EXEMPT:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            named = any((isinstance(part, ast.Constant) and part.value in BACKEND_NAMES)
                        or (isinstance(part, ast.Attribute) and part.attr in BACKEND_SETTINGS)
                        or (isinstance(part, ast.Name) and part.id in BACKEND_SETTINGS)
                        for side in [node.left, *node.comparators] for part in ast.walk(side))
            if named:
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return found


def long_modules(paths) -> list[str]:
    out = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        n = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if n > MAX_LINES and LONG_MARK not in doc:
            out.append(f"{path.relative_to(ROOT)}: {n} lines, no '{LONG_MARK}' reason in its docstring")
    return out


MODULE_MAP = "docs/architecture.md"  # its "## Module map" section


def readme_map() -> set[str]:
    """The files the docs' module map names: lines "- `path/to/module.py`: ..." in MODULE_MAP's "## Module map"."""
    path = ROOT / MODULE_MAP
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0] if "## Module map" in text else ""
    return set(re.findall(r"^- `([\w/]+\.py)`", section, flags=re.M))


def map_mismatches() -> list[str]:
    listed = readme_map()
    real = {p.relative_to(ROOT).as_posix() for p in product_files()}
    return [f"{MODULE_MAP}'s map lacks {p}" for p in sorted(real - listed)] + \
        [f"{MODULE_MAP}'s map names {p}, which does not exist" for p in sorted(listed - real)]


def main() -> int:
    every = product_files() + sorted(p for folder in ("tests", "benchmarks", "demo", "tools")
                                     for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    problems = [f"import cycle: {' -> '.join(c)}" for c in cycles()] + \
        [f"family branch outside the family modules: {b}" for b in family_branches()] + \
        [f"backend branch outside backends/: {b}" for b in backend_branches()] + \
        long_modules(every) + map_mismatches()
    for p in problems:
        print(p)
    print(f"{len(product_files())} product modules: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
