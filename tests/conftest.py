"""Session fixtures for the parity and e2e tiers: tiny checkpoints in the exact released layouts, made
once per test session (support/tiny.py), and a bundle exported from them.

Nothing here imports torch or the export stack at module level: the unit tier runs without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every test pins the vision backend (children inherit it): what `--vision-backend auto` picks depends on timing.
# The tests of auto itself pass "auto" and a timer of their own.
os.environ["CONVLLAVA_EDGE_VISION_BACKEND"] = "onnxruntime"
# and auto, where a test asks for it, times its candidates in the test's own process (calibrate.py), never in a
# background process of its own, except in the test of that (tests/e2e/test_vision_choice.py)
os.environ["CONVLLAVA_EDGE_CALIBRATE"] = "now"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """support.tiny.TinyConvLlava: the same weights as sharded bf16 .bin and safetensors, and the tower folder."""
    from support.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_gqa(tmp_path_factory, tiny) -> Path:
    """A grouped-query-attention LLM (4 query heads, 2 kv heads) in bf16 safetensors shards."""
    from support.tiny import write_tiny_gqa

    return write_tiny_gqa(tmp_path_factory.mktemp("gqa"), tiny)


@pytest.fixture(scope="session")
def mini(tmp_path_factory):
    """A tiny LLaVA-Mini checkpoint (support/synthetic_mini.py): (sft folder, CLIP tower folder)."""
    from support.synthetic_mini import write_tiny_llava_mini

    return write_tiny_llava_mini(tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny, exported) -> Path:
    """fp32 + fp16 + dynamic int8 vision graphs exported from the sharded .bin checkpoint."""
    return exported(tiny.bin_ckpt, vision_types=("fp32", "fp16", "int8"))


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(checkpoint, **ExportOptions fields)``: the bundle, exported once per distinct checkpoint and
    options in the whole run (modules that need the same bundle share one export). What it returns is shared:
    a test that damages a bundle copies it first."""
    from convllava_edge.export.bundle import ExportOptions, export_bundle

    made: dict = {}

    def export(checkpoint, vision_tower=None, **options):
        key = (str(checkpoint), str(vision_tower), tuple(sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("exported") / "tiny"
            export_bundle(checkpoint, out, ExportOptions(**options), vision_tower=vision_tower)
            made[key] = out
        return made[key]

    return export
