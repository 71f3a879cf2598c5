"""The ``convllava-edge`` command: a thin layer over the library.

Each command calls one library function. Library errors (ConvLlavaEdgeError) become one line on
stderr and exit code 1 at a single boundary (``main``); usage errors exit 2 (Typer's convention).

Long module: one Typer function per command, each only options and the call it makes; split across
files, the commands' shared options and their one error boundary would be repeated or imported back.
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

from ..calibrate import mode as calibration
from ..errors import ConfigError, ConvLlavaEdgeError
from ..prompt import checked_text
from ..vision import start_deferred_calibrations
from .options import (AsJson, Aspect, Device, Grammar, JsonSchema, LlmBackend, LlmModel, LlmUrl, MaxTokens, ModelPath,
                      NoCache, Seed, Temperature, Threads, TopP, VisionBackend, VisionType, VisionUrl, ask_options,
                      runtime_options)
from .render import (StageProgress, bench_tables, check_tables, doctor_table, files_table, info_lines, stage_bars,
                     stats_line)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run ConvLLaVA-style multimodal models on the edge: export bundles, ask questions about images.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="ConvLLaVA or LLaVA-Mini model folder (config.json + .bin/.safetensors "
                                      "shards), or a Hugging Face repo id ORG/NAME[@REVISION] (its files fetched "
                                      "through the hub cache; the tower from its config's mm_vision_tower)."),
    out_dir: Path = typer.Option(..., "--out", help="Bundle folder to create."),
    vision_tower: Optional[Path] = typer.Option(None, "--vision-tower", help="Vision tower folder or repo id; default: the copy in the shards (for a repo id checkpoint: the repo its config's mm_vision_tower names)."),
    llm_type: List[str] = typer.Option(["Q4_K_M"], "--llm-type", help="GGUF: Q4_K_M, Q4_0, Q5_K_M, Q6_K, Q8_0 (llama.cpp quantizer), F16, BF16, F32; or hf (a Hugging Face folder, for vLLM); repeat for hf beside one GGUF type."),
    vision_type: Optional[List[str]] = typer.Option(None, "--vision-type", help="fp32, fp16, int8 or bf16 (the fp32 graph run in bf16: OpenVINO, a CPU with bf16); repeat to ship several (the first is the default). Default: int8, with fp32 in front where int8 misses check's vision gate on the probe images."),
    calibration_images: Optional[Path] = typer.Option(None, "--calibration-images", help="Folder of images: static (TensorRT-ready QDQ) int8 instead of dynamic."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for validation and quantization."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON at the end."),
) -> None:
    """Turn a checkpoint into a bundle: validated ONNX vision graphs, a GGUF LLM and a manifest."""
    from ..export.bundle import ExportOptions, export_bundle  # needs the export extra (torch)

    gguf_types = [t for t in llm_type if t.lower() != "hf"]
    if len(gguf_types) > 1:
        raise ConfigError(f"--llm-type: one GGUF type per bundle, got {', '.join(gguf_types)}")
    options = ExportOptions(vision_types=tuple(vision_type) if vision_type else None, llm_type=gguf_types[0] if gguf_types else None,
                            hf=len(gguf_types) < len(llm_type), calibration_images=calibration_images,
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
    out.print(files_table(manifest, str(out_dir)))


@app.command("pull")
def pull_cmd(
    repo: str = typer.Argument(..., metavar="ORG/NAME[@REVISION]", help="A published bundle's repository."),
) -> None:
    """Fetch a published bundle into the Hugging Face cache (HF_HOME) and verify every file against its manifest;
    then --model ORG/NAME runs it, offline too."""
    from ..hub import parse_spec, pull
    from ..manifest import load_manifest

    if parse_spec(repo) is None:
        raise ConfigError(f"{repo}: not a repo id (ORG/NAME or ORG/NAME@REVISION)")
    got = pull(repo)
    n = len(load_manifest(got.path, verify=False).files)
    out.print(f"{got.repo} ({got.revision or 'main'} = {got.commit[:12]}): {n} files verified, in {got.path}",
              markup=False)


@app.command("info")
def info_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder or Hugging Face repo id (ORG/NAME[@REVISION])."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file's SHA-256."),
) -> None:
    """Show a bundle's manifest and verify its files."""
    from ..backends import vision_kinds
    from ..manifest import load_manifest
    from ..vision import cached_choice, can_run

    manifest = load_manifest(_bundle(bundle), verify=verify)
    runs_on = {e.variant: [k.name for k in vision_kinds() if can_run(k.name, e)] for e in manifest.vision}
    choice = cached_choice(manifest)  # what --vision-backend auto measured here, if it ran
    if as_json:
        out.print_json(json.dumps({**manifest.to_dict(), "verified": verify, "vision_runs_on": runs_on,
                                   "vision_choice_here": choice}))
        return
    for line in info_lines(manifest, runs_on, choice):
        out.print(line)
    out.print(files_table(manifest, f"files ({'SHA-256 verified' if verify else 'not verified: --no-verify'})"))


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
    model: ModelPath = None,
    vision_type: VisionType = None,
    aspect: Aspect = None,
    device: Device = "auto",
    vision_backend: VisionBackend = None,
    vision_url: VisionUrl = None,
    threads: Threads = None,
    save: Optional[Path] = typer.Option(None, "--save", help="Write the embeddings to this file, under exactly this name (NumPy's .npy format)."),
    as_json: AsJson = False,
) -> None:
    """Encode an image to LLM-ready embeddings with the bundle's vision graph."""
    import numpy as np

    from ..image import open_image
    from ..manifest import load_manifest
    from ..files import check_output_file, write_file_atomically
    from ..preprocess import preprocess, size_check
    from ..vision import choose_vision

    runtime = runtime_options(device, threads, vision_type, vision_backend, vision_url)
    if save is not None:
        check_output_file(save, "--save")  # a folder, a device, a FIFO: refused before any work
    model = _bundle_or_demo(model)
    manifest = load_manifest(model)
    manifest.vision_entry(vision_type)  # an unknown type fails before any work
    config = manifest.preprocess
    t0 = time.perf_counter()
    aspect = aspect or config.aspect
    pixels = preprocess(open_image(image, fits=size_check(config, aspect)), config, aspect)
    t1 = time.perf_counter()
    choice, encoder = choose_vision(model, manifest, runtime.vision_type, runtime.device, runtime.threads,
                                    runtime.vision_backend, lambda line: err.print(line, markup=False),
                                    url=runtime.vision_url, calibrate=calibration("later"))
    entry = choice.entry
    t2 = time.perf_counter()
    embeds = encoder.encode(pixels)
    t3 = time.perf_counter()
    if save is not None:  # into an open file: given a name, np.save would add ".npy" to it
        write_file_atomically(save, lambda f: np.save(f, embeds), "--save")
    result = {"image": str(image), "vision_type": entry.variant, "pixel_shape": list(pixels.shape),
              "n_tokens": int(embeds.shape[0]), "n_embd": int(embeds.shape[1]), "providers": encoder.providers,
              "vision_backend": choice.kind, "vision_choice": choice.to_dict(),
              "timings": {"preprocess_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3, "encode_ms": (t3 - t2) * 1e3}}
    if save is not None:
        result["saved"] = str(save)
        err.print(f"embeddings ({embeds.shape[0]} x {embeds.shape[1]}, {embeds.dtype}) written to {save}", markup=False)
    if as_json:
        out.print_json(json.dumps(result))
        return
    err.print(encoder.note)
    out.print(f"{result['n_tokens']} tokens x {result['n_embd']} from {pixels.shape[3]}x{pixels.shape[2]} px "
              f"({entry.variant}); preprocess {result['timings']['preprocess_ms']:.0f} ms, "
              f"encode {result['timings']['encode_ms']:.0f} ms")


@app.command("check")
def check_cmd(
    bundle: Optional[Path] = typer.Argument(None, help="Bundle to check (default: the demo model shipped with the package)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Checkpoint folder or bundle (fp32 vision, F16/F32 LLM) to compare against."),
    vision_tower: Optional[Path] = typer.Option(None, "--vision-tower", help="With --reference CHECKPOINT: its ConvNeXt tower folder "
                                                "(default: the one the bundle was exported from, if it still exists)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images (default: the demo task's scenes)."),
    questions: Optional[Path] = typer.Option(None, "--questions", help='JSONL: {"image": ..., "question": ..., "answer": ...} per line.'),
    text: Optional[Path] = typer.Option(None, "--text", help="Text file for a perplexity comparison."),
    gate: List[str] = typer.Option([], "--gate", help="NAME=VALUE, e.g. llm.kl_mean=0.1 (repeatable; the defaults: docs/models.md)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write report.md and chart.png into this folder."),
    nf4: bool = typer.Option(True, "--nf4/--no-nf4", help="With a checkpoint reference, also measure bitsandbytes NF4."),
    threads: Threads = None,
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON (vision, llm, answers, passed)."),
) -> None:
    """Measure what each quantization costs, stage by stage, on the bundle's GGUF (it reads the LLM's logits);
    exit 1 when a gate fails."""
    from ..check import load_inputs, parse_gates, run_check, write_report


    gates = parse_gates(gate)
    inputs = load_inputs(images, questions, text)
    with stage_bars(err, elapsed=True) as progress:
        result = run_check(_bundle_or_demo(bundle), inputs, reference, gates, threads, nf4=nf4, progress=progress, vision_tower=vision_tower)
    if report is not None:
        md, chart = write_report(result, report)
        err.print(f"report: {md}, chart: {chart}", markup=False)
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        out.print(check_tables(result))
    for g in result.gates:
        if not g.passed:
            print(f"gate failed: {g.message()}", file=sys.stderr)
    if not result.passed:
        raise typer.Exit(1)


@app.command("bench")
def bench_cmd(
    bundle: Path = typer.Argument(..., help="Bundle to measure (a folder or a repo id)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image (default: examples/shapes-1.png)."),
    question: str = typer.Option("Describe the image.", "--question"),
    runs: int = typer.Option(5, "--runs", min=1, help="Measured runs after one warm-up (each series)."),
    max_tokens: MaxTokens = 32,
    device: Device = "cpu",
    threads: Threads = None,
    vision_type: VisionType = None,
    vision_backend: VisionBackend = None,
    vision_url: VisionUrl = None,
    llm_backend: LlmBackend = "llama.cpp",
    llm_url: LlmUrl = None,
    llm_model: LlmModel = None,
    as_json: AsJson = False,
) -> None:
    """Time preprocess, encode, prefill, first token and decode (cold and with a cache hit); peak memory."""
    from ..bench import default_image, run_bench

    runtime = runtime_options(device, threads, vision_type, vision_backend, vision_url, llm_backend, llm_url, llm_model,
                              calibrate=calibration("now"))
    image_path = image or default_image()
    bundle = _bundle(bundle)
    data = _checked_image(image_path, bundle)
    with stage_bars(err) as progress:
        result = run_bench(bundle, data, question, runs, max_tokens, runtime, progress)
    result["image"] = str(image_path)
    if as_json:
        print(json.dumps(result))
        return
    table, summary = bench_tables(result, Path(bundle).name, runs)
    out.print(table)
    out.print(summary)


def _bundle(spec: Optional[Path]) -> Optional[Path]:
    """A bundle named by a folder as it is; by a Hugging Face repo id (ORG/NAME[@REVISION], no folder of that name):
    from the hub cache without network access, else pulled and verified (hub.py)."""
    from ..hub import bundle_path, is_repo_spec

    return bundle_path(str(spec)) if spec is not None and is_repo_spec(spec) else spec


def _bundle_or_demo(model: Optional[Path]) -> Path:
    """``--model``, or the demo model shipped with the package (said in one line), as every command defaults."""
    if model is not None:
        return _bundle(model)
    from ..default_model import default_bundle

    bundle = default_bundle()
    err.print(f"using the demo model shipped with convllava-edge ({bundle.name}); pass --model for another", markup=False)
    return bundle


def _load_model(model: Optional[Path], runtime, context_for: Optional[tuple[str, int]] = None):
    """The bundle (default: the demo model, said in one line) loaded as ``runtime`` says. ``context_for``: the
    one question it answers: the LLM loads once the image is encoded and the graphs are freed (ask_once)."""
    from ..model import Model

    return Model(_bundle_or_demo(model), runtime, context_for=context_for, defer_llm=context_for is not None,
                 progress=lambda line: err.print(line, markup=False))


def _checked_image(path: Path, model: Optional[Path] = None, aspect: Optional[str] = None) -> bytes:
    """Read and decode the image before any model loads, so a bad file fails fast with its name; a size the
    model's preprocessing would refuse (a 16383x5000 WebP padded to a square) is refused from the header,
    before 1.4 GB of pixels are decoded."""
    from ..image import open_image, read_image_bytes

    _, data = read_image_bytes(path, sniff=True)
    open_image(data, name=str(path), fits=_size_check(model, aspect))
    return data


def _size_check(model: Optional[Path], aspect: Optional[str]):
    """preprocess.size_check for the bundle's preprocessing; None where the manifest cannot be read yet (the
    model's own error comes when it loads)."""
    from ..default_model import default_bundle
    from ..manifest import load_manifest
    from ..preprocess import size_check

    try:
        manifest = load_manifest(model or default_bundle(), verify=False)
        return size_check(manifest.preprocess, aspect or manifest.preprocess.aspect)
    except ConvLlavaEdgeError:
        return None


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


@contextlib.contextmanager
def _named_each(paths: List[str]):
    """_named for one image; for several, the error names them all (which one failed is in its message where
    the decoder knew)."""
    with _named(paths[0] if len(paths) == 1 else ", ".join(paths)):
        yield


@app.command("ask")
def ask_cmd(
    images_and_question: List[str] = typer.Argument(..., metavar="IMAGE... QUESTION", help="One image file or "
                                                    "several, then the question (with --video: the question alone)."),
    video: Optional[Path] = typer.Option(None, "--video", help="A video (GIF; MP4 with PyAV or OpenCV) instead of an "
                                         "image: LLaVA-Mini bundles, ~1 frame per second, one token per frame."),
    model: ModelPath = None,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.2,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    threads: Threads = None,
    device: Device = "auto",
    aspect: Aspect = None,
    vision_type: VisionType = None,
    vision_backend: VisionBackend = None,
    vision_url: VisionUrl = None,
    llm_backend: LlmBackend = "llama.cpp",
    llm_url: LlmUrl = None,
    llm_model: LlmModel = None,
    json_schema: JsonSchema = None,
    grammar: Grammar = None,
    no_cache: NoCache = False,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (answer, token ids, timings) instead of streaming."),
) -> None:
    """Ask a question about an image, several images (`ask a.png b.png "Which is newer?"`) or a video; the answer
    streams as it is generated."""
    options = ask_options(max_tokens, temperature, top_p, seed, aspect, json_schema, grammar)
    runtime = runtime_options(device, threads, vision_type, vision_backend, vision_url, llm_backend, llm_url, llm_model,
                              no_cache, calibrate=calibration("later"))
    model = _bundle(model)  # a repo id: resolved before the images are checked against its preprocessing
    *paths, question = images_and_question
    if video is not None:
        if paths:
            raise ConvLlavaEdgeError("with --video, give only the question (got an image too)")
        from ..image import read_image_bytes

        read_image_bytes(video)  # a missing or empty file fails before any model loads
    elif not paths:
        raise ConvLlavaEdgeError("missing QUESTION: convllava-edge ask IMAGE... QUESTION")
    image_data = [_checked_image(Path(p), model, aspect) for p in paths]
    checked_text(question, "the question")
    # one question: the KV cache sized to what its prompt can take (a video's frames: the model's context)
    loaded = _load_model(model, runtime, context_for=None if video is not None else (question, max_tokens, len(paths)))
    if video is not None:
        stream = loaded.ask_video_stream(video, question, options)
    else:
        with _named_each(paths):
            stream = loaded.ask_once(image_data, question, options)
    if device == "auto" and not as_json:
        err.print(loaded.note, markup=False)
    if as_json:
        for _ in stream:
            pass
        print(json.dumps({**stream.answer.to_dict(), "providers": loaded.vision_providers,
                          "vision_backend": loaded.vision_backend, "vision_type": loaded.vision_entry.variant,
                          "vision_choice": loaded.vision_choice.to_dict(),
                          "llm_extra_buffer_types": loaded.llm.settings.get("extra_bufts"), "llm_settings": loaded.llm.settings}))
        return
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    err.print(f"[dim]{stats_line(stream.answer)}[/]")


@app.command("chat")
def chat_cmd(
    images: List[Path] = typer.Argument(..., metavar="IMAGE...", help="The image file(s) of the first question; a "
                                        "line '/image FILE' adds one to the next question."),
    model: ModelPath = None,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.2,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    threads: Threads = None,
    device: Device = "auto",
    aspect: Aspect = None,
    vision_type: VisionType = None,
    vision_backend: VisionBackend = None,
    vision_url: VisionUrl = None,
    llm_backend: LlmBackend = "llama.cpp",
    llm_url: LlmUrl = None,
    llm_model: LlmModel = None,
    json_schema: JsonSchema = None,
    grammar: Grammar = None,
    no_cache: NoCache = False,
) -> None:
    """Talk about images over several turns: a line '/image FILE' adds an image to the next question (an empty line
    or end of input quits)."""
    if sys.stdin is None:  # Python's stdin when fd 0 is not open (`<&-`): checked before the model loads
        raise ConvLlavaEdgeError("chat needs a terminal or input on stdin (standard input is closed)")
    options = ask_options(max_tokens, temperature, top_p, seed, aspect, json_schema, grammar)
    runtime = runtime_options(device, threads, vision_type, vision_backend, vision_url, llm_backend, llm_url, llm_model,
                              no_cache, calibrate=calibration("later"))
    model = _bundle(model)  # a repo id: resolved before the images are checked against its preprocessing
    image_data = [_checked_image(image, model, aspect) for image in images]
    loaded = _load_model(model, runtime)
    err.print(loaded.note, markup=False)
    with _named_each([str(image) for image in images]):
        conversation = loaded.chat(image_data, options)
    while True:
        err.print("[bold]you>[/] ", end="")
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError as e:
            raise ConvLlavaEdgeError(f"standard input is not {e.encoding} text (byte {e.object[e.start]:#04x})") from None
        except OSError as e:  # stdin a folder (`< /`), or its descriptor closed meanwhile
            raise ConvLlavaEdgeError(f"chat cannot read standard input: {e.strerror or e}") from None
        if not line or not line.strip():
            break
        if line.startswith(IMAGE_COMMAND):
            _add_image(conversation, line[len(IMAGE_COMMAND):].strip(), model, aspect)
            continue
        stream = conversation.ask_stream(line)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        a = stream.answer
        err.print(f"[dim]{stats_line(a, chat=True)}[/]")


IMAGE_COMMAND = "/image "  # chat: a line that adds an image to the next question


def _add_image(conversation, path: str, model: Optional[Path], aspect: Optional[str]) -> None:
    """``/image FILE`` in chat: the image encoded for the next question; a bad file is said in one line and the
    conversation goes on."""
    try:
        with _named(path):
            conversation.add_image(_checked_image(Path(path), model, aspect))
    except ConvLlavaEdgeError as e:
        err.print(f"error: {e}", markup=False)
        return
    err.print(f"[dim]{path} added: it goes with your next question ({conversation.n_images} images in this "
              "conversation)[/]")


@app.command("batch")
def batch_cmd(
    inputs: List[str] = typer.Argument(None, metavar="INPUTS", help="Images: files, folders (their images, recursively) "
                                       "and glob patterns (quote them)."),
    question: List[str] = typer.Option([], "--question", help="Asked of every image (repeatable)."),
    questions: Optional[Path] = typer.Option(None, "--questions", help='JSONL: {"question": ...} asks every image; '
                                             '{"image": ..., "question": ...} asks that one.'),
    out_path: Path = typer.Option(..., "--out", help="The answers, one JSON line per (image, question); a rerun "
                                  "skips what it holds."),
    model: ModelPath = None,
    workers: int = typer.Option(1, "--workers", min=1, help="With --ray: actors, one loaded model each."),
    ray: bool = typer.Option(False, "--ray", help="Run on Ray Data (the 'ray' extra): a local cluster, or --address."),
    address: Optional[str] = typer.Option(None, "--address", help="With --ray: a running cluster (ray://HOST:10001 or HOST:6379)."),
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.2,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (with --ray: per actor; default: "
                                          "the node's cores shared out)."),
    device: Device = "auto",
    aspect: Aspect = None,
    vision_type: VisionType = None,
    vision_backend: VisionBackend = None,
    vision_url: VisionUrl = None,
    llm_backend: LlmBackend = "llama.cpp",
    llm_url: LlmUrl = None,
    llm_model: LlmModel = None,
    json_schema: JsonSchema = None,
    grammar: Grammar = None,
    no_cache: NoCache = False,
) -> None:
    """Answer questions about many images into a JSONL file: resumable, unreadable images as error lines."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..batch import AnswerLog, expand_images, make_items, read_questions, run_local
    from ..files import shown

    runtime = runtime_options(device, threads, vision_type, vision_backend, vision_url, llm_backend, llm_url, llm_model,
                              no_cache, calibrate=calibration("now"))
    if (workers > 1 or address) and not ray:
        raise ConfigError("--workers and --address run Ray actors: add --ray (locally the loop uses every core)")
    options = ask_options(max_tokens, temperature, top_p, seed, aspect, json_schema, grammar)
    for q in question:
        checked_text(q, "the question")
    items = make_items(expand_images(inputs or []), question, read_questions(questions) if questions else [])
    with AnswerLog(out_path) as log:
        left = sum(1 for i in items if i.key not in log.done)
        if log.repaired:
            err.print(f"{shown(out_path)}: cut off a torn last line ({log.repaired} bytes) from an interrupted run", markup=False)
        err.print(f"{len(items)} questions, {len(items) - left} already answered in {shown(out_path)}, {left} to go",
                  markup=False)
        errors = 0
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                      console=err) as bar:
            task = bar.add_task("answering", total=left, rate="")

            def advance(row: dict) -> None:
                nonlocal errors
                errors += "error" in row
                bar.advance(task)
                done, elapsed = bar.tasks[task].completed, bar.tasks[task].elapsed
                bar.update(task, rate=f"{done / elapsed:.2f}/s" if elapsed else "",  # since the start: Ray's first
                           # answers come after its actors load, then in bursts
                           description=f"answering ({errors} error{'s' * (errors != 1)})" if errors else "answering")
            if ray:
                _need_ray()
                from ..ray_batch import run_on_ray

                run_on_ray(_bundle_or_demo(model), items, log, options, runtime, workers, address, advance)
            else:
                run_local(_load_model(model, runtime), items, log, options, advance)
    err.print(f"{shown(out_path)}: {left - errors} answered, {errors} error line(s)", markup=False)


deploy_app = typer.Typer(no_args_is_help=True, help="Put a bundle where other engines serve it (Triton).")
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("triton")
def deploy_triton_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    out_repo: Path = typer.Option(..., "--out", help="The Triton model repository (created if needed; its other models are kept)."),
    vision_type: Optional[str] = typer.Option(None, "--vision-type", help="Which vision type (default: the bundle's first)."),
    instances: int = typer.Option(1, "--instances", min=1, help="instance_group count per model."),
    tensorrt: Optional[str] = typer.Option(None, "--tensorrt", help="fp16 or int8: Triton's TensorRT accelerator (GPU instances)."),
    gpu: bool = typer.Option(False, "--gpu", help="GPU instances (CUDA) without TensorRT."),
    force: bool = typer.Option(False, "--force", help="Replace model folders of the same names."),
) -> None:
    """The bundle's vision graphs as Triton models (ONNX Runtime backend), each config checked offline."""
    from ..deploy_triton import TritonOptions, deploy_triton

    for folder in deploy_triton(_bundle(bundle), out_repo, TritonOptions(vision_type, instances, tensorrt, gpu, force)):
        out.print(f"{folder}: config.pbtxt + 1/model.onnx (checked)", markup=False)


@deploy_app.command("check")
def deploy_check_cmd(repo: Path = typer.Argument(..., help="A Triton model repository.")) -> None:
    """Check every config.pbtxt of a repository as Triton would parse it, and against its graph."""
    from ..deploy_triton import check_repository

    for name in check_repository(repo):
        out.print(f"{name}: ok", markup=False)


def _need_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise ConvLlavaEdgeError(f"--ray needs the ray extra (pip install 'convllava-edge[ray]'): {e}") from None


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
        out.print(doctor_table(r))
    if not r["ok"]:
        raise typer.Exit(1)


@app.command("serve")
def serve_cmd(
    model: Optional[List[Path]] = typer.Option(None, "--model", help="A bundle to serve, named by its folder; repeat for several (default: the demo model)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback unless told otherwise)."),
    port: int = typer.Option(8765, "--port", min=0, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CONVLLAVA_EDGE_API_KEY", help="Require Authorization: Bearer KEY (all but /health)."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Generations at once per bundle (llama.cpp contexts on shared weights)."),
    queue: int = typer.Option(64, "--queue", min=0, help="Requests waiting per bundle; past it 503 with Retry-After."),
    max_tokens_cap: int = typer.Option(1024, "--max-tokens-cap", min=1),
    max_image_bytes: int = typer.Option(20 << 20, "--max-image-bytes", min=1, help="Bytes per image."),
    max_images: int = typer.Option(8, "--max-images", min=1, help="Images per request (more: 400)."),
    media_dir: Optional[Path] = typer.Option(None, "--media-dir", help="file:// image URLs are read from inside this folder only (opened once at start; symlinks inside it and .. are refused)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", min=64, help="Positions per slot (default: the LLM's trained context, at most 4096)."),
    request_timeout: float = typer.Option(300.0, "--request-timeout", help="Seconds per request, queue included (504 past it)."),
    read_timeout: float = typer.Option(30.0, "--read-timeout", help="Seconds a request's headers, and each part of "
                                       "its body, may take to arrive (408 past it; a half-sent request holds nothing)."),
    device: Device = "auto",
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Decoding threads per slot (default: the cores shared out)."),
    threads_batch: Optional[int] = typer.Option(None, "--threads-batch", min=1, help="Threads for the image's encoding and the prefill, one slot at a time (default: every core)."),
    vision_backend: VisionBackend = None,
    vision_url: VisionUrl = None,
    llm_backend: LlmBackend = "llama.cpp",
    llm_url: LlmUrl = None,
    llm_model: LlmModel = None,
    grace: float = typer.Option(10.0, "--grace", help="Seconds in-flight requests get to finish on Ctrl-C / SIGTERM."),
    ray: bool = typer.Option(False, "--ray", help="Run as a Ray Serve deployment (the 'ray' extra): --replicas copies."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="With --ray: replicas, each with its own models."),
    address: Optional[str] = typer.Option(None, "--address", help="With --ray: a running cluster (HOST:6379); "
                                          "default: a local one for this command."),
    allowed_hosts: Optional[List[str]] = typer.Option(None, "--allowed-hosts", help="More names the Host header may "
                                                      "give (comma-separated or repeated; '*': any). On a loopback "
                                                      "bind only 127.0.0.1, localhost and [::1] are accepted; on "
                                                      "another bind the check is off unless this is given."),
    allowed_origins: Optional[List[str]] = typer.Option(None, "--allowed-origins", help="Web pages that may call the "
                                                        "server from a browser, as origins (http://host:port; "
                                                        "comma-separated or repeated; '*': any). Others get 403."),
) -> None:
    """Serve bundles over HTTP: OpenAI's /v1/chat/completions (images as data: URLs, streaming), /v1/models, /health."""
    try:
        from ..serve import ServeOptions
        from ..serve.guard import parse_list
        from ..serve.server import app as serve_app, run
    except ImportError as e:
        raise ConvLlavaEdgeError(f"serve needs the serve extra (pip install 'convllava-edge[serve]'): {e}") from None
    runtime = runtime_options(device, threads, None, vision_backend, vision_url, llm_backend, llm_url, llm_model,
                              threads_batch=threads_batch, n_ctx=ctx, calibrate=calibration("now"))
    options = ServeOptions(parallel=parallel, queue=queue, api_key=api_key, max_tokens_cap=max_tokens_cap,
                           max_image_bytes=max_image_bytes, max_images=max_images, media_dir=media_dir, runtime=runtime,
                           request_timeout=request_timeout, read_timeout=read_timeout, bind_host=host, allowed_hosts=parse_list(allowed_hosts),
                           allowed_origins=parse_list(allowed_origins) or ())
    for line in options.policy.describe():
        err.print(f"warning: {line}", markup=False)
    what = ', '.join(str(m) for m in model) if model else 'the demo model'
    if (replicas > 1 or address) and not ray:
        raise ConfigError("--replicas and --address deploy on Ray Serve: add --ray")
    if ray:
        _need_ray()
        from ..serve.ray_serve import serve_on_ray

        serve_on_ray(model or None, options, host, port, replicas, address, grace, ready=lambda url: err.print(
            f"serving {what} on {url} (Ray Serve, {replicas} replica(s); OpenAI API at /v1; {parallel} slot(s) per "
            "model in each)", markup=False))
        return
    asgi = serve_app(model or None, options)
    err.print(f"serving {what} on http://{host}:{port} (OpenAI API at /v1; {parallel} slot(s) per model)", markup=False)
    run(asgi, host, port, grace, options.read_timeout)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: the one place where errors become one clean line and an exit code."""
    try:
        app(args=argv, prog_name="convllava-edge")  # standalone: usage errors print and raise SystemExit(2)
        start_deferred_calibrations()  # auto's timing of a one-shot command, once it has answered
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
