"""The ASGI app: OpenAI's chat completions and models, Ollama's chat/generate/tags/version, Prometheus
metrics, a health check and the web page at ``/``; FastAPI (the ``serve`` extra).

``app(models, ...)`` returns it, so that it can be mounted or run under any ASGI server; ``convllava-edge
serve`` runs it under uvicorn. Bundles load in a thread when the app starts: /health answers 503 until
they are ready, then 200.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from contextlib import aclosing, asynccontextmanager, contextmanager
from pathlib import Path
from typing import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles

from ..errors import ConvLlavaEdgeError
from . import guard, ollama as ollama_api, schema
from .engine import Engine, Served, load_served
from .generate import complete, generate, opened
from .media import MediaDir
from .metrics import CLIENT_CLOSED, CountRequests, Metrics
from .options import ServeOptions, served_names
from .replies import (chunk, completion, completion_id, finish_reason, logprob_entries, now, timings, tool_chunks,
                      tool_message, usage)
from .wire import MAX_JSON_DEPTH, ApiError, ChatRequest, bad, check_json, parse_chat

PAGE = Path(__file__).resolve().parent / "page"  # the web page's static files, shipped in the package


def app(models: Sequence[str | Path] | None = None, options: ServeOptions = ServeOptions(), wait: bool = False):
    """The server for ``models`` (bundle folders or repo ids; None: the demo model), named by their folder names
    (a repo's name part). The models
    load in the background (/health: 503 until then); ``wait``: the app's startup waits for them and fails with
    their error (a Ray Serve replica is then ready only once its models are, or fails to start)."""
    options.validate()
    media = MediaDir(options.media_dir) if options.media_dir is not None else None  # opened once: media.py
    if not models:
        from ..default_model import default_bundle

        models = [default_bundle()]
    names = served_names(list(models))
    state: dict = {"engine": None, "error": None}

    def load() -> None:
        try:
            served = {name: load_served(name, path, options.parallel, options.queue, options.runtime)
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
        if wait:
            await task
            if state["error"]:
                raise ConvLlavaEdgeError(f"the model failed to load: {state['error']}")
        yield
        task.cancel()
        if state["engine"] is not None:
            state["engine"].close()

    api = FastAPI(title="convllava-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(lambda: state["engine"])
    api.add_middleware(CountRequests, metrics=metrics)
    guard.install(api, options.policy)  # outermost: a page that may not drive the server reaches nothing

    def error_response(e: ApiError, request: Request | None = None) -> JSONResponse:
        """OpenAI's error object, or Ollama's ``{"error": message}`` under /api/ (whatever raised it)."""
        if request is not None and request.url.path.startswith("/api/"):
            return ollama_error(e)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @api.exception_handler(ApiError)
    async def on_api_error(request, e: ApiError):
        return error_response(e, request)

    @api.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        return error_response(ApiError(e.status_code, str(e.detail), kind="invalid_request_error"), request)

    @api.exception_handler(Exception)
    async def on_unexpected(request, e: Exception):
        return error_response(ApiError(500, f"{type(e).__name__}: {e}".splitlines()[0], kind="server_error"), request)

    @api.exception_handler(RequestValidationError)
    async def on_validation(request, e):
        return error_response(bad(f"invalid request: {e.errors()[0].get('msg', 'bad input')}"), request)

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

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        """The routes and their bodies (schema.py), behind the API key like the routes it describes."""
        check_key(request)
        return api.openapi()

    @api.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [s.describe() for s in engine().served.values()]}

    @api.post("/v1/chat/completions", openapi_extra=schema.route_docs("/v1/chat/completions"))
    async def chat_completions(request: Request):
        check_key(request)
        eng = engine()
        body = await read_json(request, options.max_body, options.read_timeout)
        chat = parse_chat(body, options.max_image_bytes, media, options.max_images)
        served = pick_model(eng, chat.model)
        gen = generation(eng, served, chat)
        if chat.stream:
            await opened(gen)  # the image and the prompt's length checked: their errors keep their status
            return StreamingResponse(sse(served.name, chat, gen), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async with aclosing(gen):
            answer = await complete(gen)
        logprobs = logprob_entries(served.model.llm, answer.logprobs) if chat.logprobs is not None else None
        return completion(completion_id(), now(), served.name, answer, logprobs, chat.tools)

    def pick_model(eng: Engine, name: str | None) -> Served:
        if name is None or (name not in eng.served and len(eng.served) == 1 and name in ("", "default")):
            return next(iter(eng.served.values()))
        if name not in eng.served:
            raise ApiError(404, f"model {name!r} is not served here (served: {', '.join(eng.served)})", "model",
                           "model_not_found")
        return eng.served[name]

    def generation(eng: Engine, served: Served, chat: ChatRequest) -> AsyncIterator[object]:
        if chat.max_tokens is not None and chat.max_tokens > options.max_tokens_cap:
            raise bad(f"max_tokens {chat.max_tokens} is over this server's cap of {options.max_tokens_cap}",
                      "max_tokens")
        eng.admit(served)  # a full queue is a 503 status, before a stream's 200 is sent
        return generate(eng, served, chat, chat.max_tokens, options.max_tokens_cap, options.request_timeout, metrics)

    async def sse(name: str, chat: ChatRequest, gen: AsyncIterator[object]) -> AsyncIterator[str]:
        """The stream of a generation ``opened`` has run up to STARTED; failures from here on are error events."""
        cid, created = completion_id(), now()
        async with aclosing(gen):
            yield event(chunk(cid, created, name, {"role": "assistant", "content": ""}))
            tools = chat.tools is not None and chat.tools.active  # the answer is read whole, then streamed
            try:
                async for item in gen:
                    if isinstance(item, str):
                        if not tools:
                            yield event(chunk(cid, created, name, {"content": item},
                                              logprobs=getattr(item, "logprobs", None)))
                    else:
                        answer = item
            except ApiError as e:
                yield error_event(e)
                return
        finish = finish_reason(answer)
        if tools:
            read = chat.tools.read(answer.text)
            for delta in tool_chunks(read):
                yield event(chunk(cid, created, name, delta))
            finish = tool_message(read, finish)[1]
        yield event(chunk(cid, created, name, {}, finish, **({"usage": None} if chat.include_usage else {})))
        if chat.include_usage:
            yield event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                         "choices": [], "usage": usage(answer), "timings": timings(answer),
                         "token_ids": answer.token_ids})
        yield "data: [DONE]\n\n"

    # -- Ollama's API ------------------------------------------------------------------------------------
    def ollama_error(e: ApiError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    async def ollama(kind: str, request: Request):
        """/api/chat or /api/generate; Ollama's errors are {"error": message} with the HTTP status."""
        try:
            check_key(request)
            eng = engine()
            chat = ollama_api.parse(kind, await read_json(request, options.max_body, options.read_timeout), options.max_image_bytes,
                                    options.max_images)
            served = pick_model(eng, ollama_api.model_name(chat.model))
            gen = generation(eng, served, chat)
            started = time.perf_counter()
            tools = chat.tools if chat.tools is not None and chat.tools.active else None
            if chat.stream:
                await opened(gen)
                return StreamingResponse(ollama_api.ndjson(kind, served.name, gen, started, tools),
                                         media_type="application/x-ndjson")
            llm = served.model.llm if chat.logprobs is not None else None
            return await ollama_api.respond(kind, served.name, gen, started, llm, tools)
        except ApiError as e:
            return ollama_error(e)

    @api.post("/api/chat", openapi_extra=schema.route_docs("/api/chat"))
    async def ollama_chat(request: Request):
        return await ollama("chat", request)

    @api.post("/api/generate", openapi_extra=schema.route_docs("/api/generate"))
    async def ollama_generate(request: Request):
        return await ollama("generate", request)

    @api.get("/api/tags")
    async def ollama_tags(request: Request):
        check_key(request)
        return ollama_api.tags(engine().served)

    @api.post("/api/show", openapi_extra=schema.route_docs("/api/show"))
    async def ollama_show(request: Request):
        try:
            check_key(request)
            eng = engine()
            name = ollama_api.show_name(await read_json(request, options.max_body, options.read_timeout))
            return ollama_api.show(pick_model(eng, name))
        except ApiError as e:
            return ollama_error(e)

    @api.get("/api/version")
    async def ollama_version(request: Request):
        check_key(request)
        return ollama_api.version()

    # -- metrics and the page ----------------------------------------------------------------------------
    @api.get("/metrics")
    async def prometheus(request: Request):
        check_key(request)
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

    @api.get("/")
    async def index():
        return FileResponse(PAGE / "index.html", headers={"Cache-Control": "no-cache"})

    api.mount("/page", StaticFiles(directory=PAGE), name="page")

    return api


def run(asgi, host: str, port: int, grace: float, read_timeout: float | None = None) -> None:
    """Serve ``asgi`` under uvicorn until Ctrl-C or SIGTERM: then no new connections, in-flight requests get
    ``grace`` seconds, and the process exits 0 (uvicorn's own handler re-raises the signal after shutdown,
    which makes a stopped server look killed to whatever supervises it). A second signal stops at once.
    ``read_timeout``: seconds a request's head may take (head_timeout_protocol); its body's: read_json."""
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

    http = head_timeout_protocol(read_timeout) if read_timeout else "auto"
    Server(uvicorn.Config(asgi, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace,
                          http=http)).run()


def head_timeout_protocol(seconds: float):
    """uvicorn's HTTP/1.1 protocol with a limit on the time from a connection's first byte (or its previous
    answer's end) to the end of a request's headers: 408 and the connection closed past it. uvicorn has no such
    option (its keep-alive timeout covers idle connections between requests, not a head that stops half-way),
    so this reads the protocol's own state: ``cycle``, the request in progress, which both of uvicorn's parsers
    (httptools, h11) set when a head is complete."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    body = json.dumps({"error": {"message": f"the request's headers did not arrive within {seconds:g} s "
                                            "(--read-timeout)", "type": "invalid_request_error", "param": None,
                                 "code": "request_timeout"}}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(body), body))

    class HeadTimeout(AutoHTTPProtocol):
        def connection_made(self, transport, *args, **kwargs):
            super().connection_made(transport, *args, **kwargs)
            self._head_timer = self.loop.call_later(seconds, self._head_late)

        def data_received(self, data: bytes) -> None:
            before = getattr(self, "cycle", None)
            between = before is None or before.response_complete  # these bytes begin a new request's head
            super().data_received(data)
            after = getattr(self, "cycle", None)
            if after is not before:  # a head completed
                self._disarm()
            elif between and self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(seconds, self._head_late)

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            cycle = getattr(self, "cycle", None)
            if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

    return HeadTimeout


def event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_event(e: ApiError) -> str:
    """An error once streaming has begun: an SSE event with an ``error`` key (the openai client raises it)."""
    return event({**e.body(), "status": e.status})


async def read_json(request, limit: int, timeout: float | None = None):
    """The body, at most ``limit`` bytes (413 past it, whether or not Content-Length says so), as JSON checked by
    wire.check_json (text, depth). ``timeout``: seconds each part of the body may take to arrive (408 past it:
    a client that stops half-way holds no handler). A client gone before the end: ClientGone, no traceback."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes, over the limit of {limit:,}",
                       code="request_too_large")
    data = bytearray()
    parts = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(timeout):
                part = await parts.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--read-timeout)",
                           code="request_timeout", headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise ClientGone() from None
        data += part
        if len(data) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit:,} bytes", code="request_too_large")
    try:
        value = json.loads(data)
    except RecursionError:  # the parser recurses per level: '[' * 3000
        raise bad(f"the request body is JSON nested more than {MAX_JSON_DEPTH} levels deep", code="too_deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not JSON: {e}") from None
    check_json(value)
    return value


class ClientGone(ApiError):
    """The client closed the connection before its request's body was in: nobody reads the answer. Status 499,
    nginx's "client closed request", which /metrics counts as a disconnect (metrics.py)."""

    def __init__(self):
        super().__init__(CLIENT_CLOSED, "the client closed the connection before sending the whole request",
                         code="client_closed_request")
