"""checkpoint -> bundle folder, written whole or not at all.

Everything goes into a hidden temporary folder beside the target, which is renamed into place only
when complete. A failed or interrupted export removes its temporary folder and never touches an
existing bundle; ``force`` swaps an existing bundle out only after the new one is complete, and
only a folder that is a bundle (our manifest, nothing it does not list), never the checkpoint, the
tower or a folder holding either. Temporary folders carry their owner (PID, its start time, the
boot): those a killed export left behind are removed by the next export to the same place, those
of a live one are not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

from .. import __version__
from ..errors import ConfigError, ConvLlavaEdgeError, ExportError
from ..manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, FileRecord, LlmEntry, Manifest, SCHEMA_VERSION, VisionEntry,
                        check_relative, write_manifest)
from ..prompt import VICUNA_V1, ImageSlot, splice
from ..quantize.gguf_quant import DEFAULT_QUANT, QUANT_FTYPES, QuantReport
from ..quantize.onnx_variants import VARIANTS
from .checkpoint import TensorStore
from .gguf_convert import OUT_TYPES, GgufConversion
from .vision_export import VisionExport, export_vision
from .vision_model import open_vision_checkpoint

LLM_TYPES = tuple(QUANT_FTYPES) + tuple(OUT_TYPES)  # Q4_K_M Q4_0 Q5_K_M Q6_K Q8_0 F32 F16 BF16
AGREEMENT_QUESTIONS = ("Describe the image.", "What is in the picture?", "How many objects are there?")
AGREEMENT_IMAGES = 3  # generated pictures (export/probe_images.py) whose rows the LLM sees at export
AGREEMENT_ANSWER_TOKENS = 24  # per answer: enough positions to see where 4 bits change a choice

PARTIAL, OLD = ".partial-", ".old-"  # staging folders: ".OUT.partial-XXXX" (new bundle), ".OUT.old-XXXX" (swapped out)
OWNER_FILE = ".convllava-edge-owner.json"  # inside a staging folder: the export that writes it
MAX_BUNDLE_ENTRIES = 10_000  # a bundle holds tens of files; walking more is not worth it to decide


class Progress(Protocol):
    def stage(self, label: str) -> None: ...
    def advance(self, done: int, total: int) -> None: ...


class SilentProgress:
    def stage(self, label: str) -> None:
        pass

    def advance(self, done: int, total: int) -> None:
        pass


@dataclass(frozen=True)
class ExportOptions:
    vision_types: tuple[str, ...] = ("fp32",)  # graphs to ship; the first is the default at run time
    llm_type: str = DEFAULT_QUANT
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
        if self.llm_type not in LLM_TYPES:
            raise ConfigError(f"unknown LLM type {self.llm_type!r} (known: {', '.join(LLM_TYPES)})")
        if self.calibration_images is not None and "int8" not in self.vision_types:
            raise ConfigError("--calibration-images only applies to --vision-type int8")


@contextlib.contextmanager
def staging_folder(out: Path, force: bool, protect: Mapping[str, Path] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, else it is removed.

    ``protect``: {"the checkpoint": folder, ...}, folders ``out`` must neither be nor hold.
    """
    given, shown = out, _shown(out)
    out = Path(os.path.abspath(out))  # ".", ".." and "a/.." become the folder they name, with its own name
    check_out(given, force, protect)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {shown}: cannot create {out.parent}: {e.strerror or e}") from e
    remove_leftovers(out)
    tmp = _staging(out, PARTIAL, shown)
    try:
        _write_owner(tmp)
        yield tmp
        _apply_default_modes(tmp)
        check_out(given, force, protect)  # again: the place may have changed during a long export
        # Between this unlink and the rename a SIGKILL would leave an unmarked folder that no later
        # export removes: a window of two system calls, against one as long as the export without markers.
        (tmp / OWNER_FILE).unlink()
        _swap_into_place(tmp, out, shown)
    except BaseException:  # KeyboardInterrupt too: no half bundle is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _staging(out: Path, kind: str, shown: str) -> Path:
    """A new hidden folder ``.OUT<kind>XXXX`` beside ``out`` (kind: PARTIAL or OLD)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}{kind}", dir=out.parent))
    except OSError as e:
        raise ExportError(f"--out {shown}: cannot write in {out.parent}: {e.strerror or e}") from e


def _shown(out: Path) -> str:
    """``out`` as the user wrote it, with the folder it names when that is not obvious ('.', '..')."""
    full = os.path.abspath(out)
    return str(out) if str(out) == full or Path(out).name not in ("", "..") else f"{out} ({full})"


def check_out(out: Path, force: bool, protect: Mapping[str, Path] | None = None) -> None:
    """Refuse an ``--out`` that export must not write: before any work, and again before the swap.

    Inputs are compared by resolved path (symbolic links followed), so a link to the checkpoint or
    to a folder above it is refused too.
    """
    where = Path(os.path.abspath(out))
    shown = _shown(out)
    real = _resolve(where, f"--out {shown}")
    for role, folder in (protect or {}).items():
        source = _resolve(Path(folder), str(folder))
        if real == source or real in source.parents:
            what = "is" if real == source else "holds"
            raise ExportError(f"--out {shown} {what} {role} ({folder}); export never replaces its inputs")
    if os.path.lexists(where):
        if not force:
            raise ExportError(f"{shown} already exists (use --force to replace it)")
        if where.is_symlink():
            raise ExportError(f"{shown} is a symbolic link; --force only replaces bundle folders")
        if not where.is_dir():
            raise ExportError(f"{shown} exists and is not a folder")
        reason = not_a_bundle(where)
        if reason:
            raise ExportError(f"{shown} is not a convllava-edge bundle ({reason}); --force only replaces bundles")
        return
    ancestor = where.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"--out {shown}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"--out {shown}: cannot write in {ancestor} (permission denied)")


def _resolve(path: Path, shown: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symbolic link loop (Python < 3.13)
        raise ExportError(f"{shown}: cannot resolve the path: {getattr(e, 'strerror', None) or e}") from e


def not_a_bundle(folder: Path) -> str | None:
    """Why ``folder`` is not a bundle this tool wrote, in a few words; None when it is one.

    A bundle has our manifest (schema version, created_with) and nothing it does not list: --force
    deletes the whole folder, so a file the user put there makes it not ours. Listed files may be
    missing: replacing a damaged bundle is what --force is for. An empty folder counts as one: it
    holds nothing to lose (a folder made for the bundle beforehand).
    """
    manifest = folder / MANIFEST_NAME
    try:
        with os.scandir(folder) as entries:
            if next(entries, None) is None:
                return None
        info = manifest.lstat()
        if not stat.S_ISREG(info.st_mode):  # a link, a folder, a FIFO that would block the read
            return f"{MANIFEST_NAME} is not a regular file"
        if info.st_size > MAX_MANIFEST_BYTES:
            return f"{MANIFEST_NAME} is {info.st_size} bytes"
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST_NAME}"
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        return f"{MANIFEST_NAME} unreadable: {type(e).__name__}"
    if not isinstance(data, dict) or not str(data.get("created_with", "")).startswith("convllava-edge "):
        return f"{MANIFEST_NAME} was not written by convllava-edge"
    version = data.get("schema_version")
    # Any version this tool (SCHEMA_VERSION) or a later one wrote counts: replacing needs only the file list.
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version:
        return f"{MANIFEST_NAME} has schema_version {version!r}"
    listed = {MANIFEST_NAME}
    try:
        for record in data["files"]:
            check_relative(record["path"], str(manifest))
            listed.add(record["path"])
    except (KeyError, TypeError, ConvLlavaEdgeError):
        return f"{MANIFEST_NAME} has a malformed file list"
    # Not Manifest.from_dict: it asks whether the bundle can run; here only whose it is matters.
    parents = {str(parent) for p in listed for parent in PurePosixPath(p).parents}
    seen = 0

    def unreadable(e: OSError):
        raise e

    try:
        walk = list(os.walk(folder, onerror=unreadable))  # does not follow links: a linked folder is one entry
    except OSError as e:
        return f"cannot list {e.filename}: {e.strerror or e}"
    for root, dirs, files in walk:
        for name in dirs + files:
            seen += 1
            rel = (Path(root) / name).relative_to(folder).as_posix()
            is_dir = name in dirs and not os.path.islink(os.path.join(root, name))
            if (rel not in parents) if is_dir else (rel not in listed):
                return f"it holds {rel!r}, which its {MANIFEST_NAME} does not list"
            if seen > MAX_BUNDLE_ENTRIES:
                return f"it holds more than {MAX_BUNDLE_ENTRIES} entries"
    return None


def _swap_into_place(tmp: Path, out: Path, shown: str) -> None:
    if not os.path.lexists(out):
        # A folder that appeared since check_out would be replaced if empty (rename's rule): POSIX
        # has no portable "rename unless it exists" for folders (Linux's renameat2 is not in os).
        try:
            os.replace(tmp, out)
        except OSError as e:
            raise ExportError(f"--out {shown}: cannot move the new bundle into place: {e.strerror or e}") from e
        return
    old = _staging(out, OLD, shown)
    try:
        _write_owner(old)
        os.replace(out, old / "bundle")
    except OSError as e:
        shutil.rmtree(old, ignore_errors=True)
        raise ExportError(f"--out {shown}: cannot move the previous bundle aside: {e.strerror or e}") from e
    try:
        os.replace(tmp, out)
    except OSError as e:
        try:
            os.replace(old / "bundle", out)  # the previous bundle goes back where it was
        except OSError:
            (old / OWNER_FILE).unlink()  # no later export may clean it away: it is the only copy
            raise ExportError(f"--out {shown}: cannot move the new bundle into place ({e.strerror or e}), nor "
                              f"the previous one back: it is in {old / 'bundle'}") from e
        shutil.rmtree(old, ignore_errors=True)
        raise ExportError(f"--out {shown}: cannot move the new bundle into place: {e.strerror or e}") from e
    shutil.rmtree(old, ignore_errors=True)


# -- owners of staging folders ---------------------------------------------------------------------
# Linux's /proc is read by hand: psutil would do it but is not a dependency, and two small files
# (/proc/PID/stat, /proc/sys/kernel/random/boot_id) are all that is needed.
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: the process's start, in clock ticks since boot (None: unknown or gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "PID (comm) ", whose comm may hold spaces and ')'
    return fields[19] if len(fields) > 19 else None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _owner_record() -> dict:
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "boot_id": _boot_id(), "pid_namespace": _pid_namespace(),
            "host": socket.gethostname()}


def _write_owner(folder: Path) -> None:
    (folder / OWNER_FILE).write_text(json.dumps(_owner_record()) + "\n", encoding="utf-8")


def owner_alive(record: dict) -> bool:
    """Whether the export that wrote ``record`` may still run; True whenever that cannot be ruled out."""
    pid = record.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return True  # not a record we wrote
    if record.get("host") != socket.gethostname() or record.get("pid_namespace") != _pid_namespace():
        return True  # another machine (a shared folder) or container: its PIDs are not ours to look up
    boot = _boot_id()
    if boot is not None and record.get("boot_id") not in (None, boot):
        return False  # written before the last reboot: every process of that boot is gone
    if boot is not None and record.get("start") is not None:
        return _start_time(pid) == record["start"]  # None: no such process; another start: the PID was reused
    try:  # no /proc (macOS...): the PID alone; a reused PID keeps the folder, which is the safe side
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def remove_leftovers(out: Path) -> list[Path]:
    """Remove ``.OUT.partial-*`` / ``.OUT.old-*`` folders that carry our owner file and whose owner is gone."""
    removed = []
    prefixes = (f".{out.name}{PARTIAL}", f".{out.name}{OLD}")
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return removed  # the export itself will say what is wrong with the folder
    for entry in entries:
        if not entry.name.startswith(prefixes) or not entry.is_dir(follow_symlinks=False):
            continue
        marker = Path(entry.path) / OWNER_FILE
        try:
            if not marker.is_file() or marker.is_symlink() or marker.stat().st_size > 4096:
                continue
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and not owner_alive(record):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _umask() -> int:
    """The process's umask, read without changing it where /proc allows (Linux >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere set-and-restore is the only way: racy if another thread creates files meanwhile,
    # acceptable for a command-line export.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_default_modes(folder: Path) -> None:
    """The modes mkdir/open give under the umask (mkdtemp makes the folder 0700, whatever the umask)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name, mode in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # a link's own mode means nothing; its target is not ours
                os.chmod(path, mode & ~mask)


def export_bundle(checkpoint: Path, out: Path, options: ExportOptions, vision_tower: Path | None = None,
                  progress: Progress = SilentProgress()) -> Manifest:
    options.validate()
    checkpoint = Path(checkpoint)
    protect = {role: Path(p) for role, p in (("the checkpoint", checkpoint), ("the vision tower", vision_tower),
                                             ("the calibration images", options.calibration_images)) if p is not None}
    check_out(Path(out), options.force, protect)  # before any work: a refusal costs nothing
    if _is_llava_mini(checkpoint):
        from .bundle_mini import export_mini_bundle
        from .llava_mini import LlavaMiniConfig

        if options.calibration_images is not None:
            raise ConfigError("--calibration-images: static int8 is not available for LLaVA-Mini bundles yet "
                              "(their int8 graphs are dynamic)")
        LlavaMiniConfig.load(checkpoint)  # the config's checks, before anything is built
        with staging_folder(out, options.force, protect) as tmp:
            manifest = _recording_tower(export_mini_bundle(checkpoint, tmp, options, vision_tower, progress), vision_tower)
            write_manifest(tmp, manifest)
        return manifest
    ckpt = open_vision_checkpoint(checkpoint, vision_tower)
    with staging_folder(out, options.force, protect) as tmp:
        vision = export_vision(ckpt, tmp, options.vision_types, options.calibration_images, progress.stage,
                               options.threads)
        llm_path, conversion, report = export_llm(checkpoint, tmp, options, progress)
        agreement = None
        if report is not None:
            progress.stage(f"measuring {options.llm_type} against the unquantized LLM on image prompts")
            agreement = _llm_agreement(vision, llm_path, conversion, options)
        _drop_unshipped(vision, options.vision_types)
        manifest = _recording_tower(_manifest(tmp, checkpoint.name, vision, options.vision_types, llm_path, conversion,
                                              report, agreement), vision_tower)
        write_manifest(tmp, manifest)
    return manifest


def _recording_tower(manifest: Manifest, vision_tower: Path | None) -> Manifest:
    """The manifest with the tower folder it was exported from: check --reference CHECKPOINT finds it again."""
    if vision_tower is None:
        return manifest
    return dataclasses.replace(manifest, source={**manifest.source, "vision_tower": str(Path(vision_tower).resolve())})


def _is_llava_mini(checkpoint: Path) -> bool:
    from .config import read_json
    from .llava_mini import LLAVA_MINI_MODEL_TYPES

    return read_json(checkpoint / "config.json").get("model_type") in LLAVA_MINI_MODEL_TYPES


def export_llm(checkpoint: Path, folder: Path, options: ExportOptions,
               progress: Progress) -> tuple[Path, GgufConversion, QuantReport | None]:
    """Convert (and quantize) the LLM into ``folder``; returns the shipped file, conversion, quant report."""
    from ..quantize.gguf_quant import quantize_gguf
    from .gguf_convert import convert_llm
    from .vocab import check_tokenizer

    quantized = options.llm_type in QUANT_FTYPES
    base_type = _intermediate_type(checkpoint) if quantized else options.llm_type
    base = folder / (f"llm-{base_type.lower()}.unquantized.gguf" if quantized else f"llm-{base_type.lower()}.gguf")
    progress.stage(f"converting the LLM to GGUF {base_type}")
    conversion = convert_llm(checkpoint, base, base_type, progress=lambda i, n, name: progress.advance(i, n))
    progress.stage("checking the GGUF tokenizer against the checkpoint's")
    check_tokenizer(base, checkpoint)
    if not quantized:
        return base, conversion, None
    progress.stage(f"quantizing the LLM to {options.llm_type} (llama.cpp)")
    final = folder / f"llm-{options.llm_type.lower()}.gguf"
    report = quantize_gguf(base, final, options.llm_type, options.threads, lambda i, n, name: progress.advance(i, n))
    return final, conversion, report


def _intermediate_type(checkpoint: Path) -> str:
    """Quantize from the checkpoint's own precision: BF16 and F16 hold bf16/fp16 weights exactly."""
    store = TensorStore(checkpoint)
    dtype = store.info("model.embed_tokens.weight").dtype
    return {torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F32")


def _llm_agreement(vision: VisionExport, llm_path: Path, conversion: GgufConversion, options: ExportOptions) -> dict:
    """Quantized vs unquantized GGUF where a user meets it: the distributions answers are drawn from.

    Rows as at run time: image rows from the bundle's own default vision graph on a few generated
    images, the template's text tokenized as the runtime does, then the unquantized model's own greedy
    answer. KL and top-1 are taken at the answer's positions only (the last prompt position and each
    answer token): the positions inside the system prompt and the question are never sampled from,
    and a small model's guesses there (what word comes next in a question) are noise that rounding
    flips freely (the demo measured KL p99 19.8 there, 0.59 on its answers through `check`).
    """
    from ..llm import LlamaCppBackend
    from ..pipeline import PromptTokenizer
    from ..preprocess import preprocess
    from ..quantize.accuracy import compare_logits, sequence_logits
    from ..vision import OnnxVisionEncoder
    from .probe_images import probe_images

    shipped = next(g for g in vision.graphs if g.variant == options.vision_types[0])
    encoder = OnnxVisionEncoder(shipped.path, "cpu", options.threads)
    images = [encoder.encode(preprocess(im, vision.preprocess)) for im in probe_images(AGREEMENT_IMAGES, seed=3)]
    del encoder  # its memory before the LLMs'
    # One model at a time, both written by this export a moment ago (no trial load in a child): a 7B's F16
    # reference (13.5 GB) and its Q4 file together thrashed a 24 GB machine. The reference loads without
    # extra buffer types: their repacked (AMX) copy of F16 weights doubled its memory.
    ref = LlamaCppBackend(conversion.path, n_ctx=1024, threads=options.threads, kv_f32=True, trial=False,
                          extra_bufts=False)
    vocab = conversion.vocab
    tokenizer = PromptTokenizer(ref, {"kind": "sentencepiece", "add_space_prefix": vocab.add_space_prefix,
                                      "space_after_special": vocab.legacy})
    sequences, ref_logits = [], []
    for n, embeds in enumerate(images):
        slot = ImageSlot(f"probe{n}", len(embeds))
        for question in AGREEMENT_QUESTIONS:
            items = tokenizer.items(VICUNA_V1.render([(question, None)]), slot)
            answer, rows = _greedy_answer(ref, items, {slot.key: embeds})
            ref_logits.append(rows)
            sequences.append((list(items) + answer, {slot.key: embeds}, len(rows)))
    ref.close()
    cand = LlamaCppBackend(llm_path, n_ctx=1024, threads=options.threads, kv_f32=True, trial=False)
    cand_logits = [sequence_logits(cand, seq, embeds)[-n_rows:] for seq, embeds, n_rows in sequences]
    cand.close()
    conversion.path.unlink()  # the unquantized file was only needed as the reference
    agreement = compare_logits(ref_logits, cand_logits)
    return {**agreement.to_dict(),
            "measured_on": f"{agreement.n_positions} answer positions: the unquantized model's greedy answers to "
                           f"{len(AGREEMENT_QUESTIONS)} questions about {len(images)} generated images "
                           f"(image rows from the {shipped.variant} graph)"}


def _greedy_answer(backend, items, embeds: dict, max_tokens: int = AGREEMENT_ANSWER_TOKENS) -> tuple[list[int], np.ndarray]:
    """The model's own greedy continuation of ``items`` (stops at its end-of-generation token), and its
    logits at the last prompt position and after each answer token: [len(answer) + 1, n_vocab]."""
    from ..quantize.accuracy import sequence_logits

    rows = [sequence_logits(backend, items, embeds)[-1]]
    answer: list[int] = []
    while len(answer) < max_tokens:
        token = int(np.argmax(rows[-1]))
        if backend.is_end(token):
            break
        answer.append(token)
        backend.eval_tokens([token])
        rows.append(backend.logits())
    return answer, np.stack(rows)


def _drop_unshipped(vision: VisionExport, vision_types: Sequence[str]) -> None:
    for g in vision.graphs:  # the fp32 graph is always made (it is the reference); drop it if not asked for
        if g.variant not in vision_types:
            for f in g.files:
                f.unlink()


def _manifest(bundle: Path, name: str, vision: VisionExport, vision_types: Sequence[str], llm_path: Path,
              conversion: GgufConversion, report: QuantReport | None, agreement: dict | None) -> Manifest:
    entries, records = [], []
    for g in (g for g in vision.graphs if g.variant in vision_types):
        files = tuple(f.relative_to(bundle).as_posix() for f in g.files)
        entries.append(VisionEntry(variant=g.variant, graph=files[0], files=files, method=g.method,
                                   tensorrt_ready=g.lint.passed,
                                   accuracy=g.accuracy.to_dict() if g.accuracy else None))
        records += [FileRecord.of(bundle, f) for f in g.files]
    records.append(FileRecord.of(bundle, llm_path))
    llm_type = report.requested if report else conversion.out_type
    tensor_types = report.tensor_types if report else conversion.tensor_types
    h, w = vision.preprocess.crop_size
    fp32 = next(g for g in vision.graphs if g.variant == "fp32")
    vocab = conversion.vocab
    return Manifest(
        schema_version=SCHEMA_VERSION, family="convllava", name=name, created_with=f"convllava-edge {__version__}",
        files=tuple(records), preprocess={**vision.preprocess.to_dict(), "aspect": "pad"}, n_embd=vision.n_embd,
        tokens_per_image={"stride": vision.stride, "rule": f"(H / {vision.stride}) * (W / {vision.stride})",
                          "square": (h // vision.stride) * (w // vision.stride)},
        vision=tuple(entries), tower=vision.tower,
        llm=LlmEntry(file=llm_path.name, type=llm_type, tensor_types=tensor_types,
                     n_ctx_train=conversion.context_length, fallbacks=len(report.fallbacks) if report else 0),
        template=VICUNA_V1.to_dict(),
        tokenizer={"kind": "sentencepiece", "add_space_prefix": vocab.add_space_prefix,
                   "space_after_special": vocab.legacy},
        accuracy={"vision_fp32_vs_pytorch": {f"{r.height}x{r.width}": r.rel_error for r in fp32.validation},
                  "vision_fp32_tolerance": fp32.validation[0].tolerance if fp32.validation else None,
                  "llm_vs_unquantized": agreement,
                  "llm_fallback_warning": report.warning() if report else None},
        source={"checkpoint": name, "notes": vision.notes},
    )
