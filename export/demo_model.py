"""Train the demo model: a tiny ConvLLaVA on the shapes task, from scratch, on CPU.

Exactly ConvLLaVA's architecture at small widths: a 5-stage ConvNeXt (total stride 64: 256 px -> 16
tokens), the mlp2x_gelu projector, a Llama with widths that are multiples of 256, a SentencePiece
tokenizer trained on the task's text with Llama's options, the vicuna_v1 template and "pad"
preprocessing. Sequences are built as the runtime builds them (template, <image> split, one BOS);
the loss covers the answer's tokens and EOS, as LLaVA's instruction tuning does.

Training from scratch, the LLM's loss alone leaves the tower without a usable signal for a long
time (measured: 750 steps at the answer prior, loss 0.42). A linear probe on the tower's tokens,
predicting which shape-colour pairs are present, how many shapes there are and which side each one
is on, gives it one from the first step. Reading the tokens stayed the LLM's bottleneck (measured
at step 4000: count 97%, but shape-of-a-colour at chance, loss flat for 1000 steps) while that probe
could already read every shape-colour pair from the tower: it reads all 16 tokens at once, so it
never asked a token to say what lies *there*. A second probe asks exactly that of each projected
token (which shape-colour pairs have their centre in its 64 px cell), which is what the LLM's
attention needs in order to look an attribute up. Both probes are training scaffolding: not part of
the model, not saved.

The shipped model so far (resumable, seeded; ~86 min fp32 + ~50 min bf16 on this 2-core machine):
    python -m convllava_edge.export.demo_model train --work demo-work --steps 3000 --fp32
    python -m convllava_edge.export.demo_model train --work demo-work --steps 6750   # bf16; stopped at 5000
    python -m convllava_edge.export.demo_model save --work demo-work --out models/shapes-demo-checkpoint
    python -m convllava_edge.export.demo_model evaluate --checkpoint models/shapes-demo-checkpoint
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

from .. import shapes_task as task
from ..preprocess import PreprocessConfig, preprocess
from ..prompt import VICUNA_V1
from . import synthetic as S
from .config import TowerConfig
from .vision_model import ConvLlavaVision

DEMO_TOWER = TowerConfig(depths=(1, 1, 3, 1, 1), hidden_sizes=(32, 64, 96, 128, 192), image_size=256)
DEMO_LLM = S.LlamaSpec(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=512)
HELD_OUT_SEED = 424242  # the evaluation seed; training draws from TRAIN_SEED_BASE + step
TRAIN_SEED_BASE = 1_000_000


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    images_per_step: int = 24
    questions_per_image: int = 4
    lr: float = 1.5e-3
    warmup: int = 150
    weight_decay: float = 0.01
    seed: int = 0
    threads: int | None = None
    bf16: bool = True  # autocast matmuls to bf16 (AVX-512 BF16 here: 1.35x per step, same loss); weights stay fp32


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
N_TOKENS = (DEMO_TOWER.image_size // DEMO_TOWER.stride) ** 2  # 16


GRID = DEMO_TOWER.image_size // DEMO_TOWER.stride  # 4 x 4 tokens, row-major as the graph emits them


def scene_targets(scene: task.Scene) -> tuple[list[float], int, list[float], list[float], np.ndarray]:
    """presence of each pair, count - 1, side of each present pair (1 = right), which sides count, and per
    token the pairs whose centre lies in its cell of the padded square image ([16, 12])."""
    by_pair = {(s.kind, s.color): s for s in scene.shapes}
    presence = [1.0 if p in by_pair else 0.0 for p in PAIRS]
    side = [1.0 if p in by_pair and by_pair[p].side == "right" else 0.0 for p in PAIRS]
    square = max(scene.width, scene.height)  # "pad": centred on a square canvas, then resized
    cells = np.zeros((GRID * GRID, len(PAIRS)), np.float32)
    for s in scene.shapes:
        x = int((s.cx + (square - scene.width) / 2) / square * GRID)
        y = int((s.cy + (square - scene.height) / 2) / square * GRID)
        cells[min(y, GRID - 1) * GRID + min(x, GRID - 1), PAIRS.index((s.kind, s.color))] = 1.0
    return presence, len(scene.shapes) - 1, side, presence, cells


class DemoModel(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vision = ConvLlavaVision(DEMO_TOWER, "mlp2x_gelu", DEMO_LLM.hidden_size)
        self.probe = nn.Linear(N_TOKENS * DEMO_TOWER.out_channels, 2 * len(PAIRS) + 3)  # training only
        self.token_probe = nn.Linear(DEMO_LLM.hidden_size, len(PAIRS))  # training only, per projected token
        for name, p in self.vision.named_parameters():
            if name.endswith("layer_scale_parameter"):
                nn.init.constant_(p, 0.1)  # ConvNeXt's 1e-6 start makes a shallow tower learn slowly
        self.llm = LlamaForCausalLM(LlamaConfig(
            hidden_size=DEMO_LLM.hidden_size, intermediate_size=DEMO_LLM.intermediate_size,
            num_hidden_layers=DEMO_LLM.num_hidden_layers, num_attention_heads=DEMO_LLM.num_attention_heads,
            num_key_value_heads=DEMO_LLM.num_key_value_heads, vocab_size=vocab_size,
            max_position_embeddings=DEMO_LLM.max_position_embeddings, rms_norm_eps=DEMO_LLM.rms_norm_eps,
            rope_theta=DEMO_LLM.rope_theta, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0))


class Batcher:
    """Scenes and questions -> pixel batch + spliced embeddings inputs, exactly as the runtime splices."""

    def __init__(self, sp, preprocess_config: PreprocessConfig):
        self.sp, self.pre = sp, preprocess_config
        self.bos, self.eos = sp.bos_id(), sp.eos_id()
        before, _ = VICUNA_V1.render([("Q", None)]).split("<image>")
        self.prefix = [self.bos] + sp.encode(before)  # BOS + system + " USER: "

    def suffix(self, question: str) -> list[int]:
        _, after = VICUNA_V1.render([(question, None)]).split("<image>")
        return self.sp.encode(after)  # the chunk after the image, its BOS dropped

    def answer(self, word: str) -> list[int]:
        return self.sp.encode(word) + [self.eos]  # "▁yes" as it follows "ASSISTANT:", then </s>

    def build(self, items: list[tuple[task.Scene, list[task.Question]]]):
        pixels = np.concatenate([preprocess(scene.render(), self.pre, "pad") for scene, _ in items])
        rows = [(i, self.suffix(q.text), self.answer(q.answer)) for i, (_, qs) in enumerate(items) for q in qs]
        targets = [torch.tensor(np.array(x)) for x in zip(*(scene_targets(scene) for scene, _ in items))]
        return torch.from_numpy(pixels), rows, targets


def probe_loss(model: DemoModel, features: torch.Tensor, image: torch.Tensor, targets) -> torch.Tensor:
    presence, count, side, side_mask, cells = targets
    cell_logits = model.token_probe(image).float()  # [B, 16, 12]
    token_loss = nn.functional.binary_cross_entropy_with_logits(cell_logits, cells, reduction="sum") / cells.shape[0]
    logits = model.probe(features.flatten(1))  # [B, 12 + 12 + 3]
    n = len(PAIRS)
    loss = nn.functional.binary_cross_entropy_with_logits(logits[:, :n], presence)
    loss = loss + nn.functional.cross_entropy(logits[:, 2 * n:], count)
    side_loss = nn.functional.binary_cross_entropy_with_logits(logits[:, n:2 * n], side, reduction="none")
    return loss + (side_loss * side_mask).sum() / side_mask.sum().clamp(min=1) + token_loss / GRID


def forward_loss(model: DemoModel, pixels: torch.Tensor, rows, prefix: list[int], targets=None) -> torch.Tensor:
    features, image = model.vision.features_and_embeds(pixels)  # [B_img, 16, C], [B_img, 16, d]
    embed = model.llm.get_input_embeddings()
    n_img = image.shape[1]
    length = max(len(prefix) + n_img + len(s) + len(a) for _, s, a in rows)
    d = image.shape[-1]
    inputs = torch.zeros(len(rows), length, d)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    pre = embed(torch.tensor(prefix))
    for r, (i, suffix, answer) in enumerate(rows):
        text = embed(torch.tensor(suffix + answer))
        seq = torch.cat([pre, image[i], text])
        inputs[r, : len(seq)] = seq
        mask[r, : len(seq)] = 1
        start = len(prefix) + n_img + len(suffix)
        labels[r, start: start + len(answer)] = torch.tensor(answer)
    loss = model.llm(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
    return loss if targets is None else loss + probe_loss(model, features, image, targets)


@torch.no_grad()
def greedy_answer(model: DemoModel, pixels: torch.Tensor, batcher: Batcher, question: str, max_tokens: int = 4) -> str:
    image = model.vision(pixels)[0]
    embed = model.llm.get_input_embeddings()
    ids = batcher.suffix(question)
    seq = torch.cat([embed(torch.tensor(batcher.prefix)), image, embed(torch.tensor(ids))])[None]
    out, past = [], None
    for _ in range(max_tokens):
        result = model.llm(inputs_embeds=seq, past_key_values=past, use_cache=True)
        past = result.past_key_values
        token = int(result.logits[0, -1].argmax())
        if token == batcher.eos:
            break
        out.append(token)
        seq = embed(torch.tensor([[token]]))
    return batcher.sp.decode(out)


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


def train(work: Path, config: TrainConfig = TrainConfig(), log=print) -> Path:
    """Train (or resume) in ``work``; returns the final state file."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    work.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    sp = _tokenizer(work)
    pre = PreprocessConfig(image_size=256, crop_size=(256, 256))
    batcher = Batcher(sp, pre)
    model = DemoModel(sp.vocab_size())
    # The token probe came in at step 4250 of the shipped model's run: it has an optimizer of its own so
    # that a state saved before it existed still resumes (the main optimizer's groups stay the same).
    main = [(n, p) for n, p in model.named_parameters() if not n.startswith("token_probe.")]
    decay = [p for n, p in main if p.ndim >= 2]
    no_decay = [p for n, p in main if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    probe_opt = torch.optim.AdamW(model.token_probe.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0)
    state_path = work / "state.pt"
    step, history = 0, []
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        if unexpected or any(not k.startswith("token_probe.") for k in missing):
            raise RuntimeError(f"{state_path}: not a demo-model training state ({(missing + unexpected)[:3]})")
        opt.load_state_dict(state["optimizer"])
        if "token_probe_optimizer" in state:
            probe_opt.load_state_dict(state["token_probe_optimizer"])
        step, history = int(state["step"]), json.loads(state["history"])
        log(f"resuming at step {step}")

    def lr_at(s: int) -> float:
        if s < config.warmup:
            return config.lr * (s + 1) / config.warmup
        return config.lr * 0.5 * (1 + math.cos(math.pi * (s - config.warmup) / max(1, config.steps - config.warmup)))

    start = time.perf_counter()
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        job = bar.add_task("train", total=config.steps, completed=step, info="")
        model.train()
        while step < config.steps:
            rng = np.random.default_rng(TRAIN_SEED_BASE + config.seed * 10_000_000 + step)
            items = []
            for _ in range(config.images_per_step):
                scene = task.random_scene(rng)
                qs = task.questions_for(scene, rng)
                picks = rng.choice(len(qs), size=min(config.questions_per_image, len(qs)), replace=False)
                items.append((scene, [qs[int(i)] for i in picks]))
            pixels, rows, targets = batcher.build(items)
            for group in opt.param_groups + probe_opt.param_groups:
                group["lr"] = lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                loss = forward_loss(model, pixels, rows, batcher.prefix, targets)
            opt.zero_grad(set_to_none=True)
            probe_opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            probe_opt.step()
            step += 1
            history.append(loss.item())
            bar.update(job, completed=step, info=f"loss {np.mean(history[-50:]):.3f}")
            if step % 250 == 0 or step == config.steps:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "token_probe_optimizer": probe_opt.state_dict(), "history": json.dumps(history)},
                           state_path)
            if step % 500 == 0 or step == config.steps:
                result = evaluate(model, batcher, n=200, seed=HELD_OUT_SEED + 1)
                log(f"step {step}: loss {np.mean(history[-100:]):.4f}, held-out accuracy {result['accuracy']:.3f} "
                    f"{result['per_form']} ({time.perf_counter() - start:.0f} s this run)")
    return state_path


