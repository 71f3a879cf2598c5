"""``convllava-edge serve``: bundles behind OpenAI's chat-completions API (the ``serve`` extra: FastAPI, uvicorn).

``convllava_edge.serve.app(models, ServeOptions(...))`` is the ASGI app; the CLI runs it under uvicorn.
"""

from .app import ServeOptions, app

__all__ = ["ServeOptions", "app"]
