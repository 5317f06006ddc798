"""Pulling a published mirror back with its Hub identity (issue 14, DESIGN.md "Publishing").

Three kinds of prefix, on a path and in a bucket (SeaweedFS): a published one (`.model-agent/lock.json`,
written by `push` or here by agent/published.py), a tree made by the real `hf download --local-dir`, and
neither (the content id, as before). Bookkeeping folders never enter a snapshot. Every check goes
through the real CLI; a consumer pinned to the Hub commit then loads offline from the cache it filled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.devhub import HubServer, make_demo_model
from agent.published import PublishedFile, PublishedLock
from conftest import ROOT, clean_env
from objstore.helpers import agent, env_for, events, summary

pytestmark = pytest.mark.timeout(180)
REPO = "org/mirror"
HF = str(ROOT / ".venv" / "bin" / "hf")
LFS_THRESHOLD = 10_000  # the dev hub's default: larger files are LFS, their etag the sha256


def hub_etag(data: bytes) -> str:
    """The Hub's blob name, computed here apart from agent/: the LFS sha256, or git's blob sha1."""
    if len(data) >= LFS_THRESHOLD:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("origin")
    paths = make_demo_model(folder / "model")
    with HubServer(folder / "hub") as hub:
        commit = hub.add_repo(REPO, paths)
        yield SimpleNamespace(hub=hub, commit=commit, files={k: Path(p).read_bytes() for k, p in paths.items()})


@pytest.fixture(scope="module")
def hf_tree(origin, tmp_path_factory) -> Path:
    """What platform teams run today to fill an NFS share: the real `hf download --local-dir`."""
    dest = tmp_path_factory.mktemp("hf-download") / "tree"
    hf_download(origin.hub, REPO, dest)
    assert (dest / ".cache" / "huggingface" / "trees" / f"{origin.commit}.json").is_file()
    return dest


def hf_download(hub, repo: str, dest: Path, *args: str) -> None:
    env = clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(dest.parent / "hf-home"), HF_HUB_DISABLE_XET="1")
    r = subprocess.run([HF, "download", repo, "--local-dir", str(dest), *args], env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr


def copy_tree(tree: Path, where: Path) -> Path:
    shutil.copytree(tree, where, symlinks=True)
    return where


def write_published(dest: Path, origin, revision: str = "v1.0", *, files: dict[str, bytes] | None = None) -> bytes:
    """A published prefix on a path, made the way `push` makes one: the files flat, the lockfile last."""
    files = origin.files if files is None else files
    entries = []
    for rel, data in files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
        etag = hub_etag(data)
        entries.append(PublishedFile(rel, len(data), etag, sha256=etag if len(etag) == 64 else None,
                                     git_sha1=etag if len(etag) == 40 else None))
    lock = PublishedLock(repo_id=REPO, repo_type="model", revision=revision, commit=origin.commit,
                         files=tuple(entries), source=f"hf://{REPO}").to_bytes()
    (dest / ".model-agent").mkdir(exist_ok=True)
    (dest / ".model-agent" / "lock.json").write_bytes(lock)
    return lock


def upload(weed, folder: Path, bucket: str, prefix: str = "m/") -> None:
    """`aws s3 sync FOLDER s3://bucket/prefix/`, bookkeeping included, as people copy mirrors."""
    c = weed.client()
    c.create_bucket(Bucket=bucket)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            c.put_object(Bucket=bucket, Key=prefix + str(p.relative_to(folder)), Body=p.read_bytes())


def consumer_loads(cache: Path, repo: str, commit: str, files: dict[str, bytes]) -> None:
    """A consumer pinned to the Hub commit, offline, as the GKE guide and the Dynamo recipes run it."""
    script = ("import sys, huggingface_hub as h\n"
              "p = h.snapshot_download(sys.argv[2], revision=sys.argv[3], cache_dir=sys.argv[1], local_files_only=True)\n"
              "info = h.scan_cache_dir(sys.argv[1]); assert not info.warnings, info.warnings\n"
              "print(p)\n")
    r = subprocess.run([sys.executable, "-c", script, str(cache), repo, commit],
                       env={**clean_env(), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    snap = Path(r.stdout.strip())
    assert snap.name == commit
    got = {str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_symlink() or p.is_file()}
    assert got == set(files), got ^ set(files)
    for rel, data in files.items():
        assert (snap / rel).read_bytes() == data, rel


def assert_hub_identity(cache: Path, repo: str, commit: str, files: dict[str, bytes], ref: str | None) -> None:
    """The layout a pull from the Hub would have made: the Hub's commit and blob names, the ref."""
    root = cache / ("models--" + repo.replace("/", "--"))
    assert {p.name for p in (root / "snapshots").iterdir()} == {commit}
    for rel, data in files.items():
        assert os.readlink(root / "snapshots" / commit / rel).endswith("blobs/" + hub_etag(data)), rel
    assert {p.name for p in (root / "blobs").iterdir()} == {hub_etag(d) for d in files.values()}
    if ref is not None:
        assert (root / "refs" / ref).read_text() == commit
    assert (root / ".model-agent" / f"{commit}.ready").read_text().strip() == commit


