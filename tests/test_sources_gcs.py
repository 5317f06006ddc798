"""gs:// end to end: the real CLI against fake-gcs-server on 127.0.0.1 (STORAGE_EMULATOR_HOST)."""

from __future__ import annotations

import base64
import itertools
import os
import signal
import time

import pytest

from objstore.helpers import (FAST, agent, assert_hf_snapshot, assert_local_dir, content_id, env_for, hf_loads_offline, popen,
                              send_json, summary)
from objstore.proxy import FaultProxy

pytestmark = pytest.mark.timeout(120)
MiB = 2**20
_names = itertools.count()


def make_bucket(gcs, files: dict[str, bytes], prefix: str = "m/") -> str:
    name = f"gmodels-{os.getpid()}-{next(_names)}"
    bucket = gcs.client().create_bucket(name)
    for rel, data in files.items():
        bucket.blob(prefix + rel).upload_from_string(data)
    return name


def listed_id(gcs, bucket: str, prefix: str = "m/") -> str:
    blobs = gcs.client().list_blobs(bucket, prefix=prefix)
    return content_id([(b.name[len(prefix):], b.size, str(b.generation)) for b in blobs if not b.name.endswith("/")])


def test_hf_layout_local_dir_and_noop(gcs, tmp_path):
    files = {"config.json": b'{"a": 1}', "model.safetensors": os.urandom(20 * MiB), "tok/vocab.txt": b"a\nb\n"}
    bucket = make_bucket(gcs, files)
    cache, env = tmp_path / "cache", env_for(gcs.env())
    r = agent("pull", f"gs://{bucket}/m/", "--repo-id", "acme/g", "--cache-dir", str(cache), "--chunk-size", "8Mi", env=env)
    assert r.returncode == 0, r.stderr
    commit = listed_id(gcs, bucket)
    assert summary(r.stderr)["commit"] == commit
    root = assert_hf_snapshot(cache, "acme/g", commit, files)
    assert hf_loads_offline(cache, "acme/g").endswith(commit)
    lock = __import__("json").loads((root / ".model-agent" / f"{commit}.lock.json").read_text())
    gens = {b.name[2:]: str(b.generation) for b in gcs.client().list_blobs(bucket, prefix="m/")}
    assert {f["path"]: f["generation"] for f in lock["files"]} == gens
    assert all(f.get("crc32c") for f in lock["files"])

    r = agent("pull", f"gs://{bucket}/m/", "--repo-id", "acme/g", "--cache-dir", str(cache), env=env)
    assert r.returncode == 0 and summary(r.stderr)["already_ready"] is True, r.stderr

    dest = tmp_path / "flat"
    r = agent("pull", f"gs://{bucket}/m", "--local-dir", str(dest), "--exclude", "*.safetensors", env=env)
    assert r.returncode == 0, r.stderr
    assert_local_dir(dest, {k: v for k, v in files.items() if not k.endswith(".safetensors")}, commit)


def test_missing_bucket_and_empty_prefix(gcs, tmp_path):
    bucket = make_bucket(gcs, {"a.txt": b"a"})
    env = env_for(gcs.env())
    r = agent("pull", "gs://no-such-gcs-bucket/m/", "--local-dir", str(tmp_path / "a"), env=env)
    assert r.returncode == 4 and "not found" in r.stderr, r.stderr
    r = agent("pull", f"gs://{bucket}/empty/", "--local-dir", str(tmp_path / "b"), env=env)
    assert r.returncode == 4 and "no objects" in r.stderr, r.stderr


