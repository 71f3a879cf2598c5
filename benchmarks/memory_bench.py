"""Peak memory of `convllava-edge ask` on a 7B-shaped ConvLLaVA bundle, against transformers bf16 on the
same checkpoint (issue 13, M1). Benchmark only, never in CI: it writes ~15 GB of random bf16 shards, and
the export holds an F16 GGUF (~13.5 GB) while it quantizes; it checks the disk first.

The checkpoint: the released ConvLLaVA-1536 layout (ConvNeXt-L + stage 5 tower copy in the shards, the
mlp2x_gelu projector, a Vicuna-7B-shaped Llama: hidden 4096, 32 layers, intermediate 11008, vocabulary
32000), random weights, written one tensor at a time so the writer never holds more than a shard.
The bundle: `convllava-edge export --llm-type Q4_K_M --vision-type int8`. Each measurement runs in a child
of its own and reads the child's peak resident set (``os.wait4``'s ru_maxrss), so nothing the parent holds
is counted:
- ours: `convllava-edge ask IMAGE QUESTION --model BUNDLE --max-tokens 8 --no-cache` on a 1536 px image
  (576 image tokens), the product's own command;
- transformers bf16: LlamaForCausalLM.from_pretrained(the checkpoint, torch_dtype=bfloat16) (the official
  builder's path for the LLM; its vision keys are left out as unexpected) and the ConvNeXt tower +
  projector in bf16 (the reference module the export is tested against), the same image, the same
  positions, 8 greedy tokens.

    python benchmarks/memory_bench.py [--work DIR] [--threads 2] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # tests.support.memwatch: the sampler the export memory test uses too
QUESTION = "What is in the image?"
IMAGE_SIZE = 1536
CHECKPOINT_BYTES = 15 * 10**9  # the shards, already written on a second run
DISK_NEEDED = 40 * 10**9  # shards ~15 GB + F16 GGUF ~13.5 GB + Q4_K_M ~4 GB + ONNX fp32 while exporting ~2.7 GB


SMALL = os.environ.get("MEMORY_BENCH_SMALL") == "1"  # --small: the same steps on a tiny model (checks the script)


def spec():
    from convllava_edge.export.convllava import synthetic as S

    if SMALL:
        return S.LlamaSpec(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=2000, max_position_embeddings=4096)
    return S.LlamaSpec(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def tower_config():
    from convllava_edge.export.convllava import synthetic as S

    return S.TowerConfig(depths=S.TINY_TOWER.depths, hidden_sizes=S.TINY_TOWER.hidden_sizes, image_size=IMAGE_SIZE) \
        if SMALL else S.convllava_tower(IMAGE_SIZE)


def llama_shapes(s) -> list[tuple[str, tuple[int, ...]]]:
    """The HF Llama tensors in save_pretrained's order (synthetic.random_llama_state's, without values)."""
    d, f = s.hidden_size, s.intermediate_size
    kv = s.num_key_value_heads * (d // s.num_attention_heads)
    out = [("model.embed_tokens.weight", (s.vocab_size, d))]
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f)), (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (s.vocab_size, d))]


def write_checkpoint(folder: Path, shard_bytes: int = 2 * 10**9) -> Path:
    """A 7B-shaped ConvLLaVA-1536 sft folder, streamed: shards of ~shard_bytes, index with total_size."""
    import torch

    from convllava_edge.export.checkpoint import BIN_INDEX, write_index
    from convllava_edge.export.convllava.vision_model import TOWER_PREFIX
    from convllava_edge.export.convllava import synthetic as S

    s, tower = spec(), tower_config()
    folder.mkdir(parents=True, exist_ok=True)
    vision = S.random_vision_state(tower, "mlp2x_gelu", s.hidden_size, seed=0)
    gen = torch.Generator().manual_seed(1)

    def tensors():
        for name, shape in llama_shapes(s)[:-1]:
            if name.endswith("norm.weight"):
                yield name, (torch.randn(shape, generator=gen) * 0.05 + 1.0).to(torch.bfloat16)
            else:
                yield name, (torch.randn(shape, generator=gen) / math.sqrt(shape[1])).to(torch.bfloat16)
        for k, v in vision.items():  # the tower copy and the projector, where the released shards have them
            if k.startswith("vision_tower."):
                yield TOWER_PREFIX + k.removeprefix("vision_tower."), v.to(torch.bfloat16)
            elif k.startswith("mm_projector."):
                yield "model." + k, v.to(torch.bfloat16)
        yield "lm_head.weight", (torch.randn((s.vocab_size, s.hidden_size), generator=gen)
                                 / math.sqrt(s.hidden_size)).to(torch.bfloat16)

    shards, current, size, total = [], {}, 0, 0
    for name, t in tensors():
        current[name] = t.contiguous()
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            shards.append(current)
            torch.save(current, folder / f"part-{len(shards)}.tmp")
            total += size
            current, size = {}, 0
            shards[-1] = list(shards[-1])  # names only: the tensors are on disk
    if current:
        shards.append(current)
        torch.save(current, folder / f"part-{len(shards)}.tmp")
        total += size
        shards[-1] = list(current)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        final = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        (folder / f"part-{i}.tmp").rename(folder / final)
        weight_map.update({n: final for n in names})
    write_index(folder, BIN_INDEX, weight_map, total)
    S.write_json(folder / "config.json", S.llava_config(s, tower))
    S.write_json(folder / "preprocessor_config.json", S.preprocessor_config(IMAGE_SIZE))
    S.write_llama_tokenizer(folder, 2000)
    return folder


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` and return its peak RSS (GB), wall time and last stdout line, from os.wait4."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = subprocess.Popen(cmd, stdout=out, stderr=err, env=env).pid
        _, status, usage = os.wait4(pid, 0)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} ...: exit {code}\n{stderr[-3000:]}")
    return {"peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "seconds": time.perf_counter() - t,
            "last_line": (stdout.strip().splitlines() or [""])[-1]}


def torch_child(ckpt: Path, image: Path, n_decode: int, threads: int) -> None:
    """transformers bf16 on the checkpoint: the tower + projector, then the LLM on the spliced prompt."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import LlamaConfig, LlamaForCausalLM, logging

    from convllava_edge.export.config import LlavaConfig
    from convllava_edge.export.convllava.vision_model import load_vision_model, open_vision_checkpoint
    from convllava_edge.preprocess import PreprocessConfig, preprocess

    logging.set_verbosity_error()  # the vision keys are "unexpected" for a plain Llama: expected here
    torch.set_num_threads(threads)
    vision = load_vision_model(open_vision_checkpoint(ckpt)).to(torch.bfloat16).eval()
    llava = LlavaConfig.load(ckpt)
    s = spec()
    config = LlamaConfig(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
                         num_key_value_heads=s.num_key_value_heads, vocab_size=s.vocab_size,
                         max_position_embeddings=s.max_position_embeddings, rms_norm_eps=s.rms_norm_eps,
                         rope_theta=s.rope_theta, tie_word_embeddings=False)
    llm = LlamaForCausalLM.from_pretrained(ckpt, config=config, torch_dtype=torch.bfloat16).eval()
    assert llava.llm.hidden_size == s.hidden_size
    pixels = preprocess(Image.open(image), PreprocessConfig(image_size=IMAGE_SIZE, crop_size=(IMAGE_SIZE, IMAGE_SIZE)))
    with torch.inference_mode():
        image_rows = vision(torch.from_numpy(np.asarray(pixels)).to(torch.bfloat16))[0]  # [576, 4096]
        rng = np.random.default_rng(0)
        before, after = (torch.from_numpy(rng.integers(3, 2000, n)) for n in (35, 12))  # vicuna system prompt + question
        emb = llm.get_input_embeddings()
        prompt = torch.cat([emb(before), image_rows, emb(after)])[None]
        out = llm(inputs_embeds=prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        for _ in range(n_decode - 1):
            out = llm(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
    print(json.dumps({"positions": int(prompt.shape[1]), "image_rows": int(image_rows.shape[0])}))


def export_side(args, ckpt: Path, bundle: Path, cpu: str) -> None:
    """The export in a child of its own (what `convllava-edge export` calls), its tree sampled every 0.1 s:
    RssAnon (what must stay resident) and RssFile (mapped files: reclaimable page cache) per stage, ru_maxrss
    (which counts mapped file pages), and under --memory-limit the cgroup's peak charge and OOM kills."""
    from tests.support.memwatch import export_command, memory_cgroup, run_watched

    shutil.rmtree(bundle, ignore_errors=True)
    log = args.work / "export-stages.log"
    log.unlink(missing_ok=True)
    limit = int(args.memory_limit * 1e9) if args.memory_limit else None
    cmd = export_command(ckpt, bundle, log, llm_type="Q4_K_M", vision_types=("int8",), threads=args.threads)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    with memory_cgroup(limit) if limit else contextlib.nullcontext() as group:
        if limit and group is None:
            raise SystemExit("--memory-limit: this machine does not let this process make a memory cgroup")
        run = run_watched(cmd, stage_log=log, cgroup=group, env=env)
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "threads": args.threads, "label": args.label,
              "memory_limit_gb": args.memory_limit, "command": "export --llm-type Q4_K_M --vision-type int8",
              **run.to_dict()}
    if run.returncode == 0:
        manifest = json.loads((bundle / "manifest.json").read_text())
        result["files"] = {f["path"]: f["sha256"] for f in manifest["files"]}
        result["llm_vs_unquantized"] = manifest["accuracy"].get("llm_vs_unquantized")
        result["vision_int8"] = next((v.get("accuracy") for v in manifest["vision"] if v["variant"] == "int8"), None)
    else:
        result["stderr_tail"] = run.stderr[-3000:]
    if args.compare and run.returncode == 0:
        before = json.loads(args.compare.read_text())
        result["same_files_as"] = {"results": str(args.compare), "identical": before.get("files") == result["files"],
                                   "differing": sorted(k for k in set(before.get("files", {})) | set(result["files"])
                                                       if before.get("files", {}).get(k) != result["files"].get(k))}
    out = args.out.with_name(f"memory-export-{args.label}{'-small' if SMALL else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{cpu}, {args.threads} threads: export exit {run.returncode} in {run.seconds:.0f} s; peak anon "
          f"{run.peak_anon / 1e9:.2f} GB, file {run.peak_file / 1e9:.2f} GB, ru_maxrss {run.ru_maxrss / 1e9:.2f} GB"
          + (f", cgroup peak {run.cgroup_peak / 1e9:.2f} GB, OOM kills {run.oom_kills}" if group else ""))
    print("| stage | s | peak anon GB | peak file GB |\n|---|---|---|---|")
    for s in result["stages"]:
        print(f"| {s['stage']} | {s['seconds']} | {s['peak_anon_gb']} | {s['peak_file_gb']} |")
    print(f"results: {out}")
    if not args.keep:
        shutil.rmtree(bundle, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "convllava-memory-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep checkpoint and bundle (else removed at the end)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    parser.add_argument("--small", action="store_true", help="a tiny model through the same steps (checks the script)")
    parser.add_argument("--export-only", action="store_true",
                        help="measure the export alone: anonymous and file-backed peaks per stage, children included")
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="with --export-only: run the export in a memory cgroup of this many GB (page cache counts)")
    parser.add_argument("--label", default="after", help="with --export-only: results/memory-export-LABEL.json")
    parser.add_argument("--compare", type=Path, default=None,
                        help="with --export-only: an earlier results file whose bundle file hashes must be the same")
    parser.add_argument("--torch-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small and not SMALL:  # children read it from the environment
        os.environ["MEMORY_BENCH_SMALL"] = "1"
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    if args.torch_child:
        torch_child(Path(args.torch_child[0]), Path(args.torch_child[1]), 8, args.threads)
        return

    from structured_bench import cpu_name  # the model and its vector flags

    if SMALL:
        args.work, args.out = args.work.with_name(args.work.name + "-small"), args.out.with_name("memory-small.json")
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt, bundle, image = args.work / "ckpt", args.work / "bundle", args.work / "scene.png"
    have = (ckpt / "config.json").exists() + (bundle / "manifest.json").exists()
    free = shutil.disk_usage(args.work).free
    needed = DISK_NEEDED - (CHECKPOINT_BYTES if (ckpt / "config.json").exists() else 0)
    if have < 2 and free < needed and not SMALL:
        raise SystemExit(f"{args.work}: {free / 1e9:.1f} GB free, this benchmark needs about {needed / 1e9:.0f} GB "
                         "(choose another --work)")
    cpu = cpu_name()
    print(f"{cpu}; work folder {args.work} ({free / 1e9:.1f} GB free)", flush=True)
    if not (ckpt / "config.json").exists():
        t = time.perf_counter()
        write_checkpoint(ckpt)
        print(f"checkpoint written in {time.perf_counter() - t:.0f} s", flush=True)
    if args.export_only:
        export_side(args, ckpt, bundle, cpu)
        return
    if not (bundle / "manifest.json").exists():
        exported = run_measured([sys.executable, "-m", "convllava_edge.cli.main", "export", str(ckpt), "--out", str(bundle),
                                 "--llm-type", "Q4_K_M", "--vision-type", "int8", "--threads", str(args.threads)])
        print(f"exported in {exported['seconds']:.0f} s (peak RSS {exported['peak_rss_gb']:.2f} GB)", flush=True)
    if not image.exists():
        import numpy as np

        from convllava_edge.shapes_task import random_scene

        buf = io.BytesIO()
        random_scene(np.random.default_rng(3)).render().resize((IMAGE_SIZE, IMAGE_SIZE)).save(buf, "PNG")
        image.write_bytes(buf.getvalue())

    env = dict(os.environ, CONVLLAVA_EDGE_CACHE=str(args.work / "cache"))
    ours = run_measured([sys.executable, "-m", "convllava_edge.cli.main", "ask", str(image), QUESTION, "--model", str(bundle),
                         "--max-tokens", "8", "--temperature", "0", "--no-cache", "--json",
                         "--threads", str(args.threads)], env)
    answer = json.loads(ours.pop("last_line"))
    print(f"ours: peak RSS {ours['peak_rss_gb']:.2f} GB, {ours['seconds']:.1f} s, "
          f"{answer['n_prompt_positions']} positions ({answer['n_image_tokens']} image)", flush=True)
    theirs = run_measured([sys.executable, __file__, "--torch-child", str(ckpt), str(image),
                           "--threads", str(args.threads)])
    shape = json.loads(theirs.pop("last_line"))
    print(f"transformers bf16: peak RSS {theirs['peak_rss_gb']:.2f} GB, {theirs['seconds']:.1f} s, "
          f"{shape['positions']} positions", flush=True)
    files = {p.name: p.stat().st_size for p in bundle.rglob("*") if p.is_file() and p.stat().st_size > 10**6}
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "machine": platform.machine(), "threads": args.threads,
              "image_size": IMAGE_SIZE, "bundle_files_bytes": files,
              "ours": {**ours, "n_prompt_positions": answer["n_prompt_positions"],
                       "n_image_tokens": answer["n_image_tokens"], "llm_settings": answer.get("llm_settings")},
              "transformers_bf16": {**theirs, **shape},
              "ratio": ours["peak_rss_gb"] / theirs["peak_rss_gb"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{cpu}, {args.threads} threads, 7B-shaped ConvLLaVA-1536 (random weights)\n")
    print("| | peak RSS | wall time |\n|---|---|---|")
    print(f"| convllava-edge ask (Q4_K_M + int8 tower) | {ours['peak_rss_gb']:.2f} GB | {ours['seconds']:.1f} s |")
    print(f"| transformers bf16 | {theirs['peak_rss_gb']:.2f} GB | {theirs['seconds']:.1f} s |")
    print(f"\nratio {result['ratio']:.2f}x (floor: ours <= 6 GB; stretch: <= 0.5x)")
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(bundle, ignore_errors=True)


if __name__ == "__main__":
    main()
