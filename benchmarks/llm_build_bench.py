"""llama.cpp builds and settings side by side on the ~1B benchmark Llama, against transformers fp32 and bf16.

Each llama.cpp library (a folder holding libllama.so and libggml*.so, from `pip wheel` with some
CMAKE_ARGS, unpacked) runs in a child process of its own through llama-cpp-python's
``LLAMA_CPP_LIB_PATH`` override, for each quant type and with llama.cpp's extra buffer types (AMX,
repacked weights) on and off; a child killed by a signal is reported as such ("SIGILL": the build's
AMX path traps on this CPU), not hidden. Decode is set against the memory-bandwidth bound (see
llm_bench.py), prompt processing against transformers in its fastest dtype.

    python benchmarks/llm_build_bench.py --lib portable=DIR --lib native-noamx=DIR [--lib installed]
        [--quants Q4_K_M,Q4_0] [--threads 2] [--prompt 128] [--decode 32] [--runs 3] [--work DIR]

Builds used for benchmarks/results/llm_builds.json (each `pip wheel --no-cache-dir --no-deps
llama-cpp-python==0.3.36` with CMAKE_ARGS as named, then `unzip` to get llama_cpp/lib):
  portable      -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF  (the Makefile's until now)
  native        (no CMAKE_ARGS: pip's default, -march=native, AMX kernels included)
  native-noamx  -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def child(path: str, load: dict, prompt: list[int], n_decode: int, threads: int, runs: int) -> dict:
    """Runs in the child: one library (chosen by the parent's LLAMA_CPP_LIB_PATH), one file, one setting."""
    import llama_cpp

    from llama_timing import llama_cpp_speed

    speed = llama_cpp_speed(Path(path), prompt, n_decode, threads, runs, trial=False, **load)
    return {**speed, "system_info": llama_cpp.llama_print_system_info().decode().strip()}


def run_child(lib_dir: str | None, path: Path, load: dict, args, prompt: list[int], threads: int | None = None) -> dict:
    """``load``: LlamaCppBackend keyword arguments (extra_bufts, n_batch, n_ubatch, kv_type, flash_attn)."""
    env = dict(os.environ)
    if lib_dir:
        env["LLAMA_CPP_LIB_PATH"] = lib_dir
    payload = json.dumps({"path": str(path), "load": load, "prompt": [int(t) for t in prompt],
                          "n_decode": args.decode, "threads": threads or args.threads, "runs": args.runs})
    proc = subprocess.run([sys.executable, __file__, "--child", payload], capture_output=True, text=True, env=env,
                          timeout=1800)
    if proc.returncode < 0:
        import signal

        return {"error": signal.Signals(-proc.returncode).name}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The settings sweep: one factor at a time away from the backend's defaults (LlamaCppBackend), each in a
# child of its own. Label -> (LlamaCppBackend keyword arguments, threads or None for --threads).
DEFAULTS = {"extra_bufts": None, "n_batch": 512, "n_ubatch": 512, "kv_type": "f16", "flash_attn": "auto"}
SWEEP = {
    "defaults": ({}, None),
    "extra_bufts=on": ({"extra_bufts": True}, None),
    "extra_bufts=off": ({"extra_bufts": False}, None),
    "threads=1": ({}, 1),
    "n_batch=n_ubatch=256": ({"n_batch": 256, "n_ubatch": 256}, None),
    "n_batch=n_ubatch=128": ({"n_batch": 128, "n_ubatch": 128}, None),
    "n_batch=n_ubatch=64": ({"n_batch": 64, "n_ubatch": 64}, None),
    "n_batch=512 n_ubatch=128": ({"n_ubatch": 128}, None),
    "n_batch=512 n_ubatch=256": ({"n_ubatch": 256}, None),
    "kv=f32": ({"kv_type": "f32"}, None),
    "kv=q8_0": ({"kv_type": "q8_0"}, None),
    "flash_attn=on": ({"flash_attn": "on"}, None),
    "flash_attn=off": ({"flash_attn": "off"}, None),
}


def cpu_model() -> str:
    from convllava_edge.machine import cpu_info

    return cpu_info()["model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lib", action="append", default=[], help="NAME=DIR (a llama_cpp/lib folder), or 'installed'")
    parser.add_argument("--quants", default="Q4_K_M,Q4_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per child (after a warm-up)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of children, interleaved")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="every setting of SWEEP, not only extra buffer types on/off")
    parser.add_argument("--only", default=None, help="SWEEP labels separated by ';': a closer look at a few")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "llm_builds.json")
    args = parser.parse_args()
    if args.child:
        p = json.loads(args.child)
        print(json.dumps(child(p["path"], p["load"], p["prompt"], p["n_decode"], p["threads"], p["runs"])))
        return

    import torch

    sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]  # llm_bench; support: the synthetic checkpoints
    from llm_bench import SPEC, bytes_per_token, read_bandwidth, transformers_speed

    from convllava_edge.export.gguf_convert import convert_llm
    from convllava_edge.quantize.gguf_quant import quantize_gguf
    from convllava_edge.export.convllava import synthetic as S

    libs = [(spec.split("=", 1) if "=" in spec else (spec, None)) for spec in (args.lib or ["installed"])]
    work = args.work or Path(tempfile.mkdtemp(prefix="llm-builds-"))
    work.mkdir(parents=True, exist_ok=True)
    bandwidth = read_bandwidth(args.threads)
    print(f"{cpu_model()}; read bandwidth ({args.threads} threads) {bandwidth:.1f} GB/s", flush=True)
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 2000, args.prompt)]
    quants = args.quants.split(",")
    files = {q: work / f"{q}.gguf" for q in quants}
    rows = []
    state = S.random_llama_state(SPEC, seed=1) if not args.no_transformers or not all(f.is_file() for f in files.values()) else None

    def measure_transformers(when: str) -> None:
        for dtype in (torch.float32, torch.bfloat16):
            hf = transformers_speed(state, prompt, args.decode, args.threads, args.runs, dtype)
            rows.append({"engine": f"transformers {str(dtype).removeprefix('torch.')}", "measured": when, **hf})
            print(rows[-1], flush=True)

    if not args.no_transformers:
        measure_transformers("before")
    if not all(f.is_file() for f in files.values()):
        vision = S.random_vision_state(S.TINY_TOWER, "mlp2x_gelu", SPEC.hidden_size, seed=0)
        ckpt = S.write_convllava_checkpoint(work / "ckpt", SPEC, S.TINY_TOWER, vision_state=vision,
                                            llm_state=state, shards=4)
        S.write_llama_tokenizer(ckpt, 2000)
        f16 = convert_llm(ckpt, work / "f16.gguf", "F16").path
        for q, path in files.items():
            quantize_gguf(f16, path, q, args.threads)
    jobs = []  # (row, lib_dir, path, load, threads)
    for name, lib_dir in libs:
        for q, path in files.items():
            names = args.only.split(";") if args.only else list(SWEEP) if args.sweep else ["extra_bufts=on", "extra_bufts=off"]
            settings = {k: SWEEP[k] for k in names}
            for label, (change, threads) in settings.items():
                load = {**DEFAULTS, **change}
                row = {"engine": f"llama.cpp {name} {q} {label}", "build": name, "quant": q, "setting": label,
                       **load, "threads": threads or args.threads, "_path": path}
                jobs.append((row, lib_dir, path, load, threads))
    # Every setting once per round, rounds in alternating order, medians over rounds: a machine whose speed
    # drifts over the minutes a sweep takes (a VM's neighbours) shifts every setting alike.
    results: list[list[dict]] = [[] for _ in jobs]
    for rnd in range(args.repeat):
        order = range(len(jobs)) if rnd % 2 == 0 else reversed(range(len(jobs)))
        for i in order:
            row, lib_dir, path, load, threads = jobs[i]
            results[i].append(run_child(lib_dir, path, load, args, prompt, threads))
            print(f"round {rnd + 1}/{args.repeat}: {row['engine']}: "
                  f"{ {k: v for k, v in results[i][-1].items() if k != 'system_info'} }", flush=True)
    if args.repeat > 1:  # the reference and the bound again after the rounds; the better figure of each is used
        if not args.no_transformers:
            measure_transformers("after")
        bandwidth = max(bandwidth, read_bandwidth(args.threads))
    del state
    best_hf = {k: max((r[k] for r in rows), default=float("nan")) for k in ("prefill_tok_s", "decode_tok_s")}
    for (row, *_), runs in zip(jobs, results):
        row["bound_tok_s"] = bandwidth * 1e9 / bytes_per_token(row.pop("_path"))
        ok = [r for r in runs if "error" not in r]
        if not ok:
            row.update(runs[0])
        else:
            row.update(system_info=ok[0]["system_info"], settings=ok[0].get("settings"), rounds=len(ok),
                       **{k: statistics.median(r[k] for r in ok) for k in ("prefill_tok_s", "decode_tok_s")},
                       **{f"{k}_range": [min(r[k] for r in ok), max(r[k] for r in ok)] for k in ("prefill_tok_s", "decode_tok_s")})
            row.update(pct_of_bound=100 * row["decode_tok_s"] / row["bound_tok_s"],
                       decode_vs_best_transformers=row["decode_tok_s"] / best_hf["decode_tok_s"],
                       prefill_vs_best_transformers=row["prefill_tok_s"] / best_hf["prefill_tok_s"])
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "machine": platform.machine(),
                                    "threads": args.threads, "prompt_tokens": args.prompt,
                                    "decode_tokens": args.decode, "read_bandwidth_gb_s": bandwidth, "rows": rows},
                                   indent=2) + "\n")
    print(f"\n{cpu_model()}, {args.threads} threads, prompt {args.prompt}, {args.decode} decoded, "
          f"read bandwidth {bandwidth:.1f} GB/s\n")
    print("| engine | prefill tok/s (range) | decode tok/s (range) | % of bound | prefill vs best transformers | decode vs best transformers |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | died: {r['error']} | | | | |")
            continue
        span = {k: " ({:.0f}-{:.0f})".format(*r[k + "_range"]) if k + "_range" in r else ""
                for k in ("prefill_tok_s", "decode_tok_s")}
        print(f"| {r['engine']} | {r['prefill_tok_s']:.1f}{span['prefill_tok_s']} | {r['decode_tok_s']:.1f}{span['decode_tok_s']} | "
              f"{r.get('pct_of_bound', float('nan')):.0f}% | {r.get('prefill_vs_best_transformers', float('nan')):.2f}x | "
              f"{r.get('decode_vs_best_transformers', float('nan')):.2f}x |")


if __name__ == "__main__":
    main()
