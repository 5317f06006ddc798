"""`model-agent push` to s3://: the real CLI against SeaweedFS (SigV4, checksums verified on arrival).

A Hub model from the suite's devhub is pushed to a bucket prefix; the objects, their metadata and their
S3 checksums are read back with boto3, then pulled back with `model-agent pull`. Faults on the upload
path (a slow link to kill a push in the middle of a multipart upload, a byte flipped in a request body)
come from a small TCP proxy below, in front of SeaweedFS.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest
from conftest import ROOT, agent_cmd, hub_env, log_events, run_agent

from agent.devhub import make_model

pytestmark = pytest.mark.timeout(180)
MiB = 2**20
REPO = "org/pushed-s3"
DIGEST_KEY = "model-agent-digest"
FAST = {"MODEL_AGENT_RETRY_BASE_DELAY": "0.05", "MODEL_AGENT_RETRY_MAX_FAILURES": "4"}
_names = itertools.count()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """One 12 MiB shard (three parts at --chunk-size 5Mi), three small files (git blobs on the Hub), an empty one."""
    folder = tmp_path_factory.mktemp("push-s3-model")
    files = make_model(folder, large_files=1, large_size=12 * MiB, small_files=3)
    (folder / "empty.txt").write_bytes(b"")
    return {**files, "empty.txt": folder / "empty.txt"}


def new_bucket(srv) -> str:
    bucket = f"push-{os.getpid()}-{next(_names)}"
    srv.client().create_bucket(Bucket=bucket)
    return bucket


def push(hub, srv, staging: Path, dest: str, *more: str, endpoint: str | None = None, **env: str):
    s3_env = srv.env(**({"AWS_ENDPOINT_URL": endpoint} if endpoint else {}), **env)
    return run_agent("push", REPO, dest, "--cache-dir", str(staging), "--log-format", "json", *more,
                     env=hub_env(hub, **s3_env, **FAST))


def events(stderr: str, name: str | None) -> list[dict]:
    return log_events(stderr, name)


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def uploads_under(srv, bucket: str, prefix: str) -> list[dict]:
    return srv.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])


def test_push_to_s3_then_pull_it_back_verified_and_a_rerun_uploads_nothing(hub, weed, model_files, tmp_path):
    commit = hub.add_repo(REPO, model_files)
    bucket = new_bucket(weed)
    staging = tmp_path / "staging"
    prom = tmp_path / "push.prom"
    r = push(hub, weed, staging, f"s3://{bucket}/mirror", "--chunk-size", "5Mi", "--metrics-textfile", str(prom))
    assert r.returncode == 0, r.stderr[-3000:]
    published = events(r.stderr, "published")[0]
    total = sum(p.stat().st_size for p in model_files.values())
    assert published["uploaded_bytes"] == total and published["uploaded_files"] == len(model_files)
    # Every byte sent was counted once by the progress callback: no more (a double count), no less.
    counted = [line for line in prom.read_text().splitlines() if line.startswith("model_agent_bytes_uploaded_total{")]
    assert [float(line.split()[-1]) for line in counted] == [total], counted

    c = weed.client()
    lock = json.loads(c.get_object(Bucket=bucket, Key="mirror/.model-agent/lock.json")["Body"].read())
    assert lock["repo_id"] == REPO and lock["commit"] == commit
    etags = {f["path"]: f["etag"] for f in lock["files"]}
    assert sorted(etags) == sorted(model_files)
    keys = {o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix="mirror/")["Contents"]}
    assert keys == {f"mirror/{p}" for p in model_files} | {"mirror/.model-agent/lock.json"}  # `publishing` gone
    for rel, local in model_files.items():
        data = local.read_bytes()
        head = c.head_object(Bucket=bucket, Key=f"mirror/{rel}", ChecksumMode="ENABLED")
        headers = head["ResponseMetadata"]["HTTPHeaders"]
        assert head["ContentLength"] == len(data)
        assert head["Metadata"] == {DIGEST_KEY: etags[rel]}, rel
        # One CRC32 of the whole object, multipart or not: what the store checked on arrival and
        # what a pull checks again with a single pass over the file, with no part sizes to learn.
        assert headers.get("x-amz-checksum-crc32") == crc32_b64(data), (rel, headers)
        assert headers.get("x-amz-checksum-type", "FULL_OBJECT") == "FULL_OBJECT", (rel, headers)
    big = max(model_files, key=lambda p: model_files[p].stat().st_size)
    assert c.head_object(Bucket=bucket, Key=f"mirror/{big}")["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB

    # A pull of the mirror is a pull of the Hub commit (the published identity), and it checks each
    # file against that CRC32 as well as the published digest (its lockfile records what it checked).
    cache = tmp_path / "cache"
    pulled = run_agent("pull", f"s3://{bucket}/mirror/", "--cache-dir", str(cache), "--log-format", "json",
                       env=hub_env(hub, **weed.env(), **FAST))
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    repo = cache / ("models--" + REPO.replace("/", "--"))
    for rel, src in model_files.items():
        assert (repo / "snapshots" / commit / rel).read_bytes() == src.read_bytes(), rel
    pulled_lock = json.loads((repo / ".model-agent" / f"{commit}.lock.json").read_text())
    entry = next(f for f in pulled_lock["files"] if f["path"] == big)
    assert entry.get("checksum_crc32") == f"{zlib.crc32(model_files[big].read_bytes()):08x}", entry

    modified = {o["Key"]: o["LastModified"] for o in c.list_objects_v2(Bucket=bucket, Prefix="mirror/")["Contents"]}
    again = push(hub, weed, staging, f"s3://{bucket}/mirror/", "--chunk-size", "5Mi")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = events(again.stderr, "published")[0]
    assert summary["uploaded_bytes"] == 0 and summary["skipped_files"] == len(model_files)
    now = {o["Key"]: o["LastModified"] for o in c.list_objects_v2(Bucket=bucket, Prefix="mirror/")["Contents"]}
    assert now == modified  # not one object rewritten


@pytest.mark.parametrize("case, code, words", [
    ("denied", 3, "access refused"),
    ("missing_bucket", 4, "does not exist"),
])
def test_push_errors_have_the_contract_exit_codes(hub, weed, model_files, tmp_path, case, code, words):
    hub.add_repo(REPO, model_files)
    bucket = new_bucket(weed)
    if case == "denied":
        r = push(hub, weed, tmp_path / "staging", f"s3://{bucket}/m/", AWS_SECRET_ACCESS_KEY="not-the-secret")
    else:
        r = push(hub, weed, tmp_path / "staging", f"s3://{bucket}-gone/m/")
    assert r.returncode == code, r.stderr[-3000:]
    failed = [e for e in events(r.stderr, None) if "exit_code" in e]
    message = json.dumps(failed[-1])
    assert words in message and "not-the-secret" not in r.stderr, message


class UploadProxy:
    """A TCP proxy that throttles (and may corrupt) what clients send: the upload direction.

    `rate` bytes per second per connection while set; `corrupt_at` flips the byte at that offset of
    the first connection whose upload reaches it (once): a byte of a large request body.
    """

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.rate = 0.0
        self.corrupt_at: int | None = None
        self.corrupted = 0
        self.reset_at: int | None = None  # cut the first connection whose upload reaches this offset
        self.up_bytes = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket) -> None:
        sent = 0
        try:
            while data := src.recv(64 * 1024 if not self.rate else 16 * 1024):
                data = self._maybe_corrupt(data, sent)
                if self._cut(sent + len(data)):
                    src.shutdown(socket.SHUT_RDWR)
                    return
                dst.sendall(data)
                sent += len(data)
                with self._lock:
                    self.up_bytes += len(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            dst.close()

    def _maybe_corrupt(self, data: bytes, sent: int) -> bytes:
        with self._lock:
            at = self.corrupt_at
            if at is None or not sent <= at < sent + len(data):
                return data
            self.corrupt_at, self.corrupted = None, self.corrupted + 1
        flipped = bytearray(data)
        flipped[at - sent] ^= 0xFF
        return bytes(flipped)

    def _cut(self, upto: int) -> bool:
        with self._lock:
            if self.reset_at is None or upto <= self.reset_at:
                return False
            self.reset_at = None
            return True

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(64 * 1024):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def upload_proxy(weed):
    p = UploadProxy(weed.port)
    yield p
    p.close()


def test_a_killed_push_leaves_an_unfinished_upload_that_the_next_run_aborts(hub, weed, model_files, upload_proxy,
                                                                              tmp_path):
    hub.add_repo(REPO, model_files)
    bucket = new_bucket(weed)
    staging = tmp_path / "staging"
    first = push(hub, weed, staging, f"s3://{bucket}/warmup/", "--include", "*.json")  # stages the snapshot
    assert first.returncode == 0, first.stderr[-3000:]
    # Someone else's unfinished upload in the same bucket, outside DEST: never touched.
    other = weed.client().create_multipart_upload(Bucket=bucket, Key="elsewhere/big.bin")["UploadId"]

    upload_proxy.rate = 2 * MiB  # the 12 MiB shard takes ~6 s: time to kill the push in the middle of it
    cmd = agent_cmd("push", REPO, f"s3://{bucket}/m/", "--cache-dir", str(staging), "--log-format", "json",
                    "--chunk-size", "5Mi", "--workers", "1")
    proc = subprocess.Popen(cmd, env=hub_env(hub, **weed.env(AWS_ENDPOINT_URL=upload_proxy.url), **FAST), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not uploads_under(weed, bucket, "m/"):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the push never started a multipart upload"
        time.sleep(0.05)
    time.sleep(0.5)  # a part on its way
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stderr.close()
    stale = uploads_under(weed, bucket, "m/")
    assert len(stale) == 1 and not weed.client().list_objects_v2(Bucket=bucket, Prefix="m/.model-agent/lock.json").get("Contents")

    upload_proxy.rate = 0
    r = push(hub, weed, staging, f"s3://{bucket}/m/", "--chunk-size", "5Mi", endpoint=upload_proxy.url)
    assert r.returncode == 0, r.stderr[-3000:]
    assert uploads_under(weed, bucket, "m/") == []  # the killed push's parts are not kept (nor billed)
    assert [u["UploadId"] for u in uploads_under(weed, bucket, "elsewhere/")] == [other]
    c = weed.client()
    for rel, src in model_files.items():
        assert c.get_object(Bucket=bucket, Key=f"m/{rel}")["Body"].read() == src.read_bytes(), rel


def test_a_byte_corrupted_on_its_way_up_is_refused_by_the_store_and_sent_again(hub, weed, model_files, upload_proxy,
                                                                                tmp_path):
    hub.add_repo(REPO, model_files)
    bucket = new_bucket(weed)
    upload_proxy.corrupt_at = 3 * MiB  # inside the first part of the 12 MiB shard, the first file to go up
    r = push(hub, weed, tmp_path / "staging", f"s3://{bucket}/m/", "--chunk-size", "5Mi", "--workers", "1",
             endpoint=upload_proxy.url)
    assert r.returncode == 0, r.stderr[-3000:]
    assert upload_proxy.corrupted == 1  # refused by the store (BadDigest), sent again: else exit 1 or bad bytes
    c = weed.client()
    for rel, src in model_files.items():
        assert c.get_object(Bucket=bucket, Key=f"m/{rel}")["Body"].read() == src.read_bytes(), rel
    assert uploads_under(weed, bucket, "m/") == []


def test_a_part_cut_off_mid_upload_is_sent_again_alone(hub, weed, model_files, upload_proxy, tmp_path):
    hub.add_repo(REPO, model_files)
    bucket = new_bucket(weed)
    staging = tmp_path / "staging"
    first = push(hub, weed, staging, f"s3://{bucket}/warmup/", "--include", "*.json")  # stages the snapshot
    assert first.returncode == 0, first.stderr[-3000:]
    upload_proxy.reset_at = 8 * MiB  # the connection dies inside the second 5 MiB part of the 12 MiB shard
    r = push(hub, weed, staging, f"s3://{bucket}/m/", "--chunk-size", "5Mi", "--workers", "1",
             endpoint=upload_proxy.url)
    assert r.returncode == 0, r.stderr[-3000:]
    assert upload_proxy.reset_at is None, "the connection was never cut"
    # The 12 MiB shard, the 3 MiB of the cut part that were lost, and a few KiB of small files and
    # requests. Sending the whole file again would be 8 + 12 MiB.
    assert upload_proxy.up_bytes < 16 * MiB, upload_proxy.up_bytes / MiB
    c = weed.client()
    for rel, src in model_files.items():
        assert c.get_object(Bucket=bucket, Key=f"m/{rel}")["Body"].read() == src.read_bytes(), rel


def test_a_push_of_another_commit_removes_the_files_it_no_longer_has(hub, weed, model_files, tmp_path):
    hub.add_repo(REPO, model_files)
    bucket = new_bucket(weed)
    staging = tmp_path / "staging"
    assert push(hub, weed, staging, f"s3://{bucket}/m/").returncode == 0
    c = weed.client()
    c.put_object(Bucket=bucket, Key="m/notes-of-someone.txt", Body=b"not ours")
    renamed = {k: v for k, v in model_files.items() if k != "tokenizer_config.json"}
    renamed["tokenizer.json"] = model_files["tokenizer_config.json"]  # a file renamed by the new commit
    new_commit = hub.commit(REPO, renamed)
    r = push(hub, weed, staging, f"s3://{bucket}/m/")
    assert r.returncode == 0, r.stderr[-3000:]
    keys = {o["Key"][2:] for o in c.list_objects_v2(Bucket=bucket, Prefix="m/")["Contents"]}
    assert keys == set(renamed) | {"notes-of-someone.txt", ".model-agent/lock.json"}, keys
    lock = json.loads(c.get_object(Bucket=bucket, Key="m/.model-agent/lock.json")["Body"].read())
    assert lock["commit"] == new_commit
