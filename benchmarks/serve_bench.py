"""`convllava-edge serve` under load: requests/s, p50/p99 time to first token and total latency at 1, 2, 4 and
8 concurrent clients, with --parallel 1 and 2, and the server's overhead against `Model.ask` in-process.

Each client sends a streamed request (an image as a data: URL, a question, greedy, --max-tokens) in a loop for
--seconds; time to first token is the first content chunk's arrival. By default every request sends the same
image (after the warm-up its embeddings and KV state are cached: the server's own cost shows); --distinct-images
makes each request's image new (examples/shapes-1.png with one pixel set from a counter), so every request
encodes and prefills, as when many users send their own photos. The run's caches live in a temporary folder.
The server runs as a child process on a free loopback port, stopped by its PID. --threads-batch 1 2 ... repeats
each --parallel setting above 1 with the encoding's and prefill's threads at that count (the server's default:
every core). The overhead: the same kind of request's end-to-end time in process (`Model.ask`, caches as the
server has them) and through the first server, one client, taken in turns.

    python benchmarks/serve_bench.py [--model BUNDLE] [--seconds 20] [--clients 1 2 4 8] [--parallel 1 2]
        [--distinct-images] [--threads-batch N ...] [--overhead-runs 5]

Writes benchmarks/results/serve.json, a PNG of latency against concurrency beside it, and a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "shapes-1.png"
QUESTION = "How many shapes are there?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Images:
    """The request's image, PNG bytes: the example, or with --distinct-images a new one each call."""

    def __init__(self, distinct: bool):
        self.distinct, self.count, self.lock = distinct, 0, threading.Lock()
        self.base = Image.open(EXAMPLE).convert("RGB")

    def next(self) -> bytes:
        if not self.distinct:
            return EXAMPLE.read_bytes()
        with self.lock:
            self.count += 1
            n = self.count
        image = self.base.copy()
        image.putpixel((0, 0), (n % 256, (n // 256) % 256, (n // 65536) % 256))
        out = io.BytesIO()
        image.save(out, "PNG")
        return out.getvalue()


def request_body(image: bytes, max_tokens: int, stream: bool = True) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": QUESTION}]}],
            "temperature": 0, "max_tokens": max_tokens, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}


def start_server(model: str | None, parallel: int, threads: int | None, threads_batch: int | None,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """``serve`` on a free loopback port, healthy; ``extra``: more of its options (--llm-backend vllm ...)."""
    port = free_port()
    cmd = [sys.executable, "-m", "convllava_edge.cli.main", "serve", "--port", str(port), "--parallel", str(parallel),
           "--queue", "64"] + (["--model", model] if model else []) + (["--threads", str(threads)] if threads else []) \
        + (["--threads-batch", str(threads_batch)] if threads_batch else []) + list(extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, 600, "the server", lambda: proc.stderr.read().decode(), proc.kill)
    return proc, url


def wait_healthy(proc: subprocess.Popen, url: str, seconds: float, what: str, output, stop, interval: float = 0.5) -> None:
    """Until ``url``/health answers 200 (the benchmarks' servers: serve, serve --ray, vLLM); SystemExit with the
    tail of ``output()`` if the process exits first, or after ``stop()`` if the time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited: {output()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)
    stop()
    raise SystemExit(f"{what} did not become healthy in {seconds:g} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_request(client: httpx.Client, url: str, body: dict) -> tuple[float, float]:
    """(time to first token, total) of one streamed request, in seconds. The first token is the first content
    chunk's arrival; when the answer shows no text before the end (the benchmark bundles' random LLM generates
    tokens whose text is empty), it is the total less the server's own decoding time (the usage chunk's tokens
    over its decode tokens/s), not the total."""
    t0 = time.perf_counter()
    first = None
    final = {}
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter() - t0
            elif line.startswith("data: {") and '"usage": {' in line:
                final = json.loads(line[len("data: "):])
    total = time.perf_counter() - t0
    if first is None:
        tokens, speed = final.get("usage", {}).get("completion_tokens", 0), final.get("timings", {}).get(
            "decode_tokens_per_s", 0)
        first = total - (max(tokens - 1, 0) / speed if speed else 0.0)
    return first, total


def load(url: str, images: Images, max_tokens: int, clients: int, seconds: float) -> dict:
    results: list[tuple[float, float]] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client_loop():
        with httpx.Client(timeout=600) as client:
            while time.monotonic() < end:
                r = one_request(client, url, request_body(images.next(), max_tokens))
                with lock:
                    results.append(r)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttft, total = sorted(r[0] for r in results), sorted(r[1] for r in results)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))]
    return {"clients": clients, "requests": len(results), "req_per_s": len(results) / wall,
            "ttft_p50_ms": pct(ttft, 0.5) * 1e3, "ttft_p99_ms": pct(ttft, 0.99) * 1e3,
            "latency_p50_ms": pct(total, 0.5) * 1e3, "latency_p99_ms": pct(total, 0.99) * 1e3}


def overhead(url: str, model: str | None, images: Images, max_tokens: int, runs: int) -> tuple[float, float]:
    """Median end-to-end seconds of the same kind of request (a new image each with --distinct-images) in
    process (Model.ask, caches as the server has them) and through the running server, taken in turns so that
    the machine's drift falls on both alike."""
    import convllava_edge
    from convllava_edge.backends.base import SamplingOptions
    from convllava_edge.model import AskOptions

    m = convllava_edge.load(model)
    options = AskOptions(max_tokens=max_tokens, sampling=SamplingOptions(temperature=0.0))
    local, served = [], []
    with httpx.Client(timeout=600) as client:
        for i in range(runs + 1):
            image = images.next()
            t = time.perf_counter()
            m.ask(image, QUESTION, options)
            elapsed = time.perf_counter() - t
            _, total = one_request(client, url, request_body(images.next(), max_tokens))
            if i:  # the first pair warms both up
                local.append(elapsed)
                served.append(total)
    m.close()
    return statistics.median(local), statistics.median(served)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a bundle (default: the demo model)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="decoding threads per slot (default: the server's)")
    parser.add_argument("--threads-batch", type=int, nargs="+", default=[None],
                        help="encoding and prefill threads, one row set per value (default: the server's, every core)")
    parser.add_argument("--overhead-runs", type=int, default=5, help="in-process / server pairs for the overhead")
    parser.add_argument("--distinct-images", action="store_true", help="a new image every request (no cache hits)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve.json")
    args = parser.parse_args()
    # a cache folder of this run's own, for the server and the in-process model alike: nothing an earlier run
    # left turns a new image into a hit, and the user's cache is not filled with test images
    cache = tempfile.TemporaryDirectory(prefix="serve-bench-cache-")
    os.environ["CONVLLAVA_EDGE_CACHE"] = cache.name
    from convllava_edge.machine import cpu_info

    images = Images(args.distinct_images)
    rows, pair = [], None
    for parallel in args.parallel:
        for threads_batch in args.threads_batch if parallel > 1 else [None]:  # one slot: every core does it all
            proc, url = start_server(args.model, parallel, args.threads, threads_batch)
            try:
                with httpx.Client(timeout=600) as c:
                    one_request(c, url, request_body(images.next(), args.max_tokens))  # warm-up
                    batch = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["threads"]
                for clients in args.clients:
                    rows.append({"parallel": parallel, "threads": batch, **load(url, images, args.max_tokens, clients,
                                                                                args.seconds)})
                    print(rows[-1], flush=True)
                if pair is None:  # the first server: the in-process comparison, while it is up
                    pair = overhead(url, args.model, images, args.max_tokens, args.overhead_runs)
            finally:
                stop(proc)
    inproc, through = pair
    cost = through / inproc - 1
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_info()["model"], "cores": len(os.sched_getaffinity(0)),
              "model": args.model or "demo", "max_tokens": args.max_tokens, "distinct_images": args.distinct_images,
              "rows": rows,
              "in_process_ms": inproc * 1e3, "through_server_ms": through * 1e3, "overhead_runs": args.overhead_runs,
              "server_overhead": cost}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"\n{result['cpu']}, {result['cores']} cores; {result['model']}; {args.max_tokens} tokens max; "
          f"{'a new image every request' if args.distinct_images else 'the same image every request'}; "
          f"in-process Model.ask {inproc * 1e3:.0f} ms, through the server {through * 1e3:.0f} ms "
          f"({cost:+.1%}; medians of {args.overhead_runs}, taken in turns)")
    print("\n| --parallel | threads (decode/slot, batch) | clients | requests | req/s | TTFT p50 ms | TTFT p99 ms "
          "| latency p50 ms | latency p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['parallel']} | {r['threads']['decode_per_slot']}, {r['threads']['batch']} | {r['clients']} | "
              f"{r['requests']} | {r['req_per_s']:.2f} | {r['ttft_p50_ms']:.0f} | "
              f"{r['ttft_p99_ms']:.0f} | {r['latency_p50_ms']:.0f} | {r['latency_p99_ms']:.0f} |")


def plot(result: dict, path: Path) -> None:
    """Latency against concurrent clients, p50 and p99, a line per (--parallel, encode/prefill threads)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (the report extra): no plot")
        return
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((r["parallel"], r["threads"]["batch"]) for r in rows):
        pts = [r for r in rows if (r["parallel"], r["threads"]["batch"]) == key]
        label = f"--parallel {key[0]}, encode/prefill threads {key[1]}"
        ax.plot([r["clients"] for r in pts], [r["latency_p50_ms"] / 1e3 for r in pts], marker="o", label=f"p50, {label}")
        ax.plot([r["clients"] for r in pts], [r["latency_p99_ms"] / 1e3 for r in pts], marker="x", linestyle="--",
                label=f"p99, {label}")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("request latency (s)")
    images = "a new image per request" if result.get("distinct_images") else "the same image"
    ax.set_title(f"serve: {Path(result['model']).name}, {images}\n{result['cpu']}, {result['cores']} cores",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
