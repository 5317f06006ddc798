"""The dev hub must look like the real Hub to the real huggingface_hub client (no mocks)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from agent.devhub import HubServer, make_demo_model, make_model

pytestmark = pytest.mark.timeout(60)

TOKEN = "hf_test_token"
REPO = "org/demo"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    return make_demo_model(tmp_path_factory.mktemp("demo-src"))


@pytest.fixture
def hub(tmp_path, demo_files):
    with HubServer(tmp_path / "hub") as srv:
        srv.demo_sha = srv.add_repo(REPO, demo_files, tags=["v1"])
        yield srv


@pytest.fixture
def xet_hub(tmp_path, demo_files):
    with HubServer(tmp_path / "xethub", xet=True) as srv:
        srv.demo_sha = srv.add_repo(REPO, demo_files)
        yield srv


def cdn_location(srv: HubServer, path: str, revision: str = "main") -> str:
    r = httpx.head(f"{srv.url}/{REPO}/resolve/{revision}/{path}")
    assert r.status_code == 302
    return r.headers["location"]


def assert_same_files(snapshot: str | Path, files: dict[str, Path]) -> None:
    for rel, src in files.items():
        assert sha256(Path(snapshot) / rel) == sha256(src), rel


# -- downloads through the real client --------------------------------------------------------


def test_snapshot_download_plain_http(hub, demo_files, tmp_path):
    path = snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "c", token=TOKEN)
    assert_same_files(path, demo_files)
    assert Path(path).name == hub.demo_sha
    cdn = [r for r in hub.stats.requests if r.host == "cdn"]
    assert {r.path.split("?")[0].rsplit("/", 1)[1] for r in cdn} == {
        sha256(demo_files["model.safetensors"]),
        sha256(demo_files["tokenizer.json"]),
    }
    # the token went to the Hub host but never to the CDN
    assert all("authorization" not in r.headers for r in cdn)
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.stats.requests if r.host == "api")
    assert hub.stats.bytes_sent("model.safetensors") == demo_files["model.safetensors"].stat().st_size


def test_snapshot_download_goes_through_xet(xet_hub, demo_files, tmp_path):
    path = snapshot_download(REPO, endpoint=xet_hub.url, cache_dir=tmp_path / "c", token=False)
    assert_same_files(path, demo_files)
    reqs = xet_hub.stats.requests
    assert not [r for r in reqs if r.host == "cdn"], "LFS files must come from the xet CAS, not the CDN"
    assert not [r for r in reqs if "model.safetensors" in r.path]
    assert any("/xet-read-token/" in r.path for r in reqs)
    assert xet_hub.stats.bytes_sent("model.safetensors") == 0


def test_hf_hub_download_single_xet_file(xet_hub, demo_files, tmp_path):
    head = httpx.head(f"{xet_hub.url}/{REPO}/resolve/main/model.safetensors")
    assert len(head.headers["x-xet-hash"]) == 64
    assert head.links["xet-auth"]["url"].endswith(f"/api/models/{REPO}/xet-read-token/{xet_hub.demo_sha}")
    tok = httpx.get(head.links["xet-auth"]["url"])
    assert tok.headers["x-xet-cas-url"].startswith("local://")
    assert int(tok.headers["x-xet-token-expiration"]) > time.time() + 3000
    assert tok.json()["casUrl"] == tok.headers["x-xet-cas-url"]
    out = hf_hub_download(REPO, "model.safetensors", endpoint=xet_hub.url, cache_dir=tmp_path / "c", token=False)
    assert sha256(out) == sha256(demo_files["model.safetensors"])
    assert not [r for r in xet_hub.stats.requests if r.host == "cdn"]


def test_download_resumes_after_truncated_body(hub, tmp_path):
    size, cut = 24 << 20, 12 << 20
    files = make_model(tmp_path / "big", large_files=1, large_size=size, small_files=0)
    hub.add_repo("org/big", files)
    fault = hub.faults.add("truncate", path_glob="model.safetensors", host="cdn", after_bytes=cut)
    out = hf_hub_download("org/big", "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "c", token=False)
    assert sha256(out) == sha256(files["model.safetensors"])
    assert fault.hits == 1
    # huggingface_hub resumes with a Range from the last whole 10 MiB chunk it had consumed
    cdn = [r for r in hub.stats.requests if r.host == "cdn"]
    assert len(cdn) == 2 and cdn[1].headers["range"] == f"bytes={10 << 20}-"
    assert hub.stats.bytes_sent("model.safetensors") == cut + size - (10 << 20)


def test_commit_moves_branch_and_old_commit_stays(hub, demo_files, tmp_path):
    new = hub.commit(REPO, {**demo_files, "config.json": b'{"new": true}'}, message="Update config")
    api = HfApi(endpoint=hub.url, token=False)
    assert api.model_info(REPO).sha == new
    assert api.model_info(REPO, revision="v1").sha == hub.demo_sha
    old = hf_hub_download(REPO, "config.json", revision=hub.demo_sha, endpoint=hub.url, cache_dir=tmp_path / "c")
    cur = hf_hub_download(REPO, "config.json", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert Path(old).read_bytes() == demo_files["config.json"].read_bytes()
    assert Path(cur).read_bytes() == b'{"new": true}'
    assert [c.commit_id for c in api.list_repo_commits(REPO)] == [new, hub.demo_sha]


def test_hf_cli_download(hub, demo_files, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "home"))
    hf = Path(sys.executable).with_name("hf")
    proc = subprocess.run(
        [str(hf), "download", REPO, "--cache-dir", str(tmp_path / "c")],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    snapshot = tmp_path / "c" / "models--org--demo" / "snapshots" / hub.demo_sha
    assert_same_files(snapshot, demo_files)


# -- API metadata ------------------------------------------------------------------------------


def test_model_info_by_branch_tag_and_sha(hub, demo_files):
    api = HfApi(endpoint=hub.url, token=False)
    for rev in (None, "main", "v1", hub.demo_sha, hub.demo_sha[:7], "refs/heads/main"):
        info = api.model_info(REPO, revision=rev)
        assert info.id == REPO and info.sha == hub.demo_sha, rev
        assert sorted(s.rfilename for s in info.siblings) == sorted(demo_files)
        assert info.private is False and info.gated is False and info.last_modified is not None
    full = api.model_info(REPO, files_metadata=True)
    st = {s.rfilename: s for s in full.siblings}
    assert st["model.safetensors"].lfs.sha256 == sha256(demo_files["model.safetensors"])
    assert st["config.json"].lfs is None and st["config.json"].size == demo_files["config.json"].stat().st_size
    refs = api.list_repo_refs(REPO)
    assert [b.name for b in refs.branches] == ["main"] and [t.name for t in refs.tags] == ["v1"]


def test_dataset_repo(hub, tmp_path):
    hub.add_repo("org/data", {"train.csv": b"a,b\n1,2\n"}, repo_type="dataset")
    api = HfApi(endpoint=hub.url, token=False)
    assert api.dataset_info("org/data").siblings[0].rfilename == "train.csv"
    out = hf_hub_download("org/data", "train.csv", repo_type="dataset", endpoint=hub.url, cache_dir=tmp_path)
    assert Path(out).read_bytes() == b"a,b\n1,2\n"
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/data")


def test_list_repo_tree_paginates(tmp_path, demo_files):
    with HubServer(tmp_path / "hub", tree_page_size=3) as srv:
        srv.add_repo(REPO, demo_files)
        r = httpx.get(f"{srv.url}/api/models/{REPO}/tree/main", params={"recursive": "true"})
        assert len(r.json()) == 3 and r.links["next"]["url"].startswith(srv.url)
        entries = list(HfApi(endpoint=srv.url, token=False).list_repo_tree(REPO, recursive=True))
        assert len(srv.stats.requests) == 1 + 3  # 8 entries in pages of 3
    by_path = {e.path: e for e in entries}
    assert set(by_path) == set(demo_files) | {"original"}
    assert by_path["original"].tree_id and len(by_path["original"].tree_id) == 40
    weights = by_path["model.safetensors"]
    assert weights.lfs.sha256 == sha256(demo_files["model.safetensors"])
    assert weights.lfs.pointer_size == len(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\nsize {weights.size}\n")
    cfg = demo_files["config.json"].read_bytes()
    assert by_path["config.json"].blob_id == hashlib.sha1(b"blob %d\0" % len(cfg) + cfg).hexdigest()


def test_tree_subfolder_expand_and_paths_info(hub, demo_files):
    api = HfApi(endpoint=hub.url, token=False)
    sub = list(api.list_repo_tree(REPO, path_in_repo="original", expand=True))
    assert [e.path for e in sub] == ["original/params.json"]
    assert sub[0].last_commit.oid == hub.demo_sha and sub[0].security.safe
    top = {e.path for e in api.list_repo_tree(REPO)}
    assert "original" in top and "original/params.json" not in top
    info = api.get_paths_info(REPO, ["config.json", "original", "missing.bin"])
    assert [e.path for e in info] == ["config.json", "original"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="nope"))


# -- errors -------------------------------------------------------------------------------------


def test_error_classes(hub, tmp_path):
    hub.add_repo("org/gated", {"w.bin": b"x" * 20_000, "README.md": b"# gated"}, gated=True)
    hub.add_repo("org/secret", {"a.txt": b"secret"}, private=True)
    anon = HfApi(endpoint=hub.url, token=False)
    authed = HfApi(endpoint=hub.url, token=TOKEN)
    with pytest.raises(RepositoryNotFoundError) as e:
        anon.model_info("org/missing")
    assert e.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as e:
        authed.model_info("org/missing")
    assert e.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        anon.model_info("org/secret")
    assert authed.model_info("org/secret").private is True
    with pytest.raises(RevisionNotFoundError):
        anon.model_info(REPO, revision="nope")
    kw = dict(endpoint=hub.url, cache_dir=tmp_path / "c")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.txt", token=False, **kw)
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "w.bin", token=False, **kw)
    assert anon.model_info("org/gated").gated == "auto"  # metadata of gated repos stays public
    assert Path(hf_hub_download("org/gated", "w.bin", token=TOKEN, **kw)).read_bytes() == b"x" * 20_000
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.url, token="hf_wrong").model_info(REPO)
    assert e.value.response.status_code == 401 and not isinstance(e.value, RepositoryNotFoundError)
    r = httpx.get(f"{hub.url}/api/models/org/missing")
    assert r.headers["x-error-code"] == "RepoNotFound" and r.json()["error"]


def test_moved_repo_redirects_relatively(hub, tmp_path, demo_files):
    hub.move_repo("org/old-name", REPO)
    r = httpx.head(f"{hub.url}/org/old-name/resolve/main/config.json")
    assert r.status_code == 307 and r.headers["location"] == f"/{REPO}/resolve/main/config.json"
    out = hf_hub_download("org/old-name", "config.json", endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert sha256(out) == sha256(demo_files["config.json"])


# -- HTTP details ---------------------------------------------------------------------------------


def test_resolve_headers(hub, demo_files):
    cfg = demo_files["config.json"].read_bytes()
    r = httpx.head(f"{hub.url}/{REPO}/resolve/main/config.json")
    assert r.status_code == 200 and r.headers["x-repo-commit"] == hub.demo_sha
    assert r.headers["etag"] == '"%s"' % hashlib.sha1(b"blob %d\0" % len(cfg) + cfg).hexdigest()
    assert int(r.headers["content-length"]) == len(cfg) and r.headers["accept-ranges"] == "bytes"
    assert "config.json" in r.headers["content-disposition"]
    r = httpx.head(f"{hub.url}/{REPO}/resolve/v1/model.safetensors")
    size = demo_files["model.safetensors"].stat().st_size
    assert r.status_code == 302
    assert r.headers["x-linked-etag"] == '"%s"' % sha256(demo_files["model.safetensors"])
    assert int(r.headers["x-linked-size"]) == size and r.headers["x-repo-commit"] == hub.demo_sha
    assert r.headers["location"].startswith(hub.cdn_url + "/") and "Signature=" in r.headers["location"]
    assert "x-xet-hash" not in r.headers
    # text files are gzipped on the fly for clients that accept it, like the Hub does
    g = httpx.get(f"{hub.url}/{REPO}/resolve/main/config.json", headers={"Accept-Encoding": "gzip"})
    assert g.headers["content-encoding"] == "gzip" and g.content == cfg


def test_range_and_if_range(hub, demo_files):
    data = demo_files["model.safetensors"].read_bytes()
    url = cdn_location(hub, "model.safetensors")
    full = httpx.get(url)
    etag = full.headers["etag"]
    assert full.status_code == 200 and full.content == data
    assert etag.strip('"') != sha256(demo_files["model.safetensors"])  # the CDN has its own ETag
    r = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
    assert httpx.get(url, headers={"Range": "bytes=-5"}).content == data[-5:]
    assert httpx.get(url, headers={"Range": "bytes=100-"}).content == data[100:]
    bad = httpx.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(data)}"
    ok = httpx.get(url, headers={"Range": "bytes=5-9", "If-Range": etag})
    assert ok.status_code == 206 and ok.content == data[5:10]
    stale = httpx.get(url, headers={"Range": "bytes=5-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == data
    # regular files support ranges on the resolve URL itself
    cfg = demo_files["config.json"].read_bytes()
    r = httpx.get(f"{hub.url}/{REPO}/resolve/main/config.json", headers={"Range": "bytes=0-3"})
    assert r.status_code == 206 and r.content == cfg[:4]


def test_cdn_urls_are_signed(hub):
    url = cdn_location(hub, "model.safetensors")
    assert httpx.head(url).status_code == 200
    assert httpx.get(url.replace("Signature=", "Signature=x")).status_code == 403
    hub.cdn_url_ttl = -1
    expired = httpx.get(cdn_location(hub, "model.safetensors"))
    assert expired.status_code == 403 and b"AccessDenied" in expired.content


# -- faults ----------------------------------------------------------------------------------------


def test_fault_status_and_429(hub):
    url = f"{hub.url}/api/models/{REPO}"
    f = hub.faults.add("status", path_glob="/api/models/*", status=500)
    assert httpx.get(url).status_code == 500
    assert httpx.get(url).status_code == 200 and f.hits == 1
    hub.faults.add("429", path_glob="/api/*", retry_after=7, count=2)
    for _ in range(2):
        r = httpx.get(url)
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert httpx.get(url).status_code == 200
    hub.faults.add("status", path_glob="config.json", status=503, method="HEAD")
    assert httpx.head(f"{hub.url}/{REPO}/resolve/main/config.json").status_code == 503
    assert httpx.head(f"{hub.url}/{REPO}/resolve/main/config.json").status_code == 200


def test_fault_reset_truncate_stall(hub, demo_files):
    url = cdn_location(hub, "model.safetensors")
    hub.faults.add("reset", host="cdn", after_bytes=100_000)
    with pytest.raises(httpx.ReadError, match="reset"):  # RST: ECONNRESET, not a clean EOF
        httpx.get(url)
    hub.faults.add("truncate", host="cdn", after_bytes=100_000)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url)
    hub.faults.add("stall", host="cdn", after_bytes=1000, seconds=2)
    t = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url, timeout=httpx.Timeout(5, read=0.3))
    assert time.monotonic() - t < 1.5
    assert httpx.get(url).content == demo_files["model.safetensors"].read_bytes()  # all used up


def test_fault_corrupt_and_slow(hub, demo_files):
    data = demo_files["model.safetensors"].read_bytes()
    url = cdn_location(hub, "model.safetensors")
    hub.faults.add("corrupt", path_glob="*.safetensors", after_bytes=1000)
    bad = httpx.get(url).content
    assert len(bad) == len(data) and bad[:1000] == data[:1000] and bad[1000:] != data[1000:]
    tok = demo_files["tokenizer.json"]  # ~22 kB, LFS: served by the CDN
    hub.faults.add("slow", rate=50_000, path_glob="tokenizer.json")
    t = time.monotonic()
    assert httpx.get(cdn_location(hub, "tokenizer.json")).content == tok.read_bytes()
    assert time.monotonic() - t >= tok.stat().st_size / 50_000 * 0.8


# -- fixtures --------------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def test_demo_model_safetensors_is_valid(demo_files):
    path = demo_files["model.safetensors"]
    n, header = read_safetensors_header(path)
    assert n % 8 == 0
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    spans = sorted(v["data_offsets"] for v in tensors.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert 8 + n + spans[-1][1] == path.stat().st_size
    assert 3_000_000 < path.stat().st_size < 6_000_000
    assert {"config.json", "tokenizer.json", "README.md", "original/params.json"} <= set(demo_files)


def test_make_model_is_exact_valid_and_not_repetitive(tmp_path):
    files = make_model(tmp_path / "m", large_files=2, large_size=9 * 1024 * 1024 + 3, small_files=3, seed=5)
    large = [p for n, p in files.items() if n.endswith(".safetensors")]
    assert len(large) == 2 and len(files) == 5
    for p in large:
        n, header = read_safetensors_header(p)
        assert p.stat().st_size == 9 * 1024 * 1024 + 3 == 8 + n + header["weight"]["data_offsets"][1]
    blob = large[0].read_bytes()
    assert blob[1 << 20 : 2 << 20] != blob[(8 << 20) + (1 << 20) : (8 << 20) + (2 << 20)]
    assert sha256(large[0]) != sha256(large[1])
    before = large[0].stat().st_mtime_ns
    again = make_model(tmp_path / "m", large_files=2, large_size=9 * 1024 * 1024 + 3, small_files=3, seed=5)
    assert again[large[0].name].stat().st_mtime_ns == before  # reused, not rewritten


def test_restart_keeps_urls_and_repos(hub):
    url, cdn = hub.url, hub.cdn_url
    hub.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/api/models/{REPO}")
    hub.start()
    assert (hub.url, hub.cdn_url) == (url, cdn)
    assert httpx.get(f"{url}/api/models/{REPO}").json()["sha"] == hub.demo_sha
