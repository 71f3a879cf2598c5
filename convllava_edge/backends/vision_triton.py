"""The vision backend on a Triton Inference Server (``--vision-url http://host:port``): each of the bundle's
graphs is the Triton model ``deploy triton`` named after it (deploy_triton.triton_model_name), version 1, asked
over Triton's HTTP/REST protocol with tritonclient (the ``triton`` extra). The preprocessing, the cache and what
is done with the outputs stay here; only the graph runs there. A server that is down, a model it does not serve
or one whose inputs differ from the graph's are one-line errors.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import numpy as np

from ..errors import BundleError, ConfigError
from .base import check_graph_names, checked_outputs, first_line

VERSION = "1"


def triton_model_name(manifest, role: str) -> str:
    """The Triton model of one of the bundle's graphs (``<bundle name>_<role>``): letters, digits, ``_ . -``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{manifest.name}_{role}")


def open_triton(bundle: Path, manifest, entry, url: str) -> "TritonBackend":
    """The backend for ``entry``'s graphs on the Triton server at ``url``, by the names deploy gave them."""
    from ..families import family_for
    from ..manifest import resolve_inside

    files = family_for(manifest.family).graph_files(entry)
    return TritonBackend(url, {str(resolve_inside(Path(bundle), f).resolve()): triton_model_name(manifest, role)
                               for role, f in files.items()})


def _client_module():
    try:
        import tritonclient.http as http
    except ImportError as e:
        raise ConfigError(f"--vision-url needs the triton extra (pip install 'convllava-edge[triton]'): {e}") from None
    return http


class TritonGraph:
    """One graph as a Triton model (the Graph of backends/base.py)."""

    def __init__(self, backend: "TritonBackend", model: str, path: Path):
        self.backend, self.model, self.path = backend, model, path
        metadata = backend.call(lambda c: c.get_model_metadata(model, VERSION), f"model {model!r}")
        self.input_names = [i["name"] for i in metadata["inputs"]]
        self.output_names = [o["name"] for o in metadata["outputs"]]

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        http = self.backend.http
        inputs = []
        for name, value in feeds.items():
            value = np.ascontiguousarray(value)
            item = http.InferInput(name, list(value.shape), _triton_dtype(value.dtype))
            item.set_data_from_numpy(value, binary_data=True)
            inputs.append(item)
        wanted = [http.InferRequestedOutput(name, binary_data=True) for name in outputs]

        def run():
            result = self.backend.call(lambda c: c.infer(self.model, inputs, model_version=VERSION, outputs=wanted),
                                       f"model {self.model!r}")
            return [result.as_numpy(name) for name in outputs]
        return checked_outputs(f"{self.backend.url} {self.model}", "Triton", outputs, run)


def _triton_dtype(dtype: np.dtype) -> str:
    names = {np.float32: "FP32", np.float16: "FP16", np.int64: "INT64", np.int32: "INT32"}
    return names[np.dtype(dtype).type]


class TritonBackend:
    """A Triton server running the bundle's graphs (the VisionBackend of backends/base.py). ``models``: graph file
    (resolved) -> Triton model name."""

    threads = 0  # the server's business

    def __init__(self, url: str, models: dict[str, str], timeout: float = 120.0):
        self.http = _client_module()
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--vision-url {url!r}: expected http://HOST:PORT (Triton's HTTP endpoint)")
        self.url, self.models = url.rstrip("/"), models
        # tritonclient.http runs on gevent, whose connections belong to the thread that made them (`serve` loads in
        # one thread and encodes in others): a client per thread
        self._connect = lambda: self.http.InferenceServerClient(parts.netloc, ssl=parts.scheme == "https",
                                                                connection_timeout=timeout, network_timeout=timeout)
        self._local = threading.local()
        if not self.call(lambda c: c.is_server_ready(), "readiness"):
            raise ConfigError(f"Triton at {self.url} is not ready")
        self.providers = [f"Triton ({self.url})"]
        self.note = f"vision on Triton at {self.url}"

    @property
    def client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._connect()
        return client

    def call(self, request, what: str):
        """``request(client)``, with the server's and the network's failures as one line."""
        from tritonclient.utils import InferenceServerException

        try:
            return request(self.client)
        except InferenceServerException as e:
            raise BundleError(f"Triton at {self.url}, {what}: {first_line(e)}") from None
        except (OSError, TimeoutError) as e:  # refused, reset, unreachable, timed out (gevent raises these)
            raise ConfigError(f"cannot reach Triton at {self.url} ({first_line(e) or type(e).__name__})") from None

    def load(self, path, inputs: Sequence[str], outputs: Sequence[str]) -> TritonGraph:
        model = self.models.get(str(Path(path).resolve()))
        if model is None:
            raise BundleError(f"{path}: no Triton model is named for this graph")
        if not self.call(lambda c: c.is_model_ready(model, VERSION), f"model {model!r}"):
            try:  # what it has, where the server lets us list it (PyTriton restricts its repository API)
                served = sorted(m["name"] for m in self.client.get_model_repository_index() if m.get("name"))
                has = f" (it has {', '.join(served) or 'no model'})"
            except Exception:  # noqa: BLE001: only the message's detail is lost
                has = ""
            raise ConfigError(f"Triton at {self.url} does not serve {model!r} version {VERSION}{has}: "
                              "`convllava-edge deploy triton` names the bundle's models")
        graph = TritonGraph(self, model, Path(path))
        check_graph_names(graph, inputs, outputs)
        return graph


__all__ = ["TritonBackend", "TritonGraph", "open_triton", "triton_model_name"]
