"""The demo model's training script (demo/train.py): its loss is the loss it claims, its phases train what
they say and resume.

The shipped model's accuracy is tested in e2e/test_demo_model.py; this is about the script that produced it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convllava_edge import shapes_task as task
from convllava_edge.preprocess import PreprocessConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # demo/ is the repository's, not the package's
from demo import train as D  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-work")


@pytest.fixture(scope="module")
def batcher(work):
    return D.Batcher(D._tokenizer(work), PreprocessConfig(image_size=256, crop_size=(256, 256)))


def _items(n: int, seed: int = 3):
    rng = np.random.default_rng(seed)
    scenes = [task.random_scene(rng) for _ in range(n)]
    return [(s, D.pick_questions(s, rng, 3)) for s in scenes]


@pytest.mark.parametrize("turns", [1, 3])
def test_shared_prefix_loss_equals_each_row_run_whole(batcher, turns):
    torch.manual_seed(0)
    model = D.DemoModel(batcher.sp.vocab_size()).eval()
    pixels, rows, _ = batcher.build(_items(3), turns=turns)
    assert len(rows) == 9 // turns and all(len(spans) == turns for _, _, spans, _ in rows)
    with torch.no_grad():
        image = model.vision(pixels)
        shared = D.llm_loss(model, image, rows, batcher.prefix)
        # Reference: every row as one whole sequence, alone, as the runtime sees it; mean over every answer's
        # tokens (each turn's answer and EOS).
        embed = model.llm.get_input_embeddings()
        total, count = 0.0, 0
        for i, ids, spans, _ in rows:
            seq = torch.cat([embed(torch.tensor(batcher.prefix)), image[i], embed(torch.tensor(ids))])
            logits = model.llm(inputs_embeds=seq[None]).logits[0].float()
            base = len(batcher.prefix) + image.shape[1]
            for start, end in spans:
                nll = torch.nn.functional.cross_entropy(logits[base + start - 1: base + end - 1],
                                                        torch.tensor(ids[start:end]), reduction="sum")
                total, count = total + float(nll), count + end - start
    assert abs(float(shared) - total / count) <= 1e-5 * max(1.0, total / count), (float(shared), total / count)


def test_conversations_are_tokenized_as_chat_tokenizes_them():
    """The training's multi-turn ids (earlier answers given) are the runtime's: the shipped checkpoint's
    tokenizer in training against the shipped bundle's `chat` prompt, on varied three-turn conversations."""
    import convllava_edge

    _, batcher = D.load_checkpoint_model(Path(__file__).resolve().parents[2] / "models" / "shapes-demo-checkpoint")
    model = convllava_edge.load(cache=False)
    rng = np.random.default_rng(5)
    for _ in range(10):
        scene = task.varied_scene(rng)
        qs = task.questions_for(scene, rng)[:3]
        ids, spans, _ = batcher.conversation(scene, qs)
        turns = [(q.text, q.answer) for q in qs[:-1]] + [(qs[-1].text, None)]
        items = model.prompt_items(turns, model.embed(scene.render()).slot)
        slot = next(i for i, x in enumerate(items) if not isinstance(x, int))
        assert items[slot + 1:] == ids[:spans[-1][0]], [q.text for q in qs]
    model.close()


def _shape_masks(scene: task.Scene) -> list[np.ndarray]:
    return [task._shape_mask(s, scene.width, scene.height) for s in scene.shapes]


def _nearest_gap_px(a: np.ndarray, b: np.ndarray) -> int:
    """The smallest Chebyshev distance in pixels between two masks, up to 9 (10: farther)."""
    for r in range(10):
        padded = np.pad(a, r)
        grown = np.zeros_like(a)
        for dy in range(2 * r + 1):  # a grown by r in every direction, square window
            for dx in range(2 * r + 1):
                grown |= padded[dy:dy + a.shape[0], dx:dx + a.shape[1]]
        if (grown & b).any():
            return r
    return 10


