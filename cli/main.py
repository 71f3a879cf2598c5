"""The ``convllava-edge`` command: a thin layer over the library.

Each command calls one library function. Library errors (ConvLlavaEdgeError) become one line on
stderr and exit code 1 at a single boundary (``main``); usage errors exit 2 (Typer's convention).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import ConvLlavaEdgeError
from ..prompt import checked_text

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run ConvLLaVA-style multimodal models on the edge: export bundles, ask questions about images.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


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


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="ConvLLaVA model folder (config.json + .bin/.safetensors shards)."),
    out_dir: Path = typer.Option(..., "--out", help="Bundle folder to create."),
    vision_tower: Optional[Path] = typer.Option(None, "--vision-tower", help="ConvNeXt tower folder; default: the copy in the shards."),
    llm_type: str = typer.Option("Q4_K_M", "--llm-type", help="Q4_K_M, Q4_0, Q5_K_M, Q6_K, Q8_0 (llama.cpp quantizer), or F16, BF16, F32."),
    vision_type: List[str] = typer.Option(["fp32"], "--vision-type", help="fp32, fp16 or int8; repeat to ship several (the first is the default)."),
    calibration_images: Optional[Path] = typer.Option(None, "--calibration-images", help="Folder of images: static (TensorRT-ready QDQ) int8 instead of dynamic."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for validation and quantization."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON at the end."),
) -> None:
    """Turn a checkpoint into a bundle: validated ONNX vision graphs, a GGUF LLM and a manifest."""
    from ..export.bundle import ExportOptions, export_bundle  # needs the export extra (torch)

    options = ExportOptions(vision_types=tuple(vision_type), llm_type=llm_type, calibration_images=calibration_images,
                            force=force, threads=threads)
    progress = StageProgress(err)
    try:
        manifest = export_bundle(checkpoint, out_dir, options, vision_tower, progress=progress)
    finally:
        progress.close()
    for note in manifest.source.get("notes", []):
        err.print(f"note: {note}", markup=False)
    warning = manifest.accuracy.get("llm_fallback_warning")
    if warning:
        err.print(f"[bold yellow]warning:[/] {escape(warning)}")
    if as_json:
        out.print_json(json.dumps(manifest.to_dict()))
        return
    out.print(_files_table(manifest, str(out_dir)))


def _accuracy_text(acc: dict | None) -> str:
    """A vision variant's figures against fp32: one graph (ConvLLaVA), or one line per graph (LLaVA-Mini)."""
    if not acc:
        return "reference"
    if "cosine_mean" in acc:
        return f"vs fp32: cos mean {acc['cosine_mean']:.5f} min {acc['cosine_min']:.5f}, rel L2 {acc['rel_l2']:.1e}"
    return "vs fp32: " + "; ".join(f"{graph} cos {a['cosine_mean']:.5f}/{a['cosine_min']:.5f}" for graph, a in acc.items())


def _files_table(manifest, title: str) -> Table:
    table = Table(title=title)
    for col in ("file", "size", "type", "accuracy", "notes"):
        table.add_column(col)
    sizes = {f.path: f.size for f in manifest.files}
    for entry in manifest.vision:
        figure = _accuracy_text(entry.accuracy)
        table.add_row(escape(entry.graph if not entry.parts else ", ".join(entry.parts.values())), _size(sum(sizes[f] for f in entry.files)), f"vision {entry.variant}",
                      figure, "TensorRT-ready" if entry.tensorrt_ready else "not TensorRT-ready (see lint)")
    if manifest.llm:
        agree = manifest.accuracy.get("llm_vs_unquantized")
        figure = (f"vs unquantized: top-1 {agree['top1']:.1%}, KL mean {agree['kl_mean']:.4f} p99 {agree['kl_p99']:.4f}"
                  f" ({agree['n_positions']} {'answer ' if 'measured_on' in agree else ''}positions)"
                  if agree else "reference")
        types = ", ".join(f"{k} x{v}" for k, v in sorted(manifest.llm.tensor_types.items()))
        fallback = f"{manifest.llm.fallbacks} fallbacks" if manifest.llm.fallbacks else ""
        table.add_row(escape(manifest.llm.file), _size(sizes[manifest.llm.file]), f"LLM {manifest.llm.type}", figure,
                      escape(f"{types} {fallback}".strip()))
    return table


