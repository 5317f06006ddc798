"""The two Hub API calls a pull makes: a revision's commit, and the file tree at that commit.

They go through the agent's own HTTP client (agent/httpio.py: the same pools, proxies, CA bundle and
stall timeout as the bytes) rather than huggingface_hub's HfApi. Importing `huggingface_hub.hf_api`
and making its first request took 0.24 s of CPU-bound start-up on every pull (0.17 s import, 0.07 s
for the first call, measured against the dev Hub), before any byte could move; every init container
of a DaemonSet pays it again. The requests are huggingface_hub 2.4's, checked against its source
(hf_api.py, utils/_pagination.py, utils/_http.py):

    GET {endpoint}/api/{type}s/{repo}/revision/{quote(revision, safe="")}   -> {"sha": ...}
    GET {endpoint}/api/{type}s/{repo}/tree/{quote(commit, safe="")}?recursive=true&expand=false
        -> [{"type": "file", "path", "size", "oid", "lfs": {"oid", ...} | absent, "xetHash"}, ...],
           more pages in a `Link: <url>; rel="next"` header (the Hub's cursor; 1000 entries a page)

and so is the reading of an error: `X-Error-Code` GatedRepo, RepoNotFound, RevisionNotFound, and a
401 that is not "Invalid credentials in Authorization header" hides a private or missing repo.
Redirects (a renamed repo) are followed, dropping the token when the host changes.
"""

from __future__ import annotations

import json
import re
from typing import Callable
from urllib.parse import quote, urljoin

from .. import httpio
from ..errors import AgentError, AuthError, NotFound, Retryable

INVALID_TOKEN = "Invalid credentials in Authorization header"  # the Hub's words for a bad token
MAX_REDIRECTS = 5
MAX_PAGES = 10_000  # 10 M entries: a Link loop from a broken server ends here
_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


def api_error(status: int, headers, what: str) -> Exception:
    """The contract's meaning of a Hub API answer that is not a success."""
    code = headers.get("X-Error-Code", "")
    if code == "RevisionNotFound":
        return NotFound(f"{what}: revision not found")
    if code == "GatedRepo":
        return AuthError(f"{what}: gated repo: accept its terms on the Hub and pass a token that has access")
    if code == "RepoNotFound" or (status == 401 and headers.get("X-Error-Message") != INVALID_TOKEN):
        return NotFound(f"{what}: repo not found (or private: pass a token that can read it)")
    if status in (401, 403):
        return AuthError(f"{what}: access refused (HTTP {status}): check the token")
    return httpio.classify_status(status, headers, what)


class HubApi:
    def __init__(self, endpoint: str, token: Callable[[], str | None], stall_timeout: float):
        self.endpoint = endpoint.rstrip("/")
        self.token = token  # read per request: a mounted Secret may be rotated (agent/token.py)
        self.pools = httpio.Pools(1, stall_timeout)

    def _base(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/api/{repo_type}s/{repo_id}"

    def revision_sha(self, repo_type: str, repo_id: str, revision: str, what: str) -> object:
        """The `sha` the Hub gives for `revision` (unchecked: the caller says what a commit looks like)."""
        info, _ = self._get_json(f"{self._base(repo_type, repo_id)}/revision/{quote(revision, safe='')}", what)
        return info.get("sha") if isinstance(info, dict) else None

    def tree(self, repo_type: str, repo_id: str, commit: str, what: str) -> list[dict]:
        """Every entry of the tree at `commit`, recursively, all pages."""
        url: str | None = f"{self._base(repo_type, repo_id)}/tree/{quote(commit, safe='')}?recursive=true&expand=false"
        entries: list[dict] = []
        for _ in range(MAX_PAGES):
            if url is None:
                return entries
            page, url = self._get_json(url, what)
            if not isinstance(page, list):
                raise AgentError(f"{what}: the Hub's tree listing is not a list: is HF_ENDPOINT a Hub?")
            entries.extend(e for e in page if isinstance(e, dict))
        raise AgentError(f"{what}: the Hub's tree listing did not end after {MAX_PAGES} pages")

    def _get_json(self, url: str, what: str) -> tuple[object, str | None]:
        """(the JSON body, the next page's URL) of a GET, redirects followed; errors mapped."""
        token = self.token()
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"User-Agent": "model-agent", "Accept": "application/json", "Accept-Encoding": "identity"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            resp = httpio.request(self.pools, "GET", url, headers, what)
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                httpio.drain(resp)
                target = urljoin(url, resp.headers["Location"])
                if httpio.origin(target) != httpio.origin(url):
                    token = None  # as huggingface_hub's client: a token never follows to another host
                url = target
                continue
            return self._read_json(resp, url, what)
        raise AgentError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _read_json(self, resp, url: str, what: str) -> tuple[object, str | None]:
        try:
            body = resp.read()
        except Exception as exc:  # noqa: BLE001 - a body cut short is a transient failure
            raise Retryable("truncated", f"{what}: the Hub's answer ended early ({type(exc).__name__})") from None
        finally:
            httpio.settle(resp)
        if resp.status != 200:
            raise api_error(resp.status, resp.headers, what)
        try:
            data = json.loads(body)
        except ValueError:
            raise AgentError(f"{what}: the Hub answered with something that is not JSON: is HF_ENDPOINT a Hub?") from None
        found = _NEXT.search(resp.headers.get("Link", ""))
        return data, (urljoin(url, found.group(1)) if found else None)
