"""What ``serve`` is told: its options, checked, and the served bundles' names (no web framework imported)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import ConvLlavaEdgeError
from ..runtime import RuntimeOptions

MiB = 1 << 20


@dataclass(frozen=True)
class ServeOptions:
    parallel: int = 1  # generations at once per bundle
    queue: int = 64  # requests waiting per bundle before 503
    api_key: str | None = None
    max_tokens_cap: int = 1024
    max_image_bytes: int = 20 * MiB  # each image
    max_images: int = 8  # images per request (wire.DEFAULT_MAX_IMAGES)
    media_dir: Path | None = None
    # How each bundle runs: threads are each slot's decoding (default: the cores shared out between the slots),
    # threads_batch the vision graphs' and prefill's, one slot at a time (default: every core); n_ctx per slot
    # (default: the LLM's trained context, at most engine.DEFAULT_CONTEXT)
    runtime: RuntimeOptions = RuntimeOptions()
    request_timeout: float = 300.0
    read_timeout: float = 30.0  # --read-timeout: seconds a request's head, and each part of its body, may take
    bind_host: str = "127.0.0.1"  # the address served on: loopback turns the Host check on (guard.py)
    allowed_hosts: tuple[str, ...] | None = None  # --allowed-hosts: more names for Host ("*": any); None: not given
    allowed_origins: tuple[str, ...] = ()  # --allowed-origins: pages that may call the server ("*": any)

    def validate(self) -> None:
        for name, low in (("parallel", 1), ("queue", 0), ("max_tokens_cap", 1), ("max_image_bytes", 1),
                          ("max_images", 1)):
            if getattr(self, name) < low:
                raise ConvLlavaEdgeError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        for name in ("request_timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ConvLlavaEdgeError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        self.runtime.validate()
        if self.media_dir is not None and not Path(self.media_dir).is_dir():
            raise ConvLlavaEdgeError(f"--media-dir {self.media_dir}: not a folder")

    @property
    def policy(self):
        """The Host and Origin checks these options ask for (guard.Policy)."""
        from .guard import Policy

        return Policy(self.bind_host, self.allowed_hosts, self.allowed_origins)

    @property
    def max_body(self) -> int:
        return self.max_images * (self.max_image_bytes * 4 // 3) + 4 * MiB  # the base64 images and the text


def served_names(bundles: Sequence[str | Path]) -> dict[str, Path]:
    """Name -> folder of each bundle: a folder by its name; a repo id (hub.py) by the repo's name part, from the
    Hugging Face cache or pulled."""
    from ..hub import bundle_path, served_name

    names: dict[str, Path] = {}
    for spec in bundles:
        name, path = served_name(spec), bundle_path(spec)
        if name in names:
            raise ConvLlavaEdgeError(f"two bundles are named {name!r} ({names[name]} and {spec}): rename one folder")
        names[name] = Path(path)
    return names
