"""The HTTP request handler shared by the API host and the CDN host.

It parses a request into a `Request`, records it in the stats, and hands it to the router
of its host (`api.route` or `files.route_cdn`). It also owns the Hub's response
conventions: `X-Request-Id`, JSON error bodies with `X-Error-Code` / `X-Error-Message`,
and the access rules (private and unknown repos look the same, gated repos need a token: 401
GatedRepo without one, 403 GatedRepo for a valid token in `tokens_without_gated_access`).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from .api import route
from .body import ConnectionDropped
from .cas import route_cas
from .files import route_cdn
from .repo import Commit, Repo

if TYPE_CHECKING:
    from .server import HubServer

EXPOSED = (
    "X-Repo-Commit,X-Request-Id,X-Error-Code,X-Error-Message,X-Total-Count,ETag,Link,Accept-Ranges,"
    "Content-Range,X-Linked-Size,X-Linked-ETag,X-Xet-Hash"
)
INVALID_TOKEN = "Invalid credentials in Authorization header"  # hf_raise_for_status keys on this text


@dataclass
class Request:
    method: str
    target: str  # request target as sent (path + query)
    path: str  # still percent-encoded
    segments: list[str]  # path split on '/', each segment percent-decoded
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    token: str | None
    body: bytes = b""

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in ("1", "true", "yes")

    def form(self) -> dict[str, list[str]]:
        """POST body as form fields (what huggingface_hub sends) or a JSON object."""
        if "json" in self.headers.get("content-type", ""):
            data = json.loads(self.body or b"{}")
            return {k: [str(x) for x in v] if isinstance(v, list) else [str(v)] for k, v in data.items()}
        return parse_qs(self.body.decode(), keep_blank_values=True)


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; clients pool connections
    server_version = "devhub"
    sys_version = ""

    # -- plumbing -----------------------------------------------------------------------
    @property
    def hub(self) -> "HubServer":
        return self.server.hub  # type: ignore[attr-defined]

    @property
    def host_kind(self) -> str:
        return self.server.kind  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        self.hub._track(self.connection, True)

    def finish(self) -> None:
        self.hub._track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass  # the connection was dropped on purpose (fault) or by the peer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # tests and benchmarks would drown in access logs

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        req = self._parse()
        self.hub.stats.record_request(self.host_kind, req.method, req.target, req.headers)
        self.request_id = "Root=1-" + secrets.token_hex(12)
        try:
            {"cdn": route_cdn, "cas": route_cas}.get(self.host_kind, route)(self, req)
        except ConnectionDropped:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # client went away mid-response

    def _parse(self) -> Request:
        split = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        if segments and segments[-1] == "":
            segments.pop()
        query = parse_qs(split.query, keep_blank_values=True)
        # always drain a request body, or it would be parsed as the next keep-alive request
        length = int(headers.get("content-length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        return Request(self.command, self.path, split.path, segments, query, headers, token, body)

    # -- responses ----------------------------------------------------------------------
    def start(self, status: int, headers: dict[str, str]) -> None:
        """Status line and headers; the caller writes the body (never for HEAD)."""
        self.send_response(status)
        self.send_header("X-Request-Id", self.request_id)
        if self.host_kind == "api":
            self.send_header("Access-Control-Expose-Headers", EXPOSED)
            self.send_header("Vary", "Origin, Accept")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def respond(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        self.start(status, headers)
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def respond_json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.respond(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)

    def respond_error(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        extra = dict(headers or {})
        if code:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self.respond_json(status, {"error": message}, extra)

    def respond_fault(self, fault) -> None:
        """Answer a request fault: an empty error like a proxy or rate limiter gives, or a redirect."""
        if fault.kind == "429":
            resource = "api" if self.path.startswith("/api/") else "resolvers"
            reset = fault.reset_seconds()
            headers = {
                "RateLimit": f'"{resource}";r=0;t={reset}',
                "RateLimit-Policy": f'"fixed window";"{resource}";q=3000;w=300',
            }
            if fault.send_retry_after:
                headers["Retry-After"] = str(reset)
            self.respond(429, headers)
        elif fault.kind == "redirect":
            self.respond(307, {"Location": f"{fault.location}{self.path}"})
        else:
            self.respond(fault.status)

    # -- access rules -------------------------------------------------------------------
    def check_repo(self, req: Request, repo: Repo | None, *, files: bool) -> Repo | None:
        """The repo if this request may see it; otherwise answer like the Hub and return None."""
        valid = req.token is not None and req.token in self.hub.tokens
        if req.token is not None and not valid:
            self.respond_error(401, INVALID_TOKEN)
            return None
        if repo is None or (repo.private and not valid):
            # the Hub hides private repos: same answer as a missing repo, 401 when anonymous
            self.respond_error(404 if valid else 401, "Repository not found", "RepoNotFound")
            return None
        if repo.gated and files and not valid:
            kind = repo.repo_type
            msg = (
                f"Access to {kind} {repo.repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in."
            )
            self.respond_error(401, msg, "GatedRepo")
            return None
        if repo.gated and files and req.token in self.hub.tokens_without_gated_access:
            # a valid token whose user has not been granted access: 403, and the same X-Error-Code
            # that huggingface_hub turns into GatedRepoError (on resolve and on the Xet token route)
            msg = (
                f"Access to {repo.repo_type} {repo.repo_id} is restricted and you are not in the authorized "
                f"list. Visit {self.hub.url}/{repo.repo_id} to ask for access."
            )
            self.respond_error(403, msg, "GatedRepo")
            return None
        return repo

    def resolve_commit(self, repo: Repo, revision: str) -> Commit | None:
        """The commit `revision` names in `repo`, or answer 404 RevisionNotFound and return None."""
        commit = repo.resolve(revision)
        if commit is None:
            self.respond_error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit
