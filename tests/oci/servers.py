"""The test registries: Debian's `docker-registry` (the CNCF distribution registry 2.8) on 127.0.0.1,
TLS from a private CA, in the modes a client meets:

- `anonymous`: no auth at all (an in-cluster registry), over TLS and (`plain`) over plain HTTP;
- `basic`: htpasswd users, HTTP basic on every request;
- `token`: the bearer flow against `TokenServer` (ours), and blob GETs redirected by the registry's own
  `redirect` storage middleware to `BlobStore`, a second host (`localhost` instead of `127.0.0.1`) that
  refuses any request carrying an Authorization header: what ECR, GAR or Harbor on S3 do.

Each registry is one Go process that starts in well under a second; the token server and the blob
store are threads of the test process, so tests can read their counters.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import ssl
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.objstore.servers import Server, free_port, wait_until

from .pki import PrivateCA, TokenSigner, htpasswd

USER, PASSWORD = "model-agent", "s3cret-registry-password"
REFRESH_TOKEN = "identity-token-for-model-agent"  # what `docker login` stores as `identitytoken`
SERVICE = "model-agent-test-registry"


class _TlsHttpServer:
    """A ThreadingHTTPServer on a free port, TLS with the private CA's certificate, in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], pki: PrivateCA, host: str = "127.0.0.1"):
        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.cert, pki.key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.owner = self
        self.url = f"https://{host}:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class TokenServer(_TlsHttpServer):
    """docker's token protocol: GET with optional basic auth, or POST with an OAuth2 refresh token.
    Signed-in users get pull and push on every repository; anonymous callers get pull on `public/*`.
    `expired_next` makes that many following tokens expire at once (the registry then answers 401)."""

    def __init__(self, pki: PrivateCA, signer: TokenSigner):
        self.signer = signer
        self.requests: list[dict] = []  # {"method", "scope", "user"} per token request
        self.expired_next = 0
        self.expires_in = 300  # what the answer says, in seconds
        self._lock = threading.Lock()
        super().__init__(_TokenHandler, pki)
        self.realm = f"{self.url}/token"

    def grant(self, user: str | None, scopes: list[str]) -> list[dict]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = actions.split(",") if user else (["pull"] if name.startswith("public/") else [])
            allowed = [a for a in allowed if a in ("pull", "push", "delete", "*")]
            if kind == "repository" and allowed:
                access.append({"type": kind, "name": name, "actions": allowed})
        return access

    def issue(self, method: str, user: str | None, scopes: list[str]) -> dict:
        with self._lock:
            self.requests.append({"method": method, "scope": " ".join(scopes), "user": user})
            ttl = -120 if self.expired_next > 0 else 300
            self.expired_next = max(0, self.expired_next - 1)
        token = self.signer.token(user or "", SERVICE, self.grant(user, scopes), ttl)
        return {"token": token, "access_token": token, "expires_in": self.expires_in}


class _TokenHandler(_Quiet):
    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        user = None
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if (name, password) != (USER, PASSWORD):
                return self.reply(401, b'{"details":"incorrect username or password"}')
            user = name
        self._answer("GET", user, query.get("scope", []))

    def do_POST(self) -> None:
        form = urllib.parse.parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
        if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [REFRESH_TOKEN]:
            return self.reply(401, b'{"error":"invalid_grant"}')
        self._answer("POST", USER, " ".join(form.get("scope", [])).split())

    def _answer(self, method: str, user: str | None, scopes: list[str]) -> None:
        body = json.dumps(self.server.owner.issue(method, user, scopes)).encode()
        self.reply(200, body, {"Content-Type": "application/json"})


class BlobStore(_TlsHttpServer):
    """The redirect target: serves the registry's storage files (with Range), and fails any request
    that carries an Authorization header, recording it, as a presigned-URL store would."""

    def __init__(self, pki: PrivateCA, root: Path):
        self.root = root
        self.requests: list[dict] = []
        super().__init__(_BlobHandler, pki, host="localhost")


