"""Train the demo model: a tiny ConvLLaVA on the shapes task, from scratch, on CPU.

Exactly ConvLLaVA's architecture at small widths: a 5-stage ConvNeXt (total stride 64: 256 px -> 16
tokens; 384 px -> 36 with ``--image-size 384``, as the shipped model), the mlp2x_gelu projector, a Llama
with widths that are multiples of 256, a SentencePiece tokenizer trained on the task's text with Llama's
options, the vicuna_v1 template and "pad" preprocessing. Sequences are built as the runtime builds them
(template, <image> split, one BOS); the loss covers the answer's tokens and EOS, as LLaVA's instruction
tuning does.

Training from scratch, the LLM's loss alone leaves the tower without a usable signal for a long
time, and reading the tower's tokens is then the LLM's bottleneck. Three training aids, none of them
part of the model or saved, get it there (demo/NOTES.md has the runs that showed why):
- probes on the tower: a linear probe on all its tokens (which shape-colour pairs are present, how
  many shapes there are, which side each one is on), and a per-token probe (which pairs have their
  centre in each projected token's 64 px cell, and whether that cell is right of the middle: the
  tokens carry no position otherwise);
- phases: "joint" trains everything on every loss; "vision" the tower on the probes alone; "language"
  freezes the tower while the LLM learns to read it (no gradient through the tower, the shared prompt
  prefix run once); "finetune" (issue 21) everything at a lower rate on the language phase's loss plus the
  probes', so that the tower learns what touching and overlapping shapes need;
- attention supervision in the language phase: one head, at the position that predicts the answer,
  is taught to look at the token of the shape the question names (see llm_loss).

Seeded and resumable: each phase keeps its own step, optimizer and loss history in WORK/state.pt, and
``--steps`` is the step that phase runs to. From the repository root, in the venv ``make dev`` makes:
    python -m demo.train train --work demo-work --steps 3000 [--phase joint|vision|language|finetune] [--fp32]
        [--image-size 384] [--init CHECKPOINT] [--scenes varied --max-turns 3 --contact 0.5]
    python -m demo.train save --work demo-work --out models/shapes-demo-checkpoint
    python -m demo.train evaluate --checkpoint models/shapes-demo-checkpoint
The runs behind the shipped model, in order, with their stops and restarts: demo/NOTES.md.

Long module: one training script in reading order (model, batches, losses and aids, evaluation, the loop,
saving), read and changed together.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from convllava_edge import shapes_task as task
from convllava_edge.export.convllava.tower import TowerConfig
from convllava_edge.export.convllava.vision_model import ConvLlavaVision
from convllava_edge.preprocess import PreprocessConfig, preprocess
from convllava_edge.prompt import VICUNA_V1

from convllava_edge.export.convllava import synthetic as S  # noqa: E402

def demo_tower(image_size: int = 256) -> TowerConfig:
    """The demo's tower at ``image_size`` px, a multiple of its total stride (64): 256 px -> 4 x 4 tokens (the
    first runs), 384 px -> 6 x 6 (issue 21's last run: small shapes that touch need the finer cells). The weights
    do not depend on the size (convolutions); the training probes on all tokens do."""
    return TowerConfig(depths=(1, 1, 3, 1, 1), hidden_sizes=(32, 64, 96, 128, 192), image_size=image_size)


DEMO_TOWER = demo_tower()
DEMO_LLM = S.LlamaSpec(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=512)
HELD_OUT_SEED = 424242  # the evaluation seed; training draws from TRAIN_SEED_BASE + step
TRAIN_SEED_BASE = 1_000_000


PHASES = ("joint", "vision", "language", "finetune")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    phase: str = "joint"  # joint: everything on every loss; vision: tower + probes only; language: tower frozen;
    # finetune: everything, at a lower rate, on the language loss + the probes
    images_per_step: int = 24
    questions_per_image: int = 4
    lr: float = 1.5e-3
    warmup: int = 150
    weight_decay: float = 0.01
    seed: int = 0
    threads: int | None = None
    bf16: bool = True  # autocast matmuls to bf16 (AVX-512 BF16 here: 1.35x per step, same loss); weights stay fp32
    eval_n: int = 200  # held-out scenes or questions (seed HELD_OUT_SEED + 1) every 500 steps and at the end
    scenes: str = "task"  # task: the fixed task's scenes (the shipped model's runs); varied: issue 21's (+ a task share)
    max_turns: int = 1  # conversations of 1..max_turns questions about one image, the earlier answers given
    contact: float = 0.0  # varied: the share of its scenes drawn with shapes that touch or overlap (0: as drawn)
    image_size: int | None = None  # the tower's input in px (a multiple of 64); None: the work folder's, else 256


# What each phase of the shipped model's run used (``train --phase P`` starts from these).
PHASE_DEFAULTS = {
    "joint": {},
    "vision": {"images_per_step": 32, "lr": 1e-3, "warmup": 100},
    "language": {"lr": 1e-3, "warmup": 100},
    "finetune": {"lr": 3e-4, "warmup": 100},
}


def task_corpus() -> list[str]:
    """All text the model ever sees: the template around every question form, and the answers."""
    rng = np.random.default_rng(0)
    lines = [VICUNA_V1.system]
    for scene, q in task.samples(seed=7, n=3000, balanced=True):
        lines.append(VICUNA_V1.render([(q.text, q.answer)]).replace("<image>", ""))
    for word in task.SHAPES + task.COLORS + ("yes", "no", "left", "right", "1", "2", "3"):
        lines.append(f"ASSISTANT: {word}</s>")
    rng.shuffle(lines)
    return lines


PAIRS = [(k, c) for k in task.SHAPES for c in task.COLORS]  # 12 shape-colour pairs


def grid_of(image_size: int) -> int:
    """Tokens per side: the graph emits grid x grid tokens, row-major (4 at 256 px, 6 at 384 px)."""
    return image_size // DEMO_TOWER.stride


def scene_targets(scene: task.Scene, grid: int) -> tuple[list[float], int, list[float], list[float], np.ndarray]:
    """presence of each pair, count - 1, side of each present pair (1 = right), which sides count, and per
    token the pairs whose centre lies in its cell of the padded square image ([grid * grid, 12])."""
    by_pair = {(s.kind, s.color): s for s in scene.shapes}
    presence = [1.0 if p in by_pair else 0.0 for p in PAIRS]
    side = [1.0 if p in by_pair and by_pair[p].side == "right" else 0.0 for p in PAIRS]
    cells = np.zeros((grid * grid, len(PAIRS)), np.float32)
    for s in scene.shapes:
        cells[cell_of(scene, s, grid), PAIRS.index((s.kind, s.color))] = 1.0
    return presence, len(scene.shapes) - 1, side, presence, cells


def cell_of(scene: task.Scene, shape: task.Shape, grid: int) -> int:
    """The token (row-major cell of the padded square image) where the shape's centre lies."""
    square = max(scene.width, scene.height)  # "pad": centred on a square canvas, then resized
    x = int((shape.cx + (square - scene.width) / 2) / square * grid)
    y = int((shape.cy + (square - scene.height) / 2) / square * grid)
    return min(y, grid - 1) * grid + min(x, grid - 1)


def right_of_middle(grid: int) -> torch.Tensor:
    """Per token (row-major), whether its cell is right of the image's middle: the side probe's target."""
    return torch.arange(grid * grid) % grid >= grid // 2


PROBES = ("probe.", "token_probe.", "token_side.")  # training aids: not part of the model, not saved


class DemoModel(nn.Module):
    def __init__(self, vocab_size: int, image_size: int = 256):
        super().__init__()
        self.grid = grid_of(image_size)
        self.vision = ConvLlavaVision(demo_tower(image_size), "mlp2x_gelu", DEMO_LLM.hidden_size)
        self.probe = nn.Linear(self.grid ** 2 * DEMO_TOWER.out_channels, 2 * len(PAIRS) + 3)  # training only
        self.token_probe = nn.Linear(DEMO_LLM.hidden_size, len(PAIRS))  # training only, per projected token
        self.token_side = nn.Linear(DEMO_LLM.hidden_size, 1)  # training only: is the token right of the middle
        for name, p in self.vision.named_parameters():
            if name.endswith("layer_scale_parameter"):
                nn.init.constant_(p, 0.1)  # ConvNeXt's 1e-6 start makes a shallow tower learn slowly
        self.llm = LlamaForCausalLM(LlamaConfig(
            hidden_size=DEMO_LLM.hidden_size, intermediate_size=DEMO_LLM.intermediate_size,
            num_hidden_layers=DEMO_LLM.num_hidden_layers, num_attention_heads=DEMO_LLM.num_attention_heads,
            num_key_value_heads=DEMO_LLM.num_key_value_heads, vocab_size=vocab_size,
            max_position_embeddings=DEMO_LLM.max_position_embeddings, rms_norm_eps=DEMO_LLM.rms_norm_eps,
            rope_theta=DEMO_LLM.rope_theta, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            attn_implementation="eager"))  # the language phase reads one head's attention weights


class SpVocab:
    """The part of an LLM backend that the runtime's PromptTokenizer uses, over SentencePiece: conversations are
    tokenized in training exactly as `chat` tokenizes them (special tokens written in the text, no space after
    them as the checkpoint's tokenizer config says)."""

    def __init__(self, sp):
        self.sp, self.bos = sp, sp.bos_id()

    def tokenize(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        return ([self.bos] if add_bos else []) + self.sp.encode(text)

    def special_tokens(self) -> dict[str, int]:
        return {"<unk>": self.sp.unk_id(), "<s>": self.sp.bos_id(), "</s>": self.sp.eos_id()}


class Batcher:
    """Scenes and questions -> pixel batch + spliced embeddings inputs, exactly as the runtime splices."""

    def __init__(self, sp, preprocess_config: PreprocessConfig):
        from convllava_edge.tokenizer import PromptTokenizer

        self.sp, self.pre = sp, preprocess_config
        self.grid = grid_of(preprocess_config.crop_size[0])
        self.bos, self.eos = sp.bos_id(), sp.eos_id()
        before, _ = VICUNA_V1.render([("Q", None)]).split("<image>")
        self.prefix = [self.bos] + sp.encode(before)  # BOS + system + " USER: "
        self.tokenizer = PromptTokenizer(SpVocab(sp), {"kind": "sentencepiece", "add_space_prefix": True,
                                                       "space_after_special": False})

    def conversation(self, scene: task.Scene, qs: list[task.Question]) -> tuple[list[int], list[tuple[int, int]],
                                                                                 list[tuple[int, int]]]:
        """The ids after the image for a conversation of ``qs`` (each earlier answer given), with the spans of
        every answer (its tokens and EOS, the loss's labels) and, for questions about one shape, (position
        that predicts the answer, the shape's token) for the attention aid."""
        turns: list[tuple[str, str | None]] = []
        ids: list[int] = []
        spans, looks = [], []
        for q in qs:
            prompt = self.tokenizer.chunk(VICUNA_V1.render([*turns, (q.text, None)]).split("<image>")[1])[1:]
            if prompt[:len(ids)] != ids:  # the runtime re-tokenizes the whole text each turn: it must extend
                raise ValueError(f"turn {len(turns) + 1} does not extend the previous turns' ids: {q.text!r}")
            answer = self.answer(q.answer)
            spans.append((len(prompt), len(prompt) + len(answer)))
            if q.about is not None:
                looks.append((len(prompt) - 1, cell_of(scene, q.about, self.grid)))
            ids = prompt + answer
            turns.append((q.text, q.answer))
        return ids, spans, looks

    def answer(self, word: str) -> list[int]:
        return self.sp.encode(word) + [self.eos]  # "▁yes" as it follows "ASSISTANT:", then </s>

    def build(self, items: list[tuple[task.Scene, list[task.Question]]], turns: int = 1):
        """Rows of one question each (``turns`` 1), or conversations of up to ``turns`` questions: (image index,
        ids after the image, answer spans, looks)."""
        pixels = np.concatenate([preprocess(scene.render(), self.pre, "pad") for scene, _ in items])
        rows = [(i, *self.conversation(scene, qs[j:j + turns]))
                for i, (scene, qs) in enumerate(items) for j in range(0, len(qs), turns)]
        targets = [torch.tensor(np.array(x)) for x in zip(*(scene_targets(scene, self.grid) for scene, _ in items))]
        return torch.from_numpy(pixels), rows, targets


def probe_loss(model: DemoModel, features: torch.Tensor, image: torch.Tensor, targets) -> torch.Tensor:
    presence, count, side, side_mask, cells = targets
    logits = model.probe(features.flatten(1))  # [B, 12 + 12 + 3]
    n = len(PAIRS)
    loss = nn.functional.binary_cross_entropy_with_logits(logits[:, :n], presence)
    loss = loss + nn.functional.cross_entropy(logits[:, 2 * n:], count)
    side_loss = nn.functional.binary_cross_entropy_with_logits(logits[:, n:2 * n], side, reduction="none")
    return loss + (side_loss * side_mask).sum() / side_mask.sum().clamp(min=1) + token_probe_loss(model, image, cells)


LOOK_LAYER, LOOK_HEAD = 2, 0  # the head taught to look at the asked-about shape's token (language phase)


def llm_loss(model: DemoModel, image: torch.Tensor, rows, prefix: list[int], look: bool = False) -> torch.Tensor:
    """The answers' loss. Every row starts with the same BOS + system + " USER: " prefix, so it runs once and
    its keys/values are shared by all rows (same loss as running it per row, tested; half of each
    sequence, so ~1.8x faster per step).

    look: add attention supervision, a training aid. Where a question is about one shape, one head of
    layer LOOK_LAYER, at the position that predicts the answer, is taught to put its weight on the image
    token where that shape's centre lies (-log of that weight). Reading an attribute of a named shape
    is a two-step lookup (the question's words, then the token that matches them), which the LLM learned
    very slowly from the answer's loss alone (demo/NOTES.md)."""
    embed = model.llm.get_input_embeddings()
    n_img, d = image.shape[1], image.shape[-1]
    length = max(n_img + len(ids) for _, ids, _, _ in rows)
    inputs = torch.zeros(len(rows), length, d)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), len(prefix) + length, dtype=torch.long)
    mask[:, : len(prefix)] = 1
    for r, (i, ids, spans, _) in enumerate(rows):
        seq = torch.cat([image[i], embed(torch.tensor(ids))])
        inputs[r, : len(seq)] = seq
        mask[r, len(prefix): len(prefix) + len(seq)] = 1
        for start, end in spans:  # every answer of the conversation, as LLaVA's multi-turn data is trained
            labels[r, n_img + start: n_img + end] = torch.tensor(ids[start:end])
    cache = model.llm.model(inputs_embeds=embed(torch.tensor(prefix))[None], use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(rows))
    out = model.llm(inputs_embeds=inputs, attention_mask=mask, past_key_values=cache, labels=labels,
                    output_attentions=look)
    if not look:
        return out.loss
    looked = [(r, n_img + position, len(prefix) + cell) for r, (_, _, _, looks) in enumerate(rows)
              for position, cell in looks]
    if not looked:
        return out.loss
    weights = out.attentions[LOOK_LAYER][:, LOOK_HEAD].float()  # [rows, queries, prefix + queries]
    r, q, k = (torch.tensor(x) for x in zip(*looked))
    return out.loss - torch.log(weights[r, q, k] + 1e-6).mean()


