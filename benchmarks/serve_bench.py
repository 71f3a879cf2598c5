"""`convllava-edge serve` under load: requests/s, p50/p99 time to first token and total latency at 1, 2, 4 and
8 concurrent clients, with --parallel 1 and 2, and the server's overhead against `Model.ask` in-process.

Each client sends the same streamed request (an image as a data: URL, a question, greedy, --max-tokens) in a
loop for --seconds; time to first token is the first content chunk's arrival. The server runs as a child
process on a free loopback port, stopped by its PID. The overhead row: the same request's end-to-end time in
process (`Model.ask`, the embedding cache on, as the server has it) against one client's through the server.

    python benchmarks/serve_bench.py [--model BUNDLE] [--seconds 20] [--clients 1 2 4 8] [--parallel 1 2]

Writes benchmarks/results/serve.json, a PNG of latency against concurrency beside it, and a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "shapes-1.png"
QUESTION = "How many shapes are there?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, parallel: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "convllava_edge.cli.main", "serve", "--port", str(port), "--parallel", str(parallel),
           "--queue", "64"] + (["--model", model] if model else []) + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become healthy")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_request(client: httpx.Client, url: str, body: dict) -> tuple[float, float]:
    """(time to first content chunk, total) of one streamed request, in seconds."""
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return (first if first is not None else total), total


def load(url: str, body: dict, clients: int, seconds: float) -> dict:
    results: list[tuple[float, float]] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client_loop():
        with httpx.Client(timeout=600) as client:
            while time.monotonic() < end:
                r = one_request(client, url, body)
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


def in_process(model: str | None, body: dict, runs: int) -> float:
    """Median end-to-end seconds of the same request through Model.ask (the cache on, as the server has it)."""
    import convllava_edge
    from convllava_edge.backends.base import SamplingOptions
    from convllava_edge.model import AskOptions

    m = convllava_edge.load(model)
    options = AskOptions(max_tokens=body["max_tokens"], sampling=SamplingOptions(temperature=0.0))
    image = EXAMPLE.read_bytes()
    times = []
    for i in range(runs + 1):
        t = time.perf_counter()
        m.ask(image, QUESTION, options)
        if i:
            times.append(time.perf_counter() - t)
    m.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a bundle (default: the demo model)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="per slot (default: the server's)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve.json")
    args = parser.parse_args()
    from convllava_edge.native import cpu_info

    url_data = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url_data}},
                                                      {"type": "text", "text": QUESTION}]}],
            "temperature": 0, "max_tokens": args.max_tokens, "stream": True}
    rows = []
    for parallel in args.parallel:
        proc, url = start_server(args.model, parallel, args.threads)
        try:
            with httpx.Client(timeout=600) as c:
                one_request(c, url, body)  # warm-up: the image's embeddings and KV state cached
            for clients in args.clients:
                rows.append({"parallel": parallel, **load(url, body, clients, args.seconds)})
                print(rows[-1], flush=True)
        finally:
            stop(proc)
    inproc = in_process(args.model, {**body, "stream": False}, 5)
    single = next(r for r in rows if r["clients"] == 1 and r["parallel"] == args.parallel[0])
    overhead = single["latency_p50_ms"] / 1e3 / inproc - 1
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_info()["model"], "cores": len(os.sched_getaffinity(0)),
              "model": args.model or "demo", "max_tokens": args.max_tokens, "rows": rows,
              "in_process_ms": inproc * 1e3, "server_overhead": overhead}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for parallel in args.parallel:
            pts = [r for r in rows if r["parallel"] == parallel]
            ax.plot([r["clients"] for r in pts], [r["latency_p50_ms"] for r in pts], marker="o", label=f"p50, --parallel {parallel}")
            ax.plot([r["clients"] for r in pts], [r["latency_p99_ms"] for r in pts], marker="x", linestyle="--",
                    label=f"p99, --parallel {parallel}")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("request latency (ms)")
        ax.set_title(f"serve: {result['model']} on {result['cpu']}, {result['cores']} cores")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=120)
    except ImportError:
        print("matplotlib missing (the report extra): no plot")
    print(f"\n{result['cpu']}, {result['cores']} cores; {result['model']}; {args.max_tokens} tokens max; "
          f"in-process Model.ask {inproc * 1e3:.0f} ms, through the server {single['latency_p50_ms']:.0f} ms "
          f"({overhead:+.1%})")
    print("\n| --parallel | clients | requests | req/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['parallel']} | {r['clients']} | {r['requests']} | {r['req_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
              f"{r['ttft_p99_ms']:.0f} | {r['latency_p50_ms']:.0f} | {r['latency_p99_ms']:.0f} |")


if __name__ == "__main__":
    main()