def no_marker(cache: Path) -> bool:
    return not list(cache.rglob("*.ready")) and not list(cache.rglob("ready"))


def error_line(stderr: str) -> str:
    errors = [e for e in events(stderr) if e.get("level") == "error"]
    assert len(errors) == 1, stderr
    return errors[0]["msg"]


# -- bookkeeping -----------------------------------------------------------------------------------

BOOKKEEPING = {".model-agent/notes.txt": b"not a lockfile", ".cache/huggingface/CACHEDIR.TAG": b"Signature",
               ".cache/huggingface/upload/x.metadata": b"1\n2\n"}
DATA = {"config.json": b'{"model_type": "llama"}', "weights.bin": os.urandom(50_000), ".cache/other/kept.txt": b"k"}


def test_bookkeeping_folders_never_enter_a_snapshot_on_a_path(tmp_path):
    src = tmp_path / "src"
    for rel, data in {**DATA, **BOOKKEEPING}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    dest = tmp_path / "flat"
    r = agent("pull", str(src), "--local-dir", str(dest), env=env_for({}))
    assert r.returncode == 0, r.stderr
    got = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and ".model-agent" not in p.parts}
    assert got == set(DATA)  # `.cache/other/` is data: only huggingface_hub's own folder is bookkeeping


def test_bookkeeping_folders_never_enter_a_snapshot_in_a_bucket(weed, tmp_path):
    src = tmp_path / "src"
    for rel, data in {**DATA, **BOOKKEEPING}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    upload(weed, src, "bookkeeping")
    cache = tmp_path / "cache"
    r = agent("pull", "s3://bookkeeping/m/", "--repo-id", "acme/plain", "--cache-dir", str(cache),
              env=env_for(weed.env()))
    assert r.returncode == 0, r.stderr  # before: exit 2, ".model-agent/ is reserved for model-agent"
    snap = next((cache / "models--acme--plain" / "snapshots").iterdir())
    assert {str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_symlink()} == set(DATA)
    assert (cache / "models--acme--plain" / "refs" / "main").read_text() == snap.name  # a content id, as before


# -- trees made by `hf download --local-dir` ----------------------------------------------------------