class _BlobHandler(_Quiet):
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        store: BlobStore = self.server.owner
        authorization = self.headers.get("Authorization")
        store.requests.append({"method": self.command, "path": self.path, "authorization": authorization is not None})
        if authorization is not None:
            return self.reply(400, b"<Error>Only one auth mechanism allowed</Error>")
        path = store.root / urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        if ".." in path.parts or not path.is_file():
            return self.reply(404)
        data = path.read_bytes()
        spec = self.headers.get("Range", "")
        if spec.startswith("bytes="):
            first, _, last = spec[6:].partition("-")
            start, end = int(first), min(int(last) + 1 if last else len(data), len(data))
            return self.reply(206, data[start:end], {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})
        self.reply(200, data)


class Registry(Server):
    """One distribution registry process in one auth mode (see the module's docstring)."""

    def __init__(self, workdir: Path, pki: PrivateCA, mode: str, *, token: TokenServer | None = None,
                 redirect_to: str | None = None, tls: bool = True):
        binary = shutil.which("docker-registry") or shutil.which("registry")
        if binary is None:
            raise RuntimeError("docker-registry not found: run scripts/install-test-tools.sh")
        workdir.mkdir(parents=True, exist_ok=True)
        self.mode, self.pki = mode, pki
        self.storage = workdir / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": "model-agent-test-secret"},
        }
        if tls:
            config["http"]["tls"] = {"certificate": str(pki.cert), "key": str(pki.key)}
        if mode == "basic":
            config["auth"] = {"htpasswd": {"realm": "model-agent-test",
                                           "path": str(htpasswd(workdir / "htpasswd", {USER: PASSWORD}))}}
        elif mode == "token":
            assert token is not None
            config["auth"] = {"token": {"realm": token.realm, "service": SERVICE, "issuer": token.signer.issuer,
                                        "rootcertbundle": str(token.signer.bundle)}}
        if redirect_to:
            config["middleware"] = {"storage": [{"name": "redirect", "options": {"baseurl": redirect_to}}]}
        config_file = workdir / "config.yml"
        config_file.write_text(json.dumps(config))  # JSON is YAML
        self._spawn([binary, "serve", str(config_file)], workdir)
        context = ssl.create_default_context(cafile=str(pki.ca))
        url = f"{'https' if tls else 'http'}://{self.host}/v2/"
        wait_until(lambda: _answers(url, context), 30, f"docker-registry ({mode})", self.proc, self.log)

    def skopeo_creds(self) -> list[str]:
        return ["--dest-creds", f"{USER}:{PASSWORD}"] if self.mode != "anonymous" else []

    def blob_file(self, digest: str) -> Path:
        algorithm, hex_ = digest.split(":")
        return self.storage / "docker/registry/v2/blobs" / algorithm / hex_[:2] / hex_ / "data"


def _answers(url: str, context: ssl.SSLContext) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2, context=context)
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    return True


class Registries:
    """The registries, one CA, one token server, one blob store: started once per test session."""

    def __init__(self, workdir: Path):
        self.pki = PrivateCA(workdir / "pki")
        self.token_server = TokenServer(self.pki, TokenSigner(workdir / "pki", "model-agent-test-issuer"))
        self.anonymous = Registry(workdir / "anonymous", self.pki, "anonymous")
        self.basic = Registry(workdir / "basic", self.pki, "basic")
        self.plain = Registry(workdir / "plain", self.pki, "anonymous", tls=False)  # only with --plain-http
        token_storage = workdir / "token" / "storage"
        self.blob_store = BlobStore(self.pki, token_storage)
        self.token = Registry(workdir / "token", self.pki, "token", token=self.token_server,
                              redirect_to=f"{self.blob_store.url}/")

    def stop(self) -> None:
        for registry in (self.anonymous, self.basic, self.plain, self.token):
            registry.stop()
        self.token_server.stop()
        self.blob_store.stop()


def skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["skopeo", *args], capture_output=True, text=False, timeout=60, check=check)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
