"""ConvLLaVA (576 image tokens at 1536 px) against LLaVA-Mini (1 token) on the same ~1B LLM.

Both bundles come out of `convllava-edge export` from random checkpoints with real shapes: the
ConvLLaVA one from e2e_bench.py (full ConvNeXt tower, int8 vision, Q4_K_M); the LLaVA-Mini one with
CLIP ViT-L/14-336 (304M parameters), the Resampler compressor, 4 pre-fusion layers of the LLM's
shape, the same Llama (TinyLlama-1.1B proportions) and int8 vision, Q4_K_M. Reported: the LLM's
prefill positions and the time to first token with its parts, cold (no cache), medians.

    python benchmarks/family_bench.py [--runs 3] [--convllava-bundle DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import CLIPVisionConfig

from convllava_edge.export.bundle import ExportOptions, export_bundle
from convllava_edge.backends.base import SamplingOptions
from convllava_edge.model import AskOptions, Model
from convllava_edge.preprocess import PreprocessConfig
from convllava_edge.shapes_task import random_scene

from e2e_bench import LLM, make_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support: the synthetic checkpoints
from support.synthetic_mini import write_tiny_llava_mini  # noqa: E402

CLIP_L_336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
QUESTION = "What is in the image?"


def make_mini_bundle(work: Path, threads: int | None) -> Path:
    bundle = work / "mini-bundle"
    if (bundle / "manifest.json").exists():
        return bundle
    sft, clip = write_tiny_llava_mini(work / "mini", llm=LLM, clip=CLIP_L_336, n_prefusion=4, shards=4)
    export_bundle(sft, bundle, ExportOptions(vision_types=("int8",), llm_type="Q4_K_M", threads=threads),
                  vision_tower=clip)
    return bundle


def ttft(bundle: Path, image, runs: int, threads: int | None, size: int | None = None) -> dict:
    model = Model(bundle, device="cpu", threads=threads, cache=False)
    if size is not None:
        model.preprocess_config = PreprocessConfig(image_size=size, crop_size=(size, size))
    options = AskOptions(max_tokens=1, sampling=SamplingOptions(temperature=0.0))
    model.ask(image, QUESTION, options)
    rows = []
    for _ in range(runs):
        model.reset()
        rows.append(model.ask(image, QUESTION, options))
    med = lambda key: statistics.median(a.timings[key] for a in rows)  # noqa: E731
    result = {"family": model.family, "n_image_tokens": rows[0].n_image_tokens,
              "prefill_positions": rows[0].n_prompt_positions, "preprocess_ms": med("preprocess_ms"),
              "encode_ms": med("encode_ms"), "prefill_ms": med("prefill_ms"), "ttft_ms": med("time_to_first_token_ms")}
    model.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "family.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="family-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    image = random_scene(np.random.default_rng(3)).render()
    t = time.perf_counter()
    convllava = make_bundle(work, args.threads)
    mini = make_mini_bundle(work, args.threads)
    print(f"bundles ready in {time.perf_counter() - t:.0f} s", flush=True)
    rows = [ttft(convllava, image, args.runs, args.threads, size=1536), ttft(mini, image, args.runs, args.threads)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    print("\n| family | image tokens | LLM prefill positions | preprocess ms | vision ms | prefill ms | TTFT ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['n_image_tokens']} | {r['prefill_positions']} | {r['preprocess_ms']:.0f} | "
              f"{r['encode_ms']:.0f} | {r['prefill_ms']:.0f} | {r['ttft_ms']:.0f} |")


if __name__ == "__main__":
    main()
