"""The ASGI app: OpenAI's chat completions and models, a health check; FastAPI (the ``serve`` extra).

``app(models, ...)`` returns it, so that it can be mounted or run under any ASGI server; ``convllava-edge
serve`` runs it under uvicorn. Bundles load in a thread when the app starts: /health answers 503 until
they are ready, then 200.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import ConvLlavaEdgeError
from .engine import Engine, Served, load_served
from .wire import (ApiError, ChatRequest, bad, chunk, completion, completion_id, finish_reason, now, parse_chat,
                   timings, usage)

MiB = 1 << 20


@dataclass(frozen=True)
class ServeOptions:
    parallel: int = 1  # generations at once per bundle
    queue: int = 64  # requests waiting per bundle before 503
    api_key: str | None = None
    max_tokens_cap: int = 1024
    max_image_bytes: int = 20 * MiB
    media_dir: Path | None = None
    device: str = "auto"
    threads: int | None = None  # per slot (default: the cores shared out between the slots)
    n_ctx: int | None = None  # per slot (default: the LLM's trained context, at most engine.DEFAULT_CONTEXT)
    request_timeout: float = 300.0
    vision_backend: str | None = None

    def validate(self) -> None:
        for name, low in (("parallel", 1), ("queue", 0), ("max_tokens_cap", 1), ("max_image_bytes", 1)):
            if getattr(self, name) < low:
                raise ConvLlavaEdgeError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if not self.request_timeout > 0:
            raise ConvLlavaEdgeError(f"--request-timeout must be positive, got {self.request_timeout}")
        if self.media_dir is not None and not Path(self.media_dir).is_dir():
            raise ConvLlavaEdgeError(f"--media-dir {self.media_dir}: not a folder")

    @property
    def max_body(self) -> int:
        return self.max_image_bytes * 4 // 3 + 4 * MiB  # one base64 image and the conversation's text


def served_names(bundles: Sequence[Path]) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in bundles:
        name = Path(path).resolve().name
        if name in names:
            raise ConvLlavaEdgeError(f"two bundles are named {name!r} ({names[name]} and {path}): rename one folder")
        names[name] = Path(path)
    return names


def app(models: Sequence[str | Path] | None = None, options: ServeOptions = ServeOptions()):
    """The server for ``models`` (bundle folders; None: the demo model), named by their folder names."""
    options.validate()
    if not models:
        from ..default_model import default_bundle

        models = [default_bundle()]
    names = served_names([Path(m) for m in models])
    state: dict = {"engine": None, "error": None}

    def load() -> None:
        try:
            served = {name: load_served(name, path, options.parallel, options.queue, options.device, options.threads,
                                        options.n_ctx, options.vision_backend)
                      for name, path in names.items()}
            state["served"] = served
        except Exception as e:  # noqa: BLE001: reported by /health and every request, the server stays up
            state["error"] = f"{type(e).__name__}: {e}".splitlines()[0]

    @asynccontextmanager
    async def lifespan(_app):
        loader = threading.Thread(target=load, name="load-bundles", daemon=True)
        loader.start()

        async def attach():
            await asyncio.to_thread(loader.join)
            if state.get("served"):
                state["engine"] = Engine(state["served"])
        task = asyncio.create_task(attach())
        yield
        task.cancel()
        if state["engine"] is not None:
            state["engine"].close()

    api = FastAPI(title="convllava-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @api.exception_handler(ApiError)
    async def on_api_error(request, e: ApiError):
        return error_response(e)

    @api.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        return error_response(ApiError(e.status_code, str(e.detail), kind="invalid_request_error"))

    @api.exception_handler(Exception)
    async def on_unexpected(request, e: Exception):
        return error_response(ApiError(500, f"{type(e).__name__}: {e}".splitlines()[0], kind="server_error"))

    @api.exception_handler(RequestValidationError)
    async def on_validation(request, e):
        return error_response(bad(f"invalid request: {e.errors()[0].get('msg', 'bad input')}"))

    def check_key(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {options.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key",
                           kind="authentication_error")

    def engine() -> Engine:
        if state["error"]:
            raise ApiError(500, f"the model failed to load: {state['error']}", kind="server_error")
        if state["engine"] is None:
            raise ApiError(503, "loading the model; retry shortly", code="loading", kind="unavailable_error",
                           headers={"Retry-After": "2"})
        return state["engine"]

    @api.get("/health")
    async def health():
        if state["error"]:
            return error_response(ApiError(500, f"the model failed to load: {state['error']}", kind="server_error"))
        if state["engine"] is None:
            return error_response(ApiError(503, "Loading model", code="503", kind="unavailable_error"))
        return {"status": "ok"}

    @api.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [s.describe() for s in engine().served.values()]}

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        eng = engine()
        body = await read_json(request, options.max_body)
        chat = parse_chat(body, options.max_image_bytes, options.media_dir)
        served = pick_model(eng, chat.model)
        max_tokens = chat.max_tokens
        if max_tokens is not None and max_tokens > options.max_tokens_cap:
            raise bad(f"max_tokens {max_tokens} is over this server's cap of {options.max_tokens_cap}", "max_tokens")
        if chat.stream:
            return StreamingResponse(stream(eng, served, chat, max_tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(eng, served, chat, max_tokens)

    def pick_model(eng: Engine, name: str | None) -> Served:
        if name is None or (name not in eng.served and len(eng.served) == 1 and name in ("", "default")):
            return next(iter(eng.served.values()))
        if name not in eng.served:
            raise ApiError(404, f"model {name!r} is not served here (served: {', '.join(eng.served)})", "model",
                           "model_not_found")
        return eng.served[name]

    async def complete(eng: Engine, served: Served, chat: ChatRequest, max_tokens: int | None):
        cancel = threading.Event()
        try:
            async with asyncio.timeout(options.request_timeout):
                slot = await eng.acquire(served, chat)
                future = eng.start(served, slot, chat, (max_tokens, options.max_tokens_cap), lambda piece: None, cancel)
                answer = await asyncio.shield(future)
        except TimeoutError:
            cancel.set()
            raise too_slow() from None
        return completion(completion_id(), now(), served.name, answer)

    async def stream(eng: Engine, served: Served, chat: ChatRequest, max_tokens: int | None) -> AsyncIterator[str]:
        cid, created = completion_id(), now()
        pieces: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        deadline = loop.time() + options.request_timeout
        future = None
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    slot = await eng.acquire(served, chat)
            except ApiError as e:
                yield error_event(e)
                return
            except TimeoutError:
                yield error_event(too_slow())
                return
            future = eng.start(served, slot, chat, (max_tokens, options.max_tokens_cap),
                               lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece), cancel)
            future.add_done_callback(lambda f: loop.call_soon_threadsafe(pieces.put_nowait, None))
            yield event(chunk(cid, created, served.name, {"role": "assistant", "content": ""}))
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        piece = await pieces.get()
                except TimeoutError:
                    cancel.set()
                    yield error_event(too_slow())
                    return
                if piece is None:
                    break
                yield event(chunk(cid, created, served.name, {"content": piece}))
            try:
                answer = future.result()
            except ApiError as e:
                yield error_event(e)
                return
            yield event(chunk(cid, created, served.name, {}, finish_reason(answer),
                              **({"usage": None} if chat.include_usage else {})))
            if chat.include_usage:
                yield event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": served.name,
                             "choices": [], "usage": usage(answer), "timings": timings(answer),
                             "token_ids": answer.token_ids})
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # a client gone mid-stream: its generation stops at the next token, the slot is freed

    def too_slow() -> ApiError:
        return ApiError(504, f"the request took longer than {options.request_timeout:g} s (--request-timeout)",
                        code="timeout", kind="timeout_error")

    return api


def run(asgi, host: str, port: int, grace: float) -> None:
    """Serve ``asgi`` under uvicorn until Ctrl-C or SIGTERM: then no new connections, in-flight requests get
    ``grace`` seconds, and the process exits 0 (uvicorn's own handler re-raises the signal after shutdown,
    which makes a stopped server look killed to whatever supervises it). A second signal stops at once."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            def stop(signum, frame):
                self.force_exit = self.should_exit
                self.should_exit = True
            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    Server(uvicorn.Config(asgi, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace)).run()


def event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_event(e: ApiError) -> str:
    """An error once streaming has begun: an SSE event with an ``error`` key (the openai client raises it)."""
    return event({**e.body(), "status": e.status})


async def read_json(request, limit: int):
    """The body, at most ``limit`` bytes (413 past it, whether or not Content-Length says so), as JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes, over the limit of {limit:,}",
                       code="request_too_large")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit:,} bytes", code="request_too_large")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not JSON: {e}") from None
