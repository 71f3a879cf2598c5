"""A LLaVA-Mini checkpoint -> bundle: three vision graphs per variant, the GGUF, the chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .. import __version__
from ..errors import ConfigError
from ..manifest import FileRecord, LlmEntry, Manifest, SCHEMA_VERSION, VisionEntry, write_manifest
from ..preprocess import PreprocessConfig
from ..prompt import ChatTemplate
from .config import read_json
from .gguf_convert import GgufConversion
from .llava_mini import LlavaMiniCheckpoint, open_llava_mini
from .llava_mini_export import GRAPHS, MiniGraphs, export_mini_fp32, make_mini_variant
from .onnx_export import graph_files

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
    from ..prompt import _jinja, render_bounded

    messages = [{"role": "system", "content": MINI_SYSTEM}, {"role": "user", "content": "x"}]
    compiled = _jinja(source)
    plain = render_bounded(compiled, messages=messages, bos_token=template.bos_token, add_generation_prompt=False)
    with_header = render_bounded(compiled, messages=messages, bos_token=template.bos_token, add_generation_prompt=True)
    header = with_header[len(plain):] if with_header.startswith(plain) else ""
    return ChatTemplate(**{**template.to_dict(), "answer_header": header, "stop": ()})


def export_mini_bundle(checkpoint: Path, tmp: Path, options, vision_tower: Path | None, progress) -> Manifest:
    from .bundle import export_llm

    ckpt = open_llava_mini(checkpoint, vision_tower)
    template = chat_template(checkpoint)
    fp32 = export_mini_fp32(ckpt, tmp, progress.stage, options.threads)
    graphs = [fp32]
    for variant in options.vision_types:
        if variant != "fp32":
            progress.stage(f"making the {variant} graphs")
            graphs.append(make_mini_variant(variant, fp32, ckpt, tmp, options.threads))
    llm_path, conversion, report = export_llm(checkpoint, tmp, options, progress)
    if report is not None:
        conversion.path.unlink()
    for g in graphs:
        if g.variant not in options.vision_types:
            for path in g.paths.values():
                for f in graph_files(path):
                    f.unlink()
    return _manifest(tmp, Path(checkpoint).name, ckpt, [g for g in graphs if g.variant in options.vision_types],
                     options.vision_types, llm_path, conversion, report, template)


def _manifest(bundle: Path, name: str, ckpt: LlavaMiniCheckpoint, graphs: Sequence[MiniGraphs],
              vision_types: Sequence[str], llm_path: Path, conversion: GgufConversion, report, template) -> Manifest:
    order = {v: i for i, v in enumerate(vision_types)}
    entries, records = [], []
    for g in sorted(graphs, key=lambda g: order[g.variant]):
        files = [f for graph in GRAPHS for f in graph_files(g.paths[graph])]
        rel = tuple(f.relative_to(bundle).as_posix() for f in files)
        parts = {graph: g.paths[graph].relative_to(bundle).as_posix() for graph in GRAPHS}
        entries.append(VisionEntry(variant=g.variant, graph=parts["clip"], files=rel, method=g.method,
                                   tensorrt_ready=all(r.passed for r in g.lint.values()),
                                   accuracy=g.accuracy or None, parts=parts))
        records += [FileRecord.of(bundle, f) for f in files]
    records.append(FileRecord.of(bundle, llm_path))
    pre = PreprocessConfig.from_dict(ckpt.preprocess, stride=ckpt.clip_config.patch_size)
    fp32 = next(g for g in graphs if g.variant == "fp32") if any(g.variant == "fp32" for g in graphs) else None
    c2 = ckpt.config.compressor_size ** 2
    n_clip = (ckpt.clip_config.image_size // ckpt.clip_config.patch_size) ** 2
    return Manifest(
        schema_version=SCHEMA_VERSION, family="llava-mini", name=name, created_with=f"convllava-edge {__version__}",
        files=tuple(records), preprocess={**pre.to_dict(), "aspect": "crop"}, n_embd=ckpt.config.llm.hidden_size,
        tokens_per_image={"rule": f"{c2} compressed token(s) per image or video frame", "compressed": c2,
                          "clip_tokens": n_clip, "stride": ckpt.clip_config.patch_size, "square": c2},
        vision=tuple(entries),
        tower={"clip_width": ckpt.clip_config.hidden_size, "clip_layers_used": ckpt.clip_config.num_hidden_layers - 1,
               "compressor_size": ckpt.config.compressor_size, "prefusion_layers": ckpt.config.prefusion_layer_num},
        llm=LlmEntry(file=llm_path.name, type=report.requested if report else conversion.out_type,
                     tensor_types=report.tensor_types if report else conversion.tensor_types,
                     n_ctx_train=conversion.context_length, fallbacks=len(report.fallbacks) if report else 0),
        template=template.to_dict(),
        tokenizer={"kind": "bpe", "stop_ids": conversion.vocab.stop_ids},
        accuracy={"vision_fp32_vs_pytorch": fp32.validation if fp32 else None,
                  "llm_fallback_warning": report.warning() if report else None},
        source={"checkpoint": name, "notes": ckpt.notes},
    )
