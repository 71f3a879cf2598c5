"""Which web pages may drive the server: the ``Host`` and ``Origin`` checks in front of every route.

A server on 127.0.0.1 is reachable from any page the user opens. A cross-origin "simple request" (a POST with
``Content-Type: text/plain``) is sent without a CORS preflight and acted on; after a DNS rebinding (a name the
page's author controls, re-pointed at 127.0.0.1) the page can read the answers too. Ollama (CVE-2024-28224) and
llama.cpp's server closed exactly this; we do as they do:

- ``Host`` must name the server when it is bound to a loopback address: 127.0.0.1, localhost, [::1] or the
  bound address, any port (an ``ssh -L`` forward changes the port, not the name), plus ``--allowed-hosts``
  (``*``: any). A rebound name is refused, so a page can never read an answer. On a non-loopback bind
  (``--host 0.0.0.0``, a LAN address) clients call the machine by names we cannot know: the check is off
  unless ``--allowed-hosts`` is given, as Ollama does, and start-up says so.
- ``Origin``, when a request has one (browsers send it on every cross-origin request and on same-origin
  POSTs), must be the server's own (the ``Host`` it was sent to, over http or https) or one of
  ``--allowed-origins`` (``*``: any); else 403. That is what stops the cross-origin ``text/plain`` POST,
  whatever its Host. The page at ``/`` is same-origin; curl and the SDKs send no Origin.
- Allowed origins also get CORS headers and their preflights answered (Starlette's CORSMiddleware), so a web
  app the user trusts can call the API from the browser.

A refusal is 403 in the route's error shape (Ollama's ``{"error": ...}`` under /api/, OpenAI's elsewhere).
The middleware is pure ASGI (no BaseHTTPMiddleware: that buffers streamed responses).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Iterable

LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")  # what names a loopback server, as a Host header writes them
ANY = "*"


def is_loopback(host: str) -> bool:
    """Whether a bind address is loopback-only (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def host_name(header: str) -> str:
    """The name part of a Host header value, lowercased: ``[::1]:8765`` -> ``[::1]``, ``Example:80`` -> ``example``."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[:end + 1] if end > 0 else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _bracketed(host: str) -> str:
    """An address as a Host header writes it (IPv6 in brackets)."""
    try:
        return f"[{host.strip('[]')}]" if ipaddress.ip_address(host.strip("[]")).version == 6 else host.lower()
    except ValueError:
        return host.lower()


def _origin(value: str) -> str:
    """An origin compared as browsers write it: scheme://host[:port], lowercased, no trailing slash."""
    return value.strip().rstrip("/").lower()


@dataclass(frozen=True)
class Policy:
    """The checks, from what ``serve`` was told: the bind address and the two lists (``allowed_hosts`` None:
    not given)."""

    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] | None = None
    allowed_origins: tuple[str, ...] = ()

    @property
    def checks_host(self) -> bool:
        if self.allowed_hosts is not None and ANY in self.allowed_hosts:
            return False
        return self.allowed_hosts is not None or is_loopback(self.bind_host)

    @property
    def hosts(self) -> frozenset[str]:
        names = {*LOCAL_NAMES, _bracketed(self.bind_host)}
        names.update(host_name(h) for h in self.allowed_hosts or ())
        return frozenset(names)

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(_origin(o) for o in self.allowed_origins)

    def refusal(self, host: str | None, origin: str | None) -> str | None:
        """Why a request with these headers is refused, or None."""
        if self.checks_host:
            if host is None:
                return "a Host header is needed"
            if host_name(host) not in self.hosts:
                return (f"Host {host!r} does not name this server (accepted: {', '.join(sorted(self.hosts))}; "
                        "serve --allowed-hosts NAME adds one)")
        if origin is not None:
            own = host is not None and _origin(origin) in (f"http://{host.strip().lower()}",
                                                          f"https://{host.strip().lower()}")
            if not own and ANY not in self.origins and _origin(origin) not in self.origins:
                return (f"Origin {origin!r} is not this server's own; serve --allowed-origins ORIGIN lets a page "
                        "there use it")
        return None

    def describe(self) -> list[str]:
        """What start-up says about the checks, where they are not the safe default."""
        lines = []
        if self.allowed_hosts is not None and ANY in self.allowed_hosts:
            lines.append("the Host check is off (--allowed-hosts '*'): a page on a domain re-pointed at this "
                         "address (DNS rebinding) can read the answers")
        elif not self.checks_host:
            lines.append(f"the Host check is off: bound to {self.bind_host}, not a loopback address; "
                         "--allowed-hosts NAME turns it on for those names")
        if ANY in self.origins:
            lines.append("any web page may call this server from the browser (--allowed-origins '*')")
        return lines


def parse_list(values: Iterable[str] | None) -> tuple[str, ...] | None:
    """``--allowed-hosts a,b --allowed-hosts c`` -> ("a", "b", "c"); None when the option was not given."""
    if not values:
        return None
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


class HostOriginGuard:
    """ASGI middleware: every HTTP request passes ``policy.refusal`` or gets 403 before the app sees it."""

    def __init__(self, app, policy: Policy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(key.lower(), value.decode("latin-1"))  # the first of a repeated header, as Starlette
        reason = self.policy.refusal(headers.get(b"host"), headers.get(b"origin"))
        if reason is None:
            return await self.app(scope, receive, send)
        if scope.get("path", "").startswith("/api/"):
            body = {"error": reason}
        else:
            body = {"error": {"message": reason, "type": "permission_error", "param": None, "code": "forbidden"}}
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def install(api, policy: Policy) -> None:
    """Put the checks in front of everything ``api`` (a Starlette/FastAPI app) serves, with CORS headers and
    preflights for the allowed origins behind them (Starlette runs the middleware added last first)."""
    if policy.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        api.add_middleware(CORSMiddleware, allow_origins=["*"] if ANY in policy.origins else sorted(policy.origins),
                           allow_methods=["*"], allow_headers=["*"])
    api.add_middleware(HostOriginGuard, policy=policy)


__all__ = ["HostOriginGuard", "Policy", "install", "is_loopback", "parse_list"]
