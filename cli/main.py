"""The ``convllava-edge`` command: a thin layer over the library.

Each command calls one library function. Library errors (ConvLlavaEdgeError) become one line on
stderr and exit code 1 at a single boundary (``main``); usage errors exit 2 (Typer's convention).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConvLlavaEdgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run ConvLLaVA-style multimodal models on the edge: export bundles, ask questions about images.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class StageLog:
    """Prints each export stage with its duration; the current one shows a spinner."""

    def __init__(self, console: Console):
        self.console, self.status, self.label, self.start = console, None, None, 0.0

    def __call__(self, label: str) -> None:
        self.finish()
        self.label, self.start = label, time.perf_counter()
        self.status = self.console.status(label)
        self.status.start()

    def finish(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.console.print(f"[green]✓[/] {self.label} [dim]({time.perf_counter() - self.start:.1f} s)[/]")
            self.status = None


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
    vision_type: List[str] = typer.Option(["fp32"], "--vision-type", help="fp32, fp16 or int8; repeat to ship several (the first is the default)."),
    calibration_images: Optional[Path] = typer.Option(None, "--calibration-images", help="Folder of images: static (TensorRT-ready QDQ) int8 instead of dynamic."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for validation."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON at the end."),
) -> None:
    """Turn a checkpoint into a bundle: validated ONNX vision graphs and a manifest."""
    from ..export.bundle import ExportOptions, export_bundle  # needs the export extra (torch)

    options = ExportOptions(vision_types=tuple(vision_type), calibration_images=calibration_images, force=force,
                            threads=threads)
    log = StageLog(err)
    try:
        manifest = export_bundle(checkpoint, out_dir, options, vision_tower, progress=log)
    finally:
        log.finish()
    for note in manifest.source.get("notes", []):
        err.print(f"note: {note}", markup=False)
    if as_json:
        out.print_json(json.dumps(manifest.to_dict()))
        return
    table = Table(title=f"bundle {out_dir}")
    for col in ("file", "size", "type", "accuracy vs fp32", "TensorRT"):
        table.add_column(col)
    sizes = {f.path: f.size for f in manifest.files}
    for entry in manifest.vision:
        acc = entry.accuracy
        figure = (f"cos mean {acc['cosine_mean']:.5f} min {acc['cosine_min']:.5f}, rel L2 {acc['rel_l2']:.2e}"
                  if acc else "reference")
        table.add_row(entry.graph, _size(sum(sizes[f] for f in entry.files)), f"vision {entry.variant}", figure,
                      "ready" if entry.tensorrt_ready else "no (see lint)")
    out.print(table)


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
    out.print(f"[bold]{manifest.name}[/] ({manifest.family}, {manifest.created_with})")
    pre = manifest.preprocess
    out.print(f"image: {pre['crop_size'][0]}x{pre['crop_size'][1]} {pre['aspect']} -> "
              f"{manifest.tokens_per_image['square']} tokens of width {manifest.n_embd} "
              f"(rule {manifest.tokens_per_image['rule']})")
    for entry in manifest.vision:
        out.print(f"vision {entry.variant}: {entry.graph} - {entry.method}")
    for record in manifest.files:
        out.print(f"  {record.path}  {_size(record.size)}  sha256 {record.sha256[:16]}…")
    out.print("files verified" if verify else "files not verified (--no-verify)")


@app.command("lint")
def lint_cmd(
    graph: Path = typer.Argument(..., help="An ONNX graph."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Check whether TensorRT can build an ONNX graph well (no TensorRT needed)."""
    from ..export.trt_lint import lint

    if not graph.is_file():
        raise ConvLlavaEdgeError(f"{graph}: no such file")
    report = lint(graph)
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
    aspect: Optional[str] = typer.Option(None, "--aspect", help="pad (as trained) or native (keep aspect ratio)."),
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
    encoder = OnnxVisionEncoder(resolve_inside(model, entry.graph), device=device, threads=threads)
    t2 = time.perf_counter()
    embeds = encoder.encode(pixels)
    t3 = time.perf_counter()
    if save is not None:
        np.save(save, embeds)
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


def main(argv: list[str] | None = None) -> int:
    """Console entry point: the one place where library errors become a clean line and an exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except ConvLlavaEdgeError as e:
        print(f"error: {e}", file=sys.stderr)  # plain: messages hold [shapes] that rich would read as markup
        return e.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as e:  # click's usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            err.print("aborted")
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
