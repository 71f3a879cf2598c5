"""Loopback fake of the Hugging Face Hub file protocol, for download tests (standard library only).

Checked against the pinned client, huggingface_hub 2.4.0 (HTTP via ``httpx2``). Set ``HF_ENDPOINT`` to
``FakeHub.url`` *before* huggingface_hub is imported (``constants.ENDPOINT`` is read at import), use a scratch
``HF_HOME`` (token file, caches) and unset ``HF_TOKEN``/``HF_OIDC_RESOURCE``, or gated checks see a token.
``HF_HUB_DISABLE_XET=1`` is optional: no Xet metadata is ever sent, so the client downloads over plain HTTP.

Routes (model repos only; ``{repo}`` is ``name`` or ``org/name``; ``{rev}`` arrives URL-quoted):

* ``GET /api/models/{repo}[/revision/{rev}]`` (``HfApi.model_info``): ``snapshot_download`` reads only ``sha``
  and skips the call when ``revision`` is a 40-hex commit. Sends ``id`` (required), ``sha``, ``siblings``
  (``rfilename``, ``size``, ``blobId``, ``lfs``), ``gated``, ``private``.
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true&expand=false`` (``HfApi.list_repo_tree``): the
  file list ``snapshot_download`` filters with ``allow_patterns``. Entries ``{type, oid, size, path, lfs}``, no
  ``xetHash`` (with one, and hf_xet enabled, the client would skip HEAD for Xet). One page (no ``Link``).
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: 200 directly, no redirect (the client falls back to the request
  url when there is no ``Location``). Headers ``X-Repo-Commit``, ``ETag`` = ``X-Linked-Etag`` = ``"<sha256>"``
  (the cache's blob name), ``X-Linked-Size``, ``Content-Length``, ``Accept-Ranges``; never ``X-Xet-*``.
  ``Range: bytes=N-`` / ``bytes=N-M`` gives 206 + ``Content-Range: bytes N-M/SIZE``; past the end gives 416.
* ``GET /api/agent-harnesses``: telemetry registry, fetched once per process unless
  ``HF_HUB_DISABLE_TELEMETRY=1``; answered with an empty registry.

Errors use ``X-Error-Code`` (what ``utils/_http.py::hf_raise_for_status`` maps) plus ``X-Error-Message`` and a JSON
``{"error": ...}`` body on GET: unknown repo: 404 ``RepoNotFound``; unknown revision: 404 ``RevisionNotFound``;
unknown file: 404 ``EntryNotFound`` with ``X-Repo-Commit`` (the client records ``.no_exist``); gated repo and no
``Authorization: Bearer``: 401 ``GatedRepo`` on ``/resolve`` only. As on the real Hub, a gated repo's info and tree
stay public, and here any bearer token counts as granted access.

A cut (``cut_after``) makes the 2.4.0 client retry in the same call (``http_get``, up to 5 times, 1 s apart) with
``Range: bytes=<bytes written>-``. It writes whole ``constants.DOWNLOAD_CHUNK_SIZE`` (10 MiB) chunks only, so for
smaller files it restarts without ``Range``; patch that constant lower to see ``Range``. A failed call deletes
its partial file, so the next call starts again from byte 0.
"""

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)??)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<sub>.*))?)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<sub>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_NO_AGENTS = b'{"standardEnvVars": [], "harnesses": {}}'


