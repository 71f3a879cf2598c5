"""A ~1B-parameter Llama: llama.cpp Q4_K_M / Q8_0 / F16 against transformers fp32 and bf16, prefill and decode.

The installed llama.cpp build with the runtime's own load settings (native.load_plan); the CPU model and
the build's features are printed with the figures. Builds and settings side by side, each in a child
process: llm_build_bench.py (--sweep).

Random weights with TinyLlama-1.1B's proportions (hidden 2048, ffn 5632, 22 layers, 32/4 heads,
vocab 32000), in the ConvLLaVA layout, through the toolkit's own converter and llama.cpp's
quantizer. Decode is set against the memory-bandwidth bound: every decoded token reads every weight
once (the token-embedding table excepted: one row), so tokens/s <= read bandwidth / bytes per token.
The read bandwidth is measured with as many threads as the engines use, each streaming through its slice
of a 1 GiB array (see read_bandwidth). A one-thread copy is reported too; it undercounts what two cores
read (a first run that used it put llama.cpp F16 at 175% of its "bound").

    python benchmarks/llm_bench.py [--threads 2] [--prompt 128] [--decode 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from convllava_edge.export.gguf_convert import convert_llm
from convllava_edge.quantize.gguf_quant import quantize_gguf
from llama_timing import llama_cpp_speed

from convllava_edge.export.convllava import synthetic as S  # noqa: E402

SPEC = S.LlamaSpec(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                   num_key_value_heads=4, vocab_size=32000)


def read_bandwidth(threads: int) -> float:
    """GB/s of ``threads`` threads each streaming through its slice of a 1 GiB float32 array at once: the
    best of a max reduction and a BLAS dot (median of 7 each; numpy releases the GIL for both).

    Not a sum: numpy's pairwise float sum is compute-bound on the project's Xeon (7.3 GB/s per thread
    against 11.3-11.6 for max and dot, 13.9 against 22.1-22.6 GB/s on two threads), and the bound it gives
    put a decode at 127% "of the bound". The fastest read any kernel achieves is the bound."""
    from concurrent.futures import ThreadPoolExecutor

    data = np.ones(256 << 20, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for kernel in (np.max, lambda a: a.dot(a)):
            times = []
            for _ in range(7):
                t = time.perf_counter()
                list(pool.map(kernel, parts))
                times.append(time.perf_counter() - t)
            best = max(best, data.nbytes / statistics.median(times) / 1e9)
    return best


def copy_bandwidth() -> float:
    """GB/s of a 256 MiB numpy copy, counting bytes read and written (median of 7)."""
    src = np.ones(256 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def bytes_per_token(path: Path) -> int:
    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")


def transformers_speed(state: dict, prompt: list[int], n_decode: int, threads: int, runs: int,
                       dtype: torch.dtype = torch.float32) -> dict:
    """The official code's engine on the same weights (bf16-rounded, as the checkpoint stores them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=SPEC.hidden_size, intermediate_size=SPEC.intermediate_size,
                                         num_hidden_layers=SPEC.num_hidden_layers,
                                         num_attention_heads=SPEC.num_attention_heads,
                                         num_key_value_heads=SPEC.num_key_value_heads, vocab_size=SPEC.vocab_size,
                                         tie_word_embeddings=False)).eval()
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state.items()})
    model = model.to(dtype)
    prefill, decode = [], []
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(runs + 1):
            t = time.perf_counter()
            out = model(ids, use_cache=True)
            t1 = time.perf_counter()
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(n_decode):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            prefill.append(len(prompt) / (t1 - t))
            decode.append(n_decode / (t2 - t1))
    return {"prefill_tok_s": statistics.median(prefill[1:]), "decode_tok_s": statistics.median(decode[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llm.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="llm-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    copy = copy_bandwidth()
    bandwidth = read_bandwidth(args.threads)
    print(f"read bandwidth ({args.threads} threads) {bandwidth:.1f} GB/s; one-thread copy {copy:.1f} GB/s", flush=True)
    state = S.random_llama_state(SPEC, seed=1)
    vision = S.random_vision_state(S.TINY_TOWER, "mlp2x_gelu", SPEC.hidden_size, seed=0)
    ckpt = S.write_convllava_checkpoint(work / "ckpt", SPEC, S.TINY_TOWER, vision_state=vision, llm_state=state, shards=4)
    S.write_llama_tokenizer(ckpt, 2000)
    prompt = list(np.random.default_rng(0).integers(3, 2000, args.prompt))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        hf = transformers_speed(state, prompt, args.decode, args.threads, args.runs, dtype)
        rows.append({"engine": f"transformers {str(dtype).removeprefix('torch.')}", **hf,
                     "size_mb": sum(v.numel() for v in state.values()) * dtype.itemsize / 1e6})
        print(rows[-1], flush=True)
    best = {k: max(r[k] for r in rows) for k in ("prefill_tok_s", "decode_tok_s")}  # transformers' fastest dtype
    del state
    f16 = convert_llm(ckpt, work / "f16.gguf", "F16").path
    files = {"F16": f16}
    for quant in ("Q8_0", "Q4_K_M"):
        files[quant] = quantize_gguf(f16, work / f"{quant}.gguf", quant, args.threads).path
    for name, path in files.items():
        speed = llama_cpp_speed(path, prompt, args.decode, args.threads, args.runs)
        per_token = bytes_per_token(path)
        bound = bandwidth * 1e9 / per_token
        rows.append({"engine": f"llama.cpp {name}", **speed, "size_mb": path.stat().st_size / 1e6,
                     "bytes_per_token_mb": per_token / 1e6, "bound_tok_s": bound,
                     "pct_of_bound": 100 * speed["decode_tok_s"] / bound,
                     "decode_vs_transformers": speed["decode_tok_s"] / best["decode_tok_s"],
                     "prefill_vs_transformers": speed["prefill_tok_s"] / best["prefill_tok_s"]})
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import llama_cpp

    from convllava_edge.machine import cpu_info

    cpu, build = cpu_info()["model"], llama_cpp.llama_print_system_info().decode().strip()
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "llama_cpp_build": build,
                                    "threads": args.threads,
                                    "prompt_tokens": args.prompt, "decode_tokens": args.decode,
                                    "read_bandwidth_gb_s": bandwidth, "copy_bandwidth_gb_s": copy, "rows": rows},
                                   indent=2) + "\n")
    print(f"\n{cpu}; llama.cpp {build}\nread bandwidth {bandwidth:.1f} GB/s ({args.threads} threads); one-thread copy "
          f"{copy:.1f} GB/s; prompt {args.prompt} tokens, {args.decode} decoded, {args.threads} threads\n")
    print("| engine | size MB | prefill tok/s | decode tok/s | prefill vs best transformers | decode vs best transformers | bound tok/s | % of bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['size_mb']:.0f} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
              f"{r.get('prefill_vs_transformers', float('nan')):.2f}x | {r.get('decode_vs_transformers', float('nan')):.1f}x | "
              f"{r.get('bound_tok_s', float('nan')):.1f} | {r.get('pct_of_bound', float('nan')):.0f}% |")


if __name__ == "__main__":
    main()
