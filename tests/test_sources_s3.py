"""s3:// end to end: the real CLI against SeaweedFS (SigV4) and moto's server on 127.0.0.1.

Faults are injected by a real TCP proxy in front of the server (tests/objstore/proxy.py); bucket
changes are made at the server with boto3 while a pull runs.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time

import pytest

from objstore.helpers import (FAST, agent, assert_hf_snapshot, assert_local_dir, content_id, env_for, events,
                              hf_loads_offline, popen, summary)
from objstore.proxy import FaultProxy
from test_lease_fencing import crash_after_last_range

pytestmark = pytest.mark.timeout(120)
MiB = 2**20
_names = itertools.count()


@pytest.fixture
def proxy(weed):
    p = FaultProxy(weed.port)
    yield p
    p.close()


def model_files(big: int = 24 * MiB) -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": os.urandom(3000),
        "model-00001-of-00002.safetensors": os.urandom(big),
        "model-00002-of-00002.safetensors": os.urandom(big // 3),
        "sub/dir/notes.txt": b"hello",
    }


def make_bucket(srv, files: dict[str, bytes], prefix: str = "llama/", *, multipart: bool = False) -> str:
    bucket = f"models-{os.getpid()}-{next(_names)}"
    c = srv.client()
    c.create_bucket(Bucket=bucket)
    for rel, data in files.items():
        put(c, bucket, prefix + rel, data, multipart=multipart)
    c.put_object(Bucket=bucket, Key=prefix + "sub/", Body=b"")  # a "directory marker"
    return bucket


def put(c, bucket: str, key: str, data: bytes, multipart: bool = False) -> None:
    if multipart and len(data) > 8 * MiB:
        import io

        from boto3.s3.transfer import TransferConfig

        c.upload_fileobj(io.BytesIO(data), bucket, key, Config=TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB))
    else:
        c.put_object(Bucket=bucket, Key=key, Body=data)


def listed_id(srv, bucket: str, prefix: str = "llama/") -> str:
    objs = srv.client().list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    return content_id([(o["Key"][len(prefix):], o["Size"], o["ETag"].strip('"')) for o in objs if not o["Key"].endswith("/")])


def test_hf_layout_by_name_then_noop_repull(weed, proxy, tmp_path):
    files = model_files()
    bucket = make_bucket(weed, files, multipart=True)
    cache = tmp_path / "cache"
    env = env_for(weed.env(AWS_ENDPOINT_URL=proxy.url))
    r = agent("pull", f"s3://{bucket}/llama/", "--repo-id", "acme/llama", "--cache-dir", str(cache), "--chunk-size", "8Mi", env=env)
    assert r.returncode == 0, r.stderr
    commit = listed_id(weed, bucket)
    assert summary(r.stderr)["commit"] == commit
    root = assert_hf_snapshot(cache, "acme/llama", commit, files)
    assert hf_loads_offline(cache, "acme/llama").endswith(commit)
    lock = __import__("json").loads((root / ".model-agent" / f"{commit}.lock.json").read_text())
    assert lock["source"] == f"s3://{bucket}/llama/" and lock["revision"] == "main"
    etags = {o["Key"][6:]: o["ETag"].strip('"') for o in weed.client().list_objects_v2(Bucket=bucket, Prefix="llama/")["Contents"]}
    assert {f["path"]: f["etag"] for f in lock["files"]} == {k: v for k, v in etags.items() if k in files}
    fetched = proxy.body_bytes
    assert fetched >= len(files["model-00001-of-00002.safetensors"])

    # The same bucket again: a listing, no byte of any object.
    proxy.clear()
    r = agent("pull", f"s3://{bucket}/llama/", "--repo-id", "acme/llama", "--cache-dir", str(cache), env=env)
    assert r.returncode == 0, r.stderr
    assert summary(r.stderr)["already_ready"] is True and proxy.body_bytes == 0

    # --revision names the ref only.
    r = agent("pull", f"s3://{bucket}/llama/", "--repo-id", "acme/llama", "--cache-dir", str(cache), "--revision", "prod", env=env)
    assert r.returncode == 0, r.stderr
    assert (root / "refs" / "prod").read_text() == commit and proxy.body_bytes == 0


def test_local_dir_with_globs_and_a_bucket_without_prefix(weed, tmp_path):
    files = model_files(big=2 * MiB)
    bucket = make_bucket(weed, files, prefix="")
    dest = tmp_path / "flat"
    r = agent("pull", f"s3://{bucket}", "--local-dir", str(dest), "--include", "*.json", "--include", "sub/*",
              "--exclude", "tokenizer*", "--endpoint-url", weed.url, env=env_for({**weed.env(), "AWS_ENDPOINT_URL": ""}))
    assert r.returncode == 0, r.stderr
    want = {k: v for k, v in files.items() if k in ("config.json", "sub/dir/notes.txt")}
    assert_local_dir(dest, want, summary(r.stderr)["commit"])


@pytest.mark.parametrize("case, code, words", [
    ("no_destination", 2, "--local-dir"),
    ("empty_prefix", 4, "no objects"),
    ("missing_bucket", 4, "does not exist"),
    ("wrong_secret", 3, "access refused"),
    ("bad_uri", 2, "invalid source"),
    ("sdk_missing", 2, "model-agent[s3]"),
])
def test_errors_have_the_contract_exit_codes(weed, tmp_path, case, code, words):
    bucket = make_bucket(weed, {"a.bin": b"x" * 10})
    uri, env, dest = f"s3://{bucket}/llama/", env_for(weed.env(), **FAST), ["--local-dir", str(tmp_path / "d")]
    if case == "no_destination":
        dest = ["--cache-dir", str(tmp_path / "c")]
    elif case == "empty_prefix":
        uri = f"s3://{bucket}/nothing-here/"
    elif case == "missing_bucket":
        uri = "s3://no-such-bucket-here/x/"
    elif case == "wrong_secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "bad_uri":
        uri = "s3://a/"
    elif case == "sdk_missing":
        shim = tmp_path / "shim"
        shim.mkdir()
        (shim / "botocore").mkdir()  # the agent imports boto3's core only
        (shim / "botocore" / "__init__.py").write_text("raise ImportError('botocore is not installed')\n")
        env["PYTHONPATH"] = str(shim)
    r = agent("pull", uri, *dest, env=env)
    assert r.returncode == code, r.stderr
    assert words in r.stderr
    assert "not-the-secret" not in r.stderr and "secret" not in r.stderr.replace("AWS_SECRET", "")


def test_sigkill_then_resume_fetches_only_the_rest(weed, proxy, tmp_path):
    files = {"model.safetensors": os.urandom(40 * MiB), "config.json": b"{}"}
    bucket = make_bucket(weed, files, multipart=True)
    size = len(files["model.safetensors"])
    proxy.add("slow", rate=5 * MiB, count=1)
    env = env_for(weed.env(AWS_ENDPOINT_URL=proxy.url))
    dest = tmp_path / "d"
    args = ("pull", f"s3://{bucket}/llama/", "--local-dir", str(dest), "--chunk-size", "8Mi", "--workers", "2", "--lease-ttl", "2s")
    proc = popen(*args, env=env)
    deadline = time.monotonic() + 60
    while proxy.body_bytes < size * 0.4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = proxy.body_bytes
    assert size * 0.3 < first < size, first
    assert list((dest / ".model-agent" / "partial").glob("*.incomplete")), "the killed pull left its partial file"

    proxy.clear()
    r = agent(*args, env=env)
    assert r.returncode == 0, r.stderr
    assert_local_dir(dest, files, summary(r.stderr)["commit"])
    # Resumed: about what was missing (socket buffers and the sidecar's 0.5 s lag are lost).
    # Starting over would cost 1.4x or more: the kill came after 40% had been sent.
    assert first + proxy.body_bytes < size * 1.3, (proxy.body_bytes, first, size)


def test_bucket_rewritten_mid_pull_fails_retryably_then_pulls_the_new_state(weed, proxy, tmp_path):
    files = {"a.safetensors": os.urandom(24 * MiB), "b.safetensors": os.urandom(24 * MiB)}
    bucket = make_bucket(weed, files)
    proxy.add("slow", rate=4 * MiB, count=1)
    env = env_for(weed.env(AWS_ENDPOINT_URL=proxy.url), **FAST)
    cache = tmp_path / "cache"
    args = ("pull", f"s3://{bucket}/llama/", "--repo-id", "acme/m", "--cache-dir", str(cache), "--chunk-size", "4Mi", "--workers", "2")
    proc = popen(*args, env=env)
    deadline = time.monotonic() + 30
    while proxy.body_bytes < 6 * MiB and time.monotonic() < deadline:
        time.sleep(0.05)
    new = {"a.safetensors": os.urandom(24 * MiB), "b.safetensors": os.urandom(24 * MiB)}
    for rel, data in new.items():
        put(weed.client(), bucket, "llama/" + rel, data)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 7, err
    assert "changed or removed since the listing" in err
    root = cache / "models--acme--m"
    assert not list((root / ".model-agent").glob("*.ready")) and not (root / "refs" / "main").exists()

    assert list(root.rglob("*.incomplete")), "the failed pull should have left partial files"

    proxy.clear()
    r = agent(*args, env=env)
    assert r.returncode == 0, r.stderr
    # The old version's partials can never be resumed into (their content key is the old ETag):
    # the successful pull removes them, so a bucket that changes often does not fill the volume.
    assert_hf_snapshot(cache, "acme/m", listed_id(weed, bucket), new)
    assert not list(root.rglob("*.incomplete*"))


@pytest.mark.parametrize("fault", [
    {"kind": "reset", "after": MiB, "count": 2},
    {"kind": "stall", "after": MiB, "seconds": 4, "count": 1},
    {"kind": "corrupt", "after": 1000, "count": 1},
])
def test_transient_faults_are_retried(weed, proxy, tmp_path, fault):
    files = {"model.safetensors": os.urandom(12 * MiB), "config.json": b"{}"}
    bucket = make_bucket(weed, files)  # single-part: its ETag is the MD5 of the bytes
    f = dict(fault)
    injected = proxy.add(f.pop("kind"), **f)
    dest = tmp_path / "d"
    r = agent("pull", f"s3://{bucket}/llama/", "--local-dir", str(dest), "--chunk-size", "4Mi", "--stall-timeout", "1s",
              env=env_for(weed.env(AWS_ENDPOINT_URL=proxy.url), **FAST))
    assert r.returncode == 0, r.stderr
    assert injected.count == 0, "the fault never fired"
    assert [e for e in events(r.stderr) if e["event"] == "retry"]
    assert_local_dir(dest, files, summary(r.stderr)["commit"])


def legacy_client(srv):
    """A client that uploads as tools before 2025 did: no additional checksum, only the ETag's MD5."""
    import boto3
    from botocore.config import Config

    from objstore.servers import S3_KEY, S3_SECRET

    return boto3.client("s3", endpoint_url=srv.url, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                        region_name="us-east-1", config=Config(s3={"addressing_style": "path"},
                                                               request_checksum_calculation="when_required"))


