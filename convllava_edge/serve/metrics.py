"""``GET /metrics`` in Prometheus' text format, by prometheus_client (its registry, types and exposition).

Each app has a registry of its own (two apps in one process count apart). Requests are counted by an ASGI
middleware that reads the response's status as it is sent, which leaves streaming responses (and a client
gone mid-stream) untouched; queue depth and busy slots are read from the engine at scrape time.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "convllava_edge"
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/api/chat", "/api/generate",
             "/api/tags", "/api/version", "/api/show")
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection before its answer: not a server error
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class Metrics:
    def __init__(self, engine: Callable[[], object | None]):
        """``engine``: the running Engine, or None while the bundles load."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.disconnects = Counter(f"{PREFIX}_client_disconnects", "Requests whose client closed the connection "
                                   "before the request was in (also counted as status 499)", ["endpoint"],
                                   registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt positions (text and image) answered",
                                     ["model"], registry=self.registry)
        self.cached_tokens = Counter(f"{PREFIX}_cached_prompt_tokens", "Prompt positions reused from the KV cache",
                                     ["model"], registry=self.registry)
        self.image_tokens = Counter(f"{PREFIX}_image_tokens", "Image positions in the prompts answered",
                                    ["model"], registry=self.registry)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated", ["model"],
                                        registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to first token (preprocess, encode, "
                              "prefill, first token)", ["model"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.decode_rate = Histogram(f"{PREFIX}_decode_tokens_per_second", "Decoding speed per answer", ["model"],
                                     buckets=TOKENS_PER_S_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def request(self, path: str, status: int) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        if status == CLIENT_CLOSED:
            self.disconnects.labels(endpoint).inc()

    def answered(self, model: str, answer) -> None:
        self.prompt_tokens.labels(model).inc(answer.n_prompt_positions)
        self.cached_tokens.labels(model).inc(answer.cached_tokens or 0)
        self.image_tokens.labels(model).inc(answer.n_image_tokens)
        self.generated_tokens.labels(model).inc(len(answer.token_ids))
        self.ttft.labels(model).observe(answer.timings.get("time_to_first_token_ms", 0.0) / 1e3)
        if answer.timings.get("decode_tokens_per_s"):
            self.decode_rate.labels(model).observe(answer.timings["decode_tokens_per_s"])

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Gauges read at scrape time: requests waiting, slots busy, slots in all."""

    def __init__(self, engine: Callable[[], object | None]):
        self.engine = engine

    def describe(self):
        return []  # no fixed description: the models are known once loaded

    def collect(self):
        waiting = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for a slot", labels=["model"])
        busy = GaugeMetricFamily(f"{PREFIX}_busy_slots", "Slots generating now", labels=["model"])
        slots = GaugeMetricFamily(f"{PREFIX}_slots", "Slots in all (--parallel)", labels=["model"])
        engine = self.engine()
        for name, served in (engine.served.items() if engine is not None else ()):
            waiting.add_metric([name], served.waiting)
            busy.add_metric([name], sum(s.busy for s in served.slots))
            slots.add_metric([name], len(served.slots))
        yield from (waiting, busy, slots)


class CountRequests:
    """ASGI middleware: every HTTP request counted by endpoint and the status it was answered with."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]  # an exception before any response: the server's error handler answers 500

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.request(scope["path"], status[0])
