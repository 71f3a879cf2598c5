"""LLM conversion and quantization: peak memory, time, size, load time, next-token agreement.

Two random checkpoints in the ConvLLaVA release layout (bf16 .bin shards + tokenizer.model):
- tiny: the test model (hidden 256, 2 layers);
- ~1B: TinyLlama-1.1B proportions (hidden 2048, ffn 5632, 22 layers, 32 heads / 4 kv heads, vocab 32000).
The conversion runs in a child process so its peak resident memory (VmHWM) is its own: the
goal is about one shard plus one tensor in fp32, not the whole model. Agreement of each quant type
against the F32 GGUF: top-1 and KL(F32 || quant) of next-token distributions over text prompts
(F32 KV cache on both sides).

    python benchmarks/llm_quant_bench.py            # tiny and 1b
    python benchmarks/llm_quant_bench.py --sizes tiny

Writes benchmarks/results/llm_quant.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convllava_edge.backends.llm_llamacpp import LlamaCppBackend
from convllava_edge.quantize.accuracy import compare_logits
from convllava_edge.quantize.gguf_quant import QUANT_FTYPES, quantize_gguf

from convllava_edge.export.convllava import synthetic as S  # noqa: E402

SPECS = {
    "tiny": (S.LlamaSpec(logit_scale=4.0), 2),
    "1b": (S.LlamaSpec(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000), 4),
}
PROMPTS = [S.VICUNA_SYSTEM + " USER: what color is the circle in the middle? ASSISTANT:",
           "USER: how many shapes are there in this picture, and which one is on the left? ASSISTANT: there are two",
           "the quick brown fox jumps over the lazy dog while the red square stays on the right side"]


def make_checkpoint(name: str, folder: Path) -> tuple[Path, float]:
    spec, shards = SPECS[name]
    t = time.perf_counter()
    llm = S.random_llama_state(spec, seed=1)
    vision = S.random_vision_state(S.TINY_TOWER, "mlp2x_gelu", spec.hidden_size, seed=0)
    ckpt = S.write_convllava_checkpoint(folder / name, spec, S.TINY_TOWER, vision_state=vision, llm_state=llm,
                                        fmt="bin", shards=shards)
    S.write_llama_tokenizer(ckpt, min(spec.vocab_size, 2000))  # a smaller SentencePiece, padded to vocab_size
    del llm
    return ckpt, time.perf_counter() - t


def convert_in_child(ckpt: Path, out: Path) -> dict:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (which here held the
    # whole random model), VmHWM belongs to the child's own address space.
    code = ("import sys, time\nfrom pathlib import Path\n"
            "from convllava_edge.export.gguf_convert import convert_llm\n"
            "t = time.perf_counter()\nconvert_llm(Path(sys.argv[1]), Path(sys.argv[2]), 'F32')\n"
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]\n"
            "print(time.perf_counter() - t, hwm)\n")
    result = subprocess.run([sys.executable, "-c", code, str(ckpt), str(out)], capture_output=True, text=True, check=True)
    seconds, maxrss_kb = result.stdout.split()
    return {"seconds": float(seconds), "peak_rss_mb": int(maxrss_kb) / 1024}


def prompt_logits(path: Path, threads: int | None) -> tuple[list[np.ndarray], float]:
    t = time.perf_counter()
    backend = LlamaCppBackend(path, n_ctx=512, threads=threads, kv_f32=True)
    load_s = time.perf_counter() - t
    out = []
    for prompt in PROMPTS:
        backend.truncate(0)
        out.append(backend.eval_tokens(backend.tokenize(prompt, add_bos=True), all_logits=True))
    backend.close()
    return out, load_s


def run(name: str, work: Path, threads: int | None) -> dict:
    ckpt, make_s = make_checkpoint(name, work)
    shard_mb = max(p.stat().st_size for p in ckpt.glob("*.bin")) / 1e6
    ckpt_mb = sum(p.stat().st_size for p in ckpt.glob("*.bin")) / 1e6
    f32 = work / f"{name}-f32.gguf"
    conv = convert_in_child(ckpt, f32)
    print(f"{name}: checkpoint {ckpt_mb:.0f} MB in shards of <= {shard_mb:.0f} MB (made in {make_s:.0f} s); "
          f"F32 GGUF {f32.stat().st_size / 1e6:.0f} MB in {conv['seconds']:.1f} s, peak RSS {conv['peak_rss_mb']:.0f} MB",
          flush=True)
    ref, ref_load = prompt_logits(f32, threads)
    rows = [{"type": "F32", "size_mb": f32.stat().st_size / 1e6, "quantize_s": 0.0, "load_s": ref_load,
             "top1": 1.0, "kl_mean": 0.0, "kl_p99": 0.0, "fallbacks": 0}]
    for quant in QUANT_FTYPES:
        path = work / f"{name}-{quant}.gguf"
        t = time.perf_counter()
        report = quantize_gguf(f32, path, quant, threads)
        quant_s = time.perf_counter() - t
        logits, load_s = prompt_logits(path, threads)
        agreement = compare_logits(ref, logits)
        rows.append({"type": quant, "size_mb": report.size / 1e6, "quantize_s": quant_s, "load_s": load_s,
                     "top1": agreement.top1, "kl_mean": agreement.kl_mean, "kl_p99": agreement.kl_p99,
                     "fallbacks": len(report.fallbacks), "tensor_types": report.tensor_types})
        print(f"  {quant:7s} {report.size / 1e6:8.1f} MB  quantize {quant_s:5.1f} s  load {load_s:5.2f} s  "
              f"top-1 {agreement.top1:.3f}  KL mean {agreement.kl_mean:.4f} p99 {agreement.kl_p99:.4f}", flush=True)
        path.unlink()
    f32.unlink()
    return {"name": name, "checkpoint_mb": ckpt_mb, "largest_shard_mb": shard_mb, "conversion": conv,
            "n_positions": sum(len(r) for r in ref), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "1b"], choices=list(SPECS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llm_quant.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="llm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [run(name, work, args.threads) for name in args.sizes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results}, indent=2) + "\n")
    for r in results:
        c = r["conversion"]
        print(f"\n{r['name']}: {r['checkpoint_mb']:.0f} MB bf16 checkpoint, largest shard {r['largest_shard_mb']:.0f} MB; "
              f"conversion to F32 {c['seconds']:.1f} s, peak RSS {c['peak_rss_mb']:.0f} MB; {r['n_positions']} positions\n")
        print("| type | size MB | quantize s | load s | top-1 vs F32 | KL mean | KL p99 | fallbacks |")
        print("|---|---|---|---|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {row['type']} | {row['size_mb']:.1f} | {row['quantize_s']:.1f} | {row['load_s']:.2f} | "
                  f"{row['top1']:.3f} | {row['kl_mean']:.4f} | {row['kl_p99']:.4f} | {row['fallbacks']} |")


if __name__ == "__main__":
    main()
