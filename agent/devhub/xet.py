"""Upload LFS blobs into a filesystem Xet CAS so real hf_xet clients can download them.

hf_xet >= 1.8 understands `local://<dir>` endpoints: a content-addressed store kept on disk.
We ingest each LFS file there with hf_xet itself, which gives us the file's xet hash (the
64-hex id the Hub advertises as `xetHash` / `X-Xet-Hash`). Clients then get, as `X-Xet-Cas-Url`
from the xet-read-token endpoint, either the same `local://` URL (mode "local": hf_xet reads the
directory itself, no HTTP) or the dev Hub's CAS host (mode "http", agent/devhub/cas.py), which serves
that directory as the Hub's CAS does and checks the short-lived tokens handed out here.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path

from .blobs import Blob
from .xetformat import LocalCas

TOKEN_TTL = 3600  # seconds; the Hub hands out xet read tokens valid for about an hour
MODES = ("local", "http")


class XetCas:
    def __init__(self, cas_dir: Path, mode: str = "local"):
        if mode not in MODES:
            raise ValueError(f"xet mode must be one of {MODES}, not {mode!r}")
        self.cas_dir = Path(cas_dir).resolve()
        self.cas_dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.files = LocalCas(self.cas_dir)  # what the HTTP CAS reads
        self.token_ttl = TOKEN_TTL  # seconds; below 30 hf_xet asks for a fresh token before each request
        self.xorb_url_ttl = 3600  # seconds a presigned xorb URL stays valid (0: every URL is already stale)
        self.telemetry_posts = 0
        self._tokens: dict[str, int] = {}  # xet token -> expiry (unix seconds)
        self._lock = threading.Lock()
        self._index_file = self.cas_dir / "devhub-index.json"
        try:
            # sha256 -> xet hash; xet hashes are content-derived, so an entry stays valid as long
            # as the CAS directory it was uploaded into still exists (the index lives inside it)
            self._index: dict[str, str] = json.loads(self._index_file.read_text())
        except (OSError, ValueError):
            self._index = {}
        self._session = None

    @property
    def endpoint(self) -> str:
        """Where hf_xet uploads go: always the directory itself."""
        return f"local://{self.cas_dir}"

    def issue_token(self) -> tuple[str, int]:
        token, exp = "xet_" + secrets.token_urlsafe(24), int(time.time()) + self.token_ttl
        with self._lock:
            self._tokens[token] = exp
        return token, exp

    def token_valid(self, token: str | None) -> bool:
        with self._lock:
            exp = self._tokens.get(token or "")
        return exp is not None and time.time() < exp

    def upload(self, blobs: list[Blob]) -> dict[str, str]:
        """Ingest blobs not yet in the CAS; return sha256 -> xet hash for all of them."""
        import hf_xet  # imported lazily: only needed when the server runs with xet=True

        with self._lock:
            todo = {b.sha256: b for b in blobs if b.sha256 not in self._index}
            if todo:
                if self._session is None:
                    self._session = hf_xet.XetSession()
                with self._session.new_upload_commit(endpoint=self.endpoint) as commit:
                    # passing our sha256 spares hf_xet a second full read of multi-GB files
                    handles = {
                        sha: commit.start_upload_file(str(b.path), sha256=sha) for sha, b in todo.items()
                    }
                for sha, handle in handles.items():
                    self._index[sha] = handle.result().xet_info.hash
                tmp = self._index_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._index))
                tmp.replace(self._index_file)
            return {b.sha256: self._index[b.sha256] for b in blobs}
