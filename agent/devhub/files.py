"""File downloads: `/resolve/` on the API host and presigned blob URLs on the CDN host.

Like the Hub: regular (git) files are served directly by `/resolve/` (ETag = git blob id,
text gzipped for clients that accept it); LFS files answer 302 with an *absolute* Location
on another origin (the CDN), so huggingface_hub stops there, keeps the metadata of the 302
(X-Linked-Etag / X-Linked-Size / X-Repo-Commit) and drops the Authorization header.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from typing import TYPE_CHECKING

from .blobs import Blob
from .body import send_body
from .httputil import (
    Unsatisfiable,
    cdn_etag,
    content_disposition,
    content_type,
    etag_matches,
    http_date,
    if_range_allows,
    is_text_file,
    parse_range,
)

if TYPE_CHECKING:
    from .handler import HubHandler, Request
    from .repo import Commit, Repo

GZIP_MAX = 10 * 1024 * 1024  # gzip only small text files, compressed in memory
_CDN_BASE = {
    "Accept-Ranges": "bytes",
    "Cache-Control": "public, max-age=604800, immutable, s-maxage=604800",
    "X-Cache": "Hit from cloudfront",
    "Via": "1.1 devhub.cloudfront.net (CloudFront)",
}


def resolve(h: "HubHandler", req: "Request", repo_type: str, repo_id: str, revision: str, path: str) -> None:
    fault = h.hub.faults.take_request_fault("api", req.method, path)
    if fault is not None:
        h.respond_fault(fault)
        return
    repo = h.check_repo(req, h.hub.store.get(repo_type, repo_id), files=True)
    if repo is None:
        return
    commit = h.resolve_commit(repo, revision)
    if commit is None:
        return
    blob = commit.files.get(path)
    if blob is None:
        # X-Repo-Commit lets huggingface_hub cache the file's absence for this commit
        h.respond_error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        return
    if blob.lfs:
        _redirect_to_cdn(h, repo, commit, path, blob)
        return
    headers = {
        "X-Repo-Commit": commit.sha,
        "ETag": f'"{blob.git_oid}"',
        "Content-Type": content_type(path),
        "Content-Disposition": content_disposition(path),
        "Last-Modified": http_date(commit.date),
        "Accept-Ranges": "bytes",
    }
    serve_file(h, req, blob, path, headers, gzip_ok=True)


def _redirect_to_cdn(h: "HubHandler", repo: "Repo", commit: "Commit", path: str, blob: Blob) -> None:
    hub = h.hub
    repo_key = hashlib.sha256(f"{repo.repo_type}s/{repo.repo_id}".encode()).hexdigest()
    cdn_path = f"/repos/{repo_key[:2]}/{repo_key[2:4]}/{repo_key}/{blob.sha256}"
    params = {"response-content-disposition": content_disposition(path, "attachment"), "x-hub-path": path}
    location = f"{hub.cdn_url}{cdn_path}?{hub.signer.sign(cdn_path, params, hub.cdn_url_ttl)}"
    headers = {
        "X-Repo-Commit": commit.sha,
        "X-Linked-Etag": f'"{blob.sha256}"',
        "X-Linked-Size": str(blob.size),
        "ETag": f'"{blob.sha256}"',
        "Accept-Ranges": "bytes",
        "Location": location,
        "Content-Type": "text/plain; charset=utf-8",
    }
    if blob.xet_hash and hub.xet_cas is not None:
        # what makes huggingface_hub pick hf_xet: the hash plus the token route (rel="xet-auth")
        token_url = f"{hub.url}/api/{repo.repo_type}s/{repo.repo_id}/xet-read-token/{commit.sha}"
        headers["X-Xet-Hash"] = blob.xet_hash
        headers["Link"] = f'<{token_url}>; rel="xet-auth"'
    h.respond(302, headers, f"Found. Redirecting to {location}".encode())


def route_cdn(h: "HubHandler", req: "Request") -> None:
    params = {k: v[-1] for k, v in req.query.items()}
    segs = req.segments
    repo_path = params.get("x-hub-path") or (segs[-1] if segs else "")
    fault = h.hub.faults.take_request_fault("cdn", req.method, repo_path)
    if fault is not None:
        h.respond_fault(fault)
        return
    if req.method not in ("GET", "HEAD"):
        _xml_error(h, 405, "MethodNotAllowed", "The specified method is not allowed against this resource.")
        return
    if len(segs) != 5 or segs[0] != "repos":
        _xml_error(h, 404, "NoSuchKey", "The specified key does not exist.")
        return
    reason = h.hub.signer.verify(req.path, params)
    if reason is not None:
        _xml_error(h, 403, "AccessDenied", reason)
        return
    blob = h.hub.store.blob_by_sha256(segs[-1])
    if blob is None:
        _xml_error(h, 404, "NoSuchKey", "The specified key does not exist.")
        return
    headers = dict(_CDN_BASE)
    headers["Content-Type"] = "application/octet-stream"
    headers["ETag"] = cdn_etag(blob.sha256, blob.size)
    headers["Last-Modified"] = http_date(os.stat(blob.path).st_mtime)
    if "response-content-disposition" in params:
        headers["Content-Disposition"] = params["response-content-disposition"]
    serve_file(h, req, blob, repo_path, headers, gzip_ok=False)


def _xml_error(h: "HubHandler", status: int, code: str, message: str) -> None:
    """S3/CloudFront answer errors in XML, not the Hub's JSON."""
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
    h.respond(status, {"Content-Type": "application/xml"}, body.encode())


