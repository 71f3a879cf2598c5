"""check's answers stage on LLM backends whose answers are scripted (support/fake_llm.py): what it
compares is what a user is shown, the generated assistant header left out, and accuracy follows the
question set's scoring rule."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from convllava_edge.check.inputs import CheckInputs, CheckQuestion, exact_match
from convllava_edge.check.references import BundleLlm
from convllava_edge.check.stages import Context, answers_stage, parse_gates
from convllava_edge.families import family_for
from convllava_edge.prompt import ImageSlot
from support.fake_llm import BOS, FakeLlm

D = 8
HEADER = ["<|eot|>", "A", ":"]  # a Llama-3-style assistant header the model writes itself


class FusingEncoder:
    """Stands for LLaVA-Mini's graphs: vision tokens pass through, pre-fusion gives zero rows."""

    def encode(self, pixels):
        return np.ones((2, D), np.float32)

    def prefuse(self, vision_tokens, ids):
        return np.zeros((np.asarray(ids).size, D), np.float32), np.ones((1, D), np.float32)


def fake_bundle_llm(name: str, answers: list[list[str]]) -> BundleLlm:
    llm = object.__new__(BundleLlm)  # a bundle's LLM, its backend scripted instead of a GGUF
    llm.name, llm.backend = name, FakeLlm(n_embd=D)
    scripts = iter(answers)
    generate = llm.backend.generate

    def next_answer(sampling, max_tokens):
        llm.backend.script = next(scripts)
        return generate(sampling, max_tokens)

    llm.backend.generate = next_answer
    return llm


def mini_context(ref_answers, cand_answers, inputs) -> Context:
    reference = fake_bundle_llm("F32 (reference bundle)", ref_answers)
    candidate = fake_bundle_llm("Q4_K_M", cand_answers)
    header_ids = candidate.backend.tokenize("<|eot|>A:", parse_special=True)
    template = SimpleNamespace(stop=(), answer_header="<|eot|>A:")
    ctx = Context(bundle=None, manifest=SimpleNamespace(llm=SimpleNamespace(type="Q4_K_M")),
                  family=family_for("llava-mini"), template=template, inputs=inputs,
                  reference=SimpleNamespace(kind="bundle"), thresholds=parse_gates([]),
                  pixels={"im": np.zeros((1, 3, 4, 4), np.float32)}, threads=1, progress=lambda *a: None)
    ctx.encoders = {"fp32": FusingEncoder()}
    ctx.ref_name, ctx.ref_llm, ctx.candidate = "fp32 graphs of the reference bundle", reference, candidate
    ctx.hidden_prefix = header_ids
    ctx.llms = {"Q4_K_M": candidate}
    ctx.ref_vision = {"img:im": np.ones((2, D), np.float32)}
    for q in inputs.questions:
        ctx.prompts.append((q, [BOS, 40, ImageSlot("img:im", 1), 41, 42]))
    ctx.ref_rows = ctx.rows_with(FusingEncoder(), ctx.ref_vision)
    return ctx


def test_answers_are_compared_without_the_generated_assistant_header():
    inputs = CheckInputs({"im": None}, [CheckQuestion("im", "Which colour?", "red")])
    ctx = mini_context([HEADER + list("red")], [HEADER + list("blue")], inputs)
    figures, gates = answers_stage(ctx)
    combo = figures["combinations"]["fp32 + Q4_K_M"]
    # with the header compared, both answers would start alike (first_token 1.0)
    assert combo["first_token"] == 0.0 and combo["exact"] == 0.0
    assert ctx.samples[0] == {"question": "Which colour?", "reference": "red", "fp32 + Q4_K_M": "blue"}
    assert figures["reference_accuracy"]["overall"] == 1.0 and combo["accuracy"]["overall"] == 0.0
    assert {g.name for g in gates if not g.passed} >= {"answers.first_token", "answers.exact"}


def test_the_same_answer_after_the_header_agrees():
    inputs = CheckInputs({"im": None}, [CheckQuestion("im", "Which colour?")])
    ctx = mini_context([HEADER + list("red")], [HEADER + list("red")], inputs)
    combo = answers_stage(ctx)[0]["combinations"]["fp32 + Q4_K_M"]
    assert combo == {"exact": 1.0, "first_token": 1.0}


def test_accuracy_uses_the_question_sets_rule():
    strict = CheckInputs({"im": None}, [CheckQuestion("im", "Which colour?", "Red")])
    assert answers_stage(mini_context([list("red")], [list("red")], strict))[0]["reference_accuracy"]["overall"] == 0.0
    lenient = CheckInputs({"im": None}, [CheckQuestion("im", "Which colour?", "Red")],
                          score=lambda text, expected: text.lower() == expected.lower())
    assert answers_stage(mini_context([list("red")], [list("red")], lenient))[0]["reference_accuracy"]["overall"] == 1.0
    assert exact_match(" red ", "red") and not exact_match("red.", "red")
