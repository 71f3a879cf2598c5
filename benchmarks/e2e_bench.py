"""End to end on a full-size tower: time to first token for 144 / 256 / 576 image tokens, the cache's
effect, and what injecting image embeddings costs against prefilling as many text tokens.

The bundle: the real ConvLLaVA tower shape (669M parameters, random weights), the mlp2x_gelu
projector, and the ~1B Llama of llm_bench.py, exported by `convllava-edge export` with int8 vision
(dynamic) and Q4_K_M. The three token counts are the same graph run at 768, 1024 and 1536 px.

    python benchmarks/e2e_bench.py [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from convllava_edge.cache import DiskCache
from convllava_edge.export.bundle import ExportOptions, export_bundle
from convllava_edge.backends.base import SamplingOptions
from convllava_edge.backends.llm_llamacpp import LlamaCppBackend
from convllava_edge.manifest import resolve_inside
from convllava_edge.model import AskOptions, Model
from convllava_edge.preprocess import PreprocessConfig
from convllava_edge.shapes_task import random_scene

from convllava_edge.export.convllava import synthetic as S  # noqa: E402

LLM = S.LlamaSpec(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000)
QUESTION = "What is in the image?"


def make_checkpoint(work: Path) -> Path:
    """``work``/ckpt: the full-size tower and LLM with random weights, in the released layout (written once)."""
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        tower = S.convllava_tower(768)
        vision = S.random_vision_state(tower, "mlp2x_gelu", LLM.hidden_size, seed=0)
        llm = S.random_llama_state(LLM, seed=1)
        S.write_convllava_checkpoint(ckpt, LLM, tower, vision_state=vision, llm_state=llm, shards=4)
        S.write_llama_tokenizer(ckpt, 2000)
        S.write_json(ckpt / "preprocessor_config.json", S.preprocessor_config(768))
        del vision, llm
    return ckpt


def make_bundle(work: Path, threads: int | None, vision_types: tuple[str, ...] = ("int8",)) -> Path:
    """``work``/bundle, exported (Q4_K_M) from ``work``/ckpt, the full-size tower and LLM with random weights
    (both written once; a later call reuses them)."""
    bundle = work / "bundle"
    if (bundle / "manifest.json").exists():
        return bundle
    ckpt = make_checkpoint(work)
    t = time.perf_counter()
    export_bundle(ckpt, bundle, ExportOptions(vision_types=vision_types, llm_type="Q4_K_M", threads=threads))
    print(f"exported {', '.join(vision_types)} + Q4_K_M in {time.perf_counter() - t:.0f} s", flush=True)
    return bundle


def ttft(bundle: Path, size: int, image: bytes, runs: int, threads: int | None) -> dict:
    """Cold (no cache: decode, preprocess, encode) and cache-hit (the disk cache, as a second `ask` finds
    it) time to first token, medians; ``image`` is an encoded file's bytes, as the CLI passes them."""
    with tempfile.TemporaryDirectory() as cache_dir:
        model = Model(bundle, device="cpu", threads=threads, cache=DiskCache(cache_dir))
        model.images.preprocess_config = PreprocessConfig(image_size=size, crop_size=(size, size))  # same graph, another size
        options = AskOptions(max_tokens=1, sampling=SamplingOptions(temperature=0.0))
        store, model.cache = model.cache, None  # the cold series reads and writes no cache
        model.ask(image, QUESTION, options)  # warm-up
        cold, hit, parts = [], [], []
        for _ in range(runs):
            model.reset()
            a = model.ask(image, QUESTION, options)
            cold.append(a.timings["time_to_first_token_ms"])
            parts.append(a.timings)
        model.reset()
        model.cache = store
        model.ask(image, QUESTION, options)  # writes the cache
        for _ in range(runs):
            model.reset()
            b = model.ask(image, QUESTION, options)
            assert b.cache_hit
            hit.append(b.timings["time_to_first_token_ms"])
        med = {k: statistics.median(p[k] for p in parts) for k in ("preprocess_ms", "encode_ms", "prefill_ms")}
        model.close()
    return {"size": size, "n_image_tokens": a.n_image_tokens, "prompt_positions": a.n_prompt_positions,
            "cold_ttft_ms": statistics.median(cold), "hit_ttft_ms": statistics.median(hit),
            "hit_fraction": statistics.median(hit) / statistics.median(cold), **med}


def injection_overhead(gguf: Path, n_embd: int, counts, runs: int, threads: int | None) -> list[dict]:
    backend = LlamaCppBackend(gguf, n_ctx=1024, threads=threads)
    rng = np.random.default_rng(0)
    prefix = list(rng.integers(3, 2000, 40))
    out = []
    for n in counts:
        embeds = (rng.normal(0, 1, (n, n_embd)) * 0.02).astype(np.float32)
        ids = list(rng.integers(3, 2000, n))
        timings = {"embeddings": [], "tokens": []}
        for i in range(runs + 1):
            for kind in ("embeddings", "tokens"):
                backend.truncate(0)
                backend.eval_tokens(prefix)
                t = time.perf_counter()
                backend.eval_embeddings(embeds) if kind == "embeddings" else backend.eval_tokens(ids)
                if i:
                    timings[kind].append(time.perf_counter() - t)
        e, t = statistics.median(timings["embeddings"]), statistics.median(timings["tokens"])
        out.append({"n": n, "inject_ms": e * 1e3, "text_prefill_ms": t * 1e3, "overhead": e / t - 1})
        print(out[-1], flush=True)
    backend.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "e2e.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="e2e-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(work, args.threads)
    buf = io.BytesIO()
    random_scene(np.random.default_rng(3)).render().save(buf, format="PNG")
    image = buf.getvalue()
    rows = []
    for size in (768, 1024, 1536):
        rows.append(ttft(bundle, size, image, args.runs, args.threads))
        print(rows[-1], flush=True)
    model = Model(bundle, device="cpu", cache=False)
    gguf, n_embd = resolve_inside(bundle, model.manifest.llm.file), model.manifest.n_embd
    model.close()
    injection = injection_overhead(gguf, n_embd, (144, 256, 576), args.runs + 2, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "ttft": rows, "injection": injection},
                                   indent=2) + "\n")
    print("\n| image px | image tokens | prompt positions | preprocess ms | encode ms (int8) | prefill ms | "
          "TTFT cold ms | TTFT cache hit ms | hit / cold |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['n_image_tokens']} | {r['prompt_positions']} | {r['preprocess_ms']:.0f} | "
              f"{r['encode_ms']:.0f} | {r['prefill_ms']:.0f} | {r['cold_ttft_ms']:.0f} | {r['hit_ttft_ms']:.0f} | "
              f"{r['hit_fraction']:.1%} |")
    print("\n| positions | inject embeddings ms | prefill text tokens ms | overhead |")
    print("|---|---|---|---|")
    for r in injection:
        print(f"| {r['n']} | {r['inject_ms']:.0f} | {r['text_prefill_ms']:.0f} | {r['overhead']:+.1%} |")


if __name__ == "__main__":
    main()
