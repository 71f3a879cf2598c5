"""One stage of the export in a process of its own, so that what it allocates goes back to the system when it ends.

The vision export of a 7B-class checkpoint holds gigabytes that freeing does not return: torch.onnx's exported
program, the tower in fp32, ONNX Runtime's arenas and the quantizer's copies of the graph sit in the allocator's
free lists after ``del`` (measured: 3.8 GB of anonymous memory still resident when the LLM conversion began,
benchmarks/memory_bench.py --export-only). A process that exits returns all of it, so the LLM stages start from
what the parent held before the vision side ran: the two are never resident together.

multiprocessing's spawn context (not fork: the parent has torch's and ONNX Runtime's threads running) starts a
fresh interpreter; the stage's progress comes back through a pipe to the parent's display, its result (plain
dataclasses) and its errors (the project's one-line errors) are pickled back. The child dies with its parent
(PR_SET_PDEATHSIG), so a killed export leaves no process writing into its staging folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import traceback
from typing import Any, Callable

from ..errors import ConvLlavaEdgeError, ExportError

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Checkpoints whose weights are smaller than this run every stage in the export's own process: a fresh interpreter
# costs seconds (torch's import), and what a small model's stages leave behind is not worth them.
ISOLATE_BYTES = 64 * 2**20
WEIGHT_SUFFIXES = (".bin", ".safetensors")


def weights_bytes(*folders) -> int:
    """The bytes of the weight files (shards) in ``folders`` (None entries skipped)."""
    total = 0
    for folder in folders:
        if folder is None:
            continue
        for entry in os.scandir(folder):
            if entry.name.endswith(WEIGHT_SUFFIXES) and entry.is_file():
                total += entry.stat().st_size
    return total


def worth_isolating(*folders) -> bool:
    return weights_bytes(*folders) >= ISOLATE_BYTES


def release_freed_memory() -> None:
    """Collect cycles and hand glibc's free lists back to the system (malloc_trim): between a stage's parts in one
    process, what ``del`` freed stops counting as resident."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to hand back this way
            pass


class _PipeProgress:
    """The export's Progress (bundle.py), sent to the parent."""

    def __init__(self, conn):
        self.conn = conn

    def stage(self, label: str) -> None:
        self.conn.send(("stage", label))

    def advance(self, done: int, total: int) -> None:
        self.conn.send(("advance", done, total))


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no prctl: the child then ends at its next send to a closed pipe
            pass


def _child(conn, fn: Callable, args: tuple) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops this process
    try:
        result = fn(*args, _PipeProgress(conn))
    except ConvLlavaEdgeError as e:  # the user's error, said in one line by the parent
        conn.send(("error", e))
    except BaseException as e:  # a bug: its traceback travels as text (not every exception pickles)
        conn.send(("crash", f"{type(e).__name__}: {e}", traceback.format_exc()))
    else:
        conn.send(("result", result))
    finally:
        conn.close()


@contextlib.contextmanager
def _main_module_hidden():
    """Keep spawn from running the caller's main script again in the child: multiprocessing re-imports ``__main__``
    by its path or module name, and a script calling export_bundle without an ``if __name__ == "__main__"`` guard
    would export again there (and fail: a process started during bootstrapping). ``fn`` lives in an importable
    module, so the child needs nothing of ``__main__``; without ``__file__`` and with ``__spec__`` None it is not run."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__.pop(k) for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    if main is not None:
        main.__spec__ = None  # multiprocessing reads the attribute; None means "no module name"
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


def run_isolated(fn: Callable, args: tuple, progress, what: str) -> Any:
    """``fn(*args, progress)`` in a fresh process; its return value. ``fn`` is a module-level function (spawn
    pickles it by name), ``args`` picklable; ``what`` names the stage in the error when the process dies."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, fn, args), name=f"convllava-edge {what}")
    with _main_module_hidden():
        process.start()
    send.close()  # the child's end: recv() sees EOF when the child is gone
    ended = False  # the child sent its last message and is exiting by itself
    try:
        while True:
            try:
                message = receive.recv()
            except EOFError:
                process.join()
                code = process.exitcode
                killed = code is not None and code < 0
                raise ExportError(f"the {what} process ended without a result (exit code {code}"
                                  + (f", killed by signal {-code}: out of memory?" if killed else "") + ")") from None
            kind = message[0]
            ended = kind in ("result", "error", "crash")
            if kind == "stage":
                progress.stage(message[1])
            elif kind == "advance":
                progress.advance(message[1], message[2])
            elif kind == "result":
                return message[1]
            elif kind == "error":
                raise message[1]
            else:
                raise RuntimeError(f"the {what} process failed: {message[1]}\n{message[2]}")
    finally:
        receive.close()
        process.join(30 if ended else 0)
        if process.is_alive():
            process.terminate()
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
