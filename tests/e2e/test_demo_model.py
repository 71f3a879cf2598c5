"""The demo model shipped in the package: answers offline, small, and a real ConvLLaVA checkpoint.

The issue's bars, on a fixed set of held-out questions (the seed is never used in training): the
shipped, quantized bundle answers >= 95% right, every question form included, and loses at most 1
point against its fp32 PyTorch checkpoint. The full 500-question figures, per form, come from
benchmarks/demo_accuracy.py; here the first 250 of the same questions (50 per form).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import convllava_edge
from convllava_edge import shapes_task as task
from convllava_edge.default_model import DEMO_BUNDLE, default_bundle
from convllava_edge.export.checkpoint import TensorStore
from convllava_edge.backends.base import SamplingOptions
from convllava_edge.model import AskOptions

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # demo/ is the repository's, not the package's
from demo.train import HELD_OUT_SEED  # noqa: E402

CHECKPOINT = ROOT / "models" / "shapes-demo-checkpoint"
MAX_DROP = 0.01  # the issue: at most 1 point below the fp32 PyTorch model
ACCURACY_BAR = 0.95  # the issue: exact-match accuracy through the shipped bundle
FORM_FLOOR = 0.95  # and every question form on its own (50 each here)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_sizes():
    assert default_bundle() == DEMO_BUNDLE
    assert _size(DEMO_BUNDLE) <= 20_000_000
    assert _size(CHECKPOINT) <= 30_000_000


def test_checkpoint_is_in_the_convllava_release_layout():
    names = {p.name for p in CHECKPOINT.iterdir()}
    assert {"config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin", "tokenizer.model", "tokenizer_config.json",
            "preprocessor_config.json"} <= names
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["model_type"] == "llava" and config["mm_projector_type"] == "mlp2x_gelu"
    assert config["hidden_size"] % 256 == 0 and config["intermediate_size"] % 256 == 0
    store = TensorStore(CHECKPOINT)
    assert store.get("model.mm_projector.0.weight").dtype == torch.bfloat16
    depths = {k.split(".")[5] for k in store.keys() if k.startswith("model.vision_tower.vision_tower.encoder.stages.")}
    assert depths == {"0", "1", "2", "3", "4"}  # five stages, as ConvLLaVA's tower


def test_shipped_bundle_meets_the_accuracy_bar_and_answers_like_its_fp32_checkpoint():
    from demo.train import evaluate, load_checkpoint_model

    model = convllava_edge.load(cache=False)
    options = AskOptions(max_tokens=8, sampling=SamplingOptions(temperature=0.0))
    right: dict[str, list[bool]] = {form: [] for form in task.FORMS}
    for scene, q in task.samples(HELD_OUT_SEED, 250):
        right[q.form].append(task.is_correct(model.ask(scene.render(), q.text, options).text, q.answer))
    overall = float(np.mean([x for v in right.values() for x in v]))
    torch.set_num_threads(2)
    reference = evaluate(*load_checkpoint_model(CHECKPOINT), n=250, seed=HELD_OUT_SEED)
    assert reference["n"] == 250
    assert overall >= reference["accuracy"] - MAX_DROP, (overall, reference)
    per_form = {form: float(np.mean(v)) for form, v in right.items()}
    assert overall >= ACCURACY_BAR, (overall, per_form)
    assert all(v >= FORM_FLOOR for v in per_form.values()), per_form


def test_readme_first_command():
    result = subprocess.run([sys.executable, "-m", "convllava_edge.cli.main", "ask", str(ROOT / "examples" / "shapes-1.png"),
                             "How many shapes are there?"], capture_output=True, text=True, timeout=300,
                            env={"CONVLLAVA_EDGE_CACHE": str(ROOT / ".pytest_cache" / "emb"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "3\n"
    assert "using the demo model shipped with convllava-edge" in result.stderr
