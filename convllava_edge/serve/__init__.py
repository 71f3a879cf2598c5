"""``convllava-edge serve``: bundles behind OpenAI's and Ollama's APIs, a web page and Prometheus metrics (the
``serve`` extra: FastAPI, uvicorn, prometheus-client).

``convllava_edge.serve.app(models, ServeOptions(...))`` is the ASGI app; the CLI runs it under uvicorn. The web
framework is imported when an app is made, so the request formats (wire, ollama) import without the extra.
"""

from .options import ServeOptions


def app(models=None, options: ServeOptions = ServeOptions()):
    """The ASGI app serving ``models`` (bundle folders; None: the demo model), named by their folder names."""
    from .server import app as make

    return make(models, options)


__all__ = ["ServeOptions", "app"]
