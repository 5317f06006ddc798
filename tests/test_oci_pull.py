"""`pull oci://…` (agent/sources/oci.py) against real registries (tests/oci/servers.py: distribution 2.8
behind a private CA, anonymous, basic, token with blob redirects, plain HTTP): artifacts written by
skopeo and by our own client, the Hub identity in the annotations, errors, corruption and a kill."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from tests.conftest import load_offline
from tests.objstore.helpers import agent, popen, summary
from tests.objstore.proxy import FaultProxy
from tests.oci.artifacts import model_layout, skopeo_push
from tests.oci.servers import PASSWORD, USER, sha256_digest

pytestmark = [pytest.mark.skipif(not (shutil.which("docker-registry") and shutil.which("skopeo")),
                                 reason="docker-registry and skopeo: scripts/install-test-tools.sh"),
              pytest.mark.timeout(120)]
MiB = 2**20
FAST = {"MODEL_AGENT_RETRY_BASE_DELAY": "0.05", "MODEL_AGENT_RETRY_MAX_FAILURES": "3"}
NESTED = {"model.safetensors": os.urandom(200_000), "nested/dir/tokenizer.json": b'{"vocab": {}}',
          "config.json": b'{"model_type": "test"}'}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def env_for(registry, **extra: str) -> dict[str, str]:
    from tests.conftest import clean_env

    ca = {"SSL_CERT_FILE": str(registry.pki.ca)} if registry is not None else {}
    return clean_env(HOME="/nonexistent", **ca, **FAST, **extra)


def auth_file(tmp_path: Path, registry, password: str = PASSWORD) -> str:
    path = tmp_path / f"auth-{hashlib.sha1(password.encode()).hexdigest()[:6]}.json"
    token = base64.b64encode(f"{USER}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
    return str(path)


def client(registry, login: bool = False, plain: bool = False):
    from agent.oci.auth import Credential
    from agent.oci.client import RegistryClient

    credential = Credential(username=USER, password=PASSWORD) if login else None
    return RegistryClient(registry.host, credential=credential, ca_bundle=str(registry.pki.ca), plain_http=plain)


def push_artifact(reg_client, repository: str, tag: str, files: dict[str, bytes], *, hub: dict | None = None,
                  layer_annotations: dict | None = None, config_type: str | None = None,
                  layer_type: str | None = None) -> str:
    """A manifest built by hand with our client's uploads: ModelPack raw layers (or `layer_type`), the
    Hub identity annotations (agent/oci/mediatypes.py) when `hub` is given. Returns the manifest digest."""
    from agent.oci import mediatypes as mt

    layers = [(layer_type or mt.WEIGHT_RAW, data, {mt.TITLE: path, mt.FILEPATH: path,
                                                   **(layer_annotations or {}).get(path, {})})
              for path, data in files.items()]
    return push_manifest(reg_client, repository, tag, layers, hub=hub, config_type=config_type)


def push_manifest(reg_client, repository: str, tag: str, layers: list[tuple[str, bytes, dict]], *,
                  hub: dict | None = None, config_type: str | None = None) -> str:
    """Blobs, config, then the manifest; `layers` as (media type, blob bytes, annotations)."""
    from agent.oci import mediatypes as mt

    descriptors = []
    for media_type, blob, notes in layers:
        reg_client.push_blob(repository, sha256_digest(blob), None, len(blob), data=blob)
        descriptors.append({"mediaType": media_type, "digest": sha256_digest(blob), "size": len(blob),
                            "annotations": notes})
    config = json.dumps({"descriptor": {"name": "m"}, "modelfs": {
        "type": "layers", "diffIds": [d["digest"] for d in descriptors]}}).encode()
    reg_client.push_blob(repository, sha256_digest(config), None, len(config), data=config)
    body = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": config_type or mt.MODEL_CONFIG, "digest": sha256_digest(config), "size": len(config)},
            "layers": descriptors}
    if config_type is None:
        body["artifactType"] = mt.MODEL_ARTIFACT_TYPE
    if hub:
        body["annotations"] = hub
    return reg_client.put_manifest(repository, tag, json.dumps(body).encode(), mt.OCI_MANIFEST)


def tar_of(path: str, data: bytes, *, gz: bool, directory: bool = False) -> bytes:
    """A tar layer as modctl makes one: the file under its relative path (a folder entry first)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        if "/" in path or directory:
            folder = tarfile.TarInfo(path.rsplit("/", 1)[0] if "/" in path else path)
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
        info = tarfile.TarInfo(path)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0) if gz else buf.getvalue()


