"""Peak memory of a process and its children, sampled; and a memory cgroup to run one under a limit.

Linux only (``/proc``). What is counted, per process, from ``/proc/PID/status``:
- ``RssAnon``: anonymous resident pages (heap, arenas, copies of tensors): what a machine without swap must hold;
- ``RssFile``: resident pages of mapped files (a memory-mapped GGUF or ``.bin`` shard): page cache the kernel
  reclaims under pressure, counted by ``ru_maxrss`` as if it were held.
The tree (the process and every descendant) is summed at each sample; the peak is the largest sum. A sampler
misses a spike shorter than its interval: the figures are lower bounds within one interval.

Used by the export memory test (tests/e2e/test_export_memory.py) and benchmarks/memory_bench.py.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

KB = 1024


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone between the listing and the read
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants alive now."""
    children, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def resident(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of one process in bytes; (0, 0) once it is gone."""
    anon = file = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * KB
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) * KB
    except OSError:
        pass
    return anon, file


@dataclass
class Sample:
    t: float  # time.time()
    anon: int
    file: int
    n_processes: int


@dataclass
class TreeWatcher:
    """Samples a process tree every ``interval`` seconds in a thread until stopped."""

    pid: int
    interval: float = 0.1
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "TreeWatcher":
        self._thread.start()
        return self

    def stop(self) -> "TreeWatcher":
        self._stop.set()
        self._thread.join()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = tree(self.pid)
            figures = [resident(p) for p in pids]
            self.samples.append(Sample(time.time(), sum(a for a, _ in figures), sum(f for _, f in figures), len(pids)))
            self._stop.wait(self.interval)

    @property
    def peak_anon(self) -> int:
        return max((s.anon for s in self.samples), default=0)

    @property
    def peak_file(self) -> int:
        return max((s.file for s in self.samples), default=0)

    @property
    def peak_total(self) -> int:
        return max((s.anon + s.file for s in self.samples), default=0)

    def by_stage(self, stages: list[tuple[float, str]]) -> list[dict]:
        """Peaks per stage, ``stages`` being (start time, label) in order: each sample belongs to the last stage
        started before it (the samples before the first stage to "starting")."""
        out, bounds = [], [(0.0, "starting")] + sorted(stages)
        for i, (start, label) in enumerate(bounds):
            end = bounds[i + 1][0] if i + 1 < len(bounds) else float("inf")
            inside = [s for s in self.samples if start <= s.t < end]
            if inside:
                out.append({"stage": label, "seconds": round((inside[-1].t - inside[0].t), 1),
                            "peak_anon": max(s.anon for s in inside), "peak_file": max(s.file for s in inside),
                            "start_anon": inside[0].anon})
        return out


def read_stage_log(path: Path) -> list[tuple[float, str]]:
    """The lines a StageLog wrote: (time, label)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        t, _, label = line.partition(" ")
        out.append((float(t), label))
    return out


class StageLog:
    """An export Progress that appends "TIME LABEL" for each stage's start to a file (read by the watcher's parent)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def stage(self, label: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{time.time():.3f} {label}\n")

    def advance(self, done: int, total: int) -> None:
        pass


# -- a memory cgroup -------------------------------------------------------------------------------------------
@dataclass
class MemoryCgroup:
    path: Path
    version: int  # 1: the v1 memory controller; 2: the unified hierarchy

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def peak(self) -> int | None:
        """The largest charge seen (page cache included), when the kernel keeps it."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0


def _own_cgroup(version: int) -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if version == 1 and "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
        if version == 2 and controllers == "":
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                if (root / "cgroup.controllers").exists():
                    return root / path.lstrip("/")
    return None


def _controls_memory(parent: Path, version: int) -> bool:
    if version == 1:
        return (parent / "memory.limit_in_bytes").exists()
    try:  # v2: children get a memory.max only where the parent delegates the controller
        return "memory" in (parent / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False


@contextlib.contextmanager
def memory_cgroup(limit: int, name: str = "convllava-edge-memtest") -> Iterator[MemoryCgroup | None]:
    """A child memory cgroup of this process's own, limited to ``limit`` bytes (page cache counts, and is
    reclaimed at the limit); None where the machine does not let this process make one. Removed afterwards
    (its processes must have exited)."""
    made = None
    for version, limit_file in ((1, "memory.limit_in_bytes"), (2, "memory.max")):
        parent = _own_cgroup(version)
        if parent is None or not _controls_memory(parent, version):
            continue
        path = parent / f"{name}-{os.getpid()}"
        try:
            path.mkdir()
            (path / limit_file).write_text(str(limit))
            if version == 1:  # no swap here: the limit on memory and swap together is the same
                with contextlib.suppress(OSError):
                    (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            continue
        made = MemoryCgroup(path, version)
        break
    try:
        yield made
    finally:
        if made is not None:
            for _ in range(50):  # the kernel frees an emptied cgroup a moment after its last process exits
                try:
                    made.path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


# -- one command, measured -------------------------------------------------------------------------------------
@dataclass
class WatchedRun:
    returncode: int
    seconds: float
    peak_anon: int  # sampled, the tree summed
    peak_file: int
    peak_total: int
    ru_maxrss: int  # bytes: the largest single process's resident set, mapped file pages included (os.wait4)
    stages: list[dict]
    cgroup_peak: int | None  # the cgroup's largest charge (page cache included), when run under one
    oom_kills: int
    stdout: str
    stderr: str

    def to_dict(self) -> dict:
        gb = lambda n: None if n is None else round(n / 1e9, 3)  # noqa: E731
        return {"returncode": self.returncode, "seconds": round(self.seconds, 1),
                "peak_anon_gb": gb(self.peak_anon), "peak_file_gb": gb(self.peak_file),
                "peak_anon_plus_file_gb": gb(self.peak_total), "ru_maxrss_gb": gb(self.ru_maxrss),
                "cgroup_peak_gb": gb(self.cgroup_peak), "oom_kills": self.oom_kills,
                "stages": [{"stage": s["stage"], "seconds": s["seconds"], "peak_anon_gb": gb(s["peak_anon"]),
                            "peak_file_gb": gb(s["peak_file"]), "start_anon_gb": gb(s["start_anon"])}
                           for s in self.stages]}


def run_watched(cmd: list[str], *, stage_log: Path | None = None, cgroup: MemoryCgroup | None = None,
                env: dict | None = None, timeout: float | None = None, interval: float = 0.1,
                cwd: Path | None = None) -> WatchedRun:
    """Run ``cmd`` (in ``cgroup`` when given), sampling its tree; stops it by its PID at ``timeout``."""
    import subprocess
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL, cwd=cwd,
                                preexec_fn=(lambda: cgroup.add(os.getpid())) if cgroup else None)
        watcher = TreeWatcher(proc.pid, interval).start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                for p in reversed(tree(proc.pid)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, 9)
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        watcher.stop()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    stages = watcher.by_stage(read_stage_log(stage_log)) if stage_log else []
    return WatchedRun(proc.returncode, time.perf_counter() - start, watcher.peak_anon, watcher.peak_file,
                      watcher.peak_total, usage.ru_maxrss * KB, stages, cgroup.peak() if cgroup else None,
                      cgroup.oom_kills() if cgroup else 0, stdout, stderr)


def export_command(checkpoint: Path, out: Path, stage_log: Path, *, llm_type: str = "Q4_K_M",
                   vision_types: tuple[str, ...] | None = None, threads: int | None = None) -> list[str]:
    """The command that runs ``export_bundle`` (what ``convllava-edge export`` calls) in a child of its own,
    writing each stage's start to ``stage_log``."""
    import json
    import sys

    spec = {"checkpoint": str(checkpoint), "out": str(out), "stage_log": str(stage_log), "llm_type": llm_type,
            "vision_types": list(vision_types) if vision_types else None, "threads": threads}
    return [sys.executable, "-m", "tests.support.memwatch", json.dumps(spec)]


# Every module an export imports, imported before it starts: a run lasts an hour at 7B, and the code it runs is the
# code of its start even if the working tree changes meanwhile (the package is installed editable).
EXPORT_MODULES = (
    "convllava_edge.export.isolated",
    "convllava_edge.export.bundle", "convllava_edge.export.convllava", "convllava_edge.export.convllava.vision_export",
    "convllava_edge.export.convllava.onnx_export", "convllava_edge.export.convllava.vision_model",
    "convllava_edge.export.convllava.tower", "convllava_edge.export.gguf_convert", "convllava_edge.export.vocab",
    "convllava_edge.export.hf_llm", "convllava_edge.export.probe_images", "convllava_edge.export.model_card",
    "convllava_edge.export.sources", "convllava_edge.export.trt_lint", "convllava_edge.export.onnx_graphs",
    "convllava_edge.quantize.gguf_quant", "convllava_edge.quantize.onnx_variants", "convllava_edge.quantize.accuracy",
    "convllava_edge.backends.llm_llamacpp", "convllava_edge.families.convllava", "convllava_edge.preprocess",
    "convllava_edge.tokenizer", "convllava_edge.kv_cache", "convllava_edge.vision", "convllava_edge.hub",
    "convllava_edge.backends.vision_ort", "convllava_edge.export.llava_mini", "convllava_edge.export.llava_mini.graphs",
    "convllava_edge.export.llava_mini.modules", "convllava_edge.families.llava_mini", "convllava_edge.gguf_check",
    "convllava_edge.machine", "convllava_edge.native", "convllava_edge.records",
)


def _export_main(spec: dict) -> None:
    import importlib

    for name in EXPORT_MODULES:
        importlib.import_module(name)
    from convllava_edge.export.bundle import ExportOptions, export_bundle

    vision = tuple(spec["vision_types"]) if spec["vision_types"] else None
    log = StageLog(Path(spec["stage_log"]))
    log.stage("opening the checkpoint")
    export_bundle(spec["checkpoint"], Path(spec["out"]),
                  ExportOptions(vision_types=vision, llm_type=spec["llm_type"], threads=spec["threads"]),
                  progress=log)
    log.stage("done")


if __name__ == "__main__":
    import json
    import sys

    _export_main(json.loads(sys.argv[1]))


# -- a checkpoint whose models are large beside the process's own memory ---------------------------------------
SIZED_TOWER = dict(depths=(2, 2, 2, 2, 3), hidden_sizes=(64, 128, 256, 512, 1024), image_size=256)
SIZED_LLM = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=8000)


@dataclass(frozen=True)
class SizedCheckpoint:
    folder: Path
    tower_fp32_bytes: int  # the tower + projector as the export loads them (fp32)
    llm_bytes: int  # the LLM as stored (bf16): the size of its unquantized GGUF
    kv_bytes: int  # the agreement step's f32 KV cache for its 1024 positions


def write_sized_checkpoint(folder: Path) -> SizedCheckpoint:
    """A ConvLLaVA sft folder (released layout, random bf16 values) with a ~30M-parameter tower and a ~95M-parameter
    LLM: large enough that holding a second copy of either shows above what torch and ONNX Runtime hold."""
    from convllava_edge.export.convllava import synthetic as S

    spec, tower = S.LlamaSpec(**SIZED_LLM), S.TowerConfig(**SIZED_TOWER)
    vision = S.random_vision_state(tower, "mlp2x_gelu", spec.hidden_size, seed=0)
    llm = S.random_llama_state(spec, seed=1)
    S.write_convllava_checkpoint(folder, spec, tower, vision_state=vision, llm_state=llm, shards=2)
    S.write_json(folder / "preprocessor_config.json", S.preprocessor_config(tower.image_size))
    S.write_llama_tokenizer(folder, 2000)
    kv = 1024 * spec.num_hidden_layers * 2 * spec.num_key_value_heads * (spec.hidden_size // spec.num_attention_heads) * 4
    return SizedCheckpoint(folder, sum(v.numel() * 4 for k, v in vision.items() if k != "vision_tower.layernorm.weight"
                                       and k != "vision_tower.layernorm.bias"),
                           sum(v.numel() * 2 for v in llm.values()), kv)