@pytest.mark.parametrize("upload, words", [("crc32", "crc32"), ("etag-md5-only", "md5")])
def test_persistent_corruption_is_exit_5_and_nothing_is_ready(weed, proxy, tmp_path, upload, words):
    files = {"model.safetensors": os.urandom(6 * MiB)}
    bucket = f"corrupt-{os.getpid()}-{next(_names)}"
    weed.client().create_bucket(Bucket=bucket)
    c = weed.client() if upload == "crc32" else legacy_client(weed)
    c.put_object(Bucket=bucket, Key="llama/model.safetensors", Body=files["model.safetensors"])
    proxy.add("corrupt", after=100, count=10_000)
    dest = tmp_path / "d"
    r = agent("pull", f"s3://{bucket}/llama/", "--local-dir", str(dest), env=env_for(weed.env(AWS_ENDPOINT_URL=proxy.url), **FAST))
    assert r.returncode == 5, r.stderr
    assert words in r.stderr  # the store's CRC when it has one (cheaper), else the single-part ETag's MD5
    assert not (dest / ".model-agent" / "ready").exists() and not (dest / "model.safetensors").exists()


def test_whole_object_reads_are_checked_against_the_stores_full_object_crc(weed, tmp_path):
    import zlib

    data = os.urandom(3 * MiB + 7)
    bucket = f"crc-{os.getpid()}-{next(_names)}"
    weed.client().create_bucket(Bucket=bucket)
    weed.client().put_object(Bucket=bucket, Key="m/with-crc.bin", Body=data, ChecksumAlgorithm="CRC32")
    legacy_client(weed).put_object(Bucket=bucket, Key="m/without.bin", Body=data)
    dest = tmp_path / "d"
    r = agent("pull", f"s3://{bucket}/m/", "--local-dir", str(dest), env=env_for(weed.env()))
    assert r.returncode == 0, r.stderr
    lock = {f["path"]: f for f in __import__("json").loads((dest / ".model-agent" / "lock.json").read_text())["files"]}
    assert lock["with-crc.bin"]["checksum_crc32"] == f"{zlib.crc32(data):08x}"
    assert "checksum_crc32" not in lock["without.bin"]  # verified by the ETag's MD5 instead
    assert (dest / "with-crc.bin").read_bytes() == data == (dest / "without.bin").read_bytes()