def test_contact_scenes_have_shapes_that_touch_or_overlap():
    """`--contact`: the varied scenes it asks for have two or three shapes, two of them at most 2 px apart (here
    measured with a square window, not the 4-neighbour growth the generator uses); the draws without it are the
    ones the runs before it made (the committed recipe's), where shapes are often apart."""
    rng = np.random.default_rng(11)
    for _ in range(25):
        scene = task.varied_scene(rng, contact=True)
        masks = _shape_masks(scene)
        assert 2 <= len(masks) <= 3
        assert min(_nearest_gap_px(a, b) for i, a in enumerate(masks) for b in masks[i + 1:]) <= 2, scene
    plain = [task.varied_scene(np.random.default_rng(seed)) for seed in range(40)]
    drawn = repr([(s.width, s.height, s.background, [(x.kind, x.color, round(x.cx, 6), round(x.cy, 6),
                                                      round(x.size, 6), x.rgb) for x in s.shapes]) for s in plain])
    # these 40 scenes as varied_scene drew them before `contact` existed (computed with commit 4ccd0cb's)
    assert hashlib.sha256(drawn.encode()).hexdigest() == \
        "57935a44815d5d6e9e4c3390dc9a5f88954e51fb839b98a1f531d82c015a3f0d"
    apart = sum(len(s.shapes) == 1 or min(_nearest_gap_px(a, b) for i, a in enumerate(m) for b in m[i + 1:]) > 2
                for s in plain for m in [_shape_masks(s)])
    assert apart >= 10, apart  # a uniform draw is mostly apart: contact has to be asked for


def test_questions_are_drawn_evenly_across_forms():
    rng = np.random.default_rng(0)
    forms = [q.form for _ in range(400) for q in D.pick_questions(task.random_scene(rng), rng, 4)]
    share = {f: forms.count(f) / len(forms) for f in task.FORMS}
    # exists has one question per shape and per absent pair drawn; drawn per question it would be ~35%
    assert all(0.15 <= share[f] <= 0.26 for f in task.FORMS), share


def _two_shapes() -> task.Scene:
    return task.Scene(300, 200, (240, 240, 240), (
        task.Shape("circle", "red", 40, 90, 60, (255, 0, 0), 300),
        task.Shape("triangle", "blue", 260, 30, 50, (0, 0, 255), 300)))


def test_token_targets_mark_the_cell_of_each_centre(batcher):
    scene = _two_shapes()
    *_, cells = D.scene_targets(scene, batcher.grid)
    # padded onto a 300 x 300 square (50 px above and below), 4 x 4 cells of 75 px
    assert batcher.grid == 4 and cells.shape == (16, len(D.PAIRS))
    assert cells[1 * 4 + 0, D.PAIRS.index(("circle", "red"))] == 1
    assert cells[1 * 4 + 3, D.PAIRS.index(("triangle", "blue"))] == 1
    assert cells.sum() == 2
    # at 384 px (the shipped model's), 6 x 6 cells of 50 px: the circle's centre (40, 140) in row 2 column 0, the
    # triangle's (260, 80) in row 1 column 5
    *_, cells = D.scene_targets(scene, D.grid_of(384))
    assert cells.shape == (36, len(D.PAIRS)) and cells.sum() == 2
    assert cells[2 * 6 + 0, D.PAIRS.index(("circle", "red"))] == 1
    assert cells[1 * 6 + 5, D.PAIRS.index(("triangle", "blue"))] == 1
    # the attention aid's target: the cell of the one shape a question names, or none
    questions = task.questions_for(scene, np.random.default_rng(0))
    looks = {q.text: next((cell for _, cell in batcher.conversation(scene, [q])[2]), -1) for q in questions}
    expected = {"What color is the circle?": 4, "What shape is the blue one?": 7,
                "Is the blue triangle on the left or the right?": 7, "Is there a red circle?": 4,
                "How many shapes are there?": -1}
    assert {text: looks[text] for text in expected} == expected, looks
    absent = [q.text for q in questions if q.answer == "no"]
    assert absent and all(looks[text] == -1 for text in absent), looks


def test_phases_train_their_own_parts_and_resume(work):
    def params():
        model = D.DemoModel(D._tokenizer(work).vocab_size())
        model.load_state_dict(torch.load(work / "state.pt", weights_only=True)["model"])
        return {k: v.clone() for k, v in model.state_dict().items()}

    small = dict(images_per_step=2, questions_per_image=2, warmup=1, bf16=False, eval_n=5)
    torch.manual_seed(0)  # train() seeds with config.seed = 0 before building the model: the same start
    start = {k: v.clone() for k, v in D.DemoModel(D._tokenizer(work).vocab_size()).state_dict().items()}
    D.train(work, D.TrainConfig(steps=1, phase="vision", **small), log=lambda *_: None)
    after_vision = params()
    assert all(torch.equal(start[k], after_vision[k]) for k in start if k.startswith("llm."))
    assert not torch.equal(start["vision.vision_tower.embeddings.patch_embeddings.weight"],
                           after_vision["vision.vision_tower.embeddings.patch_embeddings.weight"])
    D.train(work, D.TrainConfig(steps=2, phase="language", **small), log=lambda *_: None)
    after_language = params()
    state = torch.load(work / "state.pt", weights_only=True)
    assert state["vision_step"] == 1 and state["language_step"] == 2
    assert "vision_optimizer" in state and "language_optimizer" in state

    def changed(prefix):
        return any(not torch.equal(after_vision[k], after_language[k]) for k in after_vision if k.startswith(prefix))

    assert not changed("vision.vision_tower.") and not changed("probe.")  # the tower is frozen there
    assert changed("vision.mm_projector.") and changed("llm.") and changed("token_probe.")
    logs = []
    D.train(work, D.TrainConfig(steps=2, phase="language", **small), log=logs.append)  # already done
    assert logs == ["language phase: resuming at step 2"]
    with pytest.raises(ValueError, match="phase 'lm'"):
        D.train(work, D.TrainConfig(steps=1, phase="lm"))


