"""checkpoint -> bundle folder, written whole or not at all.

Everything goes into a hidden temporary folder beside the target, which is renamed into place only
when complete. A failed or interrupted export removes its temporary folder and never touches an
existing bundle; ``force`` swaps an existing bundle out only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .. import __version__
from ..errors import ConfigError, ExportError
from ..manifest import FileRecord, Manifest, SCHEMA_VERSION, VisionEntry, write_manifest
from ..quantize.onnx_variants import VARIANTS
from .vision_export import VisionExport, export_vision
from .vision_model import open_vision_checkpoint

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    vision_types: tuple[str, ...] = ("fp32",)  # graphs to ship; the first is the default at run time
    calibration_images: Path | None = None  # static int8 when given, dynamic otherwise
    force: bool = False  # replace an existing bundle
    threads: int | None = None

    def validate(self) -> None:
        if not self.vision_types:
            raise ConfigError("at least one --vision-type is needed")
        for v in self.vision_types:
            if v not in VARIANTS:
                raise ConfigError(f"unknown vision type {v!r} (known: {', '.join(VARIANTS)})")
        if len(set(self.vision_types)) != len(self.vision_types):
            raise ConfigError(f"vision types repeat: {', '.join(self.vision_types)}")
        if self.calibration_images is not None and "int8" not in self.vision_types:
            raise ConfigError("--calibration-images only applies to --vision-type int8")


@contextlib.contextmanager
def staging_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, else it is removed."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:  # KeyboardInterrupt too: no half bundle is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "bundle")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(checkpoint: Path, out: Path, options: ExportOptions, vision_tower: Path | None = None,
                  progress: Progress = lambda msg: None) -> Manifest:
    options.validate()
    ckpt = open_vision_checkpoint(checkpoint, vision_tower)
    with staging_folder(out, options.force) as tmp:
        vision = export_vision(ckpt, tmp, options.vision_types, options.calibration_images, progress, options.threads)
        manifest = _manifest(tmp, Path(checkpoint).name, vision, options.vision_types)
        write_manifest(tmp, manifest)
    return manifest


def _manifest(bundle: Path, name: str, vision: VisionExport, vision_types: Sequence[str]) -> Manifest:
    shipped = [g for g in vision.graphs if g.variant in vision_types]
    for g in vision.graphs:  # the fp32 graph is always made (it is the reference); drop it if not asked for
        if g.variant not in vision_types:
            for f in g.files:
                f.unlink()
    entries, records = [], []
    for g in shipped:
        files = tuple(f.relative_to(bundle).as_posix() for f in g.files)
        entries.append(VisionEntry(variant=g.variant, graph=files[0], files=files, method=g.method,
                                   tensorrt_ready=g.lint.passed,
                                   accuracy=g.accuracy.to_dict() if g.accuracy else None))
        records += [FileRecord.of(bundle, f) for f in g.files]
    h, w = vision.preprocess.crop_size
    square = (h // vision.stride) * (w // vision.stride)
    fp32 = next(g for g in vision.graphs if g.variant == "fp32")
    return Manifest(
        schema_version=SCHEMA_VERSION, family="convllava", name=name, created_with=f"convllava-edge {__version__}",
        files=tuple(records), preprocess={**vision.preprocess.to_dict(), "aspect": "pad"}, n_embd=vision.n_embd,
        tokens_per_image={"stride": vision.stride, "rule": f"(H / {vision.stride}) * (W / {vision.stride})",
                          "square": square},
        vision=tuple(entries),
        accuracy={"vision_fp32_vs_pytorch": {f"{r.height}x{r.width}": r.rel_error for r in fp32.validation},
                  "vision_fp32_tolerance": fp32.validation[0].tolerance if fp32.validation else None},
        source={"checkpoint": name, "notes": vision.notes},
    )