@app.command("info")
def info_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file's SHA-256."),
) -> None:
    """Show a bundle's manifest and verify its files."""
    from ..manifest import load_manifest

    manifest = load_manifest(bundle, verify=verify)
    if as_json:
        out.print_json(json.dumps({**manifest.to_dict(), "verified": verify}))
        return
    out.print(f"[bold]{escape(manifest.name)}[/] ({escape(manifest.family)}, {escape(manifest.created_with)})")
    pre = manifest.preprocess
    out.print(f"image: {pre['crop_size'][0]}x{pre['crop_size'][1]} {pre['aspect']} -> "
              f"{manifest.tokens_per_image['square']} tokens of width {manifest.n_embd} "
              f"(rule {manifest.tokens_per_image['rule']})")
    for entry in manifest.vision:
        out.print(f"vision {escape(entry.variant)}: {escape(entry.method)}")
    if manifest.template:
        out.print(f"template: {escape(str(manifest.template['name']))}")
    out.print(_files_table(manifest, f"files ({'SHA-256 verified' if verify else 'not verified: --no-verify'})"))


@app.command("lint")
def lint_cmd(
    graph: Path = typer.Argument(..., help="An ONNX graph."),
    rmsnorm: bool = typer.Option(False, "--rmsnorm", help="The graph's norms are RMSNorm (Llama layers, e.g. "
                                 "LLaVA-Mini's pre-fusion): a ReduceMean chain is expected, not LayerNormalization."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Check whether TensorRT can build an ONNX graph well (no TensorRT needed)."""
    from ..export.trt_lint import lint

    if not graph.is_file():
        raise ConvLlavaEdgeError(f"{graph}: no such file")
    report = lint(graph, layernorm=not rmsnorm)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        out.print(report.summary())
    if not report.passed:
        raise typer.Exit(1)


@app.command("encode")
def encode_cmd(
    image: Path = typer.Argument(..., help="Image file."),
    model: Path = typer.Option(..., "--model", help="Bundle folder."),
    vision_type: Optional[str] = typer.Option(None, "--vision-type", help="Which vision graph (default: the bundle's first)."),
    aspect: Optional[str] = typer.Option(None, "--aspect", help="pad (as trained), native (keep aspect ratio) or crop (centre crop, LLaVA-Mini's default)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    save: Optional[Path] = typer.Option(None, "--save", help="Write the embeddings to this .npy file."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Encode an image to LLM-ready embeddings with the bundle's vision graph."""
    import numpy as np

    from ..image import open_image
    from ..manifest import load_manifest, resolve_inside
    from ..preprocess import PreprocessConfig, preprocess
    from ..vision import OnnxVisionEncoder

    manifest = load_manifest(model)
    entry = manifest.vision_entry(vision_type)
    config = PreprocessConfig.from_manifest(manifest.preprocess)
    t0 = time.perf_counter()
    pixels = preprocess(open_image(image), config, aspect or manifest.preprocess["aspect"])
    t1 = time.perf_counter()
    if manifest.family == "llava-mini":  # the vision tokens pre-fusion takes: global ones, then the compressed
        from ..mini import MiniEncoder

        encoder = MiniEncoder({r: resolve_inside(model, f) for r, f in entry.parts.items()}, device, threads)
    else:
        encoder = OnnxVisionEncoder(resolve_inside(model, entry.graph), device=device, threads=threads)
    t2 = time.perf_counter()
    embeds = encoder.encode(pixels)
    t3 = time.perf_counter()
    if save is not None:
        if not save.parent.is_dir():
            raise ConvLlavaEdgeError(f"{save}: folder {save.parent} does not exist")
        try:
            np.save(save, embeds)
        except OSError as e:
            raise ConvLlavaEdgeError(f"{save}: cannot write: {e.strerror or e}") from e
    result = {"image": str(image), "vision_type": entry.variant, "pixel_shape": list(pixels.shape),
              "n_tokens": int(embeds.shape[0]), "n_embd": int(embeds.shape[1]), "providers": encoder.providers,
              "timings": {"preprocess_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3, "encode_ms": (t3 - t2) * 1e3}}
    if as_json:
        out.print_json(json.dumps(result))
        return
    err.print(encoder.note)
    out.print(f"{result['n_tokens']} tokens x {result['n_embd']} from {pixels.shape[3]}x{pixels.shape[2]} px "
              f"({entry.variant}); preprocess {result['timings']['preprocess_ms']:.0f} ms, "
              f"encode {result['timings']['encode_ms']:.0f} ms")


@app.command("check")
def check_cmd(
    bundle: Path = typer.Argument(..., help="Bundle to check."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Checkpoint folder or bundle (fp32 vision, F16/F32 LLM) to compare against."),
    vision_tower: Optional[Path] = typer.Option(None, "--vision-tower", help="With --reference CHECKPOINT: its ConvNeXt tower folder "
                                                "(default: the one the bundle was exported from, if it still exists)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images (default: the demo task's scenes)."),
    questions: Optional[Path] = typer.Option(None, "--questions", help='JSONL: {"image": ..., "question": ..., "answer": ...} per line.'),
    text: Optional[Path] = typer.Option(None, "--text", help="Text file for a perplexity comparison."),
    gate: List[str] = typer.Option([], "--gate", help="NAME=VALUE, e.g. llm.kl_mean=0.1 (repeatable; see README for the defaults)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write report.md and chart.png into this folder."),
    nf4: bool = typer.Option(True, "--nf4/--no-nf4", help="With a checkpoint reference, also measure bitsandbytes NF4."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON (vision, llm, answers, passed)."),
) -> None:
    """Measure what each quantization costs, stage by stage; exit 1 when a gate fails."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..quantize.check import load_inputs, parse_gates, run_check, write_report

    gates = parse_gates(gate)
    inputs = load_inputs(images, questions, text)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done + 1)

        result = run_check(bundle, inputs, reference, gates, threads, nf4=nf4, progress=progress, vision_tower=vision_tower)
    if report is not None:
        md, chart = write_report(result, report)
        err.print(f"report: {md}, chart: {chart}", markup=False)
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        out.print(_check_tables(result))
    for g in result.gates:
        if not g.passed:
            print(f"gate failed: {g.message()}", file=sys.stderr)
    if not result.passed:
        raise typer.Exit(1)


def _check_tables(result):
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


@app.command("bench")
def bench_cmd(
    bundle: Path = typer.Argument(..., help="Bundle to measure."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image (default: the README's example picture)."),
    question: str = typer.Option("Describe the image.", "--question"),
    runs: int = typer.Option(5, "--runs", min=1, help="Measured runs after one warm-up (each series)."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="Tokens to decode per run."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    vision_type: Optional[str] = typer.Option(None, "--vision-type"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Time preprocess, encode, prefill, first token and decode (cold and with a cache hit); peak memory."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..bench import FIGURES, default_image, run_bench

    image_path = image or default_image()
    data = _checked_image(image_path)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done + 1)

        result = run_bench(bundle, data, question, runs, max_tokens, device, threads, vision_type, progress)
    result["image"] = str(image_path)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{Path(bundle).name}: {result['n_image_tokens']} image tokens, {result['n_prompt_positions']} "
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
    out.print(table)
    out.print(f"vision {result['vision']['graph']} on {', '.join(result['vision']['providers'])} "
              f"({result['vision']['threads']} threads); LLM {result['llm']['type']} on "
              f"{'GPU' if result['llm']['gpu_offload'] else 'CPU'} ({result['llm']['threads']} threads); "
              f"cache-hit time to first token = {result['cache_hit_ttft_fraction']:.1%} of cold; "
              f"peak memory {result['peak_rss_mb']:.0f} MB")


def _ask_options(max_tokens: int, temperature: float, top_p: float, seed: int, aspect: Optional[str]):
    from ..llm import SamplingOptions
    from ..pipeline import AskOptions

    options = AskOptions(max_tokens=max_tokens, sampling=SamplingOptions(temperature, top_p, seed), aspect=aspect)
    options.validate()
    return options


def _load_model(model: Optional[Path], device: str, threads: Optional[int], vision_type: Optional[str], no_cache: bool,
                context_for: Optional[tuple[str, int]] = None):
    from ..default_model import default_bundle
    from ..pipeline import Model
    from ..vision import check_threads

    check_threads(threads)  # before the demo's notice: a bad value is the only line

    bundle = model
    if bundle is None:
        bundle = default_bundle()
        err.print(f"using the demo model shipped with convllava-edge ({bundle.name}); pass --model for another",
                  markup=False)
    loaded = Model(bundle, device=device, threads=threads, vision_type=vision_type, cache=not no_cache,
                   context_for=context_for)
    return loaded


def _checked_image(path: Path) -> bytes:
    """Read and decode the image before any model loads, so a bad file fails fast with its name."""
    from ..image import open_image, read_image_bytes

    _, data = read_image_bytes(path, sniff=True)
    open_image(data, name=str(path))
    return data


@contextlib.contextmanager
def _named(path: str):
    """Image errors raised past decoding (sizes found while preprocessing) name the file too."""
    from ..errors import ImageError

    try:
        yield
    except ImageError as e:
        if str(e).startswith(path):
            raise
        raise ImageError(f"{path}: {e}") from e


MODEL_HELP = "Bundle folder (default: the demo model shipped with the package)."


@app.command("ask")
def ask_cmd(
    image_or_question: str = typer.Argument(..., metavar="IMAGE QUESTION", help="Image file, then the question "
                                            "(with --video: the question alone)."),
    question: Optional[str] = typer.Argument(None, hidden=True),
    video: Optional[Path] = typer.Option(None, "--video", help="A video (GIF; MP4 with PyAV or OpenCV) instead of an "
                                         "image: LLaVA-Mini bundles, ~1 frame per second, one token per frame."),
    model: Optional[Path] = typer.Option(None, "--model", help=MODEL_HELP),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.2, "--temperature", help="0 = greedy and deterministic (official default 0.2)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: all available)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    aspect: Optional[str] = typer.Option(None, "--aspect", help="pad (as trained, ConvLLaVA's default), native (keep aspect ratio) or crop (centre crop, LLaVA-Mini's default)."),
    vision_type: Optional[str] = typer.Option(None, "--vision-type", help="Which vision graph of the bundle (default: its first)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the image-embedding cache."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (answer, token ids, timings) instead of streaming."),
) -> None:
    """Ask a question about an image (or a video); the answer streams as it is generated."""
    options = _ask_options(max_tokens, temperature, top_p, seed, aspect)
    if video is not None:
        if question is not None:
            raise ConvLlavaEdgeError("with --video, give only the question (got an image too)")
        question, image_data = image_or_question, None
        from ..image import read_image_bytes

        read_image_bytes(video)  # a missing or empty file fails before any model loads
    else:
        if question is None:
            raise ConvLlavaEdgeError("missing QUESTION: convllava-edge ask IMAGE QUESTION")
        image_data = _checked_image(Path(image_or_question))
    checked_text(question, "the question")
    # one question: the KV cache sized to what its prompt can take (a video's frames: the model's context)
    loaded = _load_model(model, device, threads, vision_type, no_cache,
                         context_for=None if video is not None else (question, max_tokens))
    if device == "auto" and not as_json:
        err.print(loaded.note, markup=False)
    if video is not None:
        stream = loaded.ask_video_stream(video, question, options, use_cache=not no_cache)
    else:
        with _named(image_or_question):
            stream = loaded.ask_stream(image_data, question, options, use_cache=not no_cache)
    if as_json:
        for _ in stream:
            pass
        print(json.dumps({**stream.answer.to_dict(), "providers": loaded.vision.providers,
                          "llm_extra_buffer_types": loaded.llm.extra_bufts, "llm_settings": loaded.llm.settings}))
        return
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    err.print(f"[dim]{_stats_line(stream.answer)}[/]")


@app.command("chat")
def chat_cmd(
    image: Path = typer.Argument(..., help="Image file."),
    model: Optional[Path] = typer.Option(None, "--model", help=MODEL_HELP),
    max_tokens: int = typer.Option(512, "--max-tokens"),
    temperature: float = typer.Option(0.2, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    device: str = typer.Option("auto", "--device"),
    aspect: Optional[str] = typer.Option(None, "--aspect", help="pad, native or crop (see ask --help)."),
    vision_type: Optional[str] = typer.Option(None, "--vision-type"),
    no_cache: bool = typer.Option(False, "--no-cache"),
) -> None:
    """Talk about an image over several turns (an empty line or end of input quits)."""
    options = _ask_options(max_tokens, temperature, top_p, seed, aspect)
    image_data = _checked_image(image)
    loaded = _load_model(model, device, threads, vision_type, no_cache)
    err.print(loaded.note, markup=False)
    with _named(str(image)):
        conversation = loaded.chat(image_data, options, use_cache=not no_cache)
    while True:
        err.print("[bold]you>[/] ", end="")
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        stream = conversation.ask_stream(line)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        a = stream.answer
        err.print(f"[dim]{_stats_line(a, chat=True)}[/]")


DEBUG_ENV = "CONVLLAVA_EDGE_DEBUG"  # set to 1 for the traceback of an unexpected error


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


@app.command("doctor")
def doctor_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print everything as one JSON object."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="Run llama.cpp's CPU-path probe if no verdict is cached."),
) -> None:
    """What this machine and install can run: CPU features, llama.cpp build and probe, ONNX Runtime, GPU, cache."""
    from ..doctor import report

    r = report(run_probe=probe)
    if as_json:
        print(json.dumps(r))
    else:
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
        table.add_row("GPU", escape("; ".join(gpu["devices"]) or "none found") +
                      (f"; llama.cpp GPU offload: {'yes' if llm.get('gpu_offload') else 'no'}"))
        table.add_row("cache", escape(f"{cache['folder']}: {cache['entries']} entries, {_size(cache['size_bytes'])} "
                                      f"of {_size(cache['max_bytes'])}{'' if cache['writable'] else ' (read-only)'}"))
        table.add_row("verdict", "[green]ready[/]" if r["ok"] else "[red]cannot run bundles here (see above)[/]")
        out.print(table)
    if not r["ok"]:
        raise typer.Exit(1)


MIN_TOKENS_FOR_RATE = 8  # a decode rate over fewer tokens is mostly timer noise and the first token's wait


def _stats_line(a, chat: bool = False) -> str:
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


def main(argv: list[str] | None = None) -> int:
    """Console entry point: the one place where errors become one clean line and an exit code."""
    try:
        app(args=argv, prog_name="convllava-edge")  # standalone: usage errors print and raise SystemExit(2)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ConvLlavaEdgeError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)  # plain: messages hold [shapes] that rich would read as markup
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (a smaller image, --max-tokens or model, or more memory)", file=sys.stderr)
        return 1
    except Exception as e:  # a bug of ours: still one line for the user, the traceback on request
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: unexpected {type(e).__name__}: {_one_line(e)} (set {DEBUG_ENV}=1 for the traceback; "
              "please report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
