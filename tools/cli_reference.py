"""docs/cli.md, generated from the Typer app itself (so the reference cannot drift from the commands):

    python tools/cli_reference.py           # rewrite docs/cli.md
    python tools/cli_reference.py --check   # exit 1 when docs/cli.md is not what the app says (the test runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _params(command) -> list[str]:
    rows = []
    for param in command.params:
        if getattr(param, "hidden", False) or param.name == "help":
            continue
        if param.param_type_name == "argument":
            name = f"`{(param.metavar or param.name).upper()}`"
        else:
            name = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
        default = "" if param.required or param.default in (None, (), []) or param.param_type_name == "argument" \
            else f" (default: `{param.default}`)"
        envvar = f" (or `${param.envvar}`)" if getattr(param, "envvar", None) else ""
        required = " (required)" if param.required else ""
        rows.append(f"| {name} | {_cell(getattr(param, 'help', '') or '')}{required}{default}{envvar} |")
    return rows


def render() -> str:
    import typer.main

    from convllava_edge.cli.main import app

    root = typer.main.get_command(app)
    lines = ["# The command line", "",
             "Generated from the commands themselves by `python tools/cli_reference.py` (a test checks it is current).",
             "Every command exits 1 with one line on stderr for bad input, 2 for a usage error.", ""]

    def walk(group, prefix: str):
        for name in sorted(group.commands):
            command = group.commands[name]
            full = f"{prefix} {name}".strip()
            if hasattr(command, "commands"):
                walk(command, full)
                continue
            lines.extend([f"## `convllava-edge {full}`", "", _cell(command.help or ""), "",
                          "| option | what |", "|---|---|", *_params(command), ""])
    walk(root, "")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT.relative_to(ROOT)} is not current: run python tools/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