def test_hf_download_tree_on_a_path_keeps_the_hub_commit(origin, hf_tree, tmp_path):
    cache, env = tmp_path / "cache", env_for({})
    r = agent("pull", str(hf_tree), "--cache-dir", str(cache), env=env)
    assert r.returncode == 2 and "--repo-id" in error_line(r.stderr), r.stderr  # the tree does not say
    r = agent("pull", str(hf_tree), "--repo-id", REPO, "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stderr
    assert summary(r.stderr)["commit"] == origin.commit
    assert_hub_identity(cache, REPO, origin.commit, origin.files, ref="main")
    consumer_loads(cache, REPO, origin.commit, origin.files)
    r = agent("pull", str(hf_tree), "--repo-id", REPO, "--revision", origin.commit, "--cache-dir", str(cache), env=env)
    assert r.returncode == 0 and summary(r.stderr)["already_ready"] is True, r.stderr
    r = agent("pull", str(hf_tree), "--repo-id", REPO, "--revision", "a" * 40, "--cache-dir", str(cache), env=env)
    assert r.returncode == 4 and origin.commit[:12] in error_line(r.stderr), r.stderr


def test_hf_download_tree_in_a_bucket_and_a_partial_copy(origin, hf_tree, weed, tmp_path):
    upload(weed, hf_tree, "hf-tree")
    cache, env = tmp_path / "cache", env_for(weed.env())
    r = agent("pull", "s3://hf-tree/m/", "--repo-id", REPO, "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stderr
    assert_hub_identity(cache, REPO, origin.commit, origin.files, ref="main")
    consumer_loads(cache, REPO, origin.commit, origin.files)
    # An interrupted `aws s3 sync`: the tree listing names a file the bucket lacks.
    weed.client().delete_object(Bucket="hf-tree", Key="m/model.safetensors")
    other = tmp_path / "other"
    r = agent("pull", "s3://hf-tree/m/", "--repo-id", REPO, "--cache-dir", str(other), env=env)
    assert r.returncode == 7, r.stderr
    assert "model.safetensors" in error_line(r.stderr) and "--include" in error_line(r.stderr)
    assert no_marker(other)
    # The part that is there, asked for by name, is a complete pull of that part.
    r = agent("pull", "s3://hf-tree/m/", "--repo-id", REPO, "--exclude", "*.safetensors", "--cache-dir", str(other), env=env)
    assert r.returncode == 0, r.stderr
    assert summary(r.stderr)["commit"] == origin.commit


def test_hf_download_tree_without_its_tree_listing(origin, hf_tree, tmp_path):
    tree = copy_tree(hf_tree, tmp_path / "tree")
    shutil.rmtree(tree / ".cache" / "huggingface" / "trees")
    (tree / "notes-added-later.txt").write_bytes(b"not from the Hub")
    cache, env = tmp_path / "cache", env_for({})
    r = agent("pull", str(tree), "--repo-id", REPO, "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stderr
    assert_hub_identity(cache, REPO, origin.commit, origin.files, ref="main")  # the added file left out...
    assert any("notes-added-later.txt" in e.get("msg", "") for e in events(r.stderr) if e.get("level") == "warning")
    (tree / "original" / "params.json").unlink()  # ...and a file its metadata names is missing: incomplete
    other = tmp_path / "other"
    r = agent("pull", str(tree), "--repo-id", REPO, "--cache-dir", str(other), env=env)
    assert r.returncode == 7 and "original/params.json" in error_line(r.stderr), r.stderr
    assert no_marker(other)


def test_hf_download_tree_updated_to_a_newer_commit(origin, tmp_path):
    repo, tree = "org/moving", tmp_path / "tree"
    first = origin.hub.add_repo(repo, origin.files)
    hf_download(origin.hub, repo, tree)
    newer = {k: v for k, v in origin.files.items() if k != "original/params.json"}
    newer["config.json"] = b'{"model_type": "llama", "changed": true}'
    second = origin.hub.commit(repo, newer)
    hf_download(origin.hub, repo, tree)  # what people run to update a mirror: the old file stays behind
    assert (tree / "original" / "params.json").exists()
    cache, env = tmp_path / "cache", env_for({})
    r = agent("pull", str(tree), "--repo-id", repo, "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stderr
    assert_hub_identity(cache, repo, second, newer, ref="main")
    assert any("original/params.json" in e.get("msg", "") for e in events(r.stderr) if e.get("level") == "warning")
    consumer_loads(cache, repo, second, newer)
    r = agent("pull", str(tree), "--repo-id", repo, "--revision", first, "--cache-dir", str(cache), env=env)
    assert r.returncode == 4, r.stderr


def test_a_flipped_byte_in_a_mirror_is_exit_5(origin, hf_tree, tmp_path):
    tree = copy_tree(hf_tree, tmp_path / "tree")
    weights = tree / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))  # same size: only a checksum can tell
    cache = tmp_path / "cache"
    r = agent("pull", str(tree), "--repo-id", REPO, "--cache-dir", str(cache), env=env_for({}))
    assert r.returncode == 5 and "model.safetensors" in error_line(r.stderr), r.stderr
    assert no_marker(cache)


# -- published prefixes (.model-agent/lock.json) -------------------------------------------------------

def test_published_prefix_on_a_path(origin, tmp_path):
    pub = tmp_path / "pub"
    write_published(pub, origin, revision="v1.0")
    (pub / "stray.bin").write_bytes(b"not in the lock")
    cache, env = tmp_path / "cache", env_for({})
    r = agent("pull", str(pub), "--cache-dir", str(cache), env=env)  # no --repo-id: the lockfile names it
    assert r.returncode == 0, r.stderr
    assert summary(r.stderr)["commit"] == origin.commit
    assert_hub_identity(cache, REPO, origin.commit, origin.files, ref="v1.0")
    assert sum("stray.bin" in e.get("msg", "") for e in events(r.stderr) if e.get("level") == "warning") == 1
    consumer_loads(cache, REPO, origin.commit, origin.files)
    r = agent("verify", str(pub), "--cache-dir", str(cache), env=env)
    assert r.returncode == 0 and events(r.stderr)[-1]["commit"] == origin.commit, r.stderr
    for revision in ("v1.0", origin.commit):
        r = agent("pull", str(pub), "--revision", revision, "--cache-dir", str(cache), env=env)
        assert r.returncode == 0 and summary(r.stderr)["already_ready"] is True, r.stderr
    for revision in ("main", "b" * 40):
        r = agent("pull", str(pub), "--revision", revision, "--cache-dir", str(cache), env=env)
        assert r.returncode == 4 and "v1.0" in error_line(r.stderr), r.stderr
    r = agent("pull", str(pub), "--repo-id", "acme/renamed", "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stderr  # --repo-id wins over the lockfile's name
    assert_hub_identity(cache, "acme/renamed", origin.commit, origin.files, ref="v1.0")


def test_published_prefix_in_a_bucket_incomplete_then_complete(origin, weed, tmp_path):
    pub = tmp_path / "pub"
    write_published(pub, origin, revision="main")
    upload(weed, pub, "published")
    cache, env = tmp_path / "cache", env_for(weed.env())
    c = weed.client()
    keep = c.get_object(Bucket="published", Key="m/tokenizer.json")["Body"].read()
    c.delete_object(Bucket="published", Key="m/tokenizer.json")
    c.put_object(Bucket="published", Key="m/config.json", Body=b"{}")  # another size: a push rewriting it
    r = agent("pull", "s3://published/m/", "--cache-dir", str(cache), env=env)
    assert r.returncode == 7, r.stderr
    line = error_line(r.stderr)
    assert "tokenizer.json" in line and "config.json" in line, line
    assert no_marker(cache)
    c.put_object(Bucket="published", Key="m/tokenizer.json", Body=keep)
    c.put_object(Bucket="published", Key="m/config.json", Body=origin.files["config.json"])
    r = agent("pull", "s3://published/m/", "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stderr
    assert_hub_identity(cache, REPO, origin.commit, origin.files, ref="main")
    consumer_loads(cache, REPO, origin.commit, origin.files)


def test_a_flipped_byte_in_a_published_bucket_is_exit_5(origin, weed, tmp_path):
    pub = tmp_path / "pub"
    write_published(pub, origin)
    data = bytearray(origin.files["tokenizer.json"])
    data[100] ^= 0x20
    (pub / "tokenizer.json").write_bytes(bytes(data))
    upload(weed, pub, "flipped")
    cache = tmp_path / "cache"
    r = agent("pull", "s3://flipped/m/", "--cache-dir", str(cache), env=env_for(weed.env()))
    assert r.returncode == 5 and "tokenizer.json" in error_line(r.stderr), r.stderr
    assert no_marker(cache)


def test_a_prefix_being_published_is_refused(origin, weed, tmp_path):
    pub = tmp_path / "pub"
    write_published(pub, origin)
    (pub / ".model-agent" / "lock.json").unlink()
    (pub / ".model-agent" / "publishing").write_text(json.dumps({"commit": origin.commit}))
    upload(weed, pub, "publishing")
    for source, env in ((str(pub), env_for({})), ("s3://publishing/m/", env_for(weed.env()))):
        cache = tmp_path / ("cache-" + source[:2])
        r = agent("pull", source, "--repo-id", REPO, "--cache-dir", str(cache), env=env)
        assert r.returncode == 7, r.stderr
        assert "being published" in error_line(r.stderr)
        assert no_marker(cache)


def test_a_local_dir_pulled_from_the_hub_is_a_mirror_too(origin, tmp_path):
    flat = tmp_path / "flat"
    r = agent("pull", REPO, "--local-dir", str(flat), env=env_for({"HF_ENDPOINT": origin.hub.url}))
    assert r.returncode == 0, r.stderr
    cache = tmp_path / "cache"
    r = agent("pull", str(flat), "--cache-dir", str(cache), env=env_for({}))
    assert r.returncode == 0, r.stderr
    assert_hub_identity(cache, REPO, origin.commit, origin.files, ref="main")
    consumer_loads(cache, REPO, origin.commit, origin.files)


def test_hf_download_tree_in_gcs_and_azure(origin, hf_tree, gcs, azurite, tmp_path):
    bucket = gcs.client().create_bucket("hf-tree-mirror")
    container = azurite.service().create_container("hf-tree-mirror")
    for p in sorted(hf_tree.rglob("*")):
        if p.is_file():
            key = "m/" + str(p.relative_to(hf_tree))
            bucket.blob(key).upload_from_string(p.read_bytes())
            container.upload_blob(key, p.read_bytes())
    for source, server in (("gs://hf-tree-mirror/m/", gcs), ("az://hf-tree-mirror/m/", azurite)):
        cache = tmp_path / source[:2]
        r = agent("pull", source, "--repo-id", REPO, "--cache-dir", str(cache), env=env_for(server.env()))
        assert r.returncode == 0, r.stderr
        assert_hub_identity(cache, REPO, origin.commit, origin.files, ref="main")
        consumer_loads(cache, REPO, origin.commit, origin.files)


def test_push_to_a_path_then_pull_it_and_a_mirror_of_the_mirror(origin, tmp_path):
    first, second = tmp_path / "nfs" / "mirror", tmp_path / "nfs2" / "mirror"
    r = agent("push", REPO, str(first), "--cache-dir", str(tmp_path / "staging"),
              env=env_for({"HF_ENDPOINT": origin.hub.url}))
    assert r.returncode == 0, r.stderr
    cache = tmp_path / "cache"
    r = agent("pull", str(first), "--cache-dir", str(cache), env=env_for({}))
    assert r.returncode == 0, r.stderr
    assert_hub_identity(cache, REPO, origin.commit, origin.files, ref="main")
    consumer_loads(cache, REPO, origin.commit, origin.files)
    # Published again from the published copy, with no Hub in reach: the identity travels with it.
    r = agent("push", str(first), str(second), "--cache-dir", str(tmp_path / "staging2"), env=env_for({}))
    assert r.returncode == 0, r.stderr
    assert json.loads((second / ".model-agent" / "lock.json").read_text())["commit"] == origin.commit
    other = tmp_path / "other"
    r = agent("pull", str(second), "--revision", origin.commit, "--cache-dir", str(other), env=env_for({}))
    assert r.returncode == 0, r.stderr
    assert_hub_identity(other, REPO, origin.commit, origin.files, ref=None)
    consumer_loads(other, REPO, origin.commit, origin.files)


def test_a_bucket_mirror_published_again_keeps_the_hub_blob_names(origin, weed, tmp_path):
    pub = tmp_path / "pub"
    write_published(pub, origin, revision="main")
    upload(weed, pub, "remirror")
    nfs = tmp_path / "nfs"
    r = agent("push", "s3://remirror/m/", str(nfs), "--cache-dir", str(tmp_path / "staging"), env=env_for(weed.env()))
    assert r.returncode == 0, r.stderr
    lock = json.loads((nfs / ".model-agent" / "lock.json").read_text())
    assert {f["path"]: f["etag"] for f in lock["files"]} == {p: hub_etag(d) for p, d in origin.files.items()}
    cache = tmp_path / "cache"
    r = agent("pull", str(nfs), "--cache-dir", str(cache), env=env_for({}))
    assert r.returncode == 0, r.stderr
    assert_hub_identity(cache, REPO, origin.commit, origin.files, ref="main")