def serve_file(
    h: "HubHandler", req: "Request", blob: Blob, repo_path: str, headers: dict[str, str], *, gzip_ok: bool
) -> None:
    """Body of a blob with conditional requests (If-None-Match, If-Range) and Range support."""
    etag, size = headers["ETag"], blob.size
    if etag_matches(req.headers.get("if-none-match"), etag):
        h.respond(304, {k: v for k, v in headers.items() if not k.startswith("Content-")})
        return
    rng = None
    if if_range_allows(req.headers.get("if-range"), etag, headers.get("Last-Modified", "")):
        try:
            rng = parse_range(req.headers.get("range"), size)
        except Unsatisfiable:
            h.respond(416, {**headers, "Content-Range": f"bytes */{size}"})
            return
    if rng is not None and h.hub.faults.take_range_fault(h.host_kind, req.method, repo_path) is not None:
        rng = None  # a server that ignores Range: 200 and the whole body
    if gzip_ok and rng is None and req.method == "GET" and _wants_gzip(req, repo_path, size):
        _send_gzip(h, blob, repo_path, headers)
        return
    start, end = rng or (0, size - 1)
    length = end - start + 1
    out = dict(headers, **{"Content-Length": str(length)})
    if rng is not None:
        out["Content-Range"] = f"bytes {start}-{end}/{size}"
    h.start(206 if rng is not None else 200, out)
    if req.method == "HEAD" or length <= 0:
        return
    stats = h.hub.stats
    fault = h.hub.faults.take_body_fault(h.host_kind, req.method, repo_path)
    with stats.sending_body():
        send_body(
            h.connection,
            blob.path,
            start,
            length,
            fault=fault,
            stop=h.hub.stopping,
            on_sent=lambda n: stats.add_bytes(repo_path, n),
        )


def _wants_gzip(req: "Request", repo_path: str, size: int) -> bool:
    accepted = [e.split(";")[0].strip() for e in req.headers.get("accept-encoding", "").split(",")]
    return "gzip" in accepted and is_text_file(repo_path) and 0 < size <= GZIP_MAX


def _send_gzip(h: "HubHandler", blob: Blob, repo_path: str, headers: dict[str, str]) -> None:
    """The Hub gzips text files on the fly: chunked, no Content-Length (size comes from HEAD)."""
    data = gzip.compress(blob.path.read_bytes(), compresslevel=6)
    h.start(200, dict(headers, **{"Content-Encoding": "gzip", "Transfer-Encoding": "chunked"}))
    h.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
    h.hub.stats.add_bytes(repo_path, len(data))