@pytest.mark.parametrize("key", ["llama/../../escape.txt", "llama//etc/passwd", "llama/a\\..\\..\\b.txt"])
def test_keys_that_would_escape_the_destination_are_refused(moto, tmp_path, key):
    bucket = make_bucket(moto, {"config.json": b"{}"})
    moto.client().put_object(Bucket=bucket, Key=key, Body=b"pwned")
    dest = tmp_path / "deep" / "d"
    r = agent("pull", f"s3://{bucket}/llama/", "--local-dir", str(dest), env=env_for(moto.env()))
    assert r.returncode == 2, r.stderr
    assert "escape" in r.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"pwned"]


def test_versioned_bucket_records_and_pins_version_ids(moto, tmp_path):
    files = {"model.safetensors": os.urandom(2 * MiB), "config.json": b"{}"}
    bucket = make_bucket(moto, {})
    c = moto.client()
    c.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for rel, data in files.items():
        c.put_object(Bucket=bucket, Key="llama/" + rel, Body=b"old")
        c.put_object(Bucket=bucket, Key="llama/" + rel, Body=data)
    cache = tmp_path / "c"
    r = agent("pull", f"s3://{bucket}/llama/", "--repo-id", "acme/v", "--cache-dir", str(cache), env=env_for(moto.env()))
    assert r.returncode == 0, r.stderr
    commit = summary(r.stderr)["commit"]
    root = assert_hf_snapshot(cache, "acme/v", commit, files)
    lock = __import__("json").loads((root / ".model-agent" / f"{commit}.lock.json").read_text())
    latest = {v["Key"][6:]: v["VersionId"] for v in c.list_object_versions(Bucket=bucket)["Versions"] if v["IsLatest"] and v["Size"]}
    assert {f["path"]: f["version_id"] for f in lock["files"]} == latest