def token_probe_loss(model: DemoModel, image: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Per projected token: which pairs have their centre in its cell, and whether the cell is right of
    the middle (tokens carry no position otherwise: a linear read of the side was at chance, 52%)."""
    grid = model.grid
    logits = model.token_probe(image).float()  # [B, grid * grid, 12]
    loss = nn.functional.binary_cross_entropy_with_logits(logits, cells, reduction="sum") / cells.shape[0] / grid
    right = right_of_middle(grid).float().expand(image.shape[0], -1)
    return loss + nn.functional.binary_cross_entropy_with_logits(model.token_side(image).float()[..., 0], right)


def forward_loss(model: DemoModel, pixels: torch.Tensor, rows, prefix: list[int], targets=None,
                 phase: str = "joint") -> torch.Tensor:
    # In the language phase train() has frozen the tower's parameters: autograd records nothing through it.
    features, image = model.vision.features_and_embeds(pixels)  # [B_img, grid * grid, C], [.., d]
    if phase == "language":
        return llm_loss(model, image, rows, prefix, look=True) + token_probe_loss(model, image, targets[4])
    if phase == "vision":
        return probe_loss(model, features, image, targets)
    if phase == "finetune":  # everything on the language phase's loss, the probes keeping the tower's reading
        return llm_loss(model, image, rows, prefix, look=True) + probe_loss(model, features, image, targets)
    loss = llm_loss(model, image, rows, prefix)
    return loss if targets is None else loss + probe_loss(model, features, image, targets)


@torch.no_grad()
def greedy_chat(model: DemoModel, pixels: torch.Tensor, batcher: Batcher, questions: list[str],
                max_tokens: int = 4) -> list[str]:
    """The fp32 reference of `chat`: each question asked after the earlier ones, the model's own answers kept in
    the history, the prompt tokenized as the runtime tokenizes it (the ids after the image, as in training)."""
    image = model.vision(pixels)[0]
    embed = model.llm.get_input_embeddings()
    prefix = embed(torch.tensor(batcher.prefix))
    turns: list[tuple[str, str | None]] = []
    for question in questions:
        ids = batcher.tokenizer.chunk(VICUNA_V1.render([*turns, (question, None)]).split("<image>")[1])[1:]
        seq, out, past = torch.cat([prefix, image, embed(torch.tensor(ids))])[None], [], None
        for _ in range(max_tokens):
            result = model.llm(inputs_embeds=seq, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            if token == batcher.eos:
                break
            out.append(token)
            seq = embed(torch.tensor([[token]]))
        turns.append((question, batcher.sp.decode(out)))
    return [answer for _, answer in turns]


def greedy_answer(model: DemoModel, pixels: torch.Tensor, batcher: Batcher, question: str, max_tokens: int = 4) -> str:
    return greedy_chat(model, pixels, batcher, [question], max_tokens)[0]


def evaluate(model: DemoModel, batcher: Batcher, n: int = 500, seed: int = HELD_OUT_SEED) -> dict:
    model.eval()
    right: dict[str, list[bool]] = {form: [] for form in task.FORMS}
    for scene, q in task.samples(seed, n):
        pixels = torch.from_numpy(preprocess(scene.render(), batcher.pre, "pad"))
        right[q.form].append(task.is_correct(greedy_answer(model, pixels, batcher, q.text), q.answer))
    model.train()
    total = [x for v in right.values() for x in v]
    return {"accuracy": float(np.mean(total)), "n": len(total),
            "per_form": {f: float(np.mean(v)) for f, v in right.items() if v}}


def _tokenizer(work: Path):
    import sentencepiece as spm

    path = work / "tokenizer.model"
    if not path.exists():
        S.write_llama_tokenizer(work, DEMO_LLM.vocab_size, task_corpus())
    return spm.SentencePieceProcessor(model_file=str(path))


def pick_questions(scene: task.Scene, rng: np.random.Generator, k: int) -> list[task.Question]:
    """``k`` questions with the forms drawn evenly (as the held-out set is), not in proportion to how many
    questions each form has (exists and side have one per shape, so they would crowd out colour and shape)."""
    qs = task.questions_for(scene, rng)
    by_form: dict[str, list[task.Question]] = {}
    for q in qs:
        by_form.setdefault(q.form, []).append(q)
    forms = sorted(by_form)
    picks = [by_form[forms[int(i)]] for i in rng.integers(0, len(forms), size=k)]
    return [group[int(rng.integers(0, len(group)))] for group in picks]


@torch.no_grad()
def probe_accuracy(model: DemoModel, batcher: Batcher, n: int = 200, seed: int = HELD_OUT_SEED + 1) -> tuple[float, float]:
    """The scenes that the per-token probe reads back exactly: which pairs are present (any token's logit
    > 0) and, for each, its side (the column of its strongest token); and the tokens whose side the side
    probe reads right. The vision phase's held-out figures."""
    model.eval()
    rng = np.random.default_rng(seed)
    items = [(task.random_scene(rng), []) for _ in range(n)]
    pixels, _, (presence, _, side, _, _) = batcher.build(items)
    image = model.vision(pixels)
    grid = model.grid
    logits = model.token_probe(image)  # [n, grid * grid, 12]
    token_right = model.token_side(image)[..., 0] > 0
    token_side = float((token_right == right_of_middle(grid)).float().mean())
    present = (logits.max(1).values > 0).float()
    right = ((logits.argmax(1) % grid) >= grid // 2).float()
    ok = (present == presence).all(-1) & ((right == side) | (presence == 0)).all(-1)
    model.train()
    return float(ok.float().mean()), token_side


def _optimizer(params: list[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))


def train(work: Path, config: TrainConfig = TrainConfig(), log=print) -> Path:
    """Train (or resume) one phase in ``work``; returns the state file. Each phase keeps its own step,
    optimizer and loss history in the state, so phases run one after another and each resumes."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if config.phase not in PHASES:
        raise ValueError(f"phase {config.phase!r}: expected one of {', '.join(PHASES)}")
    work.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    state_path = work / "state.pt"
    state: dict = torch.load(state_path, weights_only=True) if state_path.exists() else {}
    image_size = work_image_size(state, config.image_size, state_path)
    sp = _tokenizer(work)
    batcher = Batcher(sp, preprocess_config(image_size))
    model = DemoModel(sp.vocab_size(), image_size)
    named = list(model.named_parameters())
    if config.phase == "joint":
        # The token probes have an optimizer of their own, so that a joint state saved before they existed
        # still resumes (the main optimizer's groups stay the same); the shipped model's run needed it.
        probes = [p for n, p in named if n.startswith("token_")]
        opts = {"optimizer": _optimizer([x for x in named if not x[0].startswith("token_")], config),
                "token_probe_optimizer": torch.optim.AdamW(probes, lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0)}
        keys = {"step": "step", "history": "history"}
    else:
        trained = {"vision": ("vision.", "probe.", "token_"), "language": ("vision.mm_projector.", "llm.", "token_"),
                   "finetune": ("",)}[config.phase]
        for name, p in named:
            p.requires_grad_(name.startswith(trained))
        opts = {f"{config.phase}_optimizer": _optimizer([x for x in named if x[1].requires_grad], config)}
        keys = {"step": f"{config.phase}_step", "history": f"{config.phase}_history"}
    step, history = 0, []
    if state:
        load_weights(model, state["model"], state_path)
        for key, opt in opts.items():
            if key not in state:
                continue
            try:
                opt.load_state_dict(state[key])
            except ValueError:  # the phase trains a probe its saved optimizer did not have
                log(f"{key}: saved for other parameters, starting it afresh")
        step, history = int(state.get(keys["step"], 0)), json.loads(state.get(keys["history"], "[]"))
        log(f"{config.phase} phase: resuming at step {step}")

    def lr_at(s: int) -> float:
        if s < config.warmup:
            return config.lr * (s + 1) / config.warmup
        return config.lr * 0.5 * (1 + math.cos(math.pi * (s - config.warmup) / max(1, config.steps - config.warmup)))

    def batch(step: int):
        seed = TRAIN_SEED_BASE + config.seed * 10_000_000 + step + PHASES.index(config.phase) * 1_000_000
        seed += {"task": 0, "varied": 100_000_000}[config.scenes]  # the varied runs draw scenes of their own
        rng = np.random.default_rng(seed)
        items = []
        for _ in range(config.images_per_step):
            # varied: issue 21's scenes, with a quarter from the fixed task so that it is not forgotten
            # (a contact share of 0 draws nothing more: the runs before it had none and draw the same scenes)
            if config.scenes == "varied" and rng.random() < 0.75:
                scene = task.varied_scene(rng, contact=config.contact > 0 and rng.random() < config.contact)
            else:
                scene = task.random_scene(rng)
            if config.phase == "vision":
                items.append((scene, []))
            elif config.phase in ("language", "finetune"):
                items.append((scene, pick_questions(scene, rng, config.questions_per_image)))
            else:  # as the shipped model's joint steps drew them
                qs = task.questions_for(scene, rng)
                picks = rng.choice(len(qs), size=min(config.questions_per_image, len(qs)), replace=False)
                items.append((scene, [qs[int(i)] for i in picks]))
        return batcher.build(items, turns=int(rng.integers(1, config.max_turns + 1)))

    start = time.perf_counter()
    with Progress(TextColumn(f"training ({config.phase})"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        job = bar.add_task("train", total=config.steps, completed=step, info="")
        model.train()
        while step < config.steps:
            pixels, rows, targets = batch(step)
            for opt in opts.values():
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                loss = forward_loss(model, pixels, rows, batcher.prefix, targets, phase=config.phase)
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            for opt in opts.values():
                opt.step()
            step += 1
            history.append(loss.item())
            bar.update(job, completed=step, info=f"loss {np.mean(history[-50:]):.3f}")
            if step % 250 == 0 or step == config.steps:
                state.update({"model": model.state_dict(), "image_size": image_size,
                              keys["step"]: step, keys["history"]: json.dumps(history),
                              **{k: opt.state_dict() for k, opt in opts.items()}})
                torch.save(state, state_path.with_suffix(".tmp"))
                state_path.with_suffix(".tmp").replace(state_path)  # an interrupted save keeps the last one
            if step % 500 == 0 or step == config.steps:
                elapsed = f"({time.perf_counter() - start:.0f} s this run)"
                if config.phase == "vision":
                    scenes, sides = probe_accuracy(model, batcher, config.eval_n)
                    log(f"step {step}: loss {np.mean(history[-100:]):.4f}, held-out scenes read back by the "
                        f"token probe {scenes:.3f}, token sides {sides:.3f} {elapsed}")
                else:
                    result = evaluate(model, batcher, n=config.eval_n, seed=HELD_OUT_SEED + 1)
                    log(f"step {step}: loss {np.mean(history[-100:]):.4f}, held-out accuracy "
                        f"{result['accuracy']:.3f} {result['per_form']} {elapsed}")
    return state_path


def preprocess_config(image_size: int) -> PreprocessConfig:
    return PreprocessConfig(image_size=image_size, crop_size=(image_size, image_size))


def check_image_size(size: int) -> int:
    if size % DEMO_TOWER.stride or not 128 <= size <= 1024:
        raise SystemExit(f"--image-size {size}: a multiple of {DEMO_TOWER.stride} from 128 to 1024")
    return size


def state_image_size(weights: dict[str, torch.Tensor]) -> int | None:
    """The size a training state's probes were trained at, from the probe on all tokens (None: no probe yet, as
    after --init, which keeps the checkpoint's weights only). States saved before the size was stored lack it."""
    if "probe.weight" not in weights:
        return None
    return math.isqrt(weights["probe.weight"].shape[1] // DEMO_TOWER.out_channels) * DEMO_TOWER.stride


def work_image_size(state: dict, asked: int | None, path: Path) -> int:
    """The size a run trains at: the one asked (--image-size), else the state's (what it trained at, or after
    --init the checkpoint's), else 256. Probes trained at one size do not resume at another; a state fresh from
    --init (no probes yet) trains at any: the model's weights do not depend on the size."""
    probes_at = state_image_size(state.get("model", {}))
    size = check_image_size(asked or state.get("image_size") or probes_at or DEMO_TOWER.image_size)
    if probes_at not in (None, size):
        raise SystemExit(f"{path}: trained at {probes_at} px (its probe reads {grid_of(probes_at) ** 2} tokens), "
                         f"not {size}: pass --image-size {probes_at} or another --work")
    return size


def load_weights(model: DemoModel, weights: dict[str, torch.Tensor], path: Path) -> None:
    """A state's weights into ``model``: every model weight there; a probe it lacks starts afresh (after --init,
    or a joint state saved before the token probes existed)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith(PROBES) for k in missing):
        raise RuntimeError(f"{path}: not a demo-model training state ({(missing + unexpected)[:3]})")


def init_from(work: Path, checkpoint: Path) -> Path:
    """Start ``work`` from a saved checkpoint (issue 21 fine-tunes the shipped model): its tokenizer files and
    weights, which any --image-size can train on; the probes start afresh (seeded by train), as do every phase's
    step and optimizer."""
    state = work / "state.pt"
    if state.exists():
        raise SystemExit(f"{state} exists: --init starts a work folder, it does not replace one")
    work.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (work / name).write_bytes((checkpoint / name).read_bytes())
    model, batcher = load_checkpoint_model(checkpoint)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith(PROBES)}
    torch.save({"model": weights, "init": str(checkpoint), "image_size": batcher.pre.crop_size[0]}, state)
    return state


def save_checkpoint(work: Path, out: Path) -> Path:
    """The trained weights in the exact ConvLLaVA sft layout (bf16 .bin shards + index), with tokenizer."""
    sp = _tokenizer(work)
    state_path = work / "state.pt"
    state = torch.load(state_path, weights_only=True)
    image_size = work_image_size(state, None, state_path)
    model = DemoModel(sp.vocab_size(), image_size)
    load_weights(model, state["model"], state_path)
    vision = {k: v.detach() for k, v in model.vision.state_dict().items()}
    last = DEMO_TOWER.out_channels  # the unused final ConvNextModel norm that released towers carry
    vision["vision_tower.layernorm.weight"], vision["vision_tower.layernorm.bias"] = torch.ones(last), torch.zeros(last)
    llm = {k: v.detach() for k, v in model.llm.state_dict().items()}
    spec = S.LlamaSpec(**{**DEMO_LLM.__dict__, "vocab_size": sp.vocab_size()})
    tower = demo_tower(image_size)
    S.write_convllava_checkpoint(out, spec, tower, vision_state=vision, llm_state=llm, fmt="bin", shards=2,
                                 extra_files=[("tokenizer.model", (work / "tokenizer.model").read_bytes())])
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (out / name).write_bytes((work / name).read_bytes())
    S.write_json(out / "preprocessor_config.json", S.preprocessor_config(tower.image_size))
    return out


def load_checkpoint_model(checkpoint: Path) -> tuple[DemoModel, Batcher]:
    """The saved checkpoint back into PyTorch (fp32 compute on its bf16 values), for the reference figures."""
    import sentencepiece as spm

    from convllava_edge.export.checkpoint import TensorStore
    from convllava_edge.export.convllava.vision_model import load_vision_model, open_vision_checkpoint

    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    vision = open_vision_checkpoint(checkpoint)
    pre = vision.tower.preprocess  # its preprocessor_config.json, as the export reads it
    model = DemoModel(sp.vocab_size(), pre.crop_size[0])
    model.vision = load_vision_model(vision)
    store = TensorStore(checkpoint)
    llm_keys = [k for k in store.keys() if not k.startswith(("model.vision_tower.", "model.mm_projector."))]
    model.llm.load_state_dict({k: store.get(k).float() for k in llm_keys}, strict=True)
    return model.eval(), Batcher(sp, pre)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train, save and evaluate the shapes demo model.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--work", type=Path, required=True)
    t.add_argument("--steps", type=int, default=TrainConfig.steps)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--phase", choices=PHASES, default="joint")
    t.add_argument("--fp32", action="store_true", help="no bf16 autocast: fp32 matmuls")
    t.add_argument("--scenes", choices=("task", "varied"), default="task")
    t.add_argument("--max-turns", type=int, default=1)
    t.add_argument("--contact", type=float, default=0.0,
                   help="with --scenes varied: the share of those scenes whose shapes touch or overlap")
    t.add_argument("--image-size", type=int, default=None,
                   help="the tower's input in px, a multiple of 64 (256: 16 tokens; 384: 36, the shipped model's); "
                        "default: the work folder's (or the --init checkpoint's), else 256")
    t.add_argument("--init", type=Path, default=None, help="start WORK from this checkpoint (its weights, tokenizer)")
    s = sub.add_parser("save")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("evaluate")
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("-n", type=int, default=500)
    args = parser.parse_args()
    if args.cmd == "train":
        if not 0 <= args.contact <= 1 or (args.contact and args.scenes != "varied"):
            raise SystemExit(f"--contact {args.contact}: a share from 0 to 1 of the varied scenes (--scenes varied)")
        if args.image_size is not None:
            check_image_size(args.image_size)
        if args.init is not None:
            init_from(args.work, args.init)
        train(args.work, TrainConfig(steps=args.steps, phase=args.phase, threads=args.threads, bf16=not args.fp32,
                                     scenes=args.scenes, max_turns=args.max_turns, contact=args.contact,
                                     image_size=args.image_size,
                                     **PHASE_DEFAULTS[args.phase]))
    elif args.cmd == "save":
        print(save_checkpoint(args.work, args.out))
    else:
        model, batcher = load_checkpoint_model(args.checkpoint)
        print(json.dumps(evaluate(model, batcher, n=args.n), indent=2))


if __name__ == "__main__":
    main()