def file_metadata(name: str, size: int, typeflag: str = "0") -> str:
    return json.dumps({"name": name, "mode": 420, "uid": 0, "gid": 0, "size": size,
                       "mtime": "2025-01-01T00:00:00Z", "typeflag": ord(typeflag)})


def hub_annotations(repo_id: str, commit: str = COMMIT, revision: str = "main") -> dict:
    from agent.oci import mediatypes as mt

    return {mt.HF_REPO_ID: repo_id, mt.HF_REPO_TYPE: "model", mt.HF_REVISION: revision, mt.HF_COMMIT: commit}


def snapshot(cache: Path, repo_id: str, commit: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def assert_files(folder: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        assert (folder / path).read_bytes() == data, path
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert on_disk == set(files)


# -- identity ---------------------------------------------------------------------------------------------

def test_pull_of_a_skopeo_artifact_with_nested_paths_then_by_digest_wait_and_verify(registries, tmp_path):
    registry = registries.anonymous
    layout = tmp_path / "layout"
    manifest = model_layout(layout, NESTED)
    skopeo_push(layout, registry, "pull-skopeo/model")
    digest = sha256_digest(manifest)
    snapshot_id = digest.split(":")[1][:40]
    env, cache = env_for(registry), tmp_path / "cache"
    source = f"oci://{registry.host}/pull-skopeo/model:v1"

    r = agent("pull", source, "--cache-dir", str(cache), env=env)
    assert r.returncode == 2 and "--repo-id" in r.stderr, r.stderr  # no Hub identity: name it

    r = agent("pull", source, "--repo-id", "acme/skopeo", "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stderr
    assert summary(r.stderr)["commit"] == snapshot_id
    repo = cache / "models--acme--skopeo"
    assert_files(snapshot(cache, "acme/skopeo", snapshot_id), NESTED)
    assert (repo / "refs" / "v1").read_text() == snapshot_id
    lock = json.loads((repo / ".model-agent" / f"{snapshot_id}.lock.json").read_text())
    assert lock["source"] == source
    for entry in lock["files"]:  # the full manifest digest, and each layer's, for verify and readers
        assert entry["manifest"] == digest and entry["digest"] == "sha256:" + entry["sha256"], entry
    weights = hashlib.sha256(NESTED["model.safetensors"]).hexdigest()
    assert (repo / "blobs" / weights).is_file()  # the blob name a Hub pull gives an LFS file

    by_digest = f"oci://{registry.host}/pull-skopeo/model@{digest}"
    r = agent("pull", by_digest, "--repo-id", "acme/skopeo", "--cache-dir", str(tmp_path / "c2"), env=env)
    assert r.returncode == 0, r.stderr
    assert_files(snapshot(tmp_path / "c2", "acme/skopeo", snapshot_id), NESTED)

    for command in ("wait", "verify"):
        r = agent(command, source, "--repo-id", "acme/skopeo", "--cache-dir", str(cache), "--timeout", "5s",
                  env=env) if command == "wait" else \
            agent(command, source, "--repo-id", "acme/skopeo", "--cache-dir", str(cache), env=env)
        assert r.returncode == 0, (command, r.stderr)


def test_hub_identity_rebuilds_the_hub_layout_for_an_offline_consumer(registries, tmp_path):
    registry = registries.anonymous
    files = {"config.json": b'{"model_type": "gpt2", "n_layer": 2}', "model.safetensors": os.urandom(150_000),
             "sub/README.md": b"# a model\n"}
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(files["config.json"]) + files["config.json"]).hexdigest()
    from agent.oci import mediatypes as mt

    push_artifact(client(registry), "pull-hub/model", "v2", files, hub=hub_annotations("org/published"),
                  layer_annotations={"config.json": {mt.HF_GIT_SHA1: git_sha1}})
    env, cache = env_for(registry), tmp_path / "cache"
    r = agent("pull", f"oci://{registry.host}/pull-hub/model:v2", "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stderr
    assert summary(r.stderr)["commit"] == COMMIT
    repo = cache / "models--org--published"
    assert (repo / "refs" / "main").read_text() == COMMIT
    assert_files(snapshot(cache, "org/published", COMMIT), files)
    assert (repo / "blobs" / git_sha1).is_file()  # a small file: its git blob id, as a Hub pull names it
    assert load_offline(cache, "org/published", COMMIT)["model_type"] == "gpt2"
    r = agent("wait", f"oci://{registry.host}/pull-hub/model:v2", "--cache-dir", str(cache), "--timeout", "5s", env=env)
    assert r.returncode == 0, r.stderr
    r = agent("pull", f"oci://{registry.host}/pull-hub/model:v2", "--revision", "other", "--cache-dir", str(cache), env=env)
    assert r.returncode == 4 and "main" in r.stderr, r.stderr


def test_one_file_tar_layers_are_unpacked_and_checked_against_their_digest(registries, tmp_path):
    from agent.oci import mediatypes as mt

    registry = registries.anonymous
    files = {"model.safetensors": os.urandom(3 * MiB + 17), "config.json": b'{"model_type": "t"}',
             "docs/README.md": b"# tar layers\n" + os.urandom(8).hex().encode()}

    def layer(path: str, kind: str, gz: bool, blob: bytes | None = None) -> tuple[str, bytes, dict]:
        notes = {mt.TITLE: path, mt.FILEPATH: path, mt.FILE_METADATA: file_metadata(path.rsplit("/")[-1], len(files[path]))}
        return mt.tar_layer(kind, "gzip" if gz else ""), blob or tar_of(path, files[path], gz=gz), notes

    layers = [layer("model.safetensors", mt.WEIGHT, True), layer("docs/README.md", mt.DOC, False),
              (mt.WEIGHT_CONFIG_RAW, files["config.json"], {mt.FILEPATH: "config.json"})]
    push_manifest(client(registry), "pull-tar/model", "v1", layers)
    env, cache = env_for(registry), tmp_path / "cache"
    r = agent("pull", f"oci://{registry.host}/pull-tar/model:v1", "--local-dir", str(tmp_path / "out"),
              "--chunk-size", "1Mi", env=env)
    assert r.returncode == 0, r.stderr
    for path, data in files.items():
        assert (tmp_path / "out" / path).read_bytes() == data, path
    assert summary(r.stderr)["engine"] == "oci+oci-untar"

    stored = registry.blob_file(sha256_digest(layers[1][1]))  # the README's tar, in the registry's storage
    bad = bytearray(stored.read_bytes())
    bad[1024] ^= 0x01  # the file's first byte (after the folder's and the file's headers): only the digest tells
    stored.write_bytes(bytes(bad))
    r = agent("pull", f"oci://{registry.host}/pull-tar/model:v1", "--repo-id", "acme/tar", "--cache-dir", str(cache),
              env=env)
    assert r.returncode == 5 and "docs/README.md" in r.stderr, r.stderr
    assert not list(cache.rglob("*.ready"))

    folder = (mt.tar_layer(mt.CODE, ""), tar_of("src", b"", gz=False, directory=True),
              {mt.FILEPATH: "src", mt.FILE_METADATA: file_metadata("src", 4096, "5")})
    push_manifest(client(registry), "pull-tar/model", "folder", [layers[2], folder])
    r = agent("pull", f"oci://{registry.host}/pull-tar/model:folder", "--repo-id", "acme/tar", "--cache-dir",
              str(cache), env=env)
    assert r.returncode == 2 and "directory" in r.stderr, r.stderr


def test_sync_fills_the_cache_from_registry_entries_and_follows_an_index(registries, tmp_path):
    import yaml

    from agent.oci import mediatypes as mt

    registry = registries.anonymous
    hub_files = {"config.json": b'{"model_type": "gpt2"}', "w.safetensors": os.urandom(70_000)}
    plain_files = {"a.bin": os.urandom(5_000)}
    reg = client(registry)
    push_artifact(reg, "sync-oci/hub", "v1", hub_files, hub=hub_annotations("org/synced", revision="v1"))
    plain = push_artifact(reg, "sync-oci/plain", "m", plain_files)
    size = len(reg.get_manifest("sync-oci/plain", plain).data)  # an index naming the model artifact
    index = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
        {"mediaType": mt.OCI_MANIFEST, "digest": plain, "size": size, "artifactType": mt.MODEL_ARTIFACT_TYPE}]})
    reg.put_manifest("sync-oci/plain", "index", index.encode(), mt.OCI_INDEX)
    models = [{"source": f"oci://{registry.host}/sync-oci/hub:v1"},
              {"source": f"oci://{registry.host}/sync-oci/plain:index", "repo_id": "acme/plain"}]
    cfg = tmp_path / "models.yaml"
    cfg.write_text(yaml.safe_dump({"models": models}))
    cache = tmp_path / "cache"
    r = agent("sync", "--config", str(cfg), "--once", "--cache-dir", str(cache), env=env_for(registry))
    assert r.returncode == 0, r.stderr
    assert_files(snapshot(cache, "org/synced", COMMIT), hub_files)
    assert (cache / "models--org--synced" / "refs" / "v1").read_text() == COMMIT
    assert_files(snapshot(cache, "acme/plain", plain.split(":")[1][:40]), plain_files)

    two = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
        {"mediaType": mt.OCI_MANIFEST, "digest": plain, "size": size, "platform": {"os": "linux", "architecture": a}}
        for a in ("amd64", "arm64")]})
    reg.put_manifest("sync-oci/plain", "multi", two.encode(), mt.OCI_INDEX)
    r = agent("pull", f"oci://{registry.host}/sync-oci/plain:multi", "--repo-id", "a/b", "--cache-dir", str(cache),
              env=env_for(registry))
    assert r.returncode == 2 and "multi-platform" in r.stderr, r.stderr


