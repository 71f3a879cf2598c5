"""llama.cpp without dying: a probe of its risky CPU paths and a trial load, each in a short-lived child.

llama.cpp ends the whole process on things Python cannot catch: an instruction the CPU refuses
(its AMX kernels trap with SIGILL when built by gcc 12, whose tile-configuration intrinsic lets the
optimizer drop the configuration: pip's default ``-march=native`` build does exactly that on AMX Xeons;
buildflags.py's build carries the fix; and pip may reuse a wheel built on another machine), and
``GGML_ASSERT``/``abort`` on model files no header check anticipated. So before the first quantized
model is loaded:

1. ``cpu_paths_verdict``: a child loads the demo model's small Q4_K_M GGUF with llama.cpp's extra
   buffer types (AMX, repacked layouts) on and evaluates a batch of tokens, the path those kernels
   serve. When the child dies from a signal, models are loaded with ``use_extra_bufts = False`` and
   one notice says so. The verdict is kept on disk, keyed by the llama.cpp libraries' SHA-256 and
   the CPU, so later runs pay nothing.
2. ``trial_load``: the first time a GGUF is seen (by its SHA-256, for this library and these load
   settings), a child loads it and evaluates a few tokens and embedding rows; an abort there becomes
   one line and exit 1 in the parent, never a dead process. Success is kept on disk too.

Children are plain ``python -m convllava_edge.native``; their output is captured (llama.cpp prints a
backtrace to stdout when it aborts) and reduced to one line.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .backends.llama_batch import batch_slot
from .errors import BundleError, ConvLlavaEdgeError
from .machine import build_features, cpu_digest, library_digest
from .records import read_record, write_record

# Test-only fault injection: the probe child raises this signal (a name, e.g. "SIGILL") itself, right
# where llama.cpp's risky kernels would run. CI's portable build never traps, so this is how a test
# shows that a trapping build still answers.
PROBE_FAULT_ENV = "CONVLLAVA_EDGE_TEST_PROBE_SIGNAL"
PROBE_TIMEOUT_S = 120  # the probe model is 4 MB: loading and 16 tokens take well under a second
TRIAL_TIMEOUT_S = 900  # a 7B Q4 model takes seconds to map; a slow disk or a GPU upload more
PROBE_TOKENS = 16  # a batch: llama.cpp's AMX kernels serve matrix products of more than one row only
TRIAL_TOKENS = 8
TRIAL_EMBEDDINGS = 4
VERDICT_VERSION = 1  # bump when what the probe exercises changes: old verdicts then no longer apply

_lock = threading.Lock()
_notices: set[str] = set()


@dataclass(frozen=True)
class Verdict:
    extra_bufts: bool  # load models with llama.cpp's extra buffer types (AMX, repacked weights)
    reason: str  # in words, for `doctor` and the notice
    signal: str | None = None  # the signal that killed the probe child, if one did
    cached: bool = False  # read from disk (no child ran in this process)
    seconds: float = 0.0  # how long the child took


def notice(text: str) -> None:
    """Print ``text`` on stderr once per process (the CLI's and the server's output stay clean)."""
    with _lock:
        if text in _notices:
            return
        _notices.add(text)
    print(f"note: {text}", file=sys.stderr, flush=True)


# -- running a child ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChildResult:
    returncode: int
    message: str  # the child's last line of stderr: its one-line error, when it has one
    seconds: float

    @property
    def signal_name(self) -> str | None:
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"


def _run_child(args: list[str], timeout: float, env_extra: dict[str, str] | None = None) -> ChildResult:
    env = {**os.environ, **(env_extra or {})}
    # The child must import this very package, installed or not (a checkout on sys.path).
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "convllava_edge.native", *args], env=env, capture_output=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ChildResult(124, f"did not finish within {timeout:.0f} s", time.perf_counter() - t0)
    except OSError as e:
        return ChildResult(127, f"could not start a check process: {e}", time.perf_counter() - t0)
    lines = [l for l in proc.stderr.decode("utf-8", errors="replace").splitlines() if l.strip()]
    return ChildResult(proc.returncode, lines[-1].strip() if lines else "", time.perf_counter() - t0)


# -- 1. the CPU-path probe ---------------------------------------------------------------------------
_verdict: list[Verdict] = []


def probe_model() -> Path | None:
    """A small Q4_K_M GGUF: the demo model's, shipped with the package."""
    from .default_model import DEMO_BUNDLE

    found = sorted(DEMO_BUNDLE.glob("*.gguf"))
    return found[0] if found else None


