"""Routing of the API host: `/api/...` JSON endpoints and `/{repo}/resolve/...` downloads."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from . import views
from .files import resolve
from .repo import Repo, RepoStore

if TYPE_CHECKING:
    from .handler import HubHandler, Request

API_ENDPOINTS = frozenset({"revision", "tree", "paths-info", "refs", "commits", "xet-read-token"})
URL_PREFIX_TYPES = {"datasets": "dataset", "spaces": "space"}  # /datasets/{id}/resolve/...
API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def split_repo(store: RepoStore, repo_type: str, segs: list[str], keywords: frozenset[str]):
    """(repo_id, rest): ids are 'name' or 'namespace/name'; known repos disambiguate."""
    if len(segs) >= 2:
        two = f"{segs[0]}/{segs[1]}"
        if store.exists(repo_type, two) or (repo_type, two) in store.moved:
            return two, segs[2:]
    if segs and (store.exists(repo_type, segs[0]) or (repo_type, segs[0]) in store.moved):
        return segs[0], segs[1:]
    if len(segs) >= 2 and segs[1] not in keywords:
        return f"{segs[0]}/{segs[1]}", segs[2:]
    return (segs[0] if segs else ""), segs[1:]


def route(h: "HubHandler", req: "Request") -> None:
    segs = req.segments
    if segs[:1] == ["api"]:
        _route_api(h, req, segs[1:])
        return
    repo_type = "model"
    if segs and segs[0] in URL_PREFIX_TYPES:
        repo_type, segs = URL_PREFIX_TYPES[segs[0]], segs[1:]
    repo_id, rest = split_repo(h.hub.store, repo_type, segs, frozenset({"resolve"}))
    if rest[:1] != ["resolve"] or len(rest) < 3:
        h.respond_error(404, "Sorry, we can't find the page you are looking for.")
        return
    if _redirect_moved(h, req, repo_type, repo_id):
        return
    resolve(h, req, repo_type, repo_id, rest[1], "/".join(rest[2:]))


def _redirect_moved(h: "HubHandler", req: "Request", repo_type: str, repo_id: str) -> bool:
    """Renamed repos answer 307 with a *relative* Location, as the Hub does."""
    new_id = h.hub.store.moved.get((repo_type, repo_id))
    if new_id is None:
        return False
    location = req.target.replace(f"/{repo_id}/", f"/{new_id}/", 1)
    if req.target.endswith(f"/{repo_id}"):
        location = req.target[: -len(repo_id)] + new_id
    h.respond_error(307, "Repository moved", headers={"Location": location})
    return True


def _route_api(h: "HubHandler", req: "Request", segs: list[str]) -> None:
    fault = h.hub.faults.take_request_fault("api", req.method, req.path)
    if fault is not None:
        h.respond_fault(fault)
        return
    if segs == ["whoami-v2"]:
        _whoami(h, req)
        return
    if not segs or segs[0] not in API_TYPES:
        h.respond_error(404, "Sorry, we can't find the page you are looking for.")
        return
    repo_type = API_TYPES[segs[0]]
    repo_id, rest = split_repo(h.hub.store, repo_type, segs[1:], API_ENDPOINTS)
    if _redirect_moved(h, req, repo_type, repo_id):
        return
    endpoint = rest[0] if rest else ""
    handler = _ENDPOINTS.get(endpoint)
    if handler is None:
        h.respond_error(404, "Sorry, we can't find the page you are looking for.")
        return
    repo = h.check_repo(req, h.hub.store.get(repo_type, repo_id), files=endpoint == "xet-read-token")
    if repo is not None:
        handler(h, req, repo, rest[1:])


def _info(h: "HubHandler", req: "Request", repo: Repo, rest: list[str]) -> None:
    commit = h.resolve_commit(repo, "/".join(rest) or "main")
    if commit is None:
        return
    expand = req.query.get("expand") or req.query.get("expand[]")
    with_blobs = req.flag("blobs")
    h.respond_json(200, views.repo_info(repo, commit, with_blobs=with_blobs, expand=expand))


def _tree(h: "HubHandler", req: "Request", repo: Repo, rest: list[str]) -> None:
    commit = h.resolve_commit(repo, rest[0] if rest else "main")
    if commit is None:
        return
    base = "/".join(rest[1:]).strip("/")
    paths = views.tree_paths(commit, base, req.flag("recursive"))
    if paths is None:
        h.respond_error(404, f"Entry not found: {base}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        return
    expand = req.flag("expand")
    # the Hub pages tree listings: 1000 entries, 50 when expand=true (cursor in a Link header)
    page = h.hub.tree_page_size if not expand else min(50, h.hub.tree_page_size)
    try:
        cursor = req.param("cursor")
        start = int(base64.urlsafe_b64decode(cursor.encode()).decode()) if cursor else 0
    except ValueError:
        h.respond_error(400, "Invalid cursor")
        return
    chunk = paths[start : start + page]
    headers = {"X-Repo-Commit": commit.sha}
    if start + page < len(paths):
        params = {k: v[-1] for k, v in req.query.items() if k != "cursor"}
        params["cursor"] = base64.urlsafe_b64encode(str(start + page).encode()).decode()
        headers["Link"] = f'<{h.hub.url}{req.path}?{urlencode(params)}>; rel="next"'
    h.respond_json(200, [_listed(h, repo, views.path_entry(repo, commit, p, expand)) for p in chunk], headers)


def _listed(h: "HubHandler", repo: Repo, entry: dict | None) -> dict | None:
    override = h.hub.listing_overrides.get((repo.repo_id, entry["path"])) if entry else None
    return views.override_entry(entry, override) if override else entry


def _paths_info(h: "HubHandler", req: "Request", repo: Repo, rest: list[str]) -> None:
    commit = h.resolve_commit(repo, "/".join(rest) or "main")
    if commit is None:
        return
    form = req.form()
    expand = (form.get("expand") or ["false"])[-1].lower() == "true"
    entries = [_listed(h, repo, views.path_entry(repo, commit, p.strip("/"), expand)) for p in form.get("paths", [])]
    h.respond_json(200, [e for e in entries if e is not None])  # unknown paths are skipped


def _refs(h: "HubHandler", req: "Request", repo: Repo, rest: list[str]) -> None:
    h.respond_json(200, views.refs(repo))


def _commits(h: "HubHandler", req: "Request", repo: Repo, rest: list[str]) -> None:
    commit = h.resolve_commit(repo, "/".join(rest) or "main")
    if commit is not None:
        h.respond_json(200, [views.commit_entry(c) for c in repo.history(commit)])


def _xet_read_token(h: "HubHandler", req: "Request", repo: Repo, rest: list[str]) -> None:
    if h.hub.xet_cas is None:
        h.respond_error(404, "Xet storage is not enabled on this server")
        return
    commit = h.resolve_commit(repo, "/".join(rest) or "main")
    if commit is None:
        return
    token, exp = h.hub.xet_cas.issue_token()
    cas = h.hub.xet_endpoint
    # huggingface_hub reads the headers; hf_xet's own token refresher reads the JSON body
    headers = {"X-Xet-Cas-Url": cas, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(exp)}
    h.respond_json(200, {"casUrl": cas, "accessToken": token, "exp": exp}, headers)


def _whoami(h: "HubHandler", req: "Request") -> None:
    if req.token is None or req.token not in h.hub.tokens:
        h.respond_error(401, "Invalid credentials in Authorization header")
        return
    token_info = {"displayName": "devhub", "role": "read"}
    body = {"type": "user", "name": "devhub-user", "fullname": "Dev Hub User", "orgs": []}
    body["auth"] = {"type": "access_token", "accessToken": token_info}
    h.respond_json(200, body)


_ENDPOINTS = {
    "": _info,
    "revision": _info,
    "tree": _tree,
    "paths-info": _paths_info,
    "refs": _refs,
    "commits": _commits,
    "xet-read-token": _xet_read_token,
}
