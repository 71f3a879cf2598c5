"""The served bundles, their slots, and the queue in front of them.

A bundle is loaded once (its vision graphs, its LLM's weights); ``--parallel N`` makes N slots, each a Model
with a llama.cpp context of its own on those weights (Model.fork). A request waits for a free slot in a bounded
queue; one that continues a conversation goes to the slot that holds its KV state when that slot is free. The
slot's work runs in a thread: the image's encoding and the prompt's prefill one slot at a time (the vision
graphs are shared, and both are compute-bound on the cores the slots share), the decoding of the slots at once.
Threads: each slot decodes on cores // parallel threads (at least one; ``--threads``); the image's encoding and
the prompt's prefill, one slot at a time, get every core (``--threads-batch``): benchmarks/serve_bench.py measured
this split against each slot keeping to its share (RESULTS.md, "Serve").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..backends import llm_kind
from ..backends.base import ContextOverflowError
from ..errors import ConvLlavaEdgeError
from ..model import Answer, AskOptions, Model
from ..prompt import describe_positions, positions
from ..runtime import RuntimeOptions
from ..threads import default_threads
from .replies import Piece, logprob_entries
from .wire import ApiError, ChatRequest

RETRY_AFTER_S = 1
# What run_in_slot emits once the request is checked through (the image decoded and encoded, the prompt's length
# within the context) and before the prefill: a stream's 200 is sent only then, so those failures keep their status.
READY = object()
DEFAULT_CONTEXT = 4096  # positions per slot unless --ctx says otherwise (Llama-3.1's 131072 would take GBs of KV)


@dataclass
class Slot:
    model: Model
    index: int
    busy: bool = False
    history: tuple = ()  # (conversation_key, conversation_turns) of the conversation its KV cache holds
    used_at: float = 0.0


@dataclass
class Served:
    """One bundle: its slots, its queue, and the lock the slots take for encoding and prefill."""

    name: str
    path: Path
    slots: list[Slot]
    queue_limit: int
    waiting: int = 0
    prefill_lock: threading.Lock = field(default_factory=threading.Lock)
    changed: asyncio.Condition | None = None  # made on the server's event loop

    @property
    def model(self) -> Model:
        return self.slots[0].model

    def describe(self) -> dict:
        m = self.model.manifest
        return {"id": self.name, "object": "model", "created": int(self.path.stat().st_mtime), "owned_by": "convllava-edge",
                "family": m.family, "llm_type": m.llm_type, "vision_types": [e.variant for e in m.vision],
                "vision": {"type": self.model.vision_entry.variant, "backend": self.model.vision_backend},
                "image_tokens": image_token_rule(m), "context": self.model.llm.n_ctx, "parallel": len(self.slots),
                "threads": {"decode_per_slot": self.model.llm.threads,
                            "batch": self.model.llm.settings.get("threads_batch")}}


def image_token_rule(m) -> dict:
    """The manifest's rule, and what a client needs to count an image's positions before sending it:
    ``per_image`` when every image takes the same number (padded or cropped to a square; LLaVA-Mini's
    compression), else the native-aspect resize's pixel budget and stride (preprocess.native_size)."""
    tokens, aspect = m.tokens_per_image, m.preprocess.aspect
    rule = tokens.to_dict()
    fixed = tokens.compressed or (tokens.square if aspect != "native" else None)
    if fixed is not None:
        return {**rule, "aspect": aspect, "per_image": fixed}
    height, width = m.preprocess.crop_size
    return {**rule, "aspect": aspect, "budget": height * width}