def save_checkpoint(work: Path, out: Path) -> Path:
    """The trained weights in the exact ConvLLaVA sft layout (bf16 .bin shards + index), with tokenizer."""
    sp = _tokenizer(work)
    model = DemoModel(sp.vocab_size())
    model.load_state_dict(torch.load(work / "state.pt", weights_only=True)["model"])
    vision = {k: v.detach() for k, v in model.vision.state_dict().items()}
    last = DEMO_TOWER.out_channels  # the unused final ConvNextModel norm that released towers carry
    vision["vision_tower.layernorm.weight"], vision["vision_tower.layernorm.bias"] = torch.ones(last), torch.zeros(last)
    llm = {k: v.detach() for k, v in model.llm.state_dict().items()}
    spec = S.LlamaSpec(**{**DEMO_LLM.__dict__, "vocab_size": sp.vocab_size()})
    S.write_convllava_checkpoint(out, spec, DEMO_TOWER, vision_state=vision, llm_state=llm, fmt="bin", shards=2,
                                 extra_files=[("tokenizer.model", (work / "tokenizer.model").read_bytes())])
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (out / name).write_bytes((work / name).read_bytes())
    S.write_json(out / "preprocessor_config.json", S.preprocessor_config(DEMO_TOWER.image_size))
    return out


