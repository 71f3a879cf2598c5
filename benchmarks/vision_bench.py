"""Full-size ConvLLaVA vision towers: ONNX Runtime fp32 / fp16 / int8 and OpenVINO fp32 / bf16 (when the
`openvino` extra is installed) against PyTorch eager fp32 and bf16.

Random weights with the real shapes (ConvNeXt-Large + the 5th stage, 669M parameters, projector
3072 -> 4096 -> 4096); the same weights serve every resolution, since the tower is fully
convolutional. Every variant runs on the same inputs in the same process, interleaved (each round times
every engine once, in turn, so that a shared host's drift falls on all alike), so the ratios are side by
side. OpenVINO runs the fp32 graph in fp32 and in bf16, and each int8 graph (fp32 around its int8 ops). GFLOP/s = 2 x multiply-accumulates / median time, against this machine's measured
fp32 matrix-multiply peak (torch, 2048^3) and int8 peak (ONNX Runtime MatMulInteger, 2048^3).

    python benchmarks/vision_bench.py --sizes 768 1024 1536 --runs 3

Writes benchmarks/results/vision.json and prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from convllava_edge.export.convllava.onnx_export import export_onnx
from convllava_edge.export.probe_images import probe_images
from convllava_edge.export.convllava.vision_model import ConvLlavaVision
from convllava_edge.metrics import compare_embeddings, convllava_vision_macs
from convllava_edge.preprocess import PreprocessConfig, preprocess
from convllava_edge.quantize.onnx_variants import make_variant
from convllava_edge.backends import open_vision_backend
from convllava_edge.backends.vision_openvino import openvino_available
from convllava_edge.errors import ConfigError
from convllava_edge.machine import cpu_info
from convllava_edge.families.convllava import CONVLLAVA, ConvLlavaEncoder

from convllava_edge.export.convllava.synthetic import convllava_tower, random_vision_state  # noqa: E402

N_EMBD = 4096  # Vicuna-7B's width: the projector's output


def timed(fn, runs: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def interleaved(engines: dict, pixels: np.ndarray, runs: int, fp16_runs: int) -> dict[str, dict]:
    """Each engine once per round, in turn (after one untimed run each): the shared host's drift falls on
    all alike. Then each output against eager fp32's."""
    with torch.no_grad():
        outputs = {}
        for name, fn in engines.items():  # the untimed run: its output is the one compared
            out = fn()
            outputs[name] = out.float().numpy()[0] if torch.is_tensor(out) else out  # eager keeps the batch axis
        times: dict[str, list[float]] = {name: [] for name in engines}
        for i in range(runs):
            for name, fn in engines.items():
                if "fp16" in name and i >= fp16_runs:
                    continue  # no fast fp16 CPU kernels: timed less
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    reference = outputs["pytorch-eager-fp32"]
    results = {}
    for name, out in outputs.items():
        agreement = compare_embeddings([np.asarray(out, dtype=np.float32)], [reference])
        results[name] = {"times": times[name], "cosine_mean": agreement.cosine_mean, "cosine_min": agreement.cosine_min,
                         "rel_l2": agreement.rel_l2}
    return results


