"""What ``check`` asks: images, questions (with expected answers and how to score them), a text.

Scoring belongs to the question set: exact match (after stripping whitespace) for questions a user
brings, the demo task's rule (case and a final period ignored) for the demo task's own questions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import shapes_task
from ..errors import ConfigError
from ..files import read_text_file
from ..image import image_files, open_image

N_DEFAULT_IMAGES = 20  # demo-task scenes when no images are given, 3 questions each: one changed answer
# of 60 moves accuracy by 1.7 points, inside the default accuracy_drop gate of 2 (with 8 scenes one flip failed it)
MAX_QUESTIONS_BYTES, MAX_QUESTIONS_LINE = 64 << 20, 1 << 20  # as batch's --questions
MAX_TEXT_BYTES = 64 << 20  # --text: a perplexity text; read whole, so bounded
GENERIC_QUESTIONS = ("Describe the image.", "What is in the picture?")


def exact_match(generated: str, expected: str) -> bool:
    """The default scorer: the answer, stripped, is the expected text."""
    return generated.strip() == expected.strip()


@dataclass(frozen=True)
class CheckQuestion:
    image: str  # key into the image table
    question: str
    answer: str | None = None
    form: str | None = None


@dataclass
class CheckInputs:
    images: dict[str, Any]  # name -> PIL image
    questions: list[CheckQuestion]
    text: str | None = None
    source: str = ""
    score: Callable[[str, str], bool] = exact_match  # (generated text, expected answer) -> right?
    scoring: str = "exact match"  # the rule, in words, for the report
    notes: list[str] = field(default_factory=list)


def default_inputs(n_images: int = N_DEFAULT_IMAGES, seed: int = 2024) -> CheckInputs:
    """The demo task: rendered scenes with three questions each, expected answers and the task's scorer."""
    rng = np.random.default_rng(seed)
    images, questions = {}, []
    for i in range(n_images):
        scene = shapes_task.random_scene(rng)
        name = f"scene{i}"
        images[name] = scene.render()
        qs = shapes_task.questions_for(scene, rng)
        for j in rng.choice(len(qs), size=min(3, len(qs)), replace=False):
            q = qs[int(j)]
            questions.append(CheckQuestion(name, q.text, q.answer, q.form))
    return CheckInputs(images, questions, source=f"demo task, seed {seed}", score=shapes_task.is_correct,
                       scoring="the demo task's rule (case and a final period ignored)")


def load_inputs(images_dir: Path | None, questions_file: Path | None, text_file: Path | None) -> CheckInputs:
    if images_dir is None and questions_file is None:
        inputs = default_inputs()
    else:
        images: dict[str, Any] = {}
        questions: list[CheckQuestion] = []
        if questions_file is not None:
            questions, images = _read_questions(questions_file)
        if images_dir is not None:
            for path in image_files(images_dir):
                images.setdefault(path.name, open_image(path))
        if not questions:  # images only: ask the same generic questions of each
            questions = [CheckQuestion(name, q) for name in images for q in GENERIC_QUESTIONS]
        inputs = CheckInputs(images, questions, source=str(questions_file or images_dir))
    if text_file is not None:
        lines = read_text_file(text_file, "--text", MAX_TEXT_BYTES, MAX_TEXT_BYTES)  # a regular file, bounded
        inputs.text = "\n".join(line for _, line in lines)
    return inputs


def _read_questions(path: Path) -> tuple[list[CheckQuestion], dict[str, Any]]:
    questions, images = [], {}
    for n, line in read_text_file(path, "--questions", MAX_QUESTIONS_BYTES, MAX_QUESTIONS_LINE):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, question = str(row["image"]), str(row["question"])
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
            raise ConfigError(f"{path}:{n}: expected {{\"image\": ..., \"question\": ..., \"answer\": ...}}") from e
        image_path = (Path(path).parent / image) if not Path(image).is_absolute() else Path(image)
        if image not in images:
            images[image] = open_image(image_path)
        answer = row.get("answer")
        questions.append(CheckQuestion(image, question, None if answer is None else str(answer), row.get("form")))
    if not questions:
        raise ConfigError(f"{path}: no questions")
    return questions, images