class RangeIgnoringRegistry(BaseHTTPRequestHandler):
    """The minimum of the registry API, answering every blob GET with 200 and the whole blob, as a
    proxy or an old registry that ignores Range does; counts the blob GETs."""

    protocol_version = "HTTP/1.1"
    blobs: ClassVar[dict[str, bytes]] = {}
    manifest = b""
    blob_gets = 0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        cls = type(self)
        if "/manifests/" in self.path:
            body, headers = cls.manifest, {"Content-Type": "application/vnd.oci.image.manifest.v1+json",
                                           "Docker-Content-Digest": sha256_digest(cls.manifest)}
        elif "/blobs/" in self.path:
            cls.blob_gets += 1
            body, headers = cls.blobs.get(self.path.rsplit("/", 1)[1], b""), {}
        else:
            body, headers = b"{}", {}
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_registry_that_ignores_range_sends_each_blob_once(tmp_path):
    from agent.oci import mediatypes as mt

    data = os.urandom(4 * MiB + 3)
    RangeIgnoringRegistry.blobs = {sha256_digest(data): data}
    RangeIgnoringRegistry.manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": mt.MODEL_ARTIFACT_TYPE,
        "config": {"mediaType": mt.MODEL_CONFIG, "digest": sha256_digest(b"{}"), "size": 2},
        "layers": [{"mediaType": mt.WEIGHT_RAW, "digest": sha256_digest(data), "size": len(data),
                    "annotations": {mt.FILEPATH: "w.safetensors"}}]}).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), RangeIgnoringRegistry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = agent("pull", f"oci://127.0.0.1:{server.server_port}/ignore/model:v1", "--plain-http", "--repo-id", "a/b",
                  "--local-dir", str(tmp_path / "out"), "--chunk-size", "1Mi", "--workers", "4",
                  env=env_for(None))
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "w.safetensors").read_bytes() == data
    assert RangeIgnoringRegistry.blob_gets == 1


