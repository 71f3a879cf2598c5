"""LLaVA-Mini's vision side as three ONNX graphs, each validated against PyTorch when written.

- ``clip``: ``pixel_values [1, 3, S, S] -> image_features [1, N, width]`` (N = (S/14)^2 = 576 at 336 px);
- ``compress``: ``image_features -> global_tokens [1, N, d], compressed_tokens [1, C*C, d]``;
- ``prefusion``: ``vision_tokens [1, N + C*C, d], input_ids [1, L] -> fused_text [1, L, d],
  compressed_fused [1, C*C, d]``; L is dynamic, the token-embedding table is inside (llama.cpp does
  not hand out input embeddings), positions and the causal mask are computed from the ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.export import Dim

from ...errors import ExportError
from ...families.llava_mini import GRAPH_IO
from ...metrics import compare_embeddings, relative_max_error
from .modules import Compress, LlavaMiniCheckpoint, PreFusion, load_modules
from ...quantize.onnx_variants import fold_constants
from ..onnx_graphs import FP32_TOLERANCE, check_opset, quiet_exporter, save_graph
from ..trt_lint import LintReport, lint

GRAPHS = ("clip", "compress", "prefusion")
# torch's exporter emits opset 18 natively; converting down to 17 goes through one protobuf message,
# which cannot hold the multi-GB pre-fusion graph (embedding table + 4 decoder layers). TensorRT 10
# reads opsets 9-20 (8.6 stops at 17).
OPSET = 18
MAX_TEXT = 8192  # longest prompt the pre-fusion graph accepts (tokenizer_model_max_length is 4096)
# Names of the graphs' inputs and outputs (the runtime in convllava_edge/families/llava_mini.py uses the same)
IO = GRAPH_IO  # the runtime family's names for the graphs' inputs and outputs: one table, the runtime's


@dataclass
class MiniGraphs:
    variant: str
    paths: dict[str, Path]
    method: str
    lint: dict[str, LintReport]
    accuracy: dict[str, dict] = field(default_factory=dict)  # graph -> agreement with fp32 (per output)
    validation: dict[str, float] = field(default_factory=dict)  # fp32 only: graph -> max relative error


def _export(module: torch.nn.Module, args: tuple, path: Path, name: str, dynamic: dict | None) -> Path:
    inputs, outputs = IO[name]
    with quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(module.eval(), args, None, input_names=inputs, output_names=outputs,
                                        opset_version=OPSET, dynamo=True, dynamic_shapes=dynamic, verbose=False)
        except Exception as e:  # torch.export raises many types; all mean "this module did not trace"
            raise ExportError(f"ONNX export of the {name} graph failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0]}") from e
    with quiet_exporter():
        proto = fold_constants(program.model_proto)
    check_opset(proto, OPSET, name)
    return save_graph(proto, path, module)


class _PreFusionGraph(torch.nn.Module):
    def __init__(self, prefusion: PreFusion):
        super().__init__()
        self.prefusion = prefusion

    def forward(self, vision_tokens: torch.Tensor, input_ids: torch.Tensor):
        return self.prefusion(vision_tokens, input_ids)


class _CompressGraph(torch.nn.Module):
    """The compressor for export, its query side folded.

    The queries do not depend on the image: ln_q(query) + pos_embed and their in-projection are
    computed here once, and the attention over keys and values is written out (the same arithmetic
    as nn.MultiheadAttention, checked against it in the tests). Left to the exporter, the query side
    stays a chain of constant-only nodes (LayerNormalization and Split are not foldable there), which
    TensorRT would recompute on every image.
    """

    def __init__(self, compress: Compress):
        super().__init__()
        c = compress.compressor
        width, heads = c.query.shape[1], c.attn.num_heads
        self.heads, self.head_dim = heads, width // heads
        wq, wk, wv = c.attn.in_proj_weight.detach().chunk(3)
        bq, bk, bv = c.attn.in_proj_bias.detach().chunk(3)
        with torch.no_grad():
            q = (c.ln_q(c.query) + c.pos_embed) @ wq.T + bq  # [C*C, width]
            q = q * self.head_dim ** -0.5  # softmax(q k^T / sqrt(d)) with the scale folded in
            self.register_buffer("q", q.reshape(-1, heads, self.head_dim).transpose(0, 1).contiguous())  # [h, C*C, hd]
            self.register_buffer("key_pos", c.key_pos_embed(compress.n_features).detach().clone())
        self.ln_kv = c.ln_kv
        self.k_proj, self.v_proj = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
        with torch.no_grad():
            self.k_proj.weight.copy_(wk), self.k_proj.bias.copy_(bk)
            self.v_proj.weight.copy_(wv), self.v_proj.bias.copy_(bv)
        self.out_proj = c.attn.out_proj
        self.mm_projector = compress.mm_projector

    def forward(self, image_features: torch.Tensor):
        b, n, width = image_features.shape
        kv = self.ln_kv(image_features)  # [1, N, width]
        k = self.k_proj(kv + self.key_pos).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # [1, h, N, hd]
        v = self.v_proj(kv).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        attn = torch.softmax(self.q[None] @ k.transpose(-1, -2), dim=-1) @ v  # [1, h, C*C, hd]
        compressed = self.out_proj(attn.transpose(1, 2).reshape(b, -1, width))  # [1, C*C, width]
        return self.mm_projector(image_features), self.mm_projector(compressed)


def sample_inputs(ckpt: LlavaMiniCheckpoint, seed: int = 0) -> dict[str, list[tuple]]:
    """Inputs to validate each graph with: realistic scales, two prompt lengths, a masked token 0."""
    rng = np.random.default_rng(seed)
    size = ckpt.clip_config.image_size
    n = (size // ckpt.clip_config.patch_size) ** 2
    c2 = ckpt.config.compressor_size ** 2
    d, v = ckpt.config.llm.hidden_size, ckpt.config.llm.vocab_size
    pixels = [rng.normal(0, 1, (1, 3, size, size)).astype(np.float32) for _ in range(2)]
    ids = []
    for length in (24, 41):
        row = rng.integers(1, v, length)
        row[5], row[9] = -200, 0  # the image placeholder and a real token 0: both masked as keys
        ids.append(row[None].astype(np.int64))
    return {"pixels": pixels, "ids": ids, "n": n, "c2": c2, "d": d}


def export_mini_fp32(ckpt: LlavaMiniCheckpoint, out_dir: Path, progress: Callable[[str], None] = lambda m: None,
                     threads: int | None = None) -> MiniGraphs:
    from ...families.llava_mini import MiniEncoder

    progress("loading CLIP, compressor and pre-fusion layers")
    clip, compress, prefusion = load_modules(ckpt)
    samples = sample_inputs(ckpt)
    size = ckpt.clip_config.image_size
    paths = {}
    progress("exporting the CLIP graph")
    paths["clip"] = _export(clip, (torch.zeros(1, 3, size, size),), out_dir / "clip-fp32.onnx", "clip", None)
    progress("exporting the compressor graph")
    n, c2, d = samples["n"], samples["c2"], samples["d"]
    paths["compress"] = _export(_CompressGraph(compress), (torch.zeros(1, n, ckpt.clip_config.hidden_size),),
                                out_dir / "compress-fp32.onnx", "compress", None)
    progress("exporting the pre-fusion graph")
    length = Dim("text_length", min=2, max=MAX_TEXT)
    paths["prefusion"] = _export(_PreFusionGraph(prefusion),
                                 (torch.zeros(1, n + c2, d), torch.ones(1, 16, dtype=torch.long)),
                                 out_dir / "prefusion-fp32.onnx", "prefusion",
                                 {"vision_tokens": None, "input_ids": {1: length}})
    progress("validating the three graphs against PyTorch")
    encoder = MiniEncoder.from_files(paths, "cpu", threads)
    errors = {}
    with torch.no_grad():
        for graph in GRAPHS:
            worst = 0.0
            for i in range(2):
                if graph == "clip":
                    got = [encoder.clip(samples["pixels"][i])]
                    want = [clip(torch.from_numpy(samples["pixels"][i]))]
                elif graph == "compress":
                    feats = clip(torch.from_numpy(samples["pixels"][i]))
                    got = list(encoder.compress(feats.numpy()))
                    want = list(compress(feats))
                else:
                    feats = clip(torch.from_numpy(samples["pixels"][i]))
                    vision = torch.cat(compress(feats), dim=1)
                    got = list(encoder.prefuse(vision.numpy(), samples["ids"][i]))
                    want = list(prefusion(vision, torch.from_numpy(samples["ids"][i])))
                for g, w in zip(got, want):
                    worst = max(worst, relative_max_error(g, w.numpy()))
            errors[graph] = worst
    failures = {g: e for g, e in errors.items() if e > FP32_TOLERANCE}
    if failures:
        raise ExportError("LLaVA-Mini graphs do not match PyTorch (tolerance "
                          f"{FP32_TOLERANCE:.0e}): " + ", ".join(f"{g} {e:.2e}" for g, e in failures.items()))
    return MiniGraphs("fp32", paths, "fp32, exported by torch.onnx (dynamo)", lint_all(paths), validation=errors)


def lint_all(paths: dict[str, Path]) -> dict[str, LintReport]:
    # CLIP and the compressor use LayerNorm (real LayerNormalization ops expected); the pre-fusion
    # layers use RMSNorm, which ONNX only has as an op from opset 23: a ReduceMean chain is expected.
    return {g: lint(p, layernorm=g != "prefusion") for g, p in paths.items()}


def make_mini_variant(variant: str, fp32: MiniGraphs, ckpt: LlavaMiniCheckpoint, out_dir: Path,
                      threads: int | None = None) -> MiniGraphs:
    """fp16 or int8 versions of the three graphs, or bf16 (the fp32 graphs in bf16 arithmetic), each measured
    against fp32 on the same inputs."""
    from ...families.llava_mini import MiniEncoder
    from ...quantize.onnx_variants import (BF16_METHOD, DYNAMIC_METHOD, RMSNORM_OPS, bf16_backend, convert_fp16,
                                           quantize_int8_dynamic)

    if variant == "bf16":
        paths, method = dict(fp32.paths), BF16_METHOD
        cand = MiniEncoder.from_files(paths, backend=bf16_backend(threads))
    else:
        paths = {}
        for graph, src in fp32.paths.items():
            dst = out_dir / f"{graph}-{variant}.onnx"
            if variant == "fp16":
                paths[graph] = convert_fp16(src, dst, RMSNORM_OPS if graph == "prefusion" else None)
            else:
                paths[graph] = quantize_int8_dynamic(src, dst)
        method = ("fp16 weights and activations, LayerNorm/RMSNorm statistics in fp32" if variant == "fp16"
                  else DYNAMIC_METHOD)
        cand = MiniEncoder.from_files(paths, "cpu", threads)
    samples = sample_inputs(ckpt, seed=1)
    ref = MiniEncoder.from_files(fp32.paths, "cpu", threads)
    pairs: dict[str, tuple[list, list]] = {"clip": ([], []), "compress": ([], []), "prefusion": ([], [])}
    for i in range(2):
        feats = ref.clip(samples["pixels"][i])
        pairs["clip"][0].append(cand.clip(samples["pixels"][i]))
        pairs["clip"][1].append(feats)
        g_ref, c_ref = ref.compress(feats)
        g_c, c_c = cand.compress(feats)
        pairs["compress"][0].append(np.concatenate([g_c, c_c]))
        pairs["compress"][1].append(np.concatenate([g_ref, c_ref]))
        vision = np.concatenate([g_ref, c_ref])[None]
        f_ref, cc_ref = ref.prefuse(vision, samples["ids"][i])
        f_c, cc_c = cand.prefuse(vision, samples["ids"][i])
        pairs["prefusion"][0].append(np.concatenate([f_c, cc_c]))
        pairs["prefusion"][1].append(np.concatenate([f_ref, cc_ref]))
    accuracy = {g: compare_embeddings(c, r).to_dict() for g, (c, r) in pairs.items()}
    return MiniGraphs(variant, paths, method, lint_all(paths), accuracy=accuracy)
