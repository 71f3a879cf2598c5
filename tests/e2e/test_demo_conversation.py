"""The shipped demo in conversations, on pictures from the evaluation generator it never trained on (issue 21).

Pictures and questions come from tests/support/eval_scenes.py (its own drawing, colours and placement; canvases
light to dark, 160-400 px, 1:2 to 2:1, shapes that touch or overlap), never from the training generator. At turn 2
the question follows "How many shapes are there?" (or another question when the count is the one asked), the
model's own first answer in the history, as `convllava-edge chat` keeps it.

The issue's bars: 60 questions (12 per form) at turns 1 and 2, >= 90% right at each through the shipped bundle;
the bundle and its fp32 PyTorch checkpoint (the same conversations, greedy) within 2 points. The 500-question
figures per form and turn, through the CLI, come from benchmarks/demo_conversation.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import convllava_edge
from convllava_edge.backends.base import SamplingOptions
from convllava_edge.model import AskOptions
from convllava_edge.preprocess import preprocess
from convllava_edge.shapes_task import is_correct
from support.eval_scenes import conversations

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # demo/ is the repository's, not the package's

CHECKPOINT = ROOT / "models" / "shapes-demo-checkpoint"
SEED = 3131  # apart from the benchmark's (2121 + turn) and from every training seed
PER_FORM = 12  # 60 questions a turn
BAR = 0.90  # the issue: at turns 1 and 2 each, through the shipped bundle
MAX_GAP = 0.02  # the issue: bundle and fp32 checkpoint within 2 points (over both turns' 120 questions)
GREEDY = AskOptions(max_tokens=8, sampling=SamplingOptions(temperature=0.0))


@pytest.fixture(scope="module")
def answers():
    """Per turn: [(right through the bundle, right through the fp32 checkpoint)] for each question."""
    from demo.train import greedy_chat, load_checkpoint_model

    bundle = convllava_edge.load(cache=False)
    torch.set_num_threads(2)
    reference, batcher = load_checkpoint_model(CHECKPOINT)
    out: dict[int, list[tuple[bool, bool]]] = {}
    for turn in (1, 2):
        rows = []
        for pic, earlier, (question, expected, _form) in conversations(SEED + turn, PER_FORM, turn):
            chat = bundle.chat(pic.image, GREEDY)
            for q in earlier:
                chat.ask(q)
            got = chat.ask(question).text
            pixels = torch.from_numpy(preprocess(pic.image, batcher.pre, "pad"))
            want = greedy_chat(reference, pixels, batcher, [*earlier, question])[-1]
            rows.append((is_correct(got, expected), is_correct(want, expected)))
        out[turn] = rows
        print(f"turn {turn}: bundle {np.mean([b for b, _ in rows]):.1%}, fp32 checkpoint {np.mean([r for _, r in rows]):.1%}")
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("turn", [1, 2])
def test_bundle_answers_at_each_turn(answers, turn):
    right = [bundle for bundle, _ in answers[turn]]
    assert len(right) == 5 * PER_FORM
    assert np.mean(right) >= BAR, f"turn {turn}: {np.mean(right):.1%} right through the bundle"


@pytest.mark.timeout(900)
def test_bundle_and_fp32_checkpoint_agree(answers):
    rows = [row for turn in (1, 2) for row in answers[turn]]
    bundle, reference = (float(np.mean(col)) for col in zip(*rows))
    assert abs(bundle - reference) <= MAX_GAP, f"bundle {bundle:.1%}, fp32 checkpoint {reference:.1%}"
