"""``convllava-edge deploy triton``: a bundle's vision graphs as a Triton Inference Server model repository, and
the checks that keep such a repository loadable (the ``triton`` extra: onnx, tritonclient).

Each graph of the chosen vision type becomes ``REPO/<model>/config.pbtxt`` + ``1/model.onnx`` (its external
data alongside, under the name the graph refers to), copied byte for byte, for Triton's ONNX Runtime backend
(``platform: "onnxruntime_onnx"``): inputs and outputs with the graph's names, dtypes and dims (symbolic ones as
-1), ``max_batch_size: 0`` (the graphs carry their own batch axis), an ``instance_group``, and on request the
TensorRT accelerator. Model names are ``<bundle name>_<role>`` (``triton_model_name``): the Triton vision
backend (backends/vision_triton.py) finds them from the bundle alone. No ensemble: ConvLLaVA has one graph, and
LLaVA-Mini's pre-fusion takes each prompt's token ids, so the runtime calls its graphs one by one anyway.

``check_repository`` parses every config.pbtxt into tritonclient's ``ModelConfig`` protobuf, as Triton does
(unknown fields and enum names fail there), then checks what protobuf cannot see: the platform, the name
against the folder, the version folder, each input's and output's dtype and dims against the graph itself.

``--force`` follows export's rule (export/staging.py): each model folder deploy writes carries ``MARKER``,
the list of its files, and a folder of the same name is replaced only if it carries that list and holds
nothing else (an empty folder too: nothing to lose); a user's notes, an extra version folder or a model of
another tool make it a one-line refusal. Folders get the umask's modes, as ``mkdir`` would give them
(``mkdtemp`` makes them 0700): Triton often runs as another user, in a container.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .backends.vision_triton import VERSION, triton_model_name
from .errors import ConfigError, ConvLlavaEdgeError
from .manifest import check_relative, load_manifest, resolve_inside
from .files import TooManyEntries, apply_default_modes, first_unlisted

PLATFORM = "onnxruntime_onnx"
# ONNX TensorProto element types -> Triton's DataType names (the ones these graphs use, and their neighbours)
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 6: "TYPE_INT32",
                  7: "TYPE_INT64", 9: "TYPE_BOOL", 2: "TYPE_UINT8", 3: "TYPE_INT8"}
TENSORRT_PRECISIONS = {"fp16": "FP16", "int8": "INT8"}
MARKER = ".convllava-edge-deploy.json"  # in each model folder deploy writes: {"created_with", "files"}
# A marker lists a config, a graph and its data files: a few hundred bytes. Past these a folder is not ours.
MAX_MARKER_BYTES = 1 << 20
MAX_MODEL_ENTRIES = 10_000


@dataclass(frozen=True)
class TritonOptions:
    vision_type: str | None = None  # the bundle's default when None
    instances: int = 1
    tensorrt: str | None = None  # fp16 | int8: the TensorRT execution accelerator (GPU instances)
    gpu: bool = False  # GPU instances (CUDA) without TensorRT
    force: bool = False  # replace model folders of the same names

    def validate(self) -> None:
        if self.instances < 1:
            raise ConfigError(f"--instances must be at least 1, got {self.instances}")
        if self.tensorrt is not None and self.tensorrt not in TENSORRT_PRECISIONS:
            raise ConfigError(f"--tensorrt {self.tensorrt!r}: one of {', '.join(TENSORRT_PRECISIONS)}")


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise ConfigError(f"deploy triton needs the triton extra (pip install 'convllava-edge[triton]'): {e}") from None
    return onnx


def graph_io(path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """The graph's inputs and outputs as (name, Triton dtype, dims with -1 for symbolic ones), read from its
    protobuf without the weights."""
    model = _load_graph(path)

    def rows(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in ONNX_TO_TRITON:
                raise ConfigError(f"{path}: {v.name} has ONNX element type {t.elem_type}, which Triton has no type for")
            out.append((v.name, ONNX_TO_TRITON[t.elem_type],
                        [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]))
        return out
    return rows(model.graph.input), rows(model.graph.output)


def config_text(name: str, graph: Path, options: TritonOptions) -> str:
    inputs, outputs = graph_io(graph)

    def tensors(rows) -> str:
        return ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {", ".join(map(str, d))} ]\n  }}'
                          for n, t, d in rows)
    kind = "KIND_GPU" if options.gpu or options.tensorrt else "KIND_CPU"
    text = (f'name: "{name}"\nplatform: "{PLATFORM}"\nmax_batch_size: 0\n'
            f"input [\n{tensors(inputs)}\n]\noutput [\n{tensors(outputs)}\n]\n"
            f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {kind}\n  }}\n]\n"
            f'version_policy: {{ specific: {{ versions: [ {VERSION} ] }} }}\n')
    if options.tensorrt:
        text += ("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
                 '        name: "tensorrt"\n'
                 f'        parameters {{ key: "precision_mode" value: "{TENSORRT_PRECISIONS[options.tensorrt]}" }}\n'
                 '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
                 "      }\n    ]\n  }\n}\n")
    return text


def deploy_triton(bundle: Path, repo: Path, options: TritonOptions = TritonOptions()) -> list[Path]:
    """Write the model folders into ``repo`` (created if needed; other models in it are left alone), each built
    in a temporary folder inside it and renamed into place when complete and checked. Returns the folders."""
    from .families import family_for

    options.validate()
    bundle = Path(bundle)
    manifest = load_manifest(bundle, verify=True)
    entry = manifest.vision_entry(options.vision_type)
    if options.tensorrt and not entry.tensorrt_ready:
        raise ConfigError(f"{bundle}: the {entry.variant} vision type is not TensorRT-ready (convllava-edge lint "
                          "says why); deploy another --vision-type, or without --tensorrt")
    files = family_for(manifest.family).graph_files(entry)
    repo = Path(repo)
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"--out {repo} exists and is not a folder (a Triton model repository is a folder)") from None
    except OSError as e:
        raise ConfigError(f"--out {repo}: cannot create it: {e.strerror or e}") from None
    targets = {role: repo / triton_model_name(manifest, role) for role in files}
    existing = [t for t in targets.values() if os.path.lexists(t)]
    if existing and not options.force:
        raise ConfigError(f"{existing[0]} exists: remove it or pass --force (other folders of {repo} are kept)")
    for target in existing:  # before any work, and again before each swap
        check_replaceable(target)
    written = []
    for role, file in files.items():
        graph = resolve_inside(bundle, file)
        staging = _staging(targets[role], "partial")
        try:
            version = staging / VERSION
            version.mkdir()
            shutil.copyfile(graph, version / "model.onnx")
            for data in external_data(graph):  # under the names the graph's references use
                shutil.copyfile(resolve_inside(graph.parent, data), version / data)
            (staging / "config.pbtxt").write_text(config_text(targets[role].name, graph, options))
            check_model(staging, name=targets[role].name)
            _write_marker(staging)
            apply_default_modes(staging)
            _swap_into_place(staging, targets[role])
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise ConfigError(f"{targets[role]}: cannot write: {e.strerror or e}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        written.append(targets[role])
    return written


def _staging(target: Path, kind: str) -> Path:
    """A new hidden folder ``.NAME.<kind>-XXXX`` beside ``target`` (kind: partial, old)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    except OSError as e:
        raise ConfigError(f"--out {target.parent}: cannot write in it: {e.strerror or e}") from None