# -- auth, redirects, errors ------------------------------------------------------------------------------

def test_token_registry_redirect_reaches_storage_without_authorization(registries, tmp_path):
    registry = registries.token
    layout = tmp_path / "layout"
    model_layout(layout, NESTED)
    skopeo_push(layout, registry, "pull-token/model")
    env, cache = env_for(registry), tmp_path / "cache"
    source = f"oci://{registry.host}/pull-token/model:v1"
    before = len(registries.blob_store.requests)
    r = agent("pull", source, "--registry-auth-file", auth_file(tmp_path, registry), "--repo-id", "acme/t",
              "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stderr
    reached = registries.blob_store.requests[before:]
    assert reached and not any(q["authorization"] for q in reached), reached
    assert_files(next((cache / "models--acme--t" / "snapshots").iterdir()), NESTED)

    r = agent("pull", source, "--registry-auth-file", auth_file(tmp_path, registry, "wrong-password-42"),
              "--repo-id", "acme/t", "--cache-dir", str(tmp_path / "c2"), env=env)
    assert r.returncode == 3, r.stderr
    assert "wrong-password-42" not in r.stderr


def test_missing_tag_malformed_reference_and_a_container_image(registries, tmp_path):
    from agent.oci import mediatypes as mt

    registry = registries.anonymous
    env, cache = env_for(registry), tmp_path / "cache"
    push_artifact(client(registry), "pull-errors/model", "v1", {"a.bin": b"x" * 100})
    r = agent("pull", f"oci://{registry.host}/pull-errors/model:nope", "--repo-id", "a/b", "--cache-dir", str(cache), env=env)
    assert r.returncode == 4 and "pull-errors/model" in r.stderr, r.stderr
    r = agent("pull", f"oci://{registry.host}/no-such/repo:v1", "--repo-id", "a/b", "--cache-dir", str(cache), env=env)
    assert r.returncode == 4, r.stderr
    r = agent("pull", f"oci://{registry.host}/Upper/Case:v1", "--repo-id", "a/b", "--cache-dir", str(cache), env=env)
    assert r.returncode == 2 and "invalid registry reference" in r.stderr, r.stderr

    push_artifact(client(registry), "pull-errors/image", "v1", {"layer.tar.gz": os.urandom(1000)},
                  config_type=mt.OCI_IMAGE_CONFIG, layer_type=mt.OCI_LAYER_TAR_GZIP)
    r = agent("pull", f"oci://{registry.host}/pull-errors/image:v1", "--repo-id", "a/b", "--cache-dir", str(cache), env=env)
    assert r.returncode == 2 and "container image" in r.stderr, r.stderr


def test_a_blob_corrupted_in_the_registry_fails_integrity_without_a_marker(registries, tmp_path):
    registry = registries.anonymous
    files = {"model.safetensors": os.urandom(300_000), "config.json": b"{}"}
    push_artifact(client(registry), "pull-corrupt/model", "v1", files)
    blob = registry.blob_file(sha256_digest(files["model.safetensors"]))
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF  # same size: only a hash can tell
    blob.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    r = agent("pull", f"oci://{registry.host}/pull-corrupt/model:v1", "--repo-id", "acme/c", "--cache-dir", str(cache),
              env=env_for(registry))
    assert r.returncode == 5, r.stderr
    assert not list(cache.rglob("*.ready")) and not (cache / "models--acme--c" / "snapshots").exists()


# -- resume -----------------------------------------------------------------------------------------------

def test_a_killed_pull_resumes_with_the_rest_only(registries, tmp_path):
    registry = registries.plain
    files = {"model.safetensors": os.urandom(40 * MiB), "config.json": b'{"model_type": "x"}'}
    push_artifact(client(registry, plain=True), "pull-resume/model", "v1", files)
    size = len(files["model.safetensors"])
    proxy = FaultProxy(registry.port)
    try:
        proxy.add("slow", rate=4 * MiB, count=1)
        env = env_for(registry)
        args = ("pull", f"oci://127.0.0.1:{proxy.port}/pull-resume/model:v1", "--plain-http", "--repo-id", "acme/r",
                "--cache-dir", str(tmp_path / "cache"), "--chunk-size", "2Mi", "--workers", "2", "--lease-ttl", "2s")
        proc = popen(*args, env=env)
        deadline = time.monotonic() + 60
        while proxy.body_bytes < size * 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = proxy.body_bytes
        assert size * 0.3 < first < size, first
        proxy.clear()
        r = agent(*args, env=env)
        assert r.returncode == 0, r.stderr
        assert first + proxy.body_bytes <= size * 1.15, (first, proxy.body_bytes, size)
    finally:
        proxy.close()
    commit = summary(r.stderr)["commit"]
    assert_files(snapshot(tmp_path / "cache", "acme/r", commit), files)