def test_multipart_objects_are_checked_part_by_part_against_the_composite_checksum(weed, proxy, tmp_path):
    """A ranged GET carries no checksum: one HEAD learns the COMPOSITE CRC32 and the part size, and
    the parts are hashed as they land. A corrupted part is then exit 5, not a snapshot."""
    import base64
    import zlib

    data = os.urandom(20 * MiB + 5)
    bucket = make_bucket(weed, {"model.safetensors": data}, multipart=True)  # 8 MiB parts
    parts = [data[i:i + 8 * MiB] for i in range(0, len(data), 8 * MiB)]
    composite = zlib.crc32(b"".join(zlib.crc32(p).to_bytes(4, "big") for p in parts))
    dest = tmp_path / "d"
    env = env_for(weed.env(AWS_ENDPOINT_URL=proxy.url), **FAST)
    r = agent("pull", f"s3://{bucket}/llama/", "--local-dir", str(dest), "--chunk-size", "6Mi", env=env)
    assert r.returncode == 0, r.stderr
    lock = {f["path"]: f for f in __import__("json").loads((dest / ".model-agent" / "lock.json").read_text())["files"]}
    assert lock["model.safetensors"]["checksum_crc32"] == f"{composite:08x}-3"
    assert (dest / "model.safetensors").read_bytes() == data
    assert base64.b64encode(composite.to_bytes(4, "big")).decode() + "-3" == weed.client().head_object(
        Bucket=bucket, Key="llama/model.safetensors", ChecksumMode="ENABLED")["ChecksumCRC32"]

    # `verify` re-hashes against what the lockfile recorded: the composite, part by part.
    uri = f"s3://{bucket}/llama/"
    assert agent("verify", uri, "--local-dir", str(dest), env=env).returncode == 0
    with open(dest / "model.safetensors", "r+b") as f:
        f.seek(17 * MiB)
        f.write(b"\0" if data[17 * MiB] else b"\1")
    r = agent("verify", uri, "--local-dir", str(dest), env=env)
    assert r.returncode == 5 and "crc32_composite" in r.stderr, r.stderr

    proxy.add("corrupt", after=100, count=10_000)
    r = agent("pull", f"s3://{bucket}/llama/", "--local-dir", str(tmp_path / "e"), "--chunk-size", "6Mi", env=env)
    assert r.returncode == 5, r.stderr
    assert "crc32_composite" in r.stderr


