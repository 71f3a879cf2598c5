"""What the rest of convllava-edge needs from a backend: the two interfaces and their shared types.

- A **vision backend** runs a bundle's graphs: ``load(path, inputs, outputs)`` gives a ``Graph`` whose
  ``run`` maps named float/int arrays to named arrays. What the graphs mean (pixels -> rows, pre-fusion)
  is the model family's business (families/), not the backend's.
- An **LLM backend** holds one sequence: it tokenizes, evaluates token ids and embedding rows at the
  next positions, and generates. What not every backend can do is declared in ``capabilities``, and
  every caller has a defined behaviour when a capability is missing (see LlmCapabilities).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence

import numpy as np

from ..errors import BundleError, ConfigError, ConvLlavaEdgeError

DEVICES = ("auto", "cpu", "cuda")


class Graph(Protocol):
    """One loaded graph of a bundle."""

    path: object  # where it came from, for messages
    input_names: list[str]
    output_names: list[str]

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Arrays of our own (never views of the backend's buffers), checked finite."""
        ...


def first_line(error: Exception) -> str:
    """A runtime's exception as one line (ONNX Runtime and OpenVINO write several), bounded."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def checked_outputs(path, runtime: str, outputs: Sequence[str], run: Callable[[], Iterable]) -> list[np.ndarray]:
    """``run()``'s arrays, copied into arrays of our own, with a runtime's failures (a graph that asks for
    4 TB, a kernel error) as one line and outputs checked for NaN/Inf: a graph that passed its hash check
    can still be hostile. The copies matter: a runtime's arrays are views of its buffers, and one kept (an
    embedding in the cache or the model's memory) keeps the whole session's memory alive after the session
    is gone. Measured on the 1536 px ConvLLaVA tower with ONNX Runtime: 2.0 GB per session, until an export
    that encodes its probe images (a session each) was killed for memory at 22.5 GB; with copies, RSS
    returns to 0.2 GB after each (the copy: the embeddings' ~9 MB)."""
    try:
        results = [np.array(value, copy=True) for value in run()]
    except MemoryError as e:
        raise BundleError(f"{path}: out of memory running the graph") from e
    except Exception as e:  # the runtimes' error types share no public base class
        raise BundleError(f"{path}: {runtime} failed running the graph: {first_line(e)}") from e
    for name, value in zip(outputs, results):
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise BundleError(f"{path}: output {name!r} holds NaN or Inf values")
    return results


def check_graph_names(graph: "Graph", inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """A BundleError unless ``graph`` has exactly ``inputs`` and at least ``outputs``."""
    if graph.input_names != list(inputs) or not set(outputs) <= set(graph.output_names):
        raise BundleError(f"{graph.path}: expected inputs {list(inputs)} and outputs {list(outputs)}, "
                          f"found {graph.input_names} and {graph.output_names}")


class VisionBackend(Protocol):
    providers: list[str]  # what really runs the graphs, first = main (e.g. CUDAExecutionProvider)
    note: str  # one line for the user: where the graphs run and, on a fallback, why
    threads: int

    def load(self, path, inputs: Sequence[str], outputs: Sequence[str]) -> Graph:
        """The graph at ``path``; a BundleError unless it has exactly these inputs and at least these outputs."""
        ...


class ContextOverflowError(ConvLlavaEdgeError):
    """The prompt (plus the answer's budget) does not fit in the context window."""


MAX_TEMPERATURE = 100.0  # far past any useful value; inf and nan make every token equally likely or none
# Seeds are in [0, SEED_LIMIT) everywhere (CLI, server, Python): llama.cpp's sampler takes a uint32_t and reads
# 0xFFFFFFFF as "pick one at random". A wider seed masked to 32 bits made different seeds draw the same samples.
SEED_LIMIT = (1 << 32) - 1


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.2  # the official CLI's default; 0 = greedy and deterministic
    top_p: float = 1.0  # nucleus sampling threshold; 1.0 keeps every token
    seed: int = 0  # for temperature > 0

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise ConfigError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"seed must be an integer in [0, {SEED_LIMIT}), got {self.seed}")


@dataclass(frozen=True)
class LlmCapabilities:
    """What an LLM backend can do beyond tokenize / evaluate / generate, and what happens without it.

    - ``save_state``: save_sequence / load_sequence. Without it the disk cache of KV states (the system
      prompt, the image) is not used: the prompt is evaluated again.
    - ``logits``: ``all_logits=True`` on evaluation and ``last_logits``. Without it ``check``'s LLM stage
      says the backend cannot be measured (a one-line error), and the answers stage still runs.
    - ``token_ids``: generated steps carry their token ids. Without them answers carry text only
      (``Answer.token_ids`` is empty) and ``check`` compares answer text instead of ids.
    - ``kv_reuse``: the KV cache persists between requests, so a prompt sharing a prefix with the last
      one evaluates only the rest (``truncate`` keeps a prefix). Without it every request starts at 0.
    - ``fork``: ``fork(threads, n_ctx, threads_batch)`` gives another sequence on the same weights (serve's
      --parallel slots). Without it a server serves one request at a time.
    - ``structured_output``: ``generate(..., constraint=)`` constrains the answer token by token (a GBNF grammar,
      structured.Constraint). Without it a constrained request is refused in one line naming the backend, never
      answered unconstrained.
    - ``logprobs``: ``generate(..., logprobs=k)`` gives each step its TokenLogprob. Without it, refused alike.
    - ``server_cache``: the backend reports how many of the last prompt's positions its server did not compute
      (``server_cached_tokens``, None when it gave no figure). Without it that figure is ours: the positions our
      KV cache reused.
    """

    save_state: bool = False
    logits: bool = False
    token_ids: bool = False
    kv_reuse: bool = False
    fork: bool = False
    server_cache: bool = False
    structured_output: bool = False
    logprobs: bool = False


class TokenLogprob(NamedTuple):
    """A generated token's log-probability and the ``top`` alternatives ((token id, logprob), most likely
    first), of the distribution it was drawn from before temperature and top-p: the log-softmax of the
    model's logits, renormalised over the tokens a constraint allows when the answer is constrained."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Step(NamedTuple):
    """One generated token: its id (None where the backend does not report ids), its bytes, and its
    log-probability when asked for (``generate(..., logprobs=k)``)."""

    token: int | None
    piece: bytes
    logprob: TokenLogprob | None = None


MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


class LlmBackend(Protocol):
    """One model, one sequence. Positions count from 0; ``n_past`` positions are evaluated."""

    name: str  # for the user: "llama.cpp"
    capabilities: LlmCapabilities
    n_ctx: int
    n_embd: int  # the width of injected embedding rows
    bos: int
    n_past: int
    threads: int
    gpu_offload: bool
    where: str  # where it computes, for the user: "CPU", "GPU", a server's address
    server_cached_tokens: int | None  # with capabilities.server_cache: the server's figure for the last prompt
    settings: dict  # what ran, for --json and benchmarks

    def tokenize(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]: ...
    def piece(self, token: int) -> bytes: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def is_end(self, token: int) -> bool: ...
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of the control tokens a prompt may spell out (<s>, </s>, <|eot_id|>...)."""
        ...

    def truncate(self, n_past: int) -> None:
        """Forget positions from ``n_past`` on (without kv_reuse: only 0 is meaningful)."""
        ...

    def eval_tokens(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray | None: ...
    def eval_embeddings(self, rows: np.ndarray, all_logits: bool = False) -> np.ndarray | None: ...

    def generate(self, sampling: SamplingOptions, max_tokens: int, constraint=None,
                 logprobs: int | None = None) -> Iterator[Step]:
        """Tokens after the evaluated prompt, at most ``max_tokens``; ends at an end-of-generation token
        (not yielded). A step is evaluated into the sequence only when the next one is asked for, so a
        caller that stops early (a stop string) leaves the last token out of the KV cache. ``constraint``
        (capabilities.structured_output): a structured.Constraint the answer follows; ``logprobs``
        (capabilities.logprobs): each step's TokenLogprob with that many alternatives (0..MAX_TOP_LOGPROBS)."""
        ...

    def save_sequence(self) -> bytes: ...  # capabilities.save_state
    def load_sequence(self, state: bytes, n_past: int) -> bool: ...  # capabilities.save_state
    def last_logits(self) -> np.ndarray: ...  # capabilities.logits
    def close(self) -> None: ...


def require(backend: LlmBackend, capability: str, for_what: str) -> None:
    """A clear error where a caller cannot do without a capability."""
    if not getattr(backend.capabilities, capability):
        raise ConfigError(f"{for_what} needs {capability.replace('_', ' ')}, which the "
                          f"{type(backend).__name__} backend does not support")
