"""The demo model in conversations, on pictures from the evaluation generator it never trained on (issue 21):
accuracy per question form at turns 1, 2 and 3, touching/overlapping scenes apart.

Pictures and questions come from tests/support/eval_scenes.py (its own drawing, colours and placement; canvases
light to dark, 160-400 px, 1:2 to 2:1, shapes 10-45% of the short side, touching or overlapping in ~30%). At
turn t the question is asked after t-1 others about the same picture (the first: "How many shapes are there?"),
the model's own answers kept in the history, as `convllava-edge chat` does. --cli runs each conversation
through `convllava-edge chat` (its function, in process, stdin fed); else Model.chat directly (the same path).

    python benchmarks/demo_conversation.py [--per-form 100] [--turns 1 2 3] [--model BUNDLE] [--cli]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support.eval_scenes import FORMS, conversations  # noqa: E402

from convllava_edge import load  # noqa: E402
from convllava_edge.backends.base import SamplingOptions  # noqa: E402
from convllava_edge.cli.main import main as cli  # noqa: E402
from convllava_edge.model import AskOptions  # noqa: E402
from convllava_edge.machine import cpu_info  # noqa: E402
from convllava_edge.shapes_task import is_correct  # noqa: E402

SEED = 2121  # never used by the training generator (it draws from demo/train.py's TRAIN_SEED_BASE + step)
GREEDY = AskOptions(max_tokens=8, sampling=SamplingOptions(temperature=0.0))


def answer_in_process(model, image, earlier: list[str], question: str) -> str:
    chat = model.chat(image, GREEDY)
    for q in earlier:
        chat.ask(q)
    return chat.ask(question).text


def answer_via_cli(bundle: str | None, image, earlier: list[str], question: str, folder: Path) -> str:
    path = folder / "picture.png"
    image.save(path)
    stdin, out = io.StringIO("\n".join(earlier + [question]) + "\n\n"), io.StringIO()
    old = sys.stdin
    sys.stdin = stdin
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = cli(["chat", str(path), "--temperature", "0", "--max-tokens", "8", "--no-cache"]
                       + (["--model", bundle] if bundle else []))
    finally:
        sys.stdin = old
    assert code == 0
    return out.getvalue().splitlines()[len(earlier)]


def run(model_path: str | None, per_form: int, turn: int, cli_path: bool, seed: int = SEED) -> dict:
    model = None if cli_path else load(model_path, cache=False)
    right: dict[str, list[bool]] = {f: [] for f in FORMS}
    layout: dict[str, list[bool]] = {"apart": [], "touching": []}
    misses = []
    with tempfile.TemporaryDirectory() as folder:
        for pic, earlier, (question, expected, form) in conversations(seed + turn, per_form, turn):
            text = answer_via_cli(model_path, pic.image, earlier, question, Path(folder)) if cli_path else \
                answer_in_process(model, pic.image, earlier, question)
            ok = is_correct(text, expected)
            right[form].append(ok)
            layout[pic.layout].append(ok)
            if not ok and len(misses) < 10:
                misses.append({"history": earlier, "question": question, "expected": expected, "got": text})
    every = [x for v in right.values() for x in v]
    return {"turn": turn, "n": len(every), "accuracy": float(np.mean(every)),
            "per_form": {f: float(np.mean(v)) for f, v in right.items()},
            "by_layout": {k: {"n": len(v), "accuracy": float(np.mean(v)) if v else None} for k, v in layout.items()},
            "misses": misses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-form", type=int, default=100)
    parser.add_argument("--turns", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--model", default=None, help="a bundle (default: the shipped demo)")
    parser.add_argument("--cli", action="store_true")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="the evaluation generator's seed (turn t draws from SEED + t); another seed is another "
                             "sample of pictures and questions, e.g. to choose between trained models apart from "
                             "the reported figures")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "demo_conversation.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = [run(args.model, args.per_form, turn, args.cli, args.seed) for turn in args.turns]
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_info()["model"], "model": args.model or "shipped demo",
              "path": "CLI chat" if args.cli else "Model.chat", "seed": args.seed,
              "seconds": round(time.perf_counter() - t0), "turns": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| turn | n | overall | " + " | ".join(FORMS) + " | apart | touching/overlapping |")
    print("|---" * (5 + len(FORMS)) + "|")
    for r in rows:
        print(f"| {r['turn']} | {r['n']} | {r['accuracy']:.1%} | " + " | ".join(f"{r['per_form'][f]:.0%}" for f in FORMS)
              + f" | {r['by_layout']['apart']['accuracy']:.1%} | {r['by_layout']['touching']['accuracy']:.1%} |")


if __name__ == "__main__":
    main()
