"""What constraining an answer costs: decode speed with a schema against without, the first-token cost of
compiling one, and what it does to the demo model's accuracy.

- S1, decode tokens/s (the ~1.1B Llama of e2e_bench.py, Q4_K_M, random weights): the same prompt, greedy,
  unconstrained; any JSON object; a schema whose one string field is long (so the answer runs to max_tokens).
  Interleaved rounds, medians; the CPU named.
- S2, compiling: a schema turned into a grammar (llama-cpp-python's converter) and compiled by llama.cpp, the
  first time and once cached (structured.py caches the grammar text, the backend the compiled sampler).
- S3, the demo model (shipped) on the evaluation generator (shapes_task.samples, balanced forms): free-text
  accuracy beside the same questions answered into a schema per form (``{"count": integer}``, ``{"color":
  enum}``...): the parsed value, as text, judged by the task's rule.

    python benchmarks/structured_bench.py [--work DIR] [--runs 3] [--tokens 64] [--questions 200]

Writes benchmarks/results/structured.json and prints Markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SCHEMA_LONG = {"type": "object", "properties": {"caption": {"type": "string", "maxLength": 400}},
               "required": ["caption"]}
FORM_SCHEMAS = {
    "count": {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"]},
    "color": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue", "yellow"]}},
              "required": ["color"]},
    "shape": {"type": "object", "properties": {"shape": {"enum": ["circle", "square", "triangle"]}},
              "required": ["shape"]},
    "exists": {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]},
    "side": {"type": "object", "properties": {"side": {"enum": ["left", "right"]}}, "required": ["side"]},
}


def cpu_name() -> str:
    """The CPU model and the flags that decide the kernels (AVX-512, VNNI, BF16, AMX)."""
    from convllava_edge.machine import cpu_info

    info = cpu_info()
    wanted = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx2")
    return f"{info['model']} ({' '.join(f for f in wanted if f in info['flags']) or 'no AVX-512'})"


def decode_speed(gguf: Path, runs: int, tokens: int, threads: int | None) -> list[dict]:
    from convllava_edge.backends.base import SamplingOptions
    from convllava_edge.backends.llm_llamacpp import LlamaCppBackend
    from convllava_edge.structured import from_schema, json_object

    llm = LlamaCppBackend(gguf, n_ctx=512, threads=threads)
    prompt = llm.tokenize("USER: Describe the picture in detail. ASSISTANT:", add_bos=True)
    kinds = {"unconstrained": None, "json_object": json_object(), "schema (one long string)": from_schema(SCHEMA_LONG)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    counts: dict[str, list[int]] = {k: [] for k in kinds}
    greedy = SamplingOptions(temperature=0.0)
    for kind, constraint in kinds.items():  # warm: the grammar compiled, caches filled
        llm.truncate(0)
        llm.eval_tokens(prompt)
        list(llm.generate(greedy, 4, constraint=constraint))
    for _ in range(runs):
        for kind, constraint in kinds.items():
            llm.truncate(0)
            llm.eval_tokens(prompt)
            t = time.perf_counter()
            n = sum(1 for _ in llm.generate(greedy, tokens, constraint=constraint))
            times[kind].append(time.perf_counter() - t)
            counts[kind].append(n)
    llm.close()
    base = statistics.median(c / t for c, t in zip(counts["unconstrained"], times["unconstrained"]))
    rows = []
    for kind in kinds:
        rate = statistics.median(c / t for c, t in zip(counts[kind], times[kind]))
        rows.append({"group": "S1", "kind": kind, "tokens": statistics.median(counts[kind]), "tokens_per_s": rate,
                     "vs_unconstrained": rate / base})
    return rows


def compile_cost(gguf: Path) -> list[dict]:
    from convllava_edge.backends.llm_llamacpp import LlamaCppBackend
    from convllava_edge.structured import _grammar_of, from_schema

    llm = LlamaCppBackend(gguf, n_ctx=256, threads=1)
    schema = {"type": "object", "properties": {
        "count": {"type": "integer"}, "shapes": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"kind": {"enum": ["circle", "square", "triangle"]},
                                             "color": {"type": "string", "maxLength": 12}},
            "required": ["kind", "color"]}}}, "required": ["count", "shapes"]}
    _grammar_of.cache_clear()
    t = time.perf_counter()
    made = from_schema(schema)
    convert = time.perf_counter() - t
    t = time.perf_counter()
    llm.grammar(made).free()
    first = time.perf_counter() - t
    t = time.perf_counter()
    made = from_schema(schema)
    llm.grammar(made).free()
    cached = time.perf_counter() - t
    llm.close()
    return [{"group": "S2", "convert_ms": convert * 1e3, "compile_ms": first * 1e3, "cached_ms": cached * 1e3,
             "grammar_bytes": len(made.grammar)}]


def demo_accuracy(n: int) -> list[dict]:
    from convllava_edge.backends.base import SamplingOptions
    from convllava_edge.model import AskOptions, load
    from convllava_edge.shapes_task import FORMS, is_correct, samples

    model = load(cache=False)
    options = AskOptions(max_tokens=24, sampling=SamplingOptions(temperature=0.0))
    right = {f: [0, 0, 0] for f in FORMS}  # free text, schema, schema answers that were complete
    asked = {f: 0 for f in FORMS}
    for scene, q in samples(seed=36, n=n):
        image = scene.render()
        asked[q.form] += 1
        right[q.form][0] += is_correct(model.ask(image, q.text, options).text, q.answer)
        a = model.ask(image, q.text, options, schema=FORM_SCHEMAS[q.form])
        value = next(iter(a.parsed.values())) if isinstance(a.parsed, dict) and a.parsed else None
        right[q.form][2] += value is not None
        right[q.form][1] += value is not None and is_correct(str(value), q.answer)
    model.close()
    return [{"group": "S3", "form": f, "questions": asked[f], "free_text": right[f][0] / asked[f],
             "schema": right[f][1] / asked[f], "schema_complete": right[f][2] / asked[f]} for f in FORMS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/structured-bench"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "structured.json")
    args = parser.parse_args()
    from e2e_bench import make_bundle

    bundle = make_bundle(args.work, args.threads)
    gguf = next(bundle.glob("llm-*.gguf"))
    rows = decode_speed(gguf, args.runs, args.tokens, args.threads) + compile_cost(gguf) + demo_accuracy(args.questions)
    cpu = cpu_name()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))
    print(f"\n{cpu}; medians of {args.runs}\n")
    print("| answer | tokens | decode tokens/s | vs unconstrained |\n|---|---|---|---|")
    for r in (r for r in rows if r["group"] == "S1"):
        print(f"| {r['kind']} | {r['tokens']:.0f} | {r['tokens_per_s']:.1f} | {r['vs_unconstrained']:.2f}x |")
    (c,) = [r for r in rows if r["group"] == "S2"]
    print(f"\nschema -> grammar {c['convert_ms']:.1f} ms, llama.cpp compile {c['compile_ms']:.1f} ms, "
          f"cached {c['cached_ms']:.2f} ms ({c['grammar_bytes']} bytes of GBNF)\n")
    print("| form | questions | free text | into a schema | schema answers complete |\n|---|---|---|---|---|")
    for r in (r for r in rows if r["group"] == "S3"):
        print(f"| {r['form']} | {r['questions']} | {r['free_text']:.1%} | {r['schema']:.1%} | {r['schema_complete']:.1%} |")


if __name__ == "__main__":
    main()
