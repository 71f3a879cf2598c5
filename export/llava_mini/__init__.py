"""LLaVA-Mini checkpoints -> three vision graphs per variant (CLIP, compressor, pre-fusion), the chat template."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ...errors import ConfigError
from ...preprocess import PreprocessConfig
from ...prompt import ChatTemplate
from ..config import read_json
from ..families import ExportFamily, ShippedVision, VisionResult
from .modules import NOT_LLM_PREFIXES, LlavaMiniConfig, open_llava_mini
from .graphs import GRAPHS, export_mini_fp32, make_mini_variant
from ..onnx_graphs import graph_files

# llavamini/conversation.py, conv_llava_llama_3_1.system
MINI_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
               "that the user provides, and assist the user with a variety of tasks using natural language.")


def chat_template(checkpoint: Path) -> ChatTemplate:
    """The checkpoint's own template (tokenizer_config.json), with what the official code puts around it."""
    config = read_json(Path(checkpoint) / "tokenizer_config.json")
    source = config.get("chat_template")
    if not source:
        raise ConfigError(f"{checkpoint}/tokenizer_config.json: no chat_template (LLaVA-Mini renders the "
                          "checkpoint's own Llama-3 template)")
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    template = ChatTemplate(name="llava_llama_3_1", chat_template=source, system=MINI_SYSTEM, bos_token=bos or "")
    # The assistant header the model writes itself: what add_generation_prompt=True would have added.
    from ...prompt import _jinja, render_bounded

    messages = [{"role": "system", "content": MINI_SYSTEM}, {"role": "user", "content": "x"}]
    compiled = _jinja(source)
    plain = render_bounded(compiled, messages=messages, bos_token=template.bos_token, add_generation_prompt=False)
    with_header = render_bounded(compiled, messages=messages, bos_token=template.bos_token, add_generation_prompt=True)
    header = with_header[len(plain):] if with_header.startswith(plain) else ""
    return ChatTemplate(**{**template.to_dict(), "answer_header": header, "stop": ()})


class LlavaMiniExport(ExportFamily):
    name = "llava-mini"
    measures_agreement = False  # its prompts are pre-fused rows: measured by check against a reference bundle
    vision_in_child = True

    @property
    def model_types(self):
        from ..config import LLAVA_MINI_MODEL_TYPES

        return LLAVA_MINI_MODEL_TYPES

    def open(self, checkpoint: Path, vision_tower: Path | None, options):
        if options.calibration_images is not None:
            raise ConfigError("--calibration-images: static int8 is not available for LLaVA-Mini bundles yet "
                              "(their int8 graphs are dynamic)")
        LlavaMiniConfig.load(checkpoint)  # the config's checks, before anything is built
        return checkpoint, vision_tower, chat_template(checkpoint)

    def export_vision(self, opened, folder: Path, options, progress) -> VisionResult:
        checkpoint, vision_tower, template = opened
        ckpt = open_llava_mini(checkpoint, vision_tower)
        fp32 = export_mini_fp32(ckpt, folder, progress.stage, options.threads)
        graphs = [fp32]
        for variant in options.vision_types:
            if variant != "fp32":
                progress.stage(f"making the {variant} graphs")
                graphs.append(make_mini_variant(variant, fp32, ckpt, folder, options.threads))
        order = {v: i for i, v in enumerate(options.vision_types)}
        shipped = []
        for g in sorted((g for g in graphs if g.variant in order), key=lambda g: order[g.variant]):
            files = [f for graph in GRAPHS for f in graph_files(g.paths[graph])]
            shipped.append(ShippedVision(g.variant, files, g.method, all(r.passed for r in g.lint.values()),
                                         g.accuracy or None, parts={graph: g.paths[graph] for graph in GRAPHS}))
        kept = {f for v in shipped for f in v.files}  # bf16 ships the fp32 graphs' files
        unshipped = [f for g in graphs if g.variant not in order for graph in GRAPHS
                     for f in graph_files(g.paths[graph]) if f not in kept]
        pre = PreprocessConfig.from_dict(ckpt.preprocess, stride=ckpt.clip_config.patch_size)
        c2 = ckpt.config.compressor_size ** 2
        n_clip = (ckpt.clip_config.image_size // ckpt.clip_config.patch_size) ** 2
        fp32_shipped = "fp32" in order or "bf16" in order  # bf16 runs the fp32 graphs
        return VisionResult(
            vision=shipped, unshipped=unshipped, preprocess=replace(pre, aspect="crop"),
            n_embd=ckpt.config.llm.hidden_size,
            tokens_per_image={"rule": f"{c2} compressed token(s) per image or video frame", "compressed": c2,
                              "clip_tokens": n_clip, "stride": ckpt.clip_config.patch_size, "square": c2},
            tower={"clip_width": ckpt.clip_config.hidden_size, "clip_layers_used": ckpt.clip_config.num_hidden_layers - 1,
                   "compressor_size": ckpt.config.compressor_size, "prefusion_layers": ckpt.config.prefusion_layer_num},
            template=template,
            accuracy={"vision_fp32_vs_pytorch": fp32.validation if fp32_shipped else None},
            notes=ckpt.notes)

    def llm_config(self, checkpoint: Path):
        mini = LlavaMiniConfig.load(checkpoint)
        return mini.llm, mini.mm.max_length, NOT_LLM_PREFIXES


FAMILY = LlavaMiniExport()