def load_served(name: str, path: Path, parallel: int, queue_limit: int, runtime: RuntimeOptions) -> Served:
    """``runtime.threads``: each slot's decoding threads (default: the cores shared out); ``threads_batch``: the
    vision graphs' and the prefill's (default: every core; they run one slot at a time); ``n_ctx``: positions
    per slot (default: the LLM's trained context, at most DEFAULT_CONTEXT)."""
    from ..manifest import load_manifest

    per_slot = runtime.threads or max(1, default_threads() // parallel)
    batch = runtime.threads_batch or default_threads()
    trained = load_manifest(path, verify=False).llm_n_ctx_train
    n_ctx = runtime.n_ctx or min(trained, DEFAULT_CONTEXT) if trained else runtime.n_ctx or DEFAULT_CONTEXT
    if not llm_kind(runtime.llm_backend).shares_cores:  # a server's threads, its context: nothing to share out here
        first = Model(path, runtime.with_(threads=batch, threads_batch=None))
    else:
        first = Model(path, runtime.with_(threads=per_slot, threads_batch=batch, n_ctx=n_ctx))
    slots = [Slot(first, 0)] + [Slot(first.fork(threads=per_slot, threads_batch=batch), i) for i in range(1, parallel)]
    return Served(name, path, slots, queue_limit)


def conversation_key(request: ChatRequest) -> tuple:
    return request.system, request.tools  # the tools are in the system prompt


def conversation_turns(request: ChatRequest, answer: str | None = None) -> tuple:
    """Each turn as (question, answer, its images' digests); the last one's answer ``answer``."""
    answers = [a for _, a in request.turns[:-1]] + [answer]
    return tuple((q, a, tuple(hashlib.sha256(image).hexdigest() for image in images))
                 for (q, _), a, images in zip(request.turns, answers, request.images))


class Engine:
    """Runs requests on slots; every slot's work in a thread of its own pool."""

    def __init__(self, served: dict[str, Served]):
        self.served = served
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=sum(len(s.slots) for s in served.values()),
                                                          thread_name_prefix="slot")
        for s in served.values():
            s.changed = asyncio.Condition()

    @staticmethod
    def admit(served: Served) -> None:
        """503 at once when every slot is busy and the queue is full."""
        if all(s.busy for s in served.slots) and served.waiting >= served.queue_limit:
            raise ApiError(503, f"busy: {len(served.slots)} generations running and {served.waiting} requests waiting; "
                           "retry shortly", code="server_busy", kind="server_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    async def acquire(self, served: Served, request: ChatRequest) -> Slot:
        """A free slot (the one holding this conversation, if free), after waiting in the bounded queue;
        503 at once when the queue is full."""
        self.admit(served)
        served.waiting += 1
        try:
            async with served.changed:
                await served.changed.wait_for(lambda: any(not s.busy for s in served.slots))
                slot = self._pick(served, request)
                slot.busy = True
                return slot
        finally:
            served.waiting -= 1

    @staticmethod
    def _pick(served: Served, request: ChatRequest) -> Slot:
        key, turns = conversation_key(request), conversation_turns(request)[:-1]
        free = [s for s in served.slots if not s.busy]
        for slot in free:  # the slot whose KV cache holds this conversation's earlier turns
            if slot.history and slot.history[0] == key and slot.history[1] == turns[:len(slot.history[1])]:
                return slot
        return min(free, key=lambda s: (bool(s.history), s.used_at))  # else an unused or the least recent

    def release(self, served: Served, slot: Slot) -> None:
        """From the event loop: the slot is free again."""
        async def notify():
            async with served.changed:
                slot.busy = False
                slot.used_at = time.monotonic()
                served.changed.notify_all()
        asyncio.ensure_future(notify())

    def start(self, served: Served, slot: Slot, request: ChatRequest, max_tokens: tuple[int | None, int],
              emit: Callable[[str], None], cancel: threading.Event) -> asyncio.Future:
        """The request's generation in the slot's thread; the slot is released when the thread is done with it
        (never earlier: a cancelled stream's thread stops at its next token)."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.pool, run_in_slot, served, slot, request, max_tokens, emit, cancel)
        future.add_done_callback(lambda f: self.release(served, slot))
        return future

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for served in self.served.values():
            for slot in reversed(served.slots):
                slot.model.close()


def run_in_slot(served: Served, slot: Slot, request: ChatRequest, max_tokens: tuple[int | None, int],
                emit: Callable[[str], None], cancel: threading.Event) -> Answer | None:
    """Encode, prefill (one slot at a time), then decode, emitting READY once the request is checked, then each
    piece; None when cancelled.
    ``max_tokens``: (the request's or None, the server's cap); None answers up to the cap or the context's end."""
    model = slot.model
    asked, cap = max_tokens
    slot.history = ()  # until this answer is complete, the KV cache holds no finished conversation
    locked = served.prefill_lock.acquire()
    try:
        # each image encoded once: one seen before (an earlier turn's) comes from the embeddings in memory or on disk
        placed = model.place([model.embed_all(images) if images else [] for images in request.images])
        system, constraint = request.system, request.constraint
        if request.tools is not None and request.tools.active:  # tools.py: the generic format
            system = request.tools.system_prompt(model.template.system if system is None else system)
            constraint = request.tools.constraint()
        items = model.prompt_items(request.turns, [[e.slot for e in turn] for turn in placed], system=system)
        room = model.llm.n_ctx - positions(items)
        if room < 1:
            raise ContextOverflowError(f"{describe_positions(items)} = {positions(items)} positions > {model.llm.n_ctx - 1} "
                                       f"(a context of {model.llm.n_ctx}, one position kept for the answer): start a "
                                       "new conversation, or send fewer images or less text")
        options = AskOptions(max_tokens=asked or min(cap, room), sampling=request.sampling, stop=request.stop,
                             constraint=constraint, logprobs=request.logprobs)
        try:
            model.check_constraint(options)  # the backend can, and llama.cpp parses the grammar: still a 400
        except ConvLlavaEdgeError as e:
            raise ApiError(400, str(e), "response_format", "invalid_schema") from None
        emit(READY)
        stream = model.answer(items, [e for turn in placed for e in turn], options)
        pieces = iter(stream)
        sent = 0  # logprob entries streamed so far
        for piece in pieces:
            if locked:
                served.prefill_lock.release()
                locked = False
            if cancel.is_set():
                pieces.close()  # type: ignore[attr-defined]
                model.reset()  # the KV cache's record no longer matches what was evaluated
                return None
            if options.logprobs is not None:
                piece, sent = Piece.of(piece, logprob_entries(model.llm, stream.logprobs[sent:])), len(stream.logprobs)
            emit(piece)
    except ContextOverflowError as e:
        raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
    except ConvLlavaEdgeError as e:
        raise ApiError(400, str(e).splitlines()[0] if str(e) else type(e).__name__, code="invalid_input") from None
    finally:
        if locked:
            served.prefill_lock.release()
    answer = stream.answer
    slot.history = (conversation_key(request), conversation_turns(request, answer.text))
    return answer