def _write_marker(folder: Path) -> None:
    from . import __version__

    files = sorted((Path(root) / name).relative_to(folder).as_posix()
                   for root, _, names in os.walk(folder) for name in names)
    record = {"created_with": f"convllava-edge {__version__}", "files": files}
    (folder / MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def not_ours(folder: Path) -> str | None:
    """Why ``--force`` may not replace ``folder``, in a few words; None when deploy wrote it (its marker, nothing
    it does not list) or it is empty. Listed files may be missing: replacing a damaged model is what it is for."""
    if folder.is_symlink():
        return "it is a symbolic link"
    if not folder.is_dir():
        return "it is not a folder"
    marker = folder / MARKER
    try:
        with os.scandir(folder) as entries:
            if next(entries, None) is None:
                return None
        info = marker.lstat()
        if not stat.S_ISREG(info.st_mode):  # a link, a folder, a FIFO that would block the read
            return f"its {MARKER} is not a regular file"
        if info.st_size > MAX_MARKER_BYTES:
            return f"its {MARKER} is {info.st_size} bytes"
        record = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {MARKER}, so deploy triton did not write it"
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        return f"its {MARKER} is unreadable ({type(e).__name__})"
    if not isinstance(record, dict) or not str(record.get("created_with", "")).startswith("convllava-edge "):
        return f"its {MARKER} was not written by convllava-edge"
    listed = {MARKER}
    try:
        for path in record["files"]:
            check_relative(path, str(marker))  # a TypeError for a path that is not a string
            listed.add(path)
    except (KeyError, TypeError, ConvLlavaEdgeError):
        return f"its {MARKER} has a malformed file list"
    try:
        extra = first_unlisted(folder, listed, MAX_MODEL_ENTRIES)
    except OSError as e:
        return f"cannot list {e.filename}: {e.strerror or e}"
    except TooManyEntries:
        return f"it holds more than {MAX_MODEL_ENTRIES} entries"
    return None if extra is None else f"it holds {extra!r}, which its {MARKER} does not list"


def check_replaceable(target: Path) -> None:
    reason = not_ours(target)
    if reason:
        raise ConfigError(f"{target} is not a model folder deploy triton wrote ({reason}); --force replaces only "
                          "those: move it away or remove it yourself")


def _swap_into_place(staging: Path, target: Path) -> None:
    """``staging`` renamed to ``target``; a model folder already there is moved aside first and removed after,
    so that a failure leaves the previous model in place."""
    if not os.path.lexists(target):
        os.replace(staging, target)
        return
    check_replaceable(target)  # again: the folder may have changed during the copy
    old = _staging(target, "old")
    try:
        os.replace(target, old / "model")
        try:
            os.replace(staging, target)
        except OSError:
            os.replace(old / "model", target)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def external_data(graph: Path) -> list[str]:
    """The files the graph's tensors live in (their ``location``, relative to the graph's folder)."""
    onnx = _onnx()
    model = _load_graph(graph)
    tensors = list(model.graph.initializer) + [a.t for node in model.graph.node for a in node.attribute if a.HasField("t")]
    return sorted({entry.value for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL
                   for entry in t.external_data if entry.key == "location"})


def _load_graph(path: Path):
    """The graph's protobuf without its weights, or a one-line error naming the file."""
    onnx = _onnx()
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, onnx's own errors, OSError: no common base but Exception
        raise ConfigError(f"{path}: not an ONNX graph ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def parse_config(path: Path):
    """config.pbtxt -> tritonclient's ModelConfig, or a one-line error naming the file."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ConfigError(f"checking Triton configs needs the triton extra (pip install 'convllava-edge[triton]'): "
                          f"{e}") from None
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (text_format.ParseError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {' '.join(str(e).split())}") from None


def check_model(folder: Path, name: str | None = None) -> None:
    """One model folder: its config parses and agrees with its own graph (see the module's docstring)."""
    where = folder / "config.pbtxt"
    config = parse_config(where)  # first: without the triton extra, its one-line error
    from tritonclient.grpc import model_config_pb2 as pb

    if config.platform != PLATFORM and config.backend != "onnxruntime":
        raise ConfigError(f"{where}: platform {config.platform!r}, expected {PLATFORM!r} (a bundle's graphs are ONNX)")
    if config.name != (name or folder.name):
        raise ConfigError(f"{where}: name {config.name!r} differs from its folder {(name or folder.name)!r}")
    graph = folder / VERSION / "model.onnx"
    if not graph.is_file():
        raise ConfigError(f"{folder}: no {VERSION}/model.onnx")
    if config.max_batch_size != 0:
        raise ConfigError(f"{where}: max_batch_size {config.max_batch_size}, expected 0 (the graph has its batch axis)")
    inputs, outputs = graph_io(graph)
    for kind, declared, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
        by_name = {n: (t, d) for n, t, d in actual}
        if kind == "input" and {t.name for t in declared} != set(by_name):
            raise ConfigError(f"{where}: inputs {sorted(t.name for t in declared)}, the graph's are {sorted(by_name)}")
        for t in declared:
            if t.name not in by_name:
                raise ConfigError(f"{where}: {kind} {t.name!r} is not one of the graph's ({', '.join(by_name)})")
            dtype, dims = by_name[t.name]
            if pb.DataType.Name(t.data_type) != dtype:
                raise ConfigError(f"{where}: {kind} {t.name} is {pb.DataType.Name(t.data_type)}, the graph's is {dtype}")
            if len(t.dims) != len(dims) or any(c != g and g != -1 for c, g in zip(t.dims, dims)) \
                    or any(c != -1 and g == -1 for c, g in zip(t.dims, dims)):
                raise ConfigError(f"{where}: {kind} {t.name} dims {list(t.dims)} disagree with the graph's {dims} "
                                  "(-1 where the graph's are symbolic)")
    for group in config.instance_group:
        if group.count < 1:
            raise ConfigError(f"{where}: instance_group count {group.count}, expected at least 1")
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        mode = accelerator.parameters.get("precision_mode", "FP32")
        if accelerator.name != "tensorrt" or mode not in ("FP32", *TENSORRT_PRECISIONS.values()):
            raise ConfigError(f"{where}: GPU accelerator {accelerator.name!r} with precision_mode {mode!r}, expected "
                              f"tensorrt with one of FP32, {', '.join(TENSORRT_PRECISIONS.values())}")


def check_repository(repo: Path) -> list[str]:
    """Every model folder of ``repo`` checked; their names."""
    repo = Path(repo)
    try:
        info = os.stat(repo)
    except OSError as e:
        raise ConfigError(f"{repo}: {e.strerror or e}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{repo} is not a folder: a Triton model repository is a folder of model folders "
                          "(NAME/config.pbtxt)")
    try:
        folders = sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    except OSError as e:
        raise ConfigError(f"{repo}: cannot list {e.filename or repo}: {e.strerror or e}") from None
    if not folders:
        raise ConfigError(f"{repo}: no model folder (NAME/config.pbtxt) in this repository")
    for folder in folders:
        check_model(folder)
    return [f.name for f in folders]


__all__ = ["TritonOptions", "check_model", "check_repository", "deploy_triton", "triton_model_name"]
