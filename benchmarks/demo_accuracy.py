"""The shipped demo model on 500 held-out questions, through the CLI path, against its fp32 PyTorch self.

Questions come from the task generator with a seed never used in training (demo/train.py's HELD_OUT_SEED,
forms in turn: 100 each). Each goes through `convllava-edge ask IMAGE QUESTION --temperature 0
--json` (the console script's own function, in-process) with the shipped bundle; the same questions
go through the fp32 PyTorch model loaded from the checkpoint in the repository.

    python benchmarks/demo_accuracy.py [-n 500]
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
import torch

from convllava_edge import shapes_task as task
from convllava_edge.cli.main import main as cli
from convllava_edge.default_model import DEMO_BUNDLE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # demo/ is the repository's, not the package's
from demo.train import HELD_OUT_SEED, evaluate, load_checkpoint_model  # noqa: E402

CHECKPOINT = ROOT / "models" / "shapes-demo-checkpoint"


def via_cli(bundle: Path, samples, folder: Path) -> dict:
    right: dict[str, list[bool]] = {f: [] for f in task.FORMS}
    for i, (scene, q) in enumerate(samples):
        image = folder / f"{i}.png"
        scene.render().save(image)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli(["ask", str(image), q.text, "--model", str(bundle), "--temperature", "0", "--json",
                        "--no-cache", "--max-tokens", "8"])
        assert code == 0
        right[q.form].append(task.is_correct(json.loads(out.getvalue())["answer"], q.answer))
    every = [x for v in right.values() for x in v]
    return {"accuracy": float(np.mean(every)), "n": len(every), "per_form": {f: float(np.mean(v)) for f, v in right.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_accuracy.json")
    args = parser.parse_args()
    samples = list(task.samples(HELD_OUT_SEED, args.n))
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shipped = via_cli(args.bundle, samples, Path(tmp))
    cli_s = time.perf_counter() - t
    torch.set_num_threads(2)
    model, batcher = load_checkpoint_model(args.checkpoint)
    reference = evaluate(model, batcher, n=args.n, seed=HELD_OUT_SEED)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    result = {"date": time.strftime("%Y-%m-%d"), "n": args.n, "seed": HELD_OUT_SEED,
              "bundle": {"vision": manifest["vision"][0]["variant"], "llm": manifest["llm"]["type"],
                         "size_mb": sum(f["size"] for f in manifest["files"]) / 1e6},
              "shipped_via_cli": shipped, "pytorch_fp32": reference,
              "drop_points": 100 * (reference["accuracy"] - shipped["accuracy"]), "cli_seconds": cli_s}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| model | overall | {' | '.join(task.FORMS)} |")
    print("|---|---|" + "---|" * len(task.FORMS))
    for name, r in (("shipped bundle via CLI " + f"({result['bundle']['vision']} + {result['bundle']['llm']})", shipped),
                    ("PyTorch fp32 (checkpoint)", reference)):
        print(f"| {name} | {r['accuracy']:.1%} | " + " | ".join(f"{r['per_form'][f]:.1%}" for f in task.FORMS) + " |")
    print(f"\ndrop: {result['drop_points']:.1f} points; bundle {result['bundle']['size_mb']:.1f} MB; "
          f"{args.n} CLI asks in {cli_s:.0f} s")


if __name__ == "__main__":
    main()
