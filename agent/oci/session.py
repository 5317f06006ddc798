"""HTTP to one registry: TLS, proxies, the auth schemes, and redirects that never carry credentials.

Auth follows the distribution spec's token flow as docker and containerd do it. A request goes out with
what worked before; a 401 names the scheme in `WWW-Authenticate`:
- `Basic`: the credential's user and password on every request from then on;
- `Bearer realm=…,service=…,scope=…`: a token from the realm (GET with basic auth or none; an
  identity token is an OAuth2 refresh-token POST; a `registrytoken` is used as is), cached per scope
  until `expires_in` runs out (60 s when unsaid, as the spec says);
then the request is sent again. A 401 to a token fetched just then (or to basic credentials) is an
AuthError (exit 3): wrong credentials, or a token without the access asked for. A 403 is one at once.

A blob GET may be redirected to object storage (ECR, GAR, Harbor, distribution with a cloud driver).
The next hop gets the Authorization header only when it is the registry's own origin: a presigned URL
carries its own signature, and S3 refuses a request with two (docker and containerd drop it too).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable
from urllib.parse import urlencode, urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from .. import httpio
from ..errors import (
    AuthError,
    CertificateError,
    InvalidInput,
    Retryable,
    untrusted_reason,
)
from ..proxies import proxy_auth, proxy_for, proxy_origin
from .auth import Credential

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
DEFAULT_TOKEN_LIFETIME = 60.0  # seconds, when the token service does not say (distribution's token spec)
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer"
    params: dict


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a `WWW-Authenticate` header (registries send one)."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


def _not_tls(exc: BaseException | None) -> bool:
    """The TLS handshake read an HTTP answer: the port serves plain HTTP (OpenSSL's "wrong version number")."""
    for _ in range(4):
        if exc is None:
            return False
        if isinstance(exc, ssl.SSLError) and exc.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"):
            return True
        exc = exc.__cause__ or exc.__context__ or (exc.args[0] if exc.args and isinstance(exc.args[0], BaseException)
                                                   else None)
    return False


class FileSlice:
    """`length` bytes of a file from `offset`, as a request body urllib3 reads in blocks; a fresh one per
    attempt, so a request sent again (after a 401) sends the same bytes again."""

    def __init__(self, path, offset: int, length: int):
        self.path, self.offset, self.length = path, offset, length
        self._file: BinaryIO | None = None
        self._left = length

    def read(self, size: int = -1) -> bytes:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed once the slice is read out
            self._file.seek(self.offset)
        want = self._left if size is None or size < 0 else min(size, self._left)
        data = self._file.read(want) if want else b""
        self._left -= len(data)
        if not data or not self._left:
            self._file.close()
        return data


Body = bytes | Callable[[], FileSlice] | None


class Session:
    """Requests to one registry with its credential; thread-safe (workers share it)."""

    def __init__(self, registry: str, credential: Credential | None, *, plain_http: bool = False,
                 ca_bundle: str | None = None, connect_timeout: float = 30.0, read_timeout: float = 60.0,
                 user_agent: str = "model-agent"):
        self.registry = registry
        self.credential = credential
        self.base = f"{'http' if plain_http else 'https'}://{registry}"
        self.plain_http = plain_http
        self.ca_bundle = ca_bundle
        self.user_agent = user_agent
        self._options = dict(num_pools=8, maxsize=16, block=False, retries=False,
                             timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
                             **({"ca_certs": ca_bundle} if ca_bundle else {}))
        self._managers: dict[str, urllib3.PoolManager] = {}
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None  # the registry's scheme, once a 401 told it
        self._tokens: dict[str, tuple[str, float]] = {}  # scope -> (token, monotonic expiry)

    # -- sending -----------------------------------------------------------------------------------------
    def request(self, method: str, url: str, *, scope: str, what: str, headers: dict | None = None,
                body: Body = None, follow: bool = False) -> urllib3.BaseHTTPResponse:
        """Send with auth (one more try after a 401), following redirects when `follow`; the response's
        body is unread (stream it, or `httpio.drain` it)."""
        url = urljoin(self.base + "/", url)
        refresh, retries = False, 0
        while True:
            authorization = self._authorization(scope, what, refresh)
            resp = self._send(method, url, {"User-Agent": self.user_agent, **(headers or {}), **authorization},
                              body, what)
            if resp.status != 401 or refresh or retries == 2:
                break
            challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            if challenge is None or (authorization and challenge.scheme == "basic"):
                break  # nothing else to try: the caller turns the 401 into an AuthError
            httpio.drain(resp)
            with self._lock:
                self._challenge = challenge
            # Unsigned, the first try only learned the scheme; signed, the token we held was refused:
            # fetch a new one, once.
            refresh, retries = bool(authorization), retries + 1
        if follow and resp.status in REDIRECTS:
            return self._follow(method, url, resp, headers or {}, what)
        return resp

    def _follow(self, method: str, url: str, resp, headers: dict, what: str) -> urllib3.BaseHTTPResponse:
        for _ in range(MAX_REDIRECTS):
            location = resp.headers.get("Location")
            httpio.drain(resp)
            if not location:
                raise Retryable("redirect", f"{what}: HTTP {resp.status} without a Location")
            url = urljoin(url, location)
            if urlsplit(url).scheme == "http" and not self.plain_http:
                raise AuthError(f"{what}: the registry redirected to plain http ({urlsplit(url).hostname}); "
                                "refused without --plain-http")
            sent = {"User-Agent": self.user_agent, **headers}
            if httpio.origin(url) == httpio.origin(self.base):
                sent.update(self._authorization_cached())
            resp = self._send(method, url, sent, None, what)
            if resp.status not in REDIRECTS:
                return resp
        httpio.drain(resp)
        raise Retryable("redirect", f"{what}: more than {MAX_REDIRECTS} redirects")

    def _send(self, method: str, url: str, headers: dict, body: Body, what: str) -> urllib3.BaseHTTPResponse:
        payload = body() if callable(body) else body
        try:
            return self._manager(url).request(method, url, headers=headers, body=payload, preload_content=False,
                                              redirect=False, decode_content=False)
        except ReadTimeoutError as exc:
            raise Retryable("stall", f"{what}: no response within the stall timeout") from exc
        except (Urllib3Error, OSError) as exc:
            reason = untrusted_reason(exc)
            if reason is not None:
                parts = urlsplit(url)
                raise CertificateError.untrusted(what, parts.netloc, reason, "SSL_CERT_FILE", self.ca_bundle) from None
            if _not_tls(exc):
                raise InvalidInput(f"{what}: {urlsplit(url).netloc} does not speak TLS; if it is a plain-HTTP "
                                   "registry, pass --plain-http") from None
            raise Retryable("connection", f"{what}: connection error ({type(exc).__name__})") from exc

    def _manager(self, url: str) -> urllib3.PoolManager:
        parts = urlsplit(url)
        proxy = proxy_for(parts.scheme, parts.hostname or "", parts.port)
        key = proxy.geturl() if proxy else ""
        with self._lock:
            if key not in self._managers:
                self._managers[key] = (urllib3.ProxyManager(proxy_origin(proxy), proxy_headers=proxy_auth(proxy),
                                                            **self._options) if proxy
                                       else urllib3.PoolManager(**self._options))
            return self._managers[key]

    def close(self) -> None:
        with self._lock:
            for manager in self._managers.values():
                manager.clear()

    # -- auth schemes -------------------------------------------------------------------------------------
    def _authorization_cached(self) -> dict:
        """The Authorization a redirect back to the registry's own origin may carry: basic, or any token."""
        with self._lock:
            challenge, tokens = self._challenge, list(self._tokens.values())
        if challenge is not None and challenge.scheme == "basic":
            return self._basic()
        now = time.monotonic()
        live = [token for token, expiry in tokens if expiry > now]
        return {"Authorization": f"Bearer {live[0]}"} if live else {}

    def _authorization(self, scope: str, what: str, refresh: bool) -> dict:
        with self._lock:
            challenge = self._challenge
        if challenge is None:
            return {}  # the first request learns the scheme from its 401 (or needs none)
        if challenge.scheme == "basic":
            if self.credential is None or not (self.credential.username or self.credential.password):
                raise AuthError(f"{what}: the registry asks for a user and password and none was found "
                                "(docker config: DOCKER_CONFIG, REGISTRY_AUTH_FILE or --registry-auth-file)")
            return self._basic()
        if challenge.scheme == "bearer":
            return {"Authorization": f"Bearer {self._token(challenge, scope, what, refresh)}"}
        raise AuthError(f"{what}: the registry asks for the unsupported auth scheme {challenge.scheme!r}")

    def _basic(self) -> dict:
        assert self.credential is not None
        pair = f"{self.credential.username}:{self.credential.password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}

    def _token(self, challenge: Challenge, scope: str, what: str, fresh: bool) -> str:
        if self.credential is not None and self.credential.registry_token:
            return self.credential.registry_token
        with self._lock:
            cached = self._tokens.get(scope)
        if cached is not None and not fresh and cached[1] > time.monotonic():
            return cached[0]
        token, lifetime = self._fetch_token(challenge, scope, what)
        # renew a little early: a token that expires between our check and the registry's is a wasted 401
        expiry = time.monotonic() + lifetime - min(10.0, lifetime / 4)
        with self._lock:
            self._tokens[scope] = (token, expiry)
        return token

    def _fetch_token(self, challenge: Challenge, scope: str, what: str) -> tuple[str, float]:
        realm = challenge.params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise AuthError(f"{what}: the registry's token realm is not a URL")
        if parts.scheme == "http" and not self.plain_http:
            raise AuthError(f"{what}: the registry's token service {parts.hostname} is plain http; refused "
                            "without --plain-http (credentials would travel in clear text)")
        service = challenge.params.get("service", "")
        scopes = scope.split()
        credential = self.credential
        if credential is not None and credential.identity_token:
            form = urlencode({"grant_type": "refresh_token", "refresh_token": credential.identity_token,
                              "service": service, "scope": " ".join(scopes), "client_id": "model-agent"})
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            resp = self._send("POST", realm, {"User-Agent": self.user_agent, **headers}, form.encode(), what)
        else:
            query = urlencode([("service", service)] * bool(service) + [("scope", s) for s in scopes])
            url = realm + ("&" if parts.query else "?") + query
            headers = {"User-Agent": self.user_agent}
            if credential is not None and (credential.username or credential.password):
                headers.update(self._basic())
            resp = self._send("GET", url, headers, None, what)
        return self._token_answer(resp, parts.hostname, what)

    @staticmethod
    def _token_answer(resp, host: str, what: str) -> tuple[str, float]:
        try:
            data = resp.read(1 << 20)
        finally:
            httpio.settle(resp)
        if resp.status in (401, 403):
            raise AuthError(f"{what}: the token service {host} refused the credentials (HTTP {resp.status})")
        if resp.status != 200:
            raise httpio.classify_status(resp.status, resp.headers, f"{what}: token service {host}")
        try:
            answer = json.loads(data)
            token = answer.get("token") or answer.get("access_token")
            lifetime = float(answer.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not token:
            raise InvalidInput(f"{what}: the token service {host} answered without a token")
        return str(token), max(lifetime, 1.0)
