"""What the CLI prints: progress per stage, the bundle's file table, check's tables, an answer's figures."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.table import Table


@contextlib.contextmanager
def stage_bars(console: Console, elapsed: bool = False) -> Iterator[Callable[[str, int, int], None]]:
    """``progress(stage, done, total)`` for the library's long loops (check, bench): a bar per stage while the
    block runs, gone after it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()] + ([TimeElapsedColumn()] if elapsed else [])
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done + 1)

        yield progress


class StageProgress:
    """One line per stage with its duration; a bar while a stage reports counts (tensors converted)."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
        self.task, self.label, self.start = None, None, 0.0

    def stage(self, label: str) -> None:
        self.finish()
        self.label, self.start = label, time.perf_counter()
        if not self.bar.live.is_started:
            self.bar.start()
        self.task = self.bar.add_task(label, total=None)

    def advance(self, done: int, total: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=done, total=total)

    def finish(self) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
            self.console.print(f"[green]✓[/] {escape(self.label)} [dim]({time.perf_counter() - self.start:.1f} s)[/]")
            self.task = None

    def close(self) -> None:
        self.finish()
        if self.bar.live.is_started:  # stopping a bar that never started still writes a blank line
            self.bar.stop()


def size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def accuracy_text(acc: dict | None) -> str:
    """A vision variant's figures against fp32: one graph (ConvLLaVA), or one line per graph (LLaVA-Mini)."""
    if not acc:
        return "reference"
    if "cosine_mean" in acc:
        return f"vs fp32: cos mean {acc['cosine_mean']:.5f} min {acc['cosine_min']:.5f}, rel L2 {acc['rel_l2']:.1e}"
    return "vs fp32: " + "; ".join(f"{graph} cos {a['cosine_mean']:.5f}/{a['cosine_min']:.5f}" for graph, a in acc.items())


def files_table(manifest, title: str) -> Table:
    table = Table(title=title)
    for col in ("file", "size", "type", "accuracy", "notes"):
        table.add_column(col)
    sizes = {f.path: f.size for f in manifest.files}
    for entry in manifest.vision:
        figure = accuracy_text(entry.accuracy)
        notes = "TensorRT-ready" if entry.tensorrt_ready else "not TensorRT-ready (see lint)"
        if entry.variant == "bf16":
            notes = "the fp32 graph's file(s), run in bf16 by OpenVINO: no extra file"
        table.add_row(escape(entry.graph if not entry.parts else ", ".join(entry.parts.values())),
                      size_text(sum(sizes[f] for f in entry.files)), f"vision {entry.variant}", figure, notes)
    if manifest.llm:
        agree = manifest.accuracy.get("llm_vs_unquantized")
        figure = (f"vs unquantized: top-1 {agree['top1']:.1%}, KL mean {agree['kl_mean']:.4f} p99 {agree['kl_p99']:.4f}"
                  f" ({agree['n_positions']} {'answer ' if 'measured_on' in agree else ''}positions)"
                  if agree else "reference")
        types = ", ".join(f"{k} x{v}" for k, v in sorted(manifest.llm.tensor_types.items()))
        fallback = f"{manifest.llm.fallbacks} fallbacks" if manifest.llm.fallbacks else ""
        table.add_row(escape(manifest.llm.file), size_text(sizes[manifest.llm.file]), f"LLM {manifest.llm.type}", figure,
                      escape(f"{types} {fallback}".strip()))
    if manifest.llm_hf:
        hf = manifest.llm_hf
        table.add_row(escape(hf.folder + "/"), size_text(sum(sizes[f] for f in hf.files)), f"LLM hf ({escape(hf.dtype)})",
                      "the checkpoint's weights", f"LlamaForCausalLM, {len(hf.files)} files, for vLLM")
        if hf.vocab:
            table.add_row(escape(hf.vocab), size_text(sizes[hf.vocab]), "LLM vocabulary", "",
                          "GGUF without tensors: how the vLLM backend tokenizes")
    return table


def check_tables(result):
    from rich.console import Group

    vision = Table(title=f"vision against {result.vision.get('reference')}")
    for col in ("variant", "features cos mean/min", "embeds cos mean/min", "embeds rel L2"):
        vision.add_column(col)
    for v, f in result.vision.get("variants", {}).items():
        vision.add_row(v, f"{f['features']['cosine_mean']:.5f} / {f['features']['cosine_min']:.5f}",
                       f"{f['embeds']['cosine_mean']:.5f} / {f['embeds']['cosine_min']:.5f}", f"{f['embeds']['rel_l2']:.2e}")
    llm = Table(title=f"LLM against {result.llm.get('reference') or '(no reference: ' + str(result.llm.get('note')) + ')'}")
    for col in ("variant", "KL mean", "KL p99", "top-1", "perplexity"):
        llm.add_column(col)
    for v, a in result.llm.get("variants", {}).items():
        ppl = f"{a['perplexity']:.3f} ({a['perplexity_change']:+.2%})" if "perplexity" in a else "-"
        llm.add_row(v, f"{a['kl_mean']:.4f}", f"{a['kl_p99']:.4f}", f"{a['top1']:.3f}", ppl)
    answers = Table(title=f"answers against {result.answers.get('reference')}")
    for col in ("combination", "exact", "first token", "accuracy"):
        answers.add_column(col)
    ref_acc = result.answers.get("reference_accuracy")
    if ref_acc:
        answers.add_row("(reference)", "-", "-", f"{ref_acc['overall']:.3f}")
    for c, a in result.answers.get("combinations", {}).items():
        answers.add_row(escape(c), f"{a['exact']:.3f}", f"{a['first_token']:.3f}",
                        f"{a['accuracy']['overall']:.3f}" if "accuracy" in a else "-")
    verdict = "[green]all gates passed[/]" if result.passed else "[red]gates failed[/]"
    return Group(vision, llm, answers, verdict)


MIN_TOKENS_FOR_RATE = 8  # a decode rate over fewer tokens is mostly timer noise and the first token's wait


def stats_line(a, chat: bool = False) -> str:
    """Only figures that mean something for this answer: no rate over a one-token answer."""
    t = a.timings
    parts = []
    if chat:
        parts.append(f"evaluated {a.n_evaluated} of {a.n_prompt_positions} prompt positions "
                     f"({a.n_prompt_positions - a.n_evaluated} reused from the KV cache)")
    else:
        source = "embeddings from the cache" if a.cache_hit else f"encoded in {t['encode_ms']:.0f} ms"
        parts.append(f"{a.n_image_tokens} image tokens ({source})" if a.n_image_tokens else "no image")
    parts.append(f"first token after {t['time_to_first_token_ms']:.0f} ms")
    n = len(a.token_ids)
    if n >= MIN_TOKENS_FOR_RATE and t.get("decode_tokens_per_s"):
        parts.append(f"{n} tokens at {t['decode_tokens_per_s']:.1f} tokens/s")
    else:
        parts.append(f"{n} token{'s' if n != 1 else ''}")
    return "; ".join(parts)


def doctor_table(r: dict) -> Table:
    """``doctor``'s findings, one row each."""
    cpu, llm, ort, gpu, cache = r["cpu"], r["llama_cpp"], r["onnxruntime"], r["gpu"], r["cache"]
    table = Table(title=f"convllava-edge {r['versions']['convllava-edge']} on {escape(cpu['model'])}", show_header=False)
    table.add_column("what")
    table.add_column("found")
    table.add_row("CPU", f"{cpu['cores']} usable cores; " + " ".join(f for f, on in cpu["features"].items() if on))
    table.add_row("llama.cpp", escape(f"llama-cpp-python {llm.get('version')}; built for: "
                                      f"{', '.join(llm.get('build_features', [])) or llm.get('error', '?')}"))
    if llm.get("unused_cpu_features"):
        table.add_row("faster llama.cpp", escape(
            f"this build leaves {', '.join(llm['unused_cpu_features'])} unused: CMAKE_ARGS=\"{llm['fast_build_cmake_args']}\" "
            f"pip install --no-cache-dir --force-reinstall {'llama-cpp-python==' + str(llm.get('version'))}"))
    if llm.get("extra_buffer_types_off_for"):
        table.add_row("llama.cpp settings", escape(
            f"{', '.join(llm['extra_buffer_types_off_for'])} weights load without extra buffer types with this build "
            "(measured faster); other types with them"))
    verdict = llm.get("probe")
    table.add_row("CPU-path probe", escape("not run (--no-probe)" if verdict is None else
                                           f"{verdict['reason']}{' (cached)' if verdict['cached'] else ''}"))
    table.add_row("ONNX Runtime", escape(f"{ort.get('version')}: {', '.join(ort.get('providers', []))}"))
    vision = r["vision"]
    ov = vision["openvino"]
    table.add_row("vision backends", escape(
        f"default {vision['default']}; onnxruntime (fp32); openvino "
        + (f"{ov['version']} ({', '.join(ov.get('precisions', []))})" if ov["installed"]
           else "not installed (pip install 'convllava-edge[openvino]')")))
    for c in vision["auto_choices"]:
        table.add_row("auto chose", escape(f"{c['bundle']}: {c['vision_type']} on {c['vision_backend']} ({c['date']}; "
                                           + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in (c["calibration_s"] or {}).items())
                                           + ")"))
    table.add_row("GPU", escape("; ".join(gpu["devices"]) or "none found") +
                  (f"; llama.cpp GPU offload: {'yes' if llm.get('gpu_offload') else 'no'}"))
    table.add_row("cache", escape(f"{cache['folder']}: {cache['entries']} entries, {size_text(cache['size_bytes'])} "
                                  f"of {size_text(cache['max_bytes'])}{'' if cache['writable'] else ' (read-only)'}"))
    table.add_row("verdict", "[green]ready[/]" if r["ok"] else "[red]cannot run bundles here (see above)[/]")
    return table


