"""HubServer: a Hugging Face Hub look-alike on 127.0.0.1, for tests, demos and benchmarks.

Two listening sockets: the API host (`url`: /api/..., /{repo}/resolve/...) and a CDN host
(`cdn_url`) that LFS downloads are redirected to, on a different port so that clients treat
it as a different origin, exactly as they treat the Hub's CDN. With `xet="http"` a third one,
the Xet CAS host (`cas_url`, agent/devhub/cas.py); `xet="local"` hands hf_xet a `local://` CAS.
"""

from __future__ import annotations

import secrets
import socket
import threading
from dataclasses import replace
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Mapping

from .blobs import Blob, BlobStore
from .faults import FaultSet
from .handler import HubHandler
from .httputil import UrlSigner
from .repo import RepoStore, normalize_path
from .stats import Stats
from .xet import XetCas


class _Listener(ThreadingHTTPServer):
    daemon_threads = True  # a stalled or idle keep-alive connection must never block exit
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], hub: "HubServer", kind: str):
        super().__init__(addr, HubHandler)
        self.hub, self.kind = hub, kind


class HubServer:
    def __init__(
        self,
        data_dir: Path,
        *,
        xet: bool | str = False,
        lfs_threshold: int = 10_000,
        tree_page_size: int = 1000,
        host: str = "127.0.0.1",
        ports: Mapping[str, int] | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.tokens: set[str] = {"hf_test_token"}
        # Valid tokens of users who were never granted a gated repo: the Hub answers them 403 GatedRepo.
        self.tokens_without_gated_access: set[str] = set()
        self.faults = FaultSet()
        self.stats = Stats()
        self.store = RepoStore()
        self.blobs = BlobStore(self.data_dir, lfs_threshold)
        # xet=True is the `local://` CAS, as before the HTTP CAS existed
        mode = "local" if xet is True else xet
        self.xet_cas = XetCas(self.data_dir / "xet-cas", mode) if mode else None
        self.tree_page_size = tree_page_size
        # (repo_id, path) -> what the tree listing says instead of the truth: {"oid": ..., "lfs_oid": ...,
        # "xetHash": ...}. A broken or hostile HF_ENDPOINT, for tests of what clients accept.
        self.listing_overrides: dict[tuple[str, str], dict[str, str]] = {}
        self.cdn_url_ttl = 3600  # seconds a presigned CDN URL stays valid (set 0 to test expiry)
        self.signer = UrlSigner(secrets.token_bytes(32))
        self.stopping = threading.Event()
        self._listeners: list[_Listener] = []
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        # kept across stop/start: a restarted hub keeps its URLs; `ports` fixes some (e.g. {"api": 80}
        # to test a default port), the others are picked by the system
        self._ports: dict[str, int] = dict(ports or {})

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "HubServer":
        if self._listeners:
            return self
        self.stopping.clear()
        for kind in self._kinds():
            listener = _Listener((self.host, self._ports.get(kind, 0)), self, kind)
            self._ports[kind] = listener.server_address[1]
            # short poll interval: stop() waits up to one interval per listener
            thread = threading.Thread(
                target=listener.serve_forever, args=(0.05,), name=f"devhub-{kind}", daemon=True
            )
            thread.start()
            self._listeners.append(listener)
            self._threads.append(thread)
        return self

    def _kinds(self) -> tuple[str, ...]:
        http_cas = self.xet_cas is not None and self.xet_cas.mode == "http"
        return ("api", "cdn", "cas") if http_cas else ("api", "cdn")

    def stop(self) -> None:
        self.stopping.set()  # wakes stalled and throttled bodies
        for listener in self._listeners:
            listener.shutdown()
            listener.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:  # idle keep-alive connections would otherwise linger forever
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        self._listeners, self._threads = [], []

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._conns_lock:
            (self._conns.add if alive else self._conns.discard)(conn)

    def _base_url(self, kind: str) -> str:
        # still valid after stop(): tests point clients at a stopped hub to get "connection refused"
        if kind not in self._ports:
            raise RuntimeError("HubServer was never started")
        return f"http://{self.host}:{self._ports[kind]}"

    @property
    def url(self) -> str:
        """API + resolve host, what clients use as HF_ENDPOINT."""
        return self._base_url("api")

    @property
    def cdn_url(self) -> str:
        """The CDN host LFS downloads are redirected to (another port = another origin)."""
        return self._base_url("cdn")

    @property
    def cas_url(self) -> str:
        """The Xet CAS host (xet="http" only)."""
        return self._base_url("cas")

    @property
    def xet_endpoint(self) -> str:
        """What the token route hands out as X-Xet-Cas-Url."""
        return self.cas_url if self.xet_cas.mode == "http" else self.xet_cas.endpoint

    # -- content --------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path],
        *,
        repo_type: str = "model",
        branch: str = "main",
        tags: Iterable[str] = (),
        gated: bool = False,
        private: bool = False,
    ) -> str:
        """Create a repo whose first commit holds `files`; returns the 40-hex commit sha."""
        blobs = self._ingest(files)
        repo = self.store.create(repo_type, repo_id, private=private, gated=gated)
        commit = self.store.add_commit(repo, blobs, branch, "Initial commit")
        for tag in tags:
            self.store.set_ref(repo, "tag", tag, commit.sha)
        return commit.sha

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path],
        *,
        branch: str = "main",
        repo_type: str = "model",
        message: str = "",
    ) -> str:
        """New commit whose file set is exactly `files`; `branch` moves (or is created from main)."""
        repo = self._repo(repo_type, repo_id)
        blobs = self._ingest(files)
        return self.store.add_commit(repo, blobs, branch, message or "Update files").sha

    def create_tag(self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model") -> str:
        return self.store.set_ref(self._repo(repo_type, repo_id), "tag", tag, revision)

    def create_branch(self, repo_id: str, branch: str, revision: str = "main", *, repo_type: str = "model") -> str:
        return self.store.set_ref(self._repo(repo_type, repo_id), "branch", branch, revision)

    def move_repo(self, old_id: str, new_id: str, *, repo_type: str = "model") -> None:
        """Requests for `old_id` now get a relative 307 to `new_id`, as after a Hub rename."""
        self._repo(repo_type, new_id)
        self.store.moved[(repo_type, old_id)] = new_id

    def _repo(self, repo_type: str, repo_id: str):
        repo = self.store.get(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id}")
        return repo

    def _ingest(self, files: Mapping[str, bytes | Path]) -> dict[str, Blob]:
        blobs = {normalize_path(p): self.blobs.ingest(c) for p, c in files.items()}
        if self.xet_cas is not None:
            lfs = [b for b in blobs.values() if b.lfs]
            hashes = self.xet_cas.upload(lfs) if lfs else {}
            blobs = {p: _with_xet(b, hashes.get(b.sha256)) for p, b in blobs.items()}
        return blobs


def _with_xet(blob: Blob, xet_hash: str | None) -> Blob:
    return replace(blob, xet_hash=xet_hash) if xet_hash else blob
