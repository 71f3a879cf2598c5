"""The vLLM backend beside llama.cpp on the same bundle: one request's time to first token and decode tokens/s
(new images, the two backends in turns, medians), then requests/s and p50/p99 latency at 1, 4 and 8 concurrent
clients through `serve` (llama.cpp: --parallel 1, its best on few cores; vLLM: --parallel 4, batched there).

    python benchmarks/vllm_bench.py [--work DIR] [--dtype bfloat16] [--runs 5] [--seconds 40] [--clients 1 4 8]

The bundle is e2e_bench's full-size 768 px ConvLLaVA (ConvNeXt-L + stage 5, a 1.1B Llama, random weights) with
int8 vision, a Q4_K_M GGUF and llm-hf/ (exported once into --work). vLLM runs from .venv-vllm (`make vllm-env`)
on a free loopback port, its KV cache at 2 GiB, and is stopped by its PID. Writes benchmarks/results/vllm.json
and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import e2e_bench  # noqa: E402
import serve_bench  # noqa: E402

from convllava_edge.backends.base import SamplingOptions  # noqa: E402
from convllava_edge.export.bundle import ExportOptions, export_bundle  # noqa: E402
from convllava_edge.model import AskOptions, Model  # noqa: E402
from convllava_edge.machine import cpu_info  # noqa: E402

QUESTION = serve_bench.QUESTION


def make_bundle(work: Path) -> Path:
    bundle = work / "bundle-hf"
    if not (bundle / "manifest.json").exists():
        ckpt = e2e_bench.make_checkpoint(work)
        t = time.perf_counter()
        export_bundle(ckpt, bundle, ExportOptions(vision_types=("int8",), llm_type="Q4_K_M", hf=True))
        print(f"exported int8 + Q4_K_M + hf in {time.perf_counter() - t:.0f} s", flush=True)
    return bundle


def start_vllm(bundle: Path, dtype: str, log: Path) -> tuple[subprocess.Popen, str]:
    python = Path(os.environ.get("CONVLLAVA_EDGE_VLLM_PYTHON", HERE.parent / ".venv-vllm" / "bin" / "python"))
    port = serve_bench.free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(bundle / "llm-hf"),
                             "--served-model-name", bundle.name, "--enable-prompt-embeds", "--dtype", dtype,
                             "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    serve_bench.wait_healthy(proc, url, 900, "vLLM", log.read_text, lambda: os.killpg(proc.pid, signal.SIGKILL), 2)
    return proc, url


def one_request(bundle: Path, url: str, images: serve_bench.Images, runs: int, max_tokens: int) -> dict:
    """TTFT and decode tok/s of the same kind of request on each backend, taken in turns (new images each)."""
    options = AskOptions(max_tokens=max_tokens, sampling=SamplingOptions(temperature=0.0))
    models = {"llama.cpp": Model(bundle, device="cpu"),
              "vllm": Model(bundle, device="cpu", llm_backend="vllm", llm_url=url)}
    figures: dict[str, list] = {name: [] for name in models}
    for i in range(runs + 1):
        for name, model in models.items():
            answer = model.ask(images.next(), QUESTION, options)
            if i:  # the first round warms both up
                figures[name].append(answer.timings)
    for model in models.values():
        model.close()
    return {name: {key: statistics.median(t[key] for t in rows)
                   for key in ("time_to_first_token_ms", "prefill_ms", "encode_ms", "decode_tokens_per_s")}
            for name, rows in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vllm-bench")
    parser.add_argument("--dtype", default="bfloat16", help="vLLM's --dtype (bfloat16: the checkpoint's)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "vllm.json")
    args = parser.parse_args()
    cache = tempfile.TemporaryDirectory(prefix="vllm-bench-cache-")
    os.environ["CONVLLAVA_EDGE_CACHE"] = cache.name  # new images never hit an earlier run's cache
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(args.work)
    images = serve_bench.Images(distinct=True)
    vllm, url = start_vllm(bundle, args.dtype, args.work / "vllm.log")
    try:
        single = one_request(bundle, url, images, args.runs, args.max_tokens)
        print(single, flush=True)
        rows = []
        for name, parallel, extra in (("llama.cpp", 1, ()), ("vllm", 4, ("--llm-backend", "vllm", "--llm-url", url))):
            proc, served = serve_bench.start_server(str(bundle), parallel, None, None, extra)
            try:
                with httpx.Client(timeout=600) as client:  # warm-up
                    serve_bench.one_request(client, served, serve_bench.request_body(images.next(), args.max_tokens))
                for clients in args.clients:
                    rows.append({"backend": name, "parallel": parallel,
                                 **serve_bench.load(served, images, args.max_tokens, clients, args.seconds)})
                    print(rows[-1], flush=True)
            finally:
                serve_bench.stop(proc)
    finally:
        os.killpg(vllm.pid, signal.SIGTERM)
        vllm.wait(60)
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_info()["model"], "cores": len(os.sched_getaffinity(0)),
              "bundle": "e2e_bench's 768 px ConvLLaVA, int8 vision, Q4_K_M GGUF + llm-hf (bf16)",
              "vllm_dtype": args.dtype, "max_tokens": args.max_tokens, "single": single, "serve": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['cpu']}, {result['cores']} cores; vLLM dtype {args.dtype}; {args.max_tokens} tokens max\n")
    print("| backend | TTFT ms | prefill ms | decode tok/s |\n|---|---|---|---|")
    for name, f in single.items():
        print(f"| {name} | {f['time_to_first_token_ms']:.0f} | {f['prefill_ms']:.0f} | {f['decode_tokens_per_s']:.1f} |")
    print("\n| backend | --parallel | clients | requests | req/s | TTFT p50 ms | latency p50 ms | latency p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['parallel']} | {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['latency_p50_ms']:.0f} | {r['latency_p99_ms']:.0f} |")


if __name__ == "__main__":
    main()
