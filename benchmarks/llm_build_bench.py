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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def child(path: str, extra: bool, prompt: list[int], n_decode: int, threads: int, runs: int) -> dict:
    """Runs in the child: one library (chosen by the parent's LLAMA_CPP_LIB_PATH), one file, one setting."""
    import llama_cpp

    from llama_timing import llama_cpp_speed

    speed = llama_cpp_speed(Path(path), prompt, n_decode, threads, runs, trial=False, extra_bufts=extra)
    return {**speed, "system_info": llama_cpp.llama_print_system_info().decode().strip()}


def run_child(lib_dir: str | None, path: Path, extra: bool, args, prompt: list[int]) -> dict:
    env = dict(os.environ)
    if lib_dir:
        env["LLAMA_CPP_LIB_PATH"] = lib_dir
    payload = json.dumps({"lib": lib_dir or "", "path": str(path), "extra": extra, "prompt": [int(t) for t in prompt],
                          "n_decode": args.decode, "threads": args.threads, "runs": args.runs})
    proc = subprocess.run([sys.executable, __file__, "--child", payload], capture_output=True, text=True, env=env,
                          timeout=1800)
    if proc.returncode < 0:
        import signal

        return {"error": signal.Signals(-proc.returncode).name}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    from convllava_edge.native import cpu_info

    return cpu_info()["model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lib", action="append", default=[], help="NAME=DIR (a llama_cpp/lib folder), or 'installed'")
    parser.add_argument("--quants", default="Q4_K_M,Q4_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "llm_builds.json")
    args = parser.parse_args()
    if args.child:
        p = json.loads(args.child)
        print(json.dumps(child(p["path"], p["extra"], p["prompt"], p["n_decode"], p["threads"], p["runs"])))
        return

    import torch

    sys.path.insert(0, str(HERE))
    from llm_bench import SPEC, bytes_per_token, read_bandwidth, transformers_speed

    from convllava_edge.export import synthetic as S
    from convllava_edge.export.gguf_convert import convert_llm
    from convllava_edge.quantize.gguf_quant import quantize_gguf

    libs = [(spec.split("=", 1) if "=" in spec else (spec, None)) for spec in (args.lib or ["installed"])]
    work = args.work or Path(tempfile.mkdtemp(prefix="llm-builds-"))
    work.mkdir(parents=True, exist_ok=True)
    bandwidth = read_bandwidth(args.threads)
    print(f"{cpu_model()}; read bandwidth ({args.threads} threads) {bandwidth:.1f} GB/s", flush=True)
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 2000, args.prompt)]
    quants = args.quants.split(",")
    files = {q: work / f"{q}.gguf" for q in quants}
    rows = []
    if not all(f.is_file() for f in files.values()) or not args.no_transformers:
        state = S.random_llama_state(SPEC, seed=1)
        if not args.no_transformers:
            for dtype in (torch.float32, torch.bfloat16):
                hf = transformers_speed(state, prompt, args.decode, args.threads, args.runs, dtype)
                rows.append({"engine": f"transformers {str(dtype).removeprefix('torch.')}", **hf})
                print(rows[-1], flush=True)
        if not all(f.is_file() for f in files.values()):
            vision = S.random_vision_state(S.TINY_TOWER, "mlp2x_gelu", SPEC.hidden_size, seed=0)
            ckpt = S.write_convllava_checkpoint(work / "ckpt", SPEC, S.TINY_TOWER, vision_state=vision,
                                                llm_state=state, shards=4)
            S.write_llama_tokenizer(ckpt, 2000)
            f16 = convert_llm(ckpt, work / "f16.gguf", "F16").path
            for q, path in files.items():
                quantize_gguf(f16, path, q, args.threads)
        del state
    best_hf = {k: max((r[k] for r in rows), default=float("nan")) for k in ("prefill_tok_s", "decode_tok_s")}
    for name, lib_dir in libs:
        for q, path in files.items():
            bound = bandwidth * 1e9 / bytes_per_token(path)
            for extra in (True, False):
                r = run_child(lib_dir, path, extra, args, prompt)
                row = {"engine": f"llama.cpp {name} {q} extra_bufts={'on' if extra else 'off'}", "build": name,
                       "quant": q, "extra_bufts": extra, "bound_tok_s": bound, **r}
                if "error" not in r:
                    row.update(pct_of_bound=100 * r["decode_tok_s"] / bound,
                               decode_vs_best_transformers=r["decode_tok_s"] / best_hf["decode_tok_s"],
                               prefill_vs_best_transformers=r["prefill_tok_s"] / best_hf["prefill_tok_s"])
                rows.append(row)
                print({k: v for k, v in row.items() if k != "system_info"}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "machine": platform.machine(),
                                    "threads": args.threads, "prompt_tokens": args.prompt,
                                    "decode_tokens": args.decode, "read_bandwidth_gb_s": bandwidth, "rows": rows},
                                   indent=2) + "\n")
    print(f"\n{cpu_model()}, {args.threads} threads, prompt {args.prompt}, {args.decode} decoded, "
          f"read bandwidth {bandwidth:.1f} GB/s\n")
    print("| engine | prefill tok/s | decode tok/s | % of bound | prefill vs best transformers | decode vs best transformers |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | died: {r['error']} | | | | |")
            continue
        print(f"| {r['engine']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
              f"{r.get('pct_of_bound', float('nan')):.0f}% | {r.get('prefill_vs_best_transformers', float('nan')):.2f}x | "
              f"{r.get('decode_vs_best_transformers', float('nan')):.2f}x |")


if __name__ == "__main__":
    main()
