"""Time to first token against the official data flow in transformers, fp32 and bf16, side by side in one run.

One checkpoint: the real ConvLLaVA tower shape (ConvNeXt-Large + the 5th stage, random weights), the mlp2x_gelu
projector, and the ~1B Llama of e2e_bench.py; exported once by `export` with the vision types bf16 (where this
CPU and OpenVINO can run it), int8 (dynamic) and fp32, and the LLM in Q4_K_M. 768 px = 144 image tokens,
1536 px = 576: the same graph at two sizes (the tower is fully convolutional).

- T1 (interleaved): our `ask` path with `--vision-backend auto` (calibrated here, in this run) against
  transformers fp32 and bf16: the tower (transformers' ConvNext stages, the checkpoint's weights, the projector),
  then LlamaForCausalLM on the same prompt positions (input embeddings with the image rows spliced in), to the
  first token's argmax. Each round times every engine once, in turn, so that the shared host's drift falls
  on all of them alike; medians of the rounds.
- Per backend and vision type (one after the other, same LLM): what each pinned choice gives.

Ours is cold: no embedding cache, the image decoded, preprocessed and encoded every time (the model loaded,
as for every engine). The vision graph and the LLM run one after the other, each with every thread: nothing
overlaps, so no thread is split between them.

    python benchmarks/ttft_bench.py [--runs 3] [--sizes 768 1536] [--work DIR]

Writes benchmarks/results/ttft.json and prints the Markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from e2e_bench import LLM, QUESTION, make_bundle  # noqa: E402  e2e_bench's ~1B Llama, checkpoint, question

PINNED = (("fp32", "onnxruntime"), ("fp32", "openvino"), ("bf16", "openvino"), ("int8", "onnxruntime"),
          ("int8", "openvino"))


def vision_types() -> tuple[str, ...]:
    """bf16 where this CPU and OpenVINO can run it (export measures it by running it), int8, fp32."""
    from convllava_edge.backends.vision_openvino import openvino_available
    from convllava_edge.backends import cpu_has_bf16

    return ("bf16", "int8", "fp32") if openvino_available() and cpu_has_bf16() else ("int8", "fp32")


class Ours:
    """`ask`'s path on the bundle (a Model), cold: max_tokens 1, no embedding cache."""

    def __init__(self, bundle: Path, size: int, threads: int, variant: str | None, kind: str, llm=None):
        from convllava_edge.model import Model
        from convllava_edge.preprocess import PreprocessConfig

        self.model = Model(bundle, device="cpu", threads=threads, vision_type=variant, cache=False,
                           vision_backend=kind, llm=llm, progress=lambda line: print(f"  {line}", flush=True))
        self.model.images.preprocess_config = PreprocessConfig(image_size=size, crop_size=(size, size))
        self.name = f"ours {self.model.vision_entry.variant} on {self.model.vision_backend}"

    def __call__(self, image: bytes) -> dict:
        from convllava_edge.backends.base import SamplingOptions
        from convllava_edge.model import AskOptions

        self.model.reset()
        a = self.model.ask(image, QUESTION, AskOptions(max_tokens=1, sampling=SamplingOptions(temperature=0.0)))
        t = a.timings
        return {"ttft_ms": t["time_to_first_token_ms"], "vision_ms": t["preprocess_ms"] + t["encode_ms"],
                "prefill_ms": t["time_to_first_token_ms"] - t["preprocess_ms"] - t["encode_ms"],
                "positions": a.n_prompt_positions, "image_tokens": a.n_image_tokens}

    def items(self):
        """The prompt as token ids around the image slot (transformers gets the same positions)."""
        from convllava_edge.prompt import ImageSlot

        slot = ImageSlot("x", 1)
        items = self.model.prompt_items([(QUESTION, None)], slot)
        i = items.index(slot)
        return [int(x) for x in items[:i]], [int(x) for x in items[i + 1:]]

    def close(self):
        self.model.close()


class Transformers:
    """The official data flow in PyTorch: transformers' ConvNext stages + projector, LlamaForCausalLM on
    input embeddings with the image rows spliced in; our numpy preprocessing (CLIPImageProcessor's, parity-tested)."""

    def __init__(self, ckpt: Path, size: int, threads: int, dtype: str, before: list[int], after: list[int]):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM, logging

        from convllava_edge.export.convllava.vision_model import load_vision_model, open_vision_checkpoint
        from convllava_edge.preprocess import PreprocessConfig

        logging.set_verbosity_error()  # the vision keys are "unexpected" for a plain Llama: expected here
        torch.set_num_threads(threads)
        self.torch, self.dtype = torch, getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
        self.vision = load_vision_model(open_vision_checkpoint(ckpt)).to(self.dtype).eval()
        config = LlamaConfig(hidden_size=LLM.hidden_size, intermediate_size=LLM.intermediate_size,
                             num_hidden_layers=LLM.num_hidden_layers, num_attention_heads=LLM.num_attention_heads,
                             num_key_value_heads=LLM.num_key_value_heads, vocab_size=LLM.vocab_size,
                             max_position_embeddings=LLM.max_position_embeddings, rms_norm_eps=LLM.rms_norm_eps,
                             rope_theta=LLM.rope_theta, tie_word_embeddings=False)
        self.llm = LlamaForCausalLM.from_pretrained(ckpt, config=config, dtype=self.dtype).eval()
        self.config = PreprocessConfig(image_size=size, crop_size=(size, size))
        self.before, self.after = torch.tensor(before), torch.tensor(after)
        self.name = f"transformers {dtype}"

    def __call__(self, image: bytes) -> dict:
        from PIL import Image

        from convllava_edge.preprocess import preprocess

        torch = self.torch
        t0 = time.perf_counter()
        with torch.inference_mode():
            pixels = preprocess(Image.open(io.BytesIO(image)), self.config)
            rows = self.vision(torch.from_numpy(pixels).to(self.dtype))[0]
            t1 = time.perf_counter()
            emb = self.llm.get_input_embeddings()
            prompt = torch.cat([emb(self.before), rows, emb(self.after)])[None]
            int(self.llm(inputs_embeds=prompt, use_cache=True).logits[0, -1].argmax())
        t2 = time.perf_counter()
        return {"ttft_ms": (t2 - t0) * 1e3, "vision_ms": (t1 - t0) * 1e3, "prefill_ms": (t2 - t1) * 1e3,
                "positions": int(prompt.shape[1]), "image_tokens": int(rows.shape[0])}

    def close(self):
        del self.vision, self.llm