def load_checkpoint_model(checkpoint: Path) -> tuple[DemoModel, Batcher]:
    """The saved checkpoint back into PyTorch (fp32 compute on its bf16 values), for the reference figures."""
    import sentencepiece as spm

    from .checkpoint import TensorStore
    from .vision_model import load_vision_model, open_vision_checkpoint

    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    model = DemoModel(sp.vocab_size())
    model.vision = load_vision_model(open_vision_checkpoint(checkpoint))
    store = TensorStore(checkpoint)
    llm_keys = [k for k in store.keys() if not k.startswith(("model.vision_tower.", "model.mm_projector."))]
    model.llm.load_state_dict({k: store.get(k).float() for k in llm_keys}, strict=True)
    pre = PreprocessConfig(image_size=256, crop_size=(256, 256))
    return model.eval(), Batcher(sp, pre)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train, save and evaluate the shapes demo model.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--work", type=Path, required=True)
    t.add_argument("--steps", type=int, default=TrainConfig.steps)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--fp32", action="store_true", help="no bf16 autocast (phase 1 of the shipped model)")
    s = sub.add_parser("save")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("evaluate")
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("-n", type=int, default=500)
    args = parser.parse_args()
    if args.cmd == "train":
        train(args.work, TrainConfig(steps=args.steps, threads=args.threads, bf16=not args.fp32))
    elif args.cmd == "save":
        print(save_checkpoint(args.work, args.out))
    else:
        model, batcher = load_checkpoint_model(args.checkpoint)
        print(json.dumps(evaluate(model, batcher, n=args.n), indent=2))


if __name__ == "__main__":
    main()
