"""``serve --ray --replicas N``: the same ASGI app as ``serve``, as a Ray Serve deployment of N replicas, each
loading its own models, behind Ray Serve's HTTP proxy on ``host:port``.

Each replica builds the app itself (``__serve_build_asgi_app__``: nothing with a lock or a model is pickled),
and its startup waits for the models (``server.app(wait=True)``), so ``serve.run`` returns once every replica
can answer and a model that fails to load fails the start in one line. Everything ``serve`` guarantees comes
from that app: limits, errors, streaming, API key, the page, Ollama's API, metrics (per replica). Ray Serve
routes at most ``parallel + queue`` requests to a replica; our queue answers 503 past that, as alone.

Without ``address`` a local cluster starts on this machine (ray_batch.start_ray) and stops with the command;
with one (``ray start --head`` first; workers ``ray start --address HEAD:6379``) the application is deployed
there and deleted on exit, the cluster left running.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from pathlib import Path

from ..errors import ConvLlavaEdgeError
from ..threads import default_threads
from .options import ServeOptions

APP_NAME = "convllava-edge"


class Replica:
    """One Ray Serve replica: ``serve``'s app for the bundles (the class is decorated in ``deploy``)."""

    def __init__(self, models: list[str] | None, options: ServeOptions):
        self.models, self.options = models, options

    def __serve_build_asgi_app__(self):
        from .server import app

        return app(self.models, self.options, wait=True)


def replica_options(options: ServeOptions, replicas: int, local: bool) -> ServeOptions:
    """On a local cluster the replicas share this machine's cores: each gets its share for the image and the
    prefill, and that share split among its slots for decoding (unless told otherwise)."""
    if not local:
        return options
    share = max(1, default_threads() // replicas)
    runtime = options.runtime
    return dataclasses.replace(options, runtime=runtime.with_(threads_batch=runtime.threads_batch or share,
                                                              threads=runtime.threads or max(1, share // options.parallel)))


def serve_on_ray(models: list[Path] | None, options: ServeOptions, host: str, port: int, replicas: int,
                 address: str | None, grace: float, ready=lambda url: None) -> None:
    """Deploy, then block until Ctrl-C or SIGTERM; then the application is deleted (in-flight requests get
    ``grace`` seconds) and a local cluster shut down."""
    import ray
    from ray import serve

    from ..ray_batch import start_ray

    from ..manifest import load_manifest

    options.validate()
    for bundle in models or ():  # a bundle that cannot load fails here in one line, not in N replicas' retries
        load_manifest(Path(bundle), verify=False)
    started = start_ray(address)
    local = address is None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        share = ray.cluster_resources().get("CPU", 1)
        deployment = serve.deployment(
            serve.ingress()(Replica), name="ConvLlavaEdge", num_replicas=replicas,
            max_ongoing_requests=options.parallel + options.queue, graceful_shutdown_timeout_s=grace,
            # fractional: whole-CPU replicas and Ray Serve's own actors can wait on each other on a small cluster
            ray_actor_options={"num_cpus": min(1.0, max(0.1, (share - 0.5) / replicas))})
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(deployment.bind([str(m) for m in models] if models else None,
                                      replica_options(options, replicas, local)),
                      name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as e:  # a replica that cannot start: Ray wraps our one line in its report
            raise ConvLlavaEdgeError(f"the Ray Serve deployment failed: {_reason(e)}") from None
        ready(f"http://{host}:{port}")
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ray.is_initialized():
            try:
                serve.delete(APP_NAME) if not local else serve.shutdown()
            finally:
                if started:
                    ray.shutdown()


def _reason(error: Exception) -> str:
    """The last line of Ray's report that names our error, else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    ours = [line for line in lines if "ConvLlavaEdgeError" in line or "the model failed to load" in line]
    return (ours[-1] if ours else lines[0] if lines else type(error).__name__)[:500]


__all__ = ["Replica", "serve_on_ray"]
