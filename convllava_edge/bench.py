"""``convllava-edge bench``: where the time to first token goes, on this machine, for one bundle.

Each run starts cold: the KV cache is cleared, the image is decoded, preprocessed and encoded again
(a private embedding cache, empty for the cold runs), then the prompt is prefilled and a fixed number
of tokens decoded greedily. A second series runs with the embeddings already cached, so the cache's
effect on time to first token is measured beside the cold figure, in the same process.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

from .backends import llm_kind
from .cache import DiskCache
from .errors import ConvLlavaEdgeError
from .backends.base import SamplingOptions
from .model import AskOptions, Model
from .runtime import RuntimeOptions

FIGURES = ("preprocess_ms", "encode_ms", "prefill_ms", "prefill_tokens_per_s", "time_to_first_token_ms",
           "decode_ms", "decode_tokens_per_s")


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "spread": (ordered[-1] - ordered[0]) / statistics.median(ordered) if statistics.median(ordered) else 0.0}


def run_bench(bundle: Path, image: Any, question: str = "Describe the image.", runs: int = 5, max_tokens: int = 32,
              runtime: RuntimeOptions = RuntimeOptions(device="cpu"),
              progress: Callable[[str, int, int], None] = lambda *a: None) -> dict[str, Any]:
    """``runtime``: how the bundle runs; its cache is replaced by a fresh one of the bench's own."""
    with tempfile.TemporaryDirectory(prefix="convllava-bench-cache-") as cache_dir:
        model = Model(bundle, runtime.with_(cache=DiskCache(cache_dir)))
        options = AskOptions(max_tokens=max_tokens, sampling=SamplingOptions(temperature=0.0))
        store, model.cache = model.cache, None  # the cold series reads and writes no cache
        model.ask(image, question, options)  # warm-up: first-call allocations, page cache
        series: dict[str, list[dict[str, float]]] = {"cold": [], "cache_hit": []}
        for i in range(runs):
            progress("cold runs", i, runs)
            model.reset()
            series["cold"].append(_figures(model.ask(image, question, options)))
        model.reset()
        model.cache = store
        model.ask(image, question, options)  # fills the cache
        for i in range(runs):
            progress("cache-hit runs", i, runs)
            model.reset()
            answer = model.ask(image, question, options)
            if not answer.cache_hit:
                raise ConvLlavaEdgeError(f"the embedding cache in {cache_dir} did not hit: is the temp folder writable?")
            series["cache_hit"].append(_figures(answer))
        result = {
            "bundle": str(bundle), "runs": runs, "max_tokens": max_tokens, "question": question,
            "n_image_tokens": answer.n_image_tokens, "n_prompt_positions": answer.n_prompt_positions,
            "n_generated": len(answer.token_ids),
            "vision": {"graph": model.vision_entry.variant, "backend": model.vision_backend,
                       "choice": model.vision_choice.to_dict(), "providers": model.vision_providers,
                       "threads": model.vision.threads},
            "llm": {"backend": model.llm.name, "type": llm_kind(model.options.llm_backend).weights(model.manifest, model.llm),
                    "threads": model.llm.threads, "gpu_offload": model.llm.gpu_offload},
            "cold": {k: summarize([r[k] for r in series["cold"]]) for k in FIGURES},
            "cache_hit": {k: summarize([r[k] for r in series["cache_hit"]]) for k in FIGURES},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        cold = result["cold"]["time_to_first_token_ms"]["median"]
        hit = result["cache_hit"]["time_to_first_token_ms"]["median"]
        result["cache_hit_ttft_fraction"] = hit / cold if cold else 0.0
        model.close()
    return result


def _figures(answer) -> dict[str, float]:
    t = dict(answer.timings)
    t["prefill_tokens_per_s"] = t["prefill_positions"] / (t["prefill_ms"] / 1e3) if t["prefill_ms"] else 0.0
    return t


def default_image() -> Path:
    """examples/shapes-1.png, next to the package in a checkout; else a generated scene."""
    example = Path(__file__).resolve().parents[1] / "examples" / "shapes-1.png"
    if example.is_file():
        return example
    from .shapes_task import random_scene
    import numpy as np

    path = Path(tempfile.gettempdir()) / "convllava-bench-scene.png"
    random_scene(np.random.default_rng(0)).render().save(path)
    return path
