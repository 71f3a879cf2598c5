"""One generation as the HTTP front-ends see it: wait for a slot, then text pieces, then the Answer.

OpenAI's SSE stream, its JSON response and Ollama's NDJSON all read the same async iterator, so the queue,
the time limit, the cancellation of a client gone mid-stream and the metrics are written once.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from ..model import Answer
from .engine import READY, Engine, Served
from .wire import ApiError, ChatRequest

# Yielded once the request is checked through in its slot (the image decoded and encoded, the prompt's length
# within the context): the front-end may open its stream; every failure before it keeps its HTTP status.
STARTED = object()


def too_slow(timeout: float) -> ApiError:
    return ApiError(504, f"the request took longer than {timeout:g} s (--request-timeout)", code="timeout",
                    kind="timeout_error")


async def generate(eng: Engine, served: Served, chat: ChatRequest, max_tokens: int | None, cap: int,
                   timeout: float, metrics=None) -> AsyncIterator[object]:
    """STARTED, then each text piece (str), then the Answer. Raises ApiError: a full queue (503), bad input
    (400: an image that does not decode, a prompt over the context), the time limit (504). Closing the iterator early (a client gone) stops the generation at its next
    token and frees the slot."""
    pieces: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    cancel = threading.Event()
    deadline = loop.time() + timeout
    try:
        try:
            async with asyncio.timeout_at(deadline):
                slot = await eng.acquire(served, chat)
        except TimeoutError:
            raise too_slow(timeout) from None
        future = eng.start(served, slot, chat, (max_tokens, cap),
                           lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece), cancel)
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(pieces.put_nowait, None))
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    piece = await pieces.get()
            except TimeoutError:
                raise too_slow(timeout) from None
            if piece is None:
                break
            yield STARTED if piece is READY else piece
        answer: Answer = future.result()  # raises the slot's ApiError
        if metrics is not None:
            metrics.answered(served.name, answer)
        yield answer
    finally:
        cancel.set()  # a client gone or a time limit: the slot's thread stops at its next token


async def opened(gen: AsyncIterator[object]) -> None:
    """Run ``gen`` up to STARTED, before a stream's first byte: what fails until then raises its ApiError, which
    the handler answers with its real status (issue 32: they came as 200 and an error event)."""
    item = await anext(gen)
    if item is not STARTED:
        raise ApiError(500, "the generation began without being checked", kind="server_error")


async def complete(gen: AsyncIterator[object]) -> Answer:
    """The Answer of a generation that nobody streams."""
    async for item in gen:
        if isinstance(item, Answer):
            return item
    raise ApiError(500, "the generation ended without an answer", kind="server_error")
