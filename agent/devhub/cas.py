"""The dev Hub's Xet CAS over HTTP, shaped like the Hub's own (xet-core's CAS API, the one hf_xet's
RemoteClient speaks), served from the `local://` CAS directory that hf_xet's uploads fill:

- `GET /v2/reconstructions/{file_hash}` and `/v1/...`, with `Authorization: Bearer <xet token>` and
  `Range: bytes=S-E` (end inclusive, cut to the file size; a start at or past the end is 416): the
  file's terms (xorb + chunk range) and where to fetch them. v1 gives one `fetch_info` entry per
  range with `url_range` (inclusive, bytes of the stored xorb); v2 one URL per xorb with `ranges`.
- `GET /xorbs/default/{xorb_hash}?<signature>`: presigned byte ranges of a stored xorb, without any
  Authorization (hf_xet sends none there); a bad or expired signature is 403, as S3 answers.
- `POST /v1/telemetry`: accepted and counted.

Fault injection applies as on the other hosts, with host "cas" and the request path as the glob
target ("/v2/reconstructions/*", "/xorbs/*").
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING

from .files import serve_file
from .xetformat import LocalCas, Segment

if TYPE_CHECKING:
    from .handler import HubHandler, Request

XORB_URL_TTL = 3600  # seconds a xorb URL stays valid; the Hub's are about an hour too
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class Unsatisfiable(Exception):
    pass


def reconstruction(cas: LocalCas, segments: list[Segment], start: int, end: int) -> tuple[int, list, dict]:
    """(offset_into_first_range, terms, {xorb: [(chunk_start, chunk_end, stored_start, stored_end)]})
    for file bytes [start, end), end already cut to the file size: the terms whose chunks overlap the
    range, trimmed chunk by chunk at both ends (xet-core's compute_reconstruction_ranges)."""
    done, terms, ranges, offset = 0, [], {}, None
    for seg in segments:
        if done >= end:
            break
        if done + seg.size <= start:
            done += seg.size
            continue
        footer = cas.footer(seg.xorb)
        first, last, size = seg.chunk_start, seg.chunk_end, seg.size
        while done + footer.decoded_size(first) <= start:  # chunks wholly before the range
            done += footer.decoded_size(first)
            size -= footer.decoded_size(first)
            first += 1
        while done + size - footer.decoded_size(last - 1) >= end:  # chunks wholly after it
            size -= footer.decoded_size(last - 1)
            last -= 1
        if offset is None:
            offset = start - done
        terms.append({"hash": seg.xorb, "unpacked_length": size, "range": {"start": first, "end": last}})
        ranges.setdefault(seg.xorb, []).append((first, last, *footer.stored_range(first, last)))
        done += size
    return offset or 0, terms, {x: _merged(r) for x, r in ranges.items()}


def _merged(ranges: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Overlapping or touching chunk ranges of one xorb as one fetch, as the Hub's CAS merges them."""
    out: list[list[int]] = []
    for first, last, lo, hi in sorted(ranges):
        if out and first <= out[-1][1]:
            out[-1][1], out[-1][3] = max(out[-1][1], last), max(out[-1][3], hi)
        else:
            out.append([first, last, lo, hi])
    return [tuple(r) for r in out]  # type: ignore[misc]


def route_cas(h: "HubHandler", req: "Request") -> None:
    kind = "xorb" if req.path.startswith("/xorbs/") else "cas"
    with h.hub.stats.handling(kind):
        _route_cas(h, req)


def _route_cas(h: "HubHandler", req: "Request") -> None:
    hub = h.hub
    delay = hub.faults.take_latency("cas", req.method, req.path)
    if delay:
        time.sleep(delay)
    fault = hub.faults.take_request_fault("cas", req.method, req.path)
    if fault is not None:
        h.respond_fault(fault)
        return
    segs = req.segments
    if req.method == "POST" and segs == ["v1", "telemetry"]:
        hub.xet_cas.telemetry_posts += 1
        h.respond_json(200, {})
    elif req.method == "GET" and len(segs) == 3 and segs[0] in ("v1", "v2") and segs[1] == "reconstructions":
        _reconstructions(h, req, segs[0], segs[2])
    elif req.method in ("GET", "HEAD") and len(segs) == 3 and segs[:2] == ["xorbs", "default"]:
        _xorb(h, req, segs[2])
    else:
        h.respond_json(404, {"error": "not found"})


def _reconstructions(h: "HubHandler", req: "Request", version: str, file_hash: str) -> None:
    xet = h.hub.xet_cas
    if not xet.token_valid(req.token):
        h.respond_json(401, {"error": "invalid or expired token"})
        return
    segments = xet.files.segments(file_hash)
    if segments is None:
        h.respond_json(404, {"error": f"no file {file_hash}"})
        return
    size = sum(s.size for s in segments)
    try:
        start, end = _file_range(req.headers.get("range"), size)
    except Unsatisfiable:
        h.respond(416, {"Content-Range": f"bytes */{size}"})
        return
    offset, terms, ranges = reconstruction(xet.files, segments, start, end)
    body = {"offset_into_first_range": offset, "terms": terms}
    if version == "v1":
        body["fetch_info"] = {
            x: [{"range": {"start": a, "end": b}, "url": _xorb_url(h, x), "url_range": {"start": lo, "end": hi - 1}}
                for a, b, lo, hi in rs]
            for x, rs in ranges.items()
        }
    else:
        body["xorbs"] = {
            x: [{"url": _xorb_url(h, x),
                 "ranges": [{"chunks": {"start": a, "end": b}, "bytes": {"start": lo, "end": hi - 1}}
                            for a, b, lo, hi in rs]}]
            for x, rs in ranges.items()
        }
    h.respond_json(200, body)


def _file_range(header: str | None, size: int) -> tuple[int, int]:
    """[start, end) of the file a Range header asks for; hf_xet always sends `bytes=S-E`."""
    m = _RANGE.match(header or "")
    if not m:
        return 0, size
    start = int(m.group(1))
    if start >= size and not start == size == 0:  # an empty file has an empty reconstruction
        raise Unsatisfiable
    return start, min(int(m.group(2)) + 1, size) if m.group(2) else size


def _xorb_url(h: "HubHandler", xorb: str) -> str:
    path = f"/xorbs/default/{xorb}"
    return f"{h.hub.cas_url}{path}?{h.hub.signer.sign(path, {}, h.hub.xet_cas.xorb_url_ttl)}"


def _xorb(h: "HubHandler", req: "Request", xorb: str) -> None:
    reason = h.hub.signer.verify(req.path, {k: v[-1] for k, v in req.query.items()})
    if reason is not None:
        h.respond(403, {"Content-Type": "application/xml"}, f"<Error><Code>AccessDenied</Code>"
                  f"<Message>{reason}</Message></Error>".encode())
        return
    path = h.hub.xet_cas.files.xorb_path(xorb)
    if path is None:
        h.respond(404, {"Content-Type": "application/xml"}, b"<Error><Code>NoSuchKey</Code></Error>")
        return
    stored = SimpleNamespace(path=path, size=path.stat().st_size)  # what serve_file reads of a blob
    headers = {"ETag": f'"{xorb}"', "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
    serve_file(h, req, stored, req.path, headers, gzip_ok=False)  # type: ignore[arg-type]
