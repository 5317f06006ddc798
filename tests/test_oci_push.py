"""`model-agent push SOURCE oci://REGISTRY/REPOSITORY:TAG` against Debian's docker-registry (distribution
2.8, tests/oci/servers.py), with skopeo as the independent reader of what we wrote.

A registry is not a bucket: blobs go up by digest (each skipped when the repository holds it, or mounted
from another repository of the registry), then ONE manifest PUT flips the tag. A push killed mid-blob
leaves the tag where it was, and its re-run resumes the blob from the offset the registry reports.
Kills land mid-upload because strace delays each open of the big file's blob (one per PATCH chunk).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, agent_cmd, clean_env, load_offline, log_events, run_agent

from tests.oci.artifacts import model_layout, skopeo_push, skopeo_raw
from tests.oci.servers import PASSWORD, USER, sha256_digest

pytestmark = pytest.mark.skipif(not (shutil.which("docker-registry") and shutil.which("skopeo")),
                                reason="docker-registry and skopeo: scripts/install-test-tools.sh")
STRACE = shutil.which("strace")
REPO = "org/pushed"
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"


def docker_config(tmp_path: Path, registry, password: str = PASSWORD) -> Path:
    """A docker config file (what a `dockerconfigjson` Secret mounts): the only place credentials come from."""
    folder = tmp_path / f"docker-{hashlib.sha1(password.encode()).hexdigest()[:8]}"
    folder.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{USER}:{password}".encode()).decode()
    (folder / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
    return folder


def env_for(hub, registry, config: Path | None) -> dict[str, str]:
    return clean_env(HF_ENDPOINT=hub.url, SSL_CERT_FILE=str(registry.pki.ca), REGISTRY_AUTH_FILE="",
                     DOCKER_CONFIG=str(config) if config else "/nonexistent")


def push(hub, registry, staging: Path, dest: str, config: Path | None, *more: str,
         repo: str = REPO) -> subprocess.CompletedProcess:
    return run_agent("push", repo, dest, "--cache-dir", str(staging), "--log-format", "json", *more,
                     env=env_for(hub, registry, config))


def events(r: subprocess.CompletedProcess, name: str) -> list[dict]:
    return log_events(r.stderr, name)


def uploaded_bytes(prom: Path) -> float:
    return sum(float(line.split()[-1]) for line in prom.read_text().splitlines()
               if line.startswith("model_agent_bytes_uploaded_total{"))


def client_of(registry):
    from agent.oci.auth import Credential
    from agent.oci.client import RegistryClient

    credential = Credential(username=USER, password=PASSWORD) if registry.mode != "anonymous" else None
    return RegistryClient(registry.host, credential=credential, ca_bundle=str(registry.pki.ca))


def test_push_writes_a_modelpack_artifact_that_skopeo_reads_by_the_same_digest(hub, demo_files, registries, tmp_path):
    commit = hub.add_repo(REPO, demo_files)
    registry = registries.basic
    config = docker_config(tmp_path, registry)
    dest = f"oci://{registry.host}/push/demo:v1"
    prom = tmp_path / "push.prom"
    r = push(hub, registry, tmp_path / "staging", dest, config, "--metrics-textfile", str(prom))
    assert r.returncode == 0, r.stderr[-3000:]
    assert PASSWORD not in r.stderr and PASSWORD not in r.stdout

    raw = skopeo_raw(registry, "push/demo:v1")  # an independent client reads what we wrote
    manifest = json.loads(raw)
    assert events(r, "manifest_pushed")[0]["digest"] == sha256_digest(raw)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["artifactType"] == MODEL_ARTIFACT and manifest["config"]["mediaType"] == MODEL_CONFIG
    assert manifest["annotations"]["model-cache-agent.hf.repo_id"] == REPO
    assert manifest["annotations"]["model-cache-agent.hf.commit"] == commit
    assert manifest["annotations"]["model-cache-agent.hf.revision"] == "main"
    layers = {layer["annotations"]["org.opencontainers.image.title"]: layer for layer in manifest["layers"]}
    assert sorted(layers) == sorted(demo_files)
    for path, layer in layers.items():
        data = demo_files[path].read_bytes()
        assert layer["digest"] == sha256_digest(data) and layer["size"] == len(data)  # a raw layer: the file
        assert layer["annotations"]["org.cncf.model.filepath"] == path
        assert layer["annotations"]["org.cnai.model.filepath"] == path
    kinds = {path: layer["mediaType"] for path, layer in layers.items()}
    assert kinds["model.safetensors"] == "application/vnd.cncf.model.weight.v1.raw"
    assert kinds["tokenizer.json"] == kinds["config.json"] == "application/vnd.cncf.model.weight.config.v1.raw"
    assert kinds["README.md"] == "application/vnd.cncf.model.doc.v1.raw"

    client = client_of(registry)
    model_config = json.loads(b"".join(bytes(p) for p in client.read_blob("push/demo", manifest["config"]["digest"])))
    assert model_config["modelfs"] == {"type": "layers", "diffIds": [layer["digest"] for layer in manifest["layers"]]}
    assert model_config["descriptor"]["name"] == REPO
    assert uploaded_bytes(prom) == sum(p.stat().st_size for p in demo_files.values())

    again = push(hub, registry, tmp_path / "staging", dest, config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert events(again, "published")[0]["already_published"] is True
    assert skopeo_raw(registry, "push/demo:v1") == raw  # the same snapshot, the same manifest digest


def test_blobs_already_there_are_skipped_and_another_repository_mounts_them(hub, demo_files, registries, tmp_path):
    hub.add_repo(REPO, demo_files)
    registry = registries.token  # the bearer flow: the mount needs pull on the source repository too
    config = docker_config(tmp_path, registry)
    staging = tmp_path / "staging"
    assert push(hub, registry, staging, f"oci://{registry.host}/mount/first:v1", config).returncode == 0

    prom = tmp_path / "second.prom"
    r = push(hub, registry, staging, f"oci://{registry.host}/mount/second:v2", config,
             "--metrics-textfile", str(prom))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = events(r, "published")[0]
    assert summary["skipped_files"] == len(demo_files) and summary["uploaded_bytes"] == 0
    assert uploaded_bytes(prom) == 0  # not a byte of a file sent: linked by the registry
    raw = skopeo_raw(registry, "mount/second:v2")
    client = client_of(registry)
    for layer in json.loads(raw)["layers"]:
        assert client.stat_blob("mount/second", layer["digest"]) == layer["size"]
    assert PASSWORD not in r.stderr


def _registry_upload_bytes(registry, repository: str) -> int:
    uploads = registry.storage / "docker/registry/v2/repositories" / repository / "_uploads"
    return max((p.stat().st_size for p in uploads.glob("*/data")), default=0) if uploads.exists() else 0


def _recorded_offset(staging: Path) -> int:
    """The offset of the upload the push recorded in the staging cache (what a re-run resumes from)."""
    offsets = [0]
    for record in (staging / "models--org--pushed" / ".model-agent" / "oci-uploads").glob("*.json"):
        try:
            offsets.append(int(json.loads(record.read_text())["offset"]))
        except (OSError, ValueError, KeyError):
            continue
    return max(offsets)


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_a_killed_push_leaves_the_tag_on_the_old_manifest_and_resumes_from_the_registrys_offset(
        hub, demo_files, big_files, registries, tmp_path):
    hub.add_repo(REPO, demo_files)
    registry = registries.basic
    config = docker_config(tmp_path, registry)
    staging, dest = tmp_path / "staging", f"oci://{registry.host}/resume/model:latest"
    assert push(hub, registry, staging, dest, config).returncode == 0
    client = client_of(registry)
    old = client.head_manifest("resume/model", "latest")
    new_commit = hub.commit(REPO, big_files)
    assert run_agent("pull", REPO, "--cache-dir", str(staging), env=env_for(hub, registry, config)).returncode == 0
    big = max(big_files, key=lambda p: big_files[p].stat().st_size)
    size = big_files[big].stat().st_size
    blob = (staging / "models--org--pushed" / "snapshots" / new_commit / big).resolve()

    # Each PATCH of the big blob opens it: a second each, so the push is killed between chunks.
    cmd = [STRACE, "-f", "-qq", "-o", "/dev/null", "-P", str(blob), "-e", "trace=openat",
           "-e", "inject=openat:delay_enter=1000000",
           *agent_cmd("push", REPO, dest, "--cache-dir", str(staging), "--log-format", "json", "--workers", "1",
                      "--chunk-size", "8Mi")]
    proc = subprocess.Popen(cmd, env=env_for(hub, registry, config), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while _recorded_offset(staging) < 16 * 2**20:  # two chunks acknowledged and recorded
        if proc.poll() is not None:
            pytest.fail(f"the push ended before it could be killed: {proc.stderr.read().decode()[-1500:]}")
        assert time.monotonic() < deadline, "the push never started uploading the big blob"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    held = _registry_upload_bytes(registry, "resume/model")
    assert 16 * 2**20 <= held < size

    assert client.head_manifest("resume/model", "latest") == old  # the tag never named a half-pushed model
    assert client.stat_blob("resume/model", "sha256:" + hashlib.sha256(big_files[big].read_bytes()).hexdigest()) is None

    prom = tmp_path / "rerun.prom"
    r = push(hub, registry, staging, dest, config, "--chunk-size", "8Mi", "--metrics-textfile", str(prom))
    assert r.returncode == 0, r.stderr[-3000:]
    total = sum(p.stat().st_size for p in big_files.values())
    # Only what the registry did not hold went up again: at most the chunk in flight when it was killed.
    assert uploaded_bytes(prom) <= total - held + 8 * 2**20, (uploaded_bytes(prom), total, held)
    raw = skopeo_raw(registry, "resume/model:latest")
    assert json.loads(raw)["annotations"]["model-cache-agent.hf.commit"] == new_commit
    assert client.head_manifest("resume/model", "latest") == sha256_digest(raw) != old
    uploads = staging / "models--org--pushed" / ".model-agent" / "oci-uploads"
    assert not list(uploads.glob("*")), "a finished push leaves no upload record behind"


def test_a_tag_holding_another_model_is_refused_unless_overwrite(hub, demo_files, registries, tmp_path):
    hub.add_repo("org/first", demo_files)
    hub.add_repo("org/second", demo_files)
    registry = registries.anonymous
    staging, dest = tmp_path / "staging", f"oci://{registry.host}/taken/model:v1"
    assert push(hub, registry, staging, dest, None, repo="org/first").returncode == 0
    first = skopeo_raw(registry, "taken/model:v1")

    r = push(hub, registry, staging, dest, None, repo="org/second")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "org/first" in events(r, "invalid_input")[0]["msg"] and "--overwrite" in r.stderr
    assert skopeo_raw(registry, "taken/model:v1") == first
    r = push(hub, registry, staging, dest, None, "--overwrite", repo="org/second")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(skopeo_raw(registry, "taken/model:v1"))["annotations"][
        "model-cache-agent.hf.repo_id"] == "org/second"

    # An artifact another client pushed, with no Hub identity: ours only to replace with --overwrite.
    foreign = tmp_path / "foreign"
    model_layout(foreign, {"weights.bin": b"not ours"})
    skopeo_push(foreign, registry, "taken/foreign")
    r = push(hub, registry, staging, f"oci://{registry.host}/taken/foreign:v1", None, repo="org/first")
    assert r.returncode == 2 and "--overwrite" in r.stderr, r.stderr[-3000:]


def test_wrong_credentials_are_exit_3_and_no_secret_is_printed(hub, demo_files, registries, tmp_path):
    hub.add_repo(REPO, demo_files)
    staging = tmp_path / "staging"
    for registry in (registries.basic, registries.token):
        wrong = docker_config(tmp_path, registry, password="wrong-registry-password-42")
        r = push(hub, registry, staging, f"oci://{registry.host}/denied/model:v1", wrong)
        assert r.returncode == 3, r.stderr[-3000:]
        assert "wrong-registry-password-42" not in r.stderr + r.stdout
        assert base64.b64encode(f"{USER}:wrong-registry-password-42".encode()).decode() not in r.stderr
    r = push(hub, registries.basic, staging, f"oci://{registries.basic.host}/denied/model:v1", None)
    assert r.returncode == 3, r.stderr[-3000:]  # no credential where the registry demands one


def test_a_digest_is_not_a_push_destination(hub, demo_files, registries, tmp_path):
    hub.add_repo(REPO, demo_files)
    r = push(hub, registries.anonymous, tmp_path / "staging", f"oci://{registries.anonymous.host}/m@sha256:{'a' * 64}",
             None)
    assert r.returncode == 2 and "tag" in events(r, "invalid_input")[0]["msg"], r.stderr[-3000:]


def test_a_pushed_artifact_pulls_back_under_the_hub_identity_and_loads_offline(hub, demo_files, registries, tmp_path):
    commit = hub.add_repo(REPO, demo_files)
    registry = registries.token
    config = docker_config(tmp_path, registry)
    dest = f"oci://{registry.host}/roundtrip/model:v1"
    assert push(hub, registry, tmp_path / "staging", dest, config).returncode == 0

    cache = tmp_path / "node-cache"  # a node that can reach only the registry
    r = run_agent("pull", dest, "--cache-dir", str(cache), "--log-format", "json",
                  env=clean_env(SSL_CERT_FILE=str(registry.pki.ca), DOCKER_CONFIG=str(config), REGISTRY_AUTH_FILE="",
                                HF_ENDPOINT="http://127.0.0.1:9"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_offline(cache, REPO, commit)["model_type"] == "llama"
    staged = sorted(p.name for p in (tmp_path / "staging" / "models--org--pushed" / "blobs").iterdir())
    assert sorted(p.name for p in (cache / "models--org--pushed" / "blobs").iterdir()) == staged  # the Hub's names