WEIRD_KEYS = ["plain.bin", "a b+c=d&e.bin", "ünï/çødé.bin", "x~y!(z)*'.bin", "pct%41.bin", "semi;colon@at,comma$.bin"]


def test_a_pull_of_keys_that_need_escaping(weed, tmp_path):
    bucket = f"esc-{os.getpid()}-{next(_names)}"
    weed.client().create_bucket(Bucket=bucket)
    files = {key: os.urandom(1000 + i) for i, key in enumerate(WEIRD_KEYS)}
    for key, data in files.items():
        weed.client().put_object(Bucket=bucket, Key="m/" + key, Body=data)
    dest = tmp_path / "d"
    r = agent("pull", f"s3://{bucket}/m/", "--local-dir", str(dest), env=env_for(weed.env()))
    assert r.returncode == 0, r.stderr
    assert {k: (dest / k).read_bytes() for k in files} == files


def test_a_partial_shorter_than_its_record_never_promotes_zeros(weed, proxy, tmp_path):
    """What a node crash on NFS leaves: the resume record survived, the partial's last pages did not.
    A multipart object is checked by its size (and parts, where the store keeps a checksum): zeros past
    the cut must never be promoted, and the pull must not hang."""
    files = {"model.safetensors": os.urandom(40 * MiB), "config.json": b"{}"}
    bucket = make_bucket(weed, files, multipart=True)
    proxy.add("slow", rate=5 * MiB, count=1)
    env = env_for(weed.env(AWS_ENDPOINT_URL=proxy.url))
    dest = tmp_path / "d"
    partials = dest / ".model-agent" / "partial"
    args = ("pull", f"s3://{bucket}/llama/", "--local-dir", str(dest), "--chunk-size", "8Mi", "--workers", "2",
            "--lease-ttl", "1s")
    proc = popen(*args, env=env)
    deadline = time.monotonic() + 60
    while sum(json.loads(p.read_text())["done"][0] > 0 for p in partials.glob("*.json")) == 0 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut = list(partials.glob("*.incomplete"))
    assert cut, "the killed pull left its partial"
    assert crash_after_last_range(partials) == len(cut)
    proxy.clear()
    r = agent(*args, env=env, timeout=90)
    assert r.returncode == 0, r.stderr
    assert (dest / "model.safetensors").read_bytes() == files["model.safetensors"]