def test_crc32c_mismatch_is_exit_5(gcs, tmp_path):
    """A corrupting proxy in front of the emulator: the CRC32C (and MD5) the listing gave disagree."""
    bucket = make_bucket(gcs, {"model.safetensors": os.urandom(3 * MiB)})
    proxy = FaultProxy(gcs.port)
    try:
        proxy.add("corrupt", after=4096, count=10_000)
        dest = tmp_path / "d"
        r = agent("pull", f"gs://{bucket}/m/", "--local-dir", str(dest), env=env_for(gcs.env(STORAGE_EMULATOR_HOST=proxy.url), **FAST))
        assert r.returncode == 5, r.stderr
        assert "crc32c" in r.stderr or "md5" in r.stderr
        assert not (dest / ".model-agent" / "ready").exists()
    finally:
        proxy.close()


def test_sigkill_resume_and_object_rewritten_mid_pull(gcs, tmp_path):
    files = {"model.safetensors": os.urandom(24 * MiB)}
    bucket = make_bucket(gcs, files)
    proxy = FaultProxy(gcs.port)
    try:
        proxy.add("slow", rate=4 * MiB, count=1)
        env = env_for(gcs.env(STORAGE_EMULATOR_HOST=proxy.url), **FAST)
        dest = tmp_path / "d"
        args = ("pull", f"gs://{bucket}/m/", "--local-dir", str(dest), "--chunk-size", "4Mi", "--workers", "2", "--lease-ttl", "2s")
        proc = popen(*args, env=env)
        deadline = time.monotonic() + 30
        while proxy.body_bytes < 10 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = proxy.body_bytes
        assert list((dest / ".model-agent" / "partial").glob("*.incomplete"))

        # Resume, but rewrite the object while the resumed pull runs: it must not finish on mixed bytes.
        proc = popen(*args, env=env)
        time.sleep(1.0)
        new = os.urandom(24 * MiB)
        gcs.client().bucket(bucket).blob("m/model.safetensors").upload_from_string(new)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 7, err
        assert "changed or removed since the listing" in err
        assert not (dest / ".model-agent" / "ready").exists()

        proxy.clear()
        r = agent(*args, env=env)
        assert r.returncode == 0, r.stderr
        assert_local_dir(dest, {"model.safetensors": new}, listed_id(gcs, bucket))
        assert first > 0
    finally:
        proxy.close()


def test_crc32c_is_what_gcs_reports(gcs):
    from agent import checksums

    data = os.urandom(1000)
    bucket = make_bucket(gcs, {"x": data})
    blob = next(iter(gcs.client().list_blobs(bucket)))
    h = checksums._hasher("crc32c", len(data))
    h.update(data)
    assert h.hexdigest() == base64.b64decode(blob.crc32c).hex()


def test_credentials_google_refuses_are_exit_3_and_never_printed(tmp_path):
    """A service-account key that Google's token endpoint rejects (revoked, wrong project): the
    credential chain (google-auth) fails before any storage request, and that is exit 3. The token
    endpoint here is a local server answering as oauth2.googleapis.com does for a revoked key."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    asked = []

    class TokenEndpoint(BaseHTTPRequestHandler):
        def do_POST(self):
            asked.append(self.rfile.read(int(self.headers["Content-Length"])))
            send_json(self, 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    sa = tmp_path / "sa.json"
    sa.write_text(json.dumps({
        "type": "service_account", "project_id": "test", "private_key_id": "0123456789abcdef",
        "private_key": key, "client_email": "puller@test.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": f"http://127.0.0.1:{server.server_port}/token",
    }))
    try:
        env = env_for({"GOOGLE_APPLICATION_CREDENTIALS": str(sa), "GOOGLE_CLOUD_PROJECT": "test"}, **FAST)
        env.pop("STORAGE_EMULATOR_HOST", None)  # the real client path, with real credentials
        r = agent("pull", "gs://private-models/llama/", "--local-dir", str(tmp_path / "d"), env=env)
    finally:
        server.shutdown()
    assert asked, "google-auth never asked the token endpoint"
    assert r.returncode == 3, r.stderr
    assert "access refused" in r.stderr
    body = key.split("\n")[1]
    assert body not in r.stderr and body not in r.stdout and "BEGIN PRIVATE KEY" not in r.stderr
