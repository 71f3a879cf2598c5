"""`batch` over --images demo scenes (the shapes task's generator, one question each): images/s for the plain
loop and for `--ray` with 1 and 2 actors, each as the CLI runs it (a fresh process: load, cluster start, all
answers), with Ray's fixed cost (the whole run's time less the answers' at the steady rate); then `serve --ray`
(1 replica) against plain `serve` on the same requests, one client, taken in turns: latency medians.

    python benchmarks/ray_bench.py [--images 200] [--requests 20] [--out benchmarks/results/ray.json]

Every run has its own empty embedding cache (new images each time). Writes JSON and prints Markdown tables.
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
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serve_bench  # noqa: E402

from convllava_edge.machine import cpu_info  # noqa: E402
from convllava_edge.shapes_task import random_scene  # noqa: E402

QUESTION = "How many shapes are there?"
CLI = [sys.executable, "-m", "convllava_edge.cli.main"]


def make_images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    for i in range(n):
        random_scene(rng).render().save(folder / f"scene-{i:04d}.png")
    return folder


def batch_run(images: Path, work: Path, extra: list[str]) -> dict:
    """One `batch` process; the time of each answer line as it lands, from the process's start."""
    out = work / f"answers-{len(list(work.glob('answers-*')))}.jsonl"
    env = {**os.environ, "CONVLLAVA_EDGE_CACHE": tempfile.mkdtemp(prefix="ray-bench-cache-"), "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(CLI + ["batch", str(images), "--question", QUESTION, "--out", str(out), "--temperature", "0",
                                   "--max-tokens", "8", *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    stamps, seen = [], 0
    while proc.poll() is None:
        n = out.read_text().count("\n") if out.exists() else 0
        stamps += [time.perf_counter() - t0] * (n - seen)
        seen = n
        time.sleep(0.05)
    total = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"batch {extra} failed: {proc.stderr.read().decode()[-2000:]}")
    n = out.read_text().count("\n")
    stamps += [total] * (n - seen)
    half = stamps[len(stamps) // 2:]  # the steady rate: the second half of the answers
    steady = (len(half) - 1) / (half[-1] - half[0]) if len(half) > 1 and half[-1] > half[0] else float("nan")
    return {"mode": " ".join(extra) or "local loop", "images": n, "total_s": round(total, 2),
            "images_per_s": round(n / total, 3), "steady_images_per_s": round(steady, 3),
            "first_answer_s": round(stamps[0], 2), "fixed_s": round(total - n / steady, 2)}


def serve_latency(requests: int) -> dict:
    """Plain `serve` and `serve --ray` on the demo, the same request (one image, cached after the first) in turns."""
    image = serve_bench.EXAMPLE.read_bytes()
    body = serve_bench.request_body(image, 8, stream=False)
    servers = {}
    plain, plain_url = serve_bench.start_server(None, 1, None, None)
    servers["serve"] = (plain, plain_url)
    port = serve_bench.free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    ray_proc = subprocess.Popen(CLI + ["serve", "--ray", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    serve_bench.wait_healthy(ray_proc, url, 600, "serve --ray", lambda: ray_proc.stderr.read().decode(),
                             lambda: os.killpg(ray_proc.pid, signal.SIGKILL), 0.2)
    ray_start = time.perf_counter() - t0
    servers["serve --ray"] = (ray_proc, url)
    times: dict[str, list[float]] = {name: [] for name in servers}
    try:
        with httpx.Client(timeout=120) as client:
            for i in range(requests + 1):
                for name, (_, u) in servers.items():
                    t = time.perf_counter()
                    client.post(u + "/v1/chat/completions", json=body).raise_for_status()
                    if i:
                        times[name].append((time.perf_counter() - t) * 1e3)
    finally:
        serve_bench.stop(plain)
        os.killpg(ray_proc.pid, signal.SIGTERM)
        ray_proc.wait(120)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"requests": requests, "ray_ready_s": round(ray_start, 1),
            "median_ms": {k: round(v, 1) for k, v in med.items()},
            "p90_ms": {k: round(statistics.quantiles(v, n=10)[-1], 1) for k, v in times.items()},
            "ray_overhead_ms": round(med["serve --ray"] - med["serve"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ray.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    images = make_images(work / "images", args.images)
    runs = [batch_run(images, work, extra) for extra in ([], ["--ray", "--workers", "1"], ["--ray", "--workers", "2"])]
    for r in runs:
        print(r, flush=True)
    serve = serve_latency(args.requests)
    print(serve, flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_info()["model"], "cores": len(os.sched_getaffinity(0)),
              "model": "the demo (shapes-demo)", "batch": runs, "serve": serve}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['cpu']}, {result['cores']} cores; {args.images} images, one question each\n")
    print("| batch | images/s (whole run) | steady images/s | first answer s | fixed cost s |\n|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['mode']} | {r['images_per_s']:.2f} | {r['steady_images_per_s']:.2f} | {r['first_answer_s']:.1f} | "
              f"{r['fixed_s']:.1f} |")
    print("\n| server | median ms | p90 ms |\n|---|---|---|")
    for name in serve["median_ms"]:
        print(f"| {name} | {serve['median_ms'][name]:.1f} | {serve['p90_ms'][name]:.1f} |")
    print(f"\nserve --ray ready in {serve['ray_ready_s']} s; Ray Serve's added latency {serve['ray_overhead_ms']} ms")


if __name__ == "__main__":
    main()