def interleaved(engines: list, image: bytes, runs: int) -> dict[str, list[dict]]:
    for engine in engines:
        engine(image)  # warm-up: first-call allocations, compilation for this shape
    out: dict[str, list[dict]] = {e.name: [] for e in engines}
    for _ in range(runs):
        for engine in engines:
            out[engine.name].append(engine(image))
    return out


def summary(name: str, size: int, series: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in series) for k in ("ttft_ms", "vision_ms", "prefill_ms")}
    return {"engine": name, "size": size, "image_tokens": series[0]["image_tokens"], "positions": series[0]["positions"],
            "runs": len(series), **med, "ttft_all_ms": [r["ttft_ms"] for r in series]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 1536])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--work", type=Path, default=None, help="keep the checkpoint and bundle here")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ttft.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ttft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # auto's calibration is part of this run (a cache of its own: no record from an earlier run is read)
    os.environ["CONVLLAVA_EDGE_CACHE"] = tempfile.mkdtemp(prefix="ttft-bench-cache-")
    from convllava_edge.machine import cpu_info
    from convllava_edge.shapes_task import random_scene

    cpu = cpu_info()["model"]
    print(f"{cpu}; {args.threads} threads", flush=True)
    bundle = make_bundle(work, args.threads, vision_types())
    buf = io.BytesIO()
    random_scene(np.random.default_rng(3)).render().save(buf, format="PNG")
    image = buf.getvalue()

    rows, choices = [], {}
    for size in args.sizes:
        ours = Ours(bundle, size, args.threads, None, "auto")
        choices[size] = ours.model.vision_choice.to_dict()
        before, after = ours.items()
        engines = [ours] + [Transformers(work / "ckpt", size, args.threads, d, before, after) for d in ("fp32", "bf16")]
        for name, series in interleaved(engines, image, args.runs).items():
            rows.append({"group": "T1", **summary(name, size, series)})
            print(rows[-1], flush=True)
        for e in engines:
            e.close()
        del engines, ours
        gc.collect()
        llm = None
        for variant, kind in PINNED:
            try:
                engine = Ours(bundle, size, args.threads, variant, kind, llm)
            except Exception as e:  # a type this bundle lacks, a backend this machine lacks: say so, go on
                print(f"  {variant} on {kind}: {e}", flush=True)
                continue
            llm = engine.model.llm
            rows.append({"group": "pinned", **summary(engine.name, size, interleaved([engine], image, args.runs)[engine.name])})
            print(rows[-1], flush=True)
            engine.model.vision = engine.model.images.encoder = None
            del engine
            gc.collect()
        if llm is not None:
            llm.close()

    import onnxruntime
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import openvino

        versions["openvino"] = openvino.__version__
    except ImportError:
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "threads": args.threads,
                                    "versions": versions, "auto_choice": choices, "rows": rows}, indent=2) + "\n")
    print(f"\n{cpu}, {args.threads} threads; medians of {args.runs}; auto chose: "
          + "; ".join(f"{s} px {c['vision_type']} on {c['vision_backend']}" for s, c in choices.items()))
    print("\n| px | image tokens | positions | engine | vision ms | prefill + 1st token ms | TTFT ms | vs transformers bf16 "
          "| vs transformers fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = {e: next(x["ttft_ms"] for x in rows if x["group"] == "T1" and x["size"] == r["size"]
                       and x["engine"] == f"transformers {e}") for e in ("bf16", "fp32")}
        print(f"| {r['size']} | {r['image_tokens']} | {r['positions']} | {r['engine']}"
              f"{' (auto)' if r['group'] == 'T1' and r['engine'].startswith('ours') else ''} | {r['vision_ms']:.0f} | "
              f"{r['prefill_ms']:.0f} | {r['ttft_ms']:.0f} | {ref['bf16'] / r['ttft_ms']:.2f}x | "
              f"{ref['fp32'] / r['ttft_ms']:.2f}x |")


if __name__ == "__main__":
    main()