def _probe_record_name() -> str:
    return f"probe-{library_digest()[:24]}-{cpu_digest()[:16]}.json"


def cpu_paths_verdict(run: bool = True) -> Verdict | None:
    """Whether llama.cpp's extra buffer types are safe on this CPU with this build (see the module doc).

    Cached in the process and on disk; ``run=False`` only reads what is known (``doctor``).
    """
    with _lock:
        if _verdict:
            return _verdict[0]
    record = read_record(_probe_record_name(), VERDICT_VERSION)
    if record is not None:
        verdict = Verdict(bool(record["extra_bufts"]), str(record["reason"]), record.get("signal"), cached=True,
                          seconds=float(record.get("seconds", 0.0)))
    elif not run:
        return None
    else:
        verdict = _probe()
        if verdict.signal is not None or verdict.extra_bufts:  # a child that could not start proves nothing
            write_record(_probe_record_name(), {k: v for k, v in asdict(verdict).items() if k != "cached"},
                         VERDICT_VERSION)
    with _lock:
        if not _verdict:
            _verdict.append(verdict)
        return _verdict[0]


def _probe() -> Verdict:
    model = probe_model()
    if model is None:
        return Verdict(False, "no probe model installed (the demo bundle is missing): extra buffer types left off")
    fault = os.environ.get(PROBE_FAULT_ENV)
    result = _run_child(["probe", str(model)], PROBE_TIMEOUT_S, {PROBE_FAULT_ENV: fault} if fault else None)
    if result.returncode == 0:
        return Verdict(True, "llama.cpp's extra buffer types (AMX, repacked weights) ran in a probe", seconds=result.seconds)
    if result.signal_name:
        return Verdict(False, f"llama.cpp's extra buffer types (AMX, repacked weights) crashed a probe with "
                              f"{result.signal_name} on this CPU; models load without them (slower prompt "
                              "processing, same answers)", result.signal_name, seconds=result.seconds)
    return Verdict(False, f"the probe of llama.cpp's extra buffer types failed ({result.message or result.returncode}); "
                          "models load without them", seconds=result.seconds)


# Weight types whose extra buffer types cost speed with some builds, from benchmarks/llm_build_bench.py
# (RESULTS.md, "llama.cpp settings"): GGML type -> the build feature with which they are left off.
# Q4_K (Q4_K_M files): llama.cpp's repacked q4_K layout and its AMX kernels process prompts slower than
# the AVX-512 kernels of the plain layout (Xeon, 2 threads: 71 and 111 vs 106-128 tok/s, same decode);
# with AVX2 only the repacked layout wins (67 vs 50 tok/s), so there it stays on. Q4_0 gains from both
# (repacked 1.8x prompt processing; AMX 2.4x, and 2.2x decode) and every type not named keeps
# llama.cpp's own default (on).
EXTRA_BUFTS_OFF = {"Q4_K": "AVX512"}


@dataclass(frozen=True)
class LoadPlan:
    extra_bufts: bool
    reason: str


def load_plan(path: Path, weight_type: str = "") -> LoadPlan:
    """How to load ``path``: llama.cpp's extra buffer types off when the probe saw them crash (noticed
    once), or when they measured slower for the file's ``weight_type`` with this build; else on."""
    verdict = cpu_paths_verdict()
    if not verdict.extra_bufts:
        if verdict.signal is not None:
            notice(verdict.reason + " (convllava-edge doctor shows the details)")
        return LoadPlan(False, verdict.reason)
    feature = EXTRA_BUFTS_OFF.get(weight_type)
    if feature and feature in build_features():
        return LoadPlan(False, f"{weight_type} weights with an {feature} build: extra buffer types off "
                               "(measured faster; benchmarks/RESULTS.md)")
    return LoadPlan(True, verdict.reason)


