"""Several images in one conversation: what a two-image question costs against two one-image questions.

- M1, time to first token (wall, in process, the KV cache and the embeddings forgotten before each: every figure
  cold but for the page cache): one question about two images (``model.ask([a, b], q)``) against the sum of two
  questions about one image each (``ask(a, q)`` + ``ask(b, q)``).
- M2, a follow-up that adds the second image (``chat.ask(q2, image=b)`` after an answer about a): its time to first
  token beside a fresh two-image question, and the prompt positions it took from the KV cache (``cached_tokens``).
Interleaved rounds, medians; the CPU named.

    python benchmarks/multi_image_bench.py [--bundle BUNDLE] [--runs 3] [--vision-type int8]

BUNDLE defaults to the demo model shipped with the package. Writes benchmarks/results/multi_image.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

QUESTION = "How many shapes are there?"


def pictures(size: int) -> list[bytes]:
    from convllava_edge.shapes_task import random_scene
    import numpy as np

    out = []
    for seed in (3, 4):
        buf = io.BytesIO()
        random_scene(np.random.default_rng(seed)).render().resize((size, size)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vision-type", default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "multi_image.json")
    args = parser.parse_args()

    import convllava_edge
    from convllava_edge.backends.base import SamplingOptions
    from convllava_edge.model import AskOptions
    from structured_bench import cpu_name

    model = convllava_edge.load(args.bundle, cache=False, vision_type=args.vision_type)
    size = model.manifest.preprocess.crop_size[0]
    a, b = pictures(size)
    first = AskOptions(max_tokens=1, sampling=SamplingOptions(temperature=0.0))
    answer = AskOptions(max_tokens=8, sampling=SamplingOptions(temperature=0.0))

    def ttft(run) -> tuple[float, object]:
        model.reset()  # no KV state, no embeddings in memory
        result = run()
        return result.timings["time_to_first_token_ms"], result

    model.ask(a, QUESTION, first)  # warm: graphs and weights loaded, the first run's allocations done
    rows: dict[str, list[float]] = {"two_images": [], "one_plus_one": [], "follow_up": [], "follow_up_cached": []}
    for _ in range(args.runs):
        rows["two_images"].append(ttft(lambda: model.ask([a, b], QUESTION, first))[0])
        one = ttft(lambda: model.ask(a, QUESTION, first))[0]
        rows["one_plus_one"].append(one + ttft(lambda: model.ask(b, QUESTION, first))[0])
        model.reset()
        chat = model.chat(a, answer)
        chat.ask(QUESTION)
        follow = chat.ask("And in this one?", first, image=b)
        rows["follow_up"].append(follow.timings["time_to_first_token_ms"])
        rows["follow_up_cached"].append(follow.cached_tokens)
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {"cpu": cpu_name(), "bundle": str(args.bundle or "demo"), "vision": model.vision_entry.variant,
              "backend": model.vision_backend, "image_tokens": model.embed(a).slot.n_tokens, "runs": args.runs,
              "rows": rows, "median": med}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{result['cpu']}; {result['bundle']} ({result['vision']} on {result['backend']}, "
          f"{result['image_tokens']} tokens per image), medians of {args.runs}\n")
    print("| question | time to first token |")
    print("|---|---|")
    print(f"| one question, two images | {med['two_images']:,.0f} ms |")
    print(f"| two questions, one image each (sum) | {med['one_plus_one']:,.0f} ms |")
    print(f"| a follow-up adding the second image | {med['follow_up']:,.0f} ms "
          f"({med['follow_up_cached']:.0f} positions from the KV cache) |")


if __name__ == "__main__":
    main()