class FakeHub:
    """In-process fake Hub. ``requests`` holds ``(method, path_with_query, headers)``, header names lowercased."""

    def __init__(self):
        self._repos: dict[str, dict] = {}  # repo_id -> {"gated": bool, "refs": {rev: sha}, "commits": {sha: files}}
        self._cuts: dict[str, list[int]] = {}  # file path -> [n_bytes, remaining times]
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[tuple[str, str, dict]] = []
        self.url = ""

    def add_repo(self, repo_id: str, files: dict[str, bytes], revision: str = "main", commit: str | None = None,
                 gated: bool = False) -> str:
        """Add (or extend) a repo with one revision name -> commit holding ``files``; return the commit sha."""
        if commit is None:
            h = hashlib.sha1(repo_id.encode())
            for path in sorted(files):
                h.update(b"\0" + path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
            commit = h.hexdigest()
        repo = self._repos.setdefault(repo_id, {"gated": gated, "refs": {}, "commits": {}})
        repo["gated"] = repo["gated"] or gated
        repo["commits"][commit] = dict(files)
        repo["refs"][revision] = commit
        return commit

    def cut_after(self, path: str, n_bytes: int, times: int = 1) -> None:
        """Make the next ``times`` GETs of ``path`` (any repo) send ``n_bytes`` of their body, then drop the socket."""
        with self._lock:
            self._cuts[path] = [n_bytes, times]

    def start(self) -> "FakeHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _take_cut(self, path: str) -> int | None:
        with self._lock:
            cut = self._cuts.get(path)
            if not cut or cut[1] <= 0:
                return None
            cut[1] -= 1
            return cut[0]


def _file_entry(path: str, data: bytes) -> dict:
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return {"type": "file", "oid": blob, "size": len(data), "path": path, "lfs": lfs}


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_HEAD(self):
            self._handle(send_body=False)

        def do_GET(self):
            self._handle(send_body=True)

        def _reply(self, status: int, headers: dict, body: bytes = b"", send_body: bool = True,
                   cut: int | None = None) -> None:
            """Send a response; with ``cut``, announce the full length, send ``cut`` bytes and drop the socket."""
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body if cut is None else body[:cut])
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def _error(self, status: int, code: str, message: str, send_body: bool, extra: dict | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
            self._reply(status, {**headers, **(extra or {})}, body, send_body)

        def _resolve(self, repo_id: str, rev: str, send_body: bool):
            """Return (repo, commit, files) or send the matching error and return None."""
            repo = hub._repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found", send_body)
            commit = repo["refs"].get(rev) or (rev if rev in repo["commits"] else None)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", send_body)
            return repo, commit, repo["commits"][commit]

        def _handle(self, send_body: bool) -> None:
            hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            path = urlsplit(self.path).path
            if path == "/api/agent-harnesses":  # fetched once per process unless HF_HUB_DISABLE_TELEMETRY=1
                return self._reply(200, {"Content-Type": "application/json"}, _NO_AGENTS, send_body)
            if m := _API.match(path):
                return self._api(unquote(m["repo"]), unquote(m["rev"] or "main"), m["kind"], unquote(m["sub"] or ""),
                                 send_body)
            if m := _RESOLVE.match(path):
                return self._file(unquote(m["repo"]), unquote(m["rev"]), unquote(m["sub"]), send_body)
            self._error(404, "NotFound", f"No route for {path}", send_body)

        def _api(self, repo_id: str, rev: str, kind: str | None, sub: str, send_body: bool) -> None:
            if (found := self._resolve(repo_id, rev, send_body)) is None:
                return
            repo, commit, files = found
            entries = [_file_entry(p, d) for p, d in sorted(files.items())]
            if kind == "tree":
                prefix = sub.strip("/") + "/" if sub.strip("/") else ""
                recursive = "recursive=true" in urlsplit(self.path).query.lower()
                dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
                listing = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                           for d in dirs] + entries
                payload = [e for e in listing if e["path"].startswith(prefix)
                           and (recursive or "/" not in e["path"][len(prefix):])]
                if prefix and not payload:
                    return self._error(404, "EntryNotFound", f"{sub} does not exist on {rev}", send_body,
                                       {"X-Repo-Commit": commit})
            else:
                siblings = [{"rfilename": e["path"], "size": e["size"], "blobId": e["oid"],
                             "lfs": {"size": e["size"], "sha256": e["lfs"]["oid"], "pointerSize": 134}}
                            for e in entries]
                payload = {"id": repo_id, "sha": commit, "private": False, "gated": "auto" if repo["gated"] else False,
                           "siblings": siblings}
            self._reply(200, {"Content-Type": "application/json", "X-Repo-Commit": commit},
                        json.dumps(payload).encode(), send_body)

        def _file(self, repo_id: str, rev: str, file_path: str, send_body: bool) -> None:
            repo = hub._repos.get(repo_id)
            auth = self.headers.get("Authorization", "")
            if repo is not None and repo["gated"] and not auth.startswith("Bearer "):
                msg = (f"Access to model {repo_id} is restricted. You must have access to it and be authenticated"
                       " to access it. Please log in.")
                return self._error(401, "GatedRepo", msg, send_body)
            if (found := self._resolve(repo_id, rev, send_body)) is None:
                return
            _, commit, files = found
            if file_path not in files:
                return self._error(404, "EntryNotFound", "Entry not found", send_body, {"X-Repo-Commit": commit})
            data = files[file_path]
            sha = hashlib.sha256(data).hexdigest()
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "X-Repo-Commit": commit,
                       "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
            status, start, end = 200, 0, len(data) - 1
            if (rng := _RANGE.match(self.headers.get("Range", "").strip())) is not None:
                start, end = int(rng[1]), min(int(rng[2]) if rng[2] else len(data) - 1, len(data) - 1)
                if start >= len(data) or start > end:
                    return self._reply(416, {"Content-Range": f"bytes */{len(data)}"}, send_body=send_body)
                status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{len(data)}"
            cut = hub._take_cut(file_path) if send_body else None
            self._reply(status, headers, data[start:end + 1], send_body, cut)

    return Handler