def test_image_size_is_kept_from_training_to_checkpoint_and_back(tmp_path):
    """--image-size: a run at 384 px trains probes on 36 tokens, resumes at that size when not told one and refuses
    another, saves a checkpoint whose configs say 384 (the export and load_checkpoint_model read the size there),
    and that checkpoint starts (--init) a run at its size, or at another one: the probes are not carried."""
    small = dict(images_per_step=2, questions_per_image=2, warmup=1, bf16=False, eval_n=5)
    quiet = dict(log=lambda *_: None)
    work = tmp_path / "w384"
    D.train(work, D.TrainConfig(steps=1, phase="vision", image_size=384, **small), **quiet)
    state = torch.load(work / "state.pt", weights_only=True)
    assert state["image_size"] == D.state_image_size(state["model"]) == 384
    assert state["model"]["probe.weight"].shape[1] == 36 * D.DEMO_TOWER.out_channels
    with pytest.raises(SystemExit, match="trained at 384 px .* pass --image-size 384"):
        D.train(work, D.TrainConfig(steps=2, phase="vision", image_size=256, **small))
    D.train(work, D.TrainConfig(steps=2, phase="vision", **small), **quiet)  # no size given: the folder's
    weights = torch.load(work / "state.pt", weights_only=True)["model"]
    assert D.state_image_size(weights) == 384
    out = D.save_checkpoint(work, tmp_path / "ckpt384")
    config = json.loads((out / "config.json").read_text())
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert config["mm_vision_tower"].endswith("-384") and pre["crop_size"] == {"height": 384, "width": 384}
    model, batcher = D.load_checkpoint_model(out)
    assert model.grid == batcher.grid == 6 and batcher.pre.crop_size == (384, 384)
    pixels, _, _ = batcher.build([(task.random_scene(np.random.default_rng(0)), [])])
    assert pixels.shape[-2:] == (384, 384) and model.vision(pixels).shape[1] == 36
    saved = model.state_dict()
    kept = [k for k in weights if k.startswith(("vision.", "llm."))]
    assert kept and all(torch.equal(saved[k], weights[k].to(torch.bfloat16).float()) for k in kept)  # bf16 shards
    # the attention aid's target at 384 px: the circle's cell of the 6 x 6 grid (row 2, column 0)
    circle = next(q for q in task.questions_for(_two_shapes(), np.random.default_rng(0))
                  if q.text == "What color is the circle?")
    assert batcher.conversation(_two_shapes(), [circle])[2][0][1] == 2 * 6 + 0
    again = tmp_path / "again"
    D.init_from(again, out)
    state = torch.load(again / "state.pt", weights_only=True)
    assert state["image_size"] == 384 and D.state_image_size(state["model"]) is None  # the probes stayed behind
    assert json.loads((D.save_checkpoint(again, tmp_path / "resaved") / "preprocessor_config.json").read_text()
                      )["crop_size"]["height"] == 384  # saved before any step: still the checkpoint's size
    D.train(again, D.TrainConfig(steps=1, phase="vision", image_size=256, **small), **quiet)
    state = torch.load(again / "state.pt", weights_only=True)
    assert state["image_size"] == D.state_image_size(state["model"]) == 256


def test_train_command_passes_and_checks_the_image_size(tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(D, "train", lambda work, config, **_: runs.append(config))
    for size in (None, 384):
        monkeypatch.setattr(sys, "argv", ["train.py", "train", "--work", str(tmp_path / "w"), "--phase", "finetune",
                                          *(["--image-size", str(size)] if size else [])])
        D.main()
    assert [config.image_size for config in runs] == [None, 384]
    monkeypatch.setattr(sys, "argv", ["train.py", "train", "--work", str(tmp_path / "bad"), "--image-size", "300",
                                      "--init", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="^--image-size 300: a multiple of 64 from 128 to 1024$"):
        D.main()
    assert not (tmp_path / "bad").exists()  # refused before anything is written
