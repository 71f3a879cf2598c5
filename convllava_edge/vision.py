"""A bundle's vision side, opened in one place: the family's graphs, loaded by a vision backend.

``ask``, ``encode``, ``check`` and ``bench`` all get their encoder from here. ``choose_vision`` decides what
runs when the user did not say: with ``--vision-backend auto`` (the default) every pair of the bundle's vision
types within the accuracy gate and the backends that can run it here is timed once on this machine, and the
fastest is kept in a record beside the embedding cache (per bundle, CPU, thread count and library versions),
so later runs read the choice instead of measuring again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import open_vision_backend, remote_vision_kind, vision_kind, vision_kinds
from .backends.base import VisionBackend
from .errors import ConfigError, ConvLlavaEdgeError, unknown_choice
from .families import VisionEncoder, family_for
from .manifest import Manifest, VisionEntry, resolve_inside

AUTO = "auto"
ENV_BACKEND = "CONVLLAVA_EDGE_VISION_BACKEND"  # the default of --vision-backend (tests pin it)
# A vision type auto may pick: check's vision gates (check/stages.py reads them from here).
VISION_GATE = {"cosine_mean": 0.99, "cosine_min": 0.95}
CALIBRATION_SIDE = 768  # px at most: a 1536 px bundle is timed at 768 (a quarter of the work, the same ranking)
CALIBRATION_RUNS = 2  # timed encodes per candidate, after one untimed (compilation, arena growth)
CLEARLY_SLOWER = 4.0  # a candidate whose untimed run already took this many times the best is not timed further
CHOICE_VERSION = 1
# The order candidates are timed in, the likely fast first, so that the clearly slower stop after one run; its
# first is also what answers while a background calibration runs. Measured (RESULTS.md): on AMX, bf16 on OpenVINO
# and int8 on ONNX Runtime are level (2.2 s, 2.3 s at 768 px); without AMX int8 wins (AMD EPYC: 1.85 s against
# 2.65 s; no bf16 at all on an Ice Lake), and OpenVINO's compile of a big graph adds ~10 s to a first load.
LIKELY_FASTEST_AMX = ("bf16", "int8", "fp16", "fp32")
LIKELY_FASTEST_OTHER = ("int8", "bf16", "fp16", "fp32")


def likely_fastest() -> tuple[str, ...]:
    from .machine import cpu_info

    return LIKELY_FASTEST_AMX if "amx_bf16" in cpu_info()["flags"] else LIKELY_FASTEST_OTHER


def precision_of(entry: VisionEntry) -> str:
    """The arithmetic a vision type runs in: bf16 for the bf16 type, fp32 for every other (fp16 and int8 graphs
    compute what they do not quantize in fp32)."""
    return "bf16" if entry.variant == "bf16" else "fp32"


def backend_choices() -> tuple[str, ...]:
    """What --vision-backend takes: auto, or a registered backend that runs here."""
    return (AUTO,) + tuple(k.name for k in vision_kinds())


def default_backend() -> str:
    kind = os.environ.get(ENV_BACKEND) or AUTO
    if kind not in backend_choices():
        raise ConfigError(f"${ENV_BACKEND}={kind!r}: expected one of {', '.join(backend_choices())}")
    return kind


def open_encoder(bundle: str | os.PathLike, manifest: Manifest, entry: VisionEntry | str | None = None,
                 device: str = "auto", threads: int | None = None, backend: VisionBackend | None = None,
                 kind: str = "onnxruntime") -> VisionEncoder:
    """The encoder of ``entry`` (a VisionEntry, a variant name, or None for the bundle's default) on the
    vision backend ``kind`` (or ``backend``, already open)."""
    if not isinstance(entry, VisionEntry):
        entry = manifest.vision_entry(entry)
    family = family_for(manifest.family)
    backend = backend or open_vision_backend(device, threads, kind, precision=precision_of(entry))
    graphs = {role: backend.load(resolve_inside(Path(bundle), file), *family.graphs[role])
              for role, file in family.graph_files(entry).items()}
    return family.encoder(graphs, backend)


# -- which backend can run what (each backend says: backends/__init__.py) ------------------------------
def can_run(kind: str, entry: VisionEntry, device: str = "auto") -> bool:
    """Whether backend ``kind`` runs ``entry`` here as it is meant to (a cheap test: no graph is opened)."""
    return vision_kind(kind).can_run(precision_of(entry), device)


def runnable_kind(entry: VisionEntry, device: str = "auto", preferred: str = "onnxruntime") -> str:
    """``preferred`` when it can run ``entry``, else the first backend that can (``check`` runs a bundle's
    every type, bf16 included); ``preferred`` when none can, so that its refusal is the message."""
    if can_run(preferred, entry, device):
        return preferred
    return next((k.name for k in vision_kinds() if k.can_run(precision_of(entry), device)), preferred)


def accuracy_cosines(variant: str, accuracy: dict | None) -> tuple[float, float]:
    """(cosine_mean, cosine_min) of a vision type against fp32 as the export measured it (``accuracy``: its
    manifest entry's); for several graphs (LLaVA-Mini: clip, compress, prefusion) the worst of them. fp32 itself:
    (1, 1); not measured: nan (never chosen unasked)."""
    if variant == "fp32":
        return 1.0, 1.0
    accuracy = accuracy or {}
    parts = [accuracy] if "cosine_mean" in accuracy else [a for a in accuracy.values() if isinstance(a, dict)]
    try:
        return min(float(p["cosine_mean"]) for p in parts), min(float(p["cosine_min"]) for p in parts)
    except (KeyError, TypeError, ValueError):
        return float("nan"), float("nan")


def gate_passed(variant: str, accuracy: dict | None) -> bool:
    mean, low = accuracy_cosines(variant, accuracy)
    return mean >= VISION_GATE["cosine_mean"] and low >= VISION_GATE["cosine_min"]


def cosines(entry: VisionEntry) -> tuple[float, float]:
    return accuracy_cosines(entry.variant, entry.accuracy)


def within_gate(entry: VisionEntry) -> bool:
    return gate_passed(entry.variant, entry.accuracy)


# -- the choice ---------------------------------------------------------------------------------------
@dataclass
class VisionChoice:
    entry: VisionEntry
    kind: str  # the backend's registered name (backends/__init__.py)
    how: str  # asked | only candidate | calibrated | cached | provisional (being timed in the background)
    seconds: dict[str, float] = field(default_factory=dict)  # "variant/backend" -> encode seconds (calibration)

    def to_dict(self) -> dict:
        return {"vision_type": self.entry.variant, "vision_backend": self.kind, "how": self.how,
                "precision": precision_of(self.entry), "calibration_s": self.seconds}


def candidates(manifest: Manifest, variant: str | None, device: str) -> list[tuple[VisionEntry, str]]:
    """(type, backend) pairs auto chooses among: the asked type, or every type within the gate (the bundle's
    default always, as its author chose it); each with every backend that runs it here."""
    entries = [manifest.vision_entry(variant)] if variant is not None else \
        [e for i, e in enumerate(manifest.vision) if i == 0 or within_gate(e)]
    order = likely_fastest()
    entries.sort(key=lambda e: order.index(e.variant) if e.variant in order else len(order))
    pairs = [(e, k.name) for e in entries for k in vision_kinds() if k.can_run(precision_of(e), device)]
    if not pairs:  # e.g. a bf16-only bundle on a CPU without bf16: the backend's refusal says why
        pairs = [(entries[0], runnable_kind(entries[0], device))]
    return pairs


def choose_vision(bundle: str | os.PathLike, manifest: Manifest, variant: str | None = None, device: str = "auto",
                  threads: int | None = None, kind: str | None = None,
                  progress: Callable[[str], None] | None = None,
                  timer: Callable[[str, VisionEncoder, np.ndarray, float | None], float] | None = None,
                  url: str | None = None, calibrate: str = "now") -> tuple[VisionChoice, VisionEncoder]:
    """What runs the vision graphs, and its open encoder. ``kind``: a backend name (used as asked), "auto", or
    None (``$CONVLLAVA_EDGE_VISION_BACKEND``, else auto). ``timer(label, encoder, pixels, best)`` gives a candidate's
    seconds per image (label "variant/backend"; best: the fastest so far, or None; tests inject theirs).
    ``url``: a Triton server that runs the graphs (``--vision-url``), in place of a backend here.
    ``calibrate``: "now" times the candidates before returning when no record holds the choice; "later" returns
    the likely fastest (the candidates' first) at once and times them in a background process (calibrate.py)."""
    if url is not None:
        remote = remote_vision_kind()
        if kind not in (None, AUTO):
            raise ConfigError(f"--vision-url runs the graphs on a {remote.name} server: leave out --vision-backend {kind}")
        entry = manifest.vision_entry(variant)
        return VisionChoice(entry, remote.name, "asked"), open_encoder(
            bundle, manifest, entry, backend=remote.open_remote(Path(bundle), manifest, entry, url))
    kind = kind or default_backend()
    if kind not in backend_choices():
        raise unknown_choice("vision backend", kind, backend_choices())
    if kind != AUTO:
        entry = manifest.vision_entry(variant)
        return VisionChoice(entry, kind, "asked"), open_encoder(bundle, manifest, entry, device, threads, kind=kind)
    pairs = candidates(manifest, variant, device)
    if len(pairs) == 1:
        entry, chosen = pairs[0]
        return VisionChoice(entry, chosen, "only candidate"), open_encoder(bundle, manifest, entry, device, threads,
                                                                           kind=chosen)
    from .records import read_record, write_record

    name = _record_name(manifest, pairs, device, threads)
    record = read_record(name)
    by_name = {(e.variant, k): (e, k) for e, k in pairs}
    if record is not None and (record.get("vision_type"), record.get("vision_backend")) in by_name:
        entry, chosen = by_name[(record["vision_type"], record["vision_backend"])]
        seconds = {str(k): float(v) for k, v in record.get("calibration_s", {}).items()}
        return VisionChoice(entry, chosen, "cached", seconds), open_encoder(bundle, manifest, entry, device, threads,
                                                                            kind=chosen)
    if calibrate == "later":
        entry, chosen = pairs[0]
        defer_calibration(Path(bundle), device, threads, name, progress)
        if progress:
            progress(f"vision: {entry.variant} on {chosen} for now; the others are timed after this answer, in "
                     "the background (once per bundle on this machine)")
        return VisionChoice(entry, chosen, "provisional"), open_encoder(bundle, manifest, entry, device, threads,
                                                                        kind=chosen)
    choice, encoder = _calibrate(bundle, manifest, pairs, device, threads, progress, timer or _time_encode)
    write_record(name, {**choice.to_dict(), "bundle": manifest.name, "threads": threads,
                        "date": time.strftime("%Y-%m-%d")})
    return choice, encoder


def cached_choice(manifest: Manifest, device: str = "auto", threads: int | None = None) -> dict | None:
    """The calibration ``auto`` recorded for this bundle here, if any (``info`` shows it; nothing runs)."""
    from .records import read_record

    pairs = candidates(manifest, None, device)
    return None if len(pairs) == 1 else read_record(_record_name(manifest, pairs, device, threads))


def _calibrate(bundle, manifest: Manifest, pairs, device: str, threads: int | None, progress, timer):
    config = manifest.preprocess
    h, w = (max(config.stride, min(side, CALIBRATION_SIDE) // config.stride * config.stride) for side in config.crop_size)
    pixels = np.random.default_rng(0).normal(0, 1, size=(1, 3, h, w)).astype(np.float32)  # cost is content-blind
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    best: tuple[float, VisionEntry, str, VisionEncoder] | None = None
    for entry, kind in pairs:
        label = f"{entry.variant}/{kind}"
        if progress:
            progress(f"timing the {entry.variant} vision type on {kind} (once per bundle on this machine)")
        try:
            encoder = open_encoder(bundle, manifest, entry, device, threads, kind=kind)
            seconds[label] = timer(label, encoder, pixels, best[0] if best else None)
        except ConvLlavaEdgeError as e:  # a backend that cannot run it here after all: not a candidate
            if progress:
                progress(f"{label}: {e}")
            continue
        if best is None or seconds[label] < best[0]:
            best = (seconds[label], entry, kind, encoder)  # the encoder it replaces is freed here
        del encoder
    if best is None:
        raise ConfigError(f"{manifest.name}: no vision backend can run this bundle's graphs here "
                          f"(tried {', '.join(f'{e.variant}/{k}' for e, k in pairs)})")
    _, entry, kind, encoder = best
    if progress:
        progress(f"vision: {entry.variant} on {kind} is the fastest here ({time.perf_counter() - started:.0f} s "
                 "to find out; kept for this bundle on this machine)")
    return VisionChoice(entry, kind, "calibrated", seconds), encoder


def _time_encode(label: str, encoder: VisionEncoder, pixels: np.ndarray, best: float | None) -> float:
    t = time.perf_counter()
    encoder.encode(pixels)  # compilation, arena growth
    first = time.perf_counter() - t
    if best is not None and first > CLEARLY_SLOWER * best:
        return first  # even with its one-off costs counted, far behind: not worth timing further
    times = []
    for _ in range(CALIBRATION_RUNS):
        t = time.perf_counter()
        encoder.encode(pixels)
        times.append(time.perf_counter() - t)
    return min(times)


def claim_name(record: str) -> str:
    return record.removesuffix(".json") + ".calibrating"


_DEFERRED: list[tuple] = []  # calibrations chosen "later", started once an answer is out (or at exit)


def defer_calibration(bundle: Path, device: str, threads: int | None, record: str, progress) -> None:
    """Time the candidates in the background once this process has answered (start_deferred_calibrations):
    measured on the AMD EPYC (2 cores, 768 px bundle), a calibration running beside the first answer, even at the
    lowest priority, made it take 22.6 s instead of 10.3 s (both read the same gigabyte of graphs and share the
    memory bandwidth); started after it, the first answer costs what a pinned one does."""
    import atexit

    if not _DEFERRED:
        atexit.register(start_deferred_calibrations)  # a library caller that never answers still gets it
    _DEFERRED.append((bundle, device, threads, record, progress))


def start_deferred_calibrations() -> list[int]:
    """Start the calibrations deferred so far (Model calls this after an answer, the CLI after a command); their PIDs."""
    pids = []
    while _DEFERRED:
        bundle, device, threads, record, progress = _DEFERRED.pop(0)
        pid = start_calibration(bundle, device, threads, record)
        if pid is not None:
            pids.append(pid)
            if progress:
                progress(f"timing the vision candidates in the background (process {pid}, once per bundle on "
                         "this machine)")
    return pids


def start_calibration(bundle: Path, device: str, threads: int | None, record: str) -> int | None:
    """Start calibrate.py's background calibration of ``bundle`` unless one is already running for ``record``; its PID."""
    import subprocess
    import sys

    from .records import claim_holder

    if claim_holder(claim_name(record)) is not None:
        return None
    command = [sys.executable, "-m", "convllava_edge.calibrate", str(Path(bundle).resolve()), "--device", device,
               "--record", record]
    if threads:
        command += ["--threads", str(threads)]
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    except OSError:  # no process to spare: the next run tries again
        return None
    return process.pid


def _record_name(manifest: Manifest, pairs, device: str, threads: int | None) -> str:
    from . import __version__
    from .machine import cpu_digest, installed_version as installed
    from .threads import default_threads

    shas = {f.path: f.sha256 for f in manifest.files}
    key = json.dumps([CHOICE_VERSION, __version__, cpu_digest(), device, threads or default_threads(),
                      sorted(f"{e.variant}/{k}:" + "+".join(shas.get(f, "") for f in e.files) for e, k in pairs),
                      installed("onnxruntime") or installed("onnxruntime-gpu"), installed("openvino")])
    return f"vision-choice-{hashlib.sha256(key.encode()).hexdigest()[:40]}.json"


__all__ = ["AUTO", "VisionChoice", "VisionEncoder", "backend_choices", "choose_vision", "open_encoder"]