def fp32_matmul_peak(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = statistics.median(timed(lambda: a @ b, runs=10, warmup=3))
    return 2 * 2048**3 / t / 1e9


def int8_matmul_peak(threads: int) -> float:
    """ONNX Runtime's own int8 GEMM (what the int8 graphs use), 2048^3, u8 x s8 -> s32."""
    from onnx import TensorProto, helper

    n = 2048
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)  # ORT 1.31 reads IR <= 13
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    t = statistics.median(timed(lambda: sess.run(None, feed), runs=10, warmup=3))
    return 2 * n**3 / t / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 1024, 1536])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--variants", nargs="+", default=["fp32", "fp16", "int8-dynamic", "int8-static"])
    parser.add_argument("--fp16-runs", type=int, default=1, help="fp16 has no fast CPU kernels; time it less")
    parser.add_argument("--work", type=Path, default=None, help="keep the graphs here (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vision.json")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="engines not to run (e.g. ort-fp32 openvino-fp32-as-fp32: memory at 1536 px)")
    parser.add_argument("--no-eager-bf16", dest="eager_bf16", action="store_false",
                        help="skip PyTorch eager bf16 (the official code's fastest dtype on AMX machines)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="vision-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    peaks = {"fp32_gflops": fp32_matmul_peak(args.threads), "int8_gops": int8_matmul_peak(args.threads)}
    print(f"peaks: fp32 matmul {peaks['fp32_gflops']:.0f} GFLOP/s, int8 matmul {peaks['int8_gops']:.0f} GOP/s")

    tower = convllava_tower(768)
    model = ConvLlavaVision(tower, "mlp2x_gelu", N_EMBD).eval()
    state = random_vision_state(tower, "mlp2x_gelu", N_EMBD, seed=0)
    names = set(model.state_dict())
    model.load_state_dict({k: v for k, v in state.items() if k in names})
    del state
    n_params = sum(p.numel() for p in model.parameters())
    import copy

    model_bf16 = copy.deepcopy(model).to(torch.bfloat16).eval() if args.eager_bf16 else None
    print(f"tower + projector: {n_params / 1e6:.0f}M parameters")

    t = time.perf_counter()
    fp32_path = export_onnx(model, work / "vision-fp32.onnx", (768, 768), 64)
    export_s = time.perf_counter() - t
    graphs = {"fp32": fp32_path}
    build_s = {"fp32": export_s}
    config = PreprocessConfig(image_size=768, crop_size=(768, 768))
    for variant in args.variants:
        if variant == "fp32":
            continue
        t = time.perf_counter()
        base = variant.split("-")[0]
        calibration = [preprocess(im, config) for im in probe_images(4, seed=7)] if variant == "int8-static" else None
        graphs[variant], _ = make_variant(base, fp32_path, work / f"vision-{variant}.onnx", calibration)
        build_s[variant] = time.perf_counter() - t
        print(f"built {variant} in {build_s[variant]:.0f} s")
    sizes_mb = {v: sum(f.stat().st_size for f in work.glob(p.name + "*")) / 1e6 for v, p in graphs.items()}

    rows = []
    for size in args.sizes:
        cfg = PreprocessConfig(image_size=size, crop_size=(size, size))
        pixels = preprocess(probe_images(1, seed=size)[0], cfg)
        gflop = 2 * convllava_vision_macs(tower.depths, tower.hidden_sizes, 4, size, size, N_EMBD) / 1e9
        x32 = torch.from_numpy(pixels)
        engines = {"pytorch-eager-fp32": lambda: model(x32)}
        if model_bf16 is not None:  # the official code's fastest dtype here
            x16 = x32.to(torch.bfloat16)
            engines["pytorch-eager-bf16"] = lambda: model_bf16(x16).float()
        for variant, path in graphs.items():
            if f"ort-{variant}" not in args.skip:
                enc = ConvLlavaEncoder.from_file(path, "cpu", args.threads)
                engines[f"ort-{variant}"] = lambda enc=enc: enc.encode(pixels)
        ov_runs = [("fp32", "fp32"), ("fp32", "bf16")] + [(v, "fp32") for v in graphs if v.startswith("int8")]
        for variant, precision in ov_runs if openvino_available() else ():
            if f"openvino-{variant}-as-{precision}" in args.skip:
                continue
            try:
                backend = open_vision_backend("cpu", args.threads, "openvino", precision=precision)
            except ConfigError as e:  # no bf16 on this CPU
                print(f"openvino {precision}: {e}")
                continue
            enc = ConvLlavaEncoder(backend.load(graphs[variant], *CONVLLAVA.graphs["vision"]), backend)
            engines[f"openvino-{variant}-as-{precision}"] = lambda enc=enc: enc.encode(pixels)
        results = interleaved(engines, pixels, args.runs, args.fp16_runs)
        del engines
        ref_t = results["pytorch-eager-fp32"]["times"]
        base_t = statistics.median(ref_t)
        for name, r in results.items():
            med = statistics.median(r["times"])
            peak = peaks["int8_gops"] if "int8" in name else peaks["fp32_gflops"]
            row = {"size": size, "tokens": (size // 64) ** 2, "gflop": gflop, "variant": name, "median_s": med,
                   "min_s": min(r["times"]), "max_s": max(r["times"]), "runs": len(r["times"]),
                   "speedup_vs_eager": base_t / med, "gflops": gflop / med, "pct_of_peak": 100 * gflop / med / peak,
                   "cosine_mean": r["cosine_mean"], "cosine_min": r["cosine_min"], "rel_l2": r.get("rel_l2", 0.0)}
            rows.append(row)
            print(f"{size} {name:22s} {med:7.2f} s  x{row['speedup_vs_eager']:.2f}  {row['gflops']:6.0f} GFLOP/s "
                  f"({row['pct_of_peak']:.0f}% of peak)  cos mean {row['cosine_mean']:.4f} min {row['cosine_min']:.4f}",
                  flush=True)

    out = {"machine": {"cpu": cpu_info()["model"], "threads": args.threads,
                       "torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__},
           "date": time.strftime("%Y-%m-%d"), "params_m": n_params / 1e6, "peaks": peaks,
           "build_s": build_s, "graph_mb": sizes_mb, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print("\n| size | tokens | variant | median s (runs) | vs eager | GFLOP/s | % of peak | cos mean | cos min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['tokens']} | {r['variant']} | {r['median_s']:.2f} ({r['runs']}) | "
              f"{r['speedup_vs_eager']:.2f}x | {r['gflops']:.0f} | {r['pct_of_peak']:.0f}% | "
              f"{r['cosine_mean']:.4f} | {r['cosine_min']:.4f} |")


if __name__ == "__main__":
    main()