# -- 2. the trial load -------------------------------------------------------------------------------
def file_identity(path: Path, sha256: str | None) -> str:
    """The file's SHA-256 when the caller verified it; else its inode, size and mtime (no 4 GB read)."""
    if sha256:
        return sha256
    st = path.stat()
    return "stat-" + hashlib.sha256(f"{path.resolve()}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


def trial_load(path: Path, *, extra_bufts: bool, n_gpu_layers: int = 0, sha256: str | None = None) -> bool:
    """Load ``path`` once in a child first; returns the ``use_extra_bufts`` to load it with.

    Raises BundleError (one line) when llama.cpp cannot load or evaluate the file, signal deaths
    included. When the child dies from a signal with extra buffer types on, the file is tried once
    more without them (a kernel the probe did not reach).
    """
    key = hashlib.sha256(f"{file_identity(path, sha256)}|{library_digest()}|{cpu_digest()}|{n_gpu_layers}".encode())
    name = f"trial-{key.hexdigest()[:40]}.json"
    record = read_record(name, VERDICT_VERSION)
    if record is not None and isinstance(record.get("extra_bufts"), bool):
        return record["extra_bufts"] if extra_bufts else False
    result = _run_child(["trial", str(path), str(int(extra_bufts)), str(n_gpu_layers)], TRIAL_TIMEOUT_S)
    if result.signal_name and extra_bufts:
        retry = _run_child(["trial", str(path), "0", str(n_gpu_layers)], TRIAL_TIMEOUT_S)
        if retry.returncode == 0:
            notice(f"{path.name}: llama.cpp's extra buffer types crashed a trial load with {result.signal_name}; "
                   "loading it without them")
            write_record(name, {"extra_bufts": False}, VERDICT_VERSION)
            return False
        result = retry
    if result.returncode != 0:
        raise BundleError(f"{path}: llama.cpp cannot load this GGUF ({_describe(result)})")
    write_record(name, {"extra_bufts": extra_bufts}, VERDICT_VERSION)
    return extra_bufts


def _describe(result: ChildResult) -> str:
    if result.signal_name:
        what = {"SIGABRT": "it aborted", "SIGSEGV": "it crashed", "SIGILL": "an instruction this CPU lacks",
                "SIGKILL": "killed, out of memory?", "SIGBUS": "the file changed or is truncated"}
        return f"a trial load died with {result.signal_name}: {what.get(result.signal_name, 'a crash')}"
    if result.returncode == 124:
        return f"a trial load {result.message}"
    return result.message or f"a trial load exited with code {result.returncode}"


# -- the child's side --------------------------------------------------------------------------------
def _child(mode: str, path: str, extra_bufts: bool, n_gpu_layers: int) -> int:
    """Load ``path`` and evaluate a batch of tokens (and, in a trial, a few embedding rows)."""
    import ctypes

    import llama_cpp

    log: list[str] = []

    @llama_cpp.llama_log_callback
    def on_log(level, text, user_data):
        log.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = n_gpu_layers
    mparams.use_extra_bufts = extra_bufts
    model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
    if not model:
        errors = [l.strip() for l in "".join(log).splitlines() if "error" in l.lower() or "failed" in l.lower()]
        print(errors[-1] if errors else "llama.cpp returned no model", file=sys.stderr)
        return 1
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    n_embd = llama_cpp.llama_model_n_embd_inp(model)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = 64
    cparams.n_batch = cparams.n_ubatch = 32
    cparams.n_threads = cparams.n_threads_batch = min(2, os.cpu_count() or 1)
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        print("llama.cpp could not create a context", file=sys.stderr)
        return 1
    n_tokens = PROBE_TOKENS if mode == "probe" else TRIAL_TOKENS
    batch = llama_cpp.llama_batch_init(n_tokens, 0, 1)
    for i in range(n_tokens):
        batch.token[i] = (i * 7 + 1) % n_vocab
        batch_slot(batch, i, i, last=i == n_tokens - 1)
    batch.n_tokens = n_tokens
    fault = os.environ.get(PROBE_FAULT_ENV)
    if mode == "probe" and fault:
        os.kill(os.getpid(), getattr(signal, fault))  # test-only: see PROBE_FAULT_ENV
    if llama_cpp.llama_decode(ctx, batch) != 0:
        print(f"llama.cpp failed to evaluate {n_tokens} tokens", file=sys.stderr)
        return 1
    if mode == "trial":  # the injection path: embedding rows at the next positions
        rows = llama_cpp.llama_batch_init(TRIAL_EMBEDDINGS, n_embd, 1)
        for i in range(TRIAL_EMBEDDINGS):
            for j in range(n_embd):
                rows.embd[i * n_embd + j] = 0.01 * ((i + j) % 7 - 3)
            batch_slot(rows, i, n_tokens + i, last=i == TRIAL_EMBEDDINGS - 1)
        rows.n_tokens = TRIAL_EMBEDDINGS
        if llama_cpp.llama_decode(ctx, rows) != 0:
            print(f"llama.cpp failed to evaluate {TRIAL_EMBEDDINGS} embedding rows", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str]) -> int:
    mode, path = argv[0], argv[1]
    extra = argv[2] != "0" if len(argv) > 2 else True
    layers = int(argv[3]) if len(argv) > 3 else 0
    try:
        return _child(mode, path, extra, layers)
    except ConvLlavaEdgeError as e:
        print(str(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