def bench_tables(result: dict, name: str, runs: int) -> tuple[Table, str]:
    """``bench``'s table (cold and cache-hit series) and its one-line summary."""
    from ..bench import FIGURES

    table = Table(title=f"{name}: {result['n_image_tokens']} image tokens, {result['n_prompt_positions']} "
                        f"prompt positions, {result['n_generated']} tokens decoded; median of {runs} (min-max)")
    table.add_column("figure")
    table.add_column("cold")
    table.add_column("cache hit")
    for figure in FIGURES:
        row = [figure]
        for series in ("cold", "cache_hit"):
            s = result[series][figure]
            row.append(f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})")
        table.add_row(*row)
    summary = (f"vision {result['vision']['graph']} on {', '.join(result['vision']['providers'])} "
               f"({result['vision']['threads']} threads); LLM {result['llm']['type']} on "
               f"{'GPU' if result['llm']['gpu_offload'] else 'CPU'} ({result['llm']['threads']} threads); "
               f"cache-hit time to first token = {result['cache_hit_ttft_fraction']:.1%} of cold; "
               f"peak memory {result['peak_rss_mb']:.0f} MB")
    return table, summary


def info_lines(manifest, runs_on: dict[str, list[str]], choice: dict | None):
    """``info``'s lines above the files table: the image rule, the architecture, each vision type (with where it
    runs here and its cosine against fp32), what auto chose here, the template."""
    from ..vision import cosines, within_gate

    yield f"[bold]{escape(manifest.name)}[/] ({escape(manifest.family)}, {escape(manifest.created_with)})"
    pre, tokens = manifest.preprocess, manifest.tokens_per_image
    count = tokens.compressed or tokens.square
    yield (f"image: {pre.crop_size[0]}x{pre.crop_size[1]} {pre.aspect} -> "
           f"{count if count is not None else 'up to the budget of'} tokens of width {manifest.n_embd}"
           + (f" (rule {escape(tokens.rule)})" if tokens.rule else ""))
    if manifest.tower:  # the architecture as exported (depths and widths, projector; CLIP width, compressor)
        yield "vision architecture: " + escape(", ".join(f"{k} {v}" for k, v in manifest.tower.items()))
    for entry in manifest.vision:
        mean, _ = cosines(entry)
        gate = "" if within_gate(entry) or entry is manifest.vision[0] else "; outside auto's accuracy gate"
        yield (f"vision {escape(entry.variant)}: {escape(entry.method)} (cosine vs fp32 {mean:.4f}; runs here on "
               f"{', '.join(runs_on[entry.variant]) or 'no installed backend'}{gate})")
    if choice is not None:
        times = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in choice.get("calibration_s", {}).items())
        yield (f"vision here (auto): {escape(choice['vision_type'])} on {escape(choice['vision_backend'])}, "
               f"{escape(choice['how'])} {escape(str(choice.get('date', '')))} ({escape(times)})")
    else:
        yield ("vision here (auto): the bundle's first vision type, timed against the others on first use when "
               "several types or backends can run it")
    if manifest.template:
        yield f"template: {escape(str(manifest.template['name']))}"
