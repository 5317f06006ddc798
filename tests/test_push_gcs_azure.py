"""`push` to gs:// and az://: fake-gcs-server and Azurite, the real SDKs, the real CLI.

The destinations first, directly (records, listing with the digest, uploads in parts, the store's
checksum on arrival), then `model-agent push` of a Hub model to each store and a pull of it back.
A corruption on the wire is made by a proxy that flips one byte inside the body of an upload: the
store's checksum must catch it, and the file must go up again, whole and right.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import hub_env, run_agent
from objstore.helpers import FAST, env_for, send_json
from objstore.servers import AZURITE_KEY, azurite_bin

pytestmark = pytest.mark.timeout(180)
MiB = 2**20
REPO = "org/published"
_names = itertools.count()
needs_azurite = pytest.mark.skipif(azurite_bin() is None, reason="azurite not installed: run scripts/install-test-tools.sh")


def unique(kind: str) -> str:
    return f"push-{kind}-{os.getpid()}-{next(_names)}"


def crc32c_b64(data: bytes) -> str:
    import google_crc32c

    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def settings_for(tmp_path: Path, **more):
    from agent.config import Settings

    base = {"cache_dir": tmp_path / "cache", "chunk_size": 1 * MiB, "workers": 4, "retry_base_delay": 0.02,
            "retry_max_failures": 4, "stall_timeout": 20.0}
    return Settings(**{**base, **more})


def destination(text: str, settings):
    from agent.destinations.base import open_destination, parse_destination

    return open_destination(parse_destination(text), settings)


def upload(dest, tmp_path: Path, path: str, data: bytes, digest: str) -> int:
    """Upload `data` as DEST/<path>; the bytes on_bytes reported, net."""
    from agent.destinations.base import Upload

    local = tmp_path / "staged" / path
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(data)
    counted = []
    dest.upload(Upload(path=path, local=local, size=len(data), digest=digest), counted.append)
    return sum(counted)


class UploadProxy:
    """A TCP proxy in front of a store that follows each connection's requests by Content-Length and
    acts on the bodies of at least `min_body` bytes (uploads, never the small API calls): it flips
    one byte `at` bytes into the first `count` of them (`fault="flip"`), or cuts the connection
    there (`fault="cut"`), after letting `skip` of them through. It counts the upload bytes it
    forwards and the most uploads in flight at once (from a request's headers to its answer)."""

    def __init__(self, upstream_port: int, fault: str = "flip", count: int = 1, skip: int = 0,
                 min_body: int = 512 * 1024, at: int = 300_000):
        self.upstream, self.fault, self.count, self.skip = upstream_port, fault, count, skip
        self.min_body, self.at = min_body, at
        self.struck = self.body_bytes = self.active = self.max_active = 0
        self._seen = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _started(self) -> bool:
        """A large body starts: count it in flight; strike this one?"""
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self._seen += 1
            if self._seen > self.skip and self.struck < self.count:
                self.struck += 1
                return True
            return False

    def _answered(self, conn: dict) -> None:
        with self._lock:
            if conn.pop("large", False):
                self.active -= 1

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            conn: dict = {}
            threading.Thread(target=self._up, args=(client, server, conn), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, conn), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, conn: dict) -> None:
        head, remaining, pos, strike = b"", 0, 0, False
        try:
            while data := client.recv(65536):
                out = bytearray()
                while data:
                    if remaining == 0:
                        head += data
                        end = head.find(b"\r\n\r\n")
                        if end < 0:
                            data = b""
                            break
                        data, header = head[end + 4:], head[:end + 4]
                        out += header
                        head = b""
                        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", header)
                        remaining, pos = (int(m.group(1)) if m else 0), 0
                        conn["large"] = remaining >= self.min_body
                        strike = conn["large"] and self._started()
                    else:
                        piece = bytearray(data[:remaining])
                        data = data[remaining:]
                        if strike and pos <= self.at < pos + len(piece):
                            strike = False
                            if self.fault == "cut":
                                server.sendall(out + piece[:self.at - pos])
                                return  # both sockets closed below: the upload dies mid-body
                            piece[self.at - pos] ^= 0xFF
                        pos += len(piece)
                        remaining -= len(piece)
                        if conn.get("large"):
                            self.body_bytes += len(piece)
                        out += piece
                server.sendall(out)
        except OSError:
            pass
        finally:
            self._answered(conn)
            _close(client, server)

    def _down(self, server: socket.socket, client: socket.socket, conn: dict) -> None:
        try:
            while data := server.recv(65536):
                self._answered(conn)
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(server, client)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


# -- gs:// --------------------------------------------------------------------------------------------

@pytest.fixture
def gcs_env(gcs, monkeypatch):
    """The destination's own client reads STORAGE_EMULATOR_HOST, as in a pod."""
    for key, value in gcs.env().items():
        monkeypatch.setenv(key, value)
    return gcs


def test_gcs_records_listing_digests_and_a_large_file_in_pieces(gcs_env, tmp_path):
    from agent.destinations.base import DIGEST_KEY, Stored

    bucket = unique("g")
    gcs_env.client().create_bucket(bucket)
    dest = destination(f"gs://{bucket}/pub/", settings_for(tmp_path))
    assert dest.read_record("lock.json") is None
    dest.write_record("lock.json", b'{"a": 1}')
    assert dest.read_record("lock.json") == b'{"a": 1}'
    assert dest.stored() == {}  # the records are never part of the snapshot

    big, small = os.urandom(9 * MiB + 123), b"hello"
    assert upload(dest, tmp_path, "shards/model.safetensors", big, "a" * 64) == len(big)
    assert upload(dest, tmp_path, "config.json", small, "b" * 40) == len(small)
    assert dest.stored() == {"shards/model.safetensors": Stored(len(big), "a" * 64),
                             "config.json": Stored(len(small), "b" * 40)}
    blobs = {b.name: b for b in gcs_env.client().list_blobs(bucket)}
    got = blobs["pub/shards/model.safetensors"]
    assert got.metadata == {DIGEST_KEY: "a" * 64} and got.crc32c == crc32c_b64(big)
    assert got.download_as_bytes() == big

    dest.remove(["config.json", "never-there.bin"])
    assert set(dest.stored()) == {"shards/model.safetensors"}
    dest.delete_record("lock.json")
    dest.delete_record("lock.json")  # absent is fine
    assert dest.read_record("lock.json") is None


@pytest.mark.parametrize("size", [9 * MiB, 2 * MiB], ids=["resumable", "one-request"])
def test_gcs_a_byte_flipped_on_the_wire_is_caught_and_the_file_sent_again(gcs_env, tmp_path, monkeypatch, size):
    bucket = unique("g")
    gcs_env.client().create_bucket(bucket)
    proxy = UploadProxy(gcs_env.port)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        dest = destination(f"gs://{bucket}/m/", settings_for(tmp_path))
        data = os.urandom(size)
        assert upload(dest, tmp_path, "model.bin", data, "c" * 64) == size  # the thrown-away try taken back
    finally:
        proxy.close()
    assert proxy.struck == 1
    assert gcs_env.client().bucket(bucket).blob("m/model.bin").download_as_bytes() == data


def test_gcs_a_connection_cut_mid_upload_is_survived(gcs_env, tmp_path, monkeypatch):
    """A resumable upload cut in its third piece starts again whole (see gcs.py: fake-gcs-server
    cannot say how much of a session it holds), and lands right."""
    bucket = unique("g")
    gcs_env.client().create_bucket(bucket)
    proxy = UploadProxy(gcs_env.port, fault="cut", skip=2)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        dest = destination(f"gs://{bucket}/m/", settings_for(tmp_path))
        data = os.urandom(9 * MiB)
        assert upload(dest, tmp_path, "model.bin", data, "c" * 64) == len(data)
    finally:
        proxy.close()
    assert proxy.struck == 1
    assert gcs_env.client().bucket(bucket).blob("m/model.bin").download_as_bytes() == data


def test_gcs_corruption_that_retrying_does_not_cure_is_exit_5_and_leaves_no_object(gcs_env, tmp_path, monkeypatch):
    from agent.errors import IntegrityError

    bucket = unique("g")
    gcs_env.client().create_bucket(bucket)
    proxy = UploadProxy(gcs_env.port, count=1000)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        dest = destination(f"gs://{bucket}/m/", settings_for(tmp_path))
        with pytest.raises(IntegrityError, match="crc32c"):
            upload(dest, tmp_path, "model.bin", os.urandom(2 * MiB), "c" * 64)
    finally:
        proxy.close()
    assert list(gcs_env.client().list_blobs(bucket)) == []


def gcs_that_answers(status: int, message: str) -> ThreadingHTTPServer:
    """A stand-in for GCS that answers every request with one JSON error, as GCS words its errors."""

    class Answers(BaseHTTPRequestHandler):
        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            send_json(self, status, {"error": {"code": status, "message": message, "errors": [
                {"message": message, "domain": "global", "reason": "invalid"}]}})

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("size", [9 * MiB, 2 * MiB], ids=["resumable", "one-request"])
def test_gcs_refusing_the_crc32c_is_integrity_not_invalid_input(tmp_path, monkeypatch, size):
    """Real GCS checks the CRC32C sent with an upload and refuses a mismatch with a 400 (which
    fake-gcs-server never does): a mismatch to retry, then exit 5; not a bad request (exit 2)."""
    from agent.errors import IntegrityError

    server = gcs_that_answers(400, 'Provided CRC32C "AAAAAA==" doesn\'t match calculated CRC32C "2HvlZg==".')
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
    try:
        dest = destination("gs://refusing/m/", settings_for(tmp_path))
        with pytest.raises(IntegrityError, match="refused"):
            upload(dest, tmp_path, "model.bin", os.urandom(size), "c" * 64)
    finally:
        server.shutdown()


# -- az:// --------------------------------------------------------------------------------------------

def azure_settings(tmp_path: Path, connection_string: str, **more):
    return settings_for(tmp_path, azure_connection_string=connection_string, **more)


@needs_azurite
def test_azure_records_listing_digests_and_a_large_file_in_blocks(azurite, tmp_path):
    from agent.destinations.azure import AZURE_DIGEST_KEY
    from agent.destinations.base import Stored

    container = unique("a")
    azurite.service().create_container(container)
    dest = destination(f"az://{container}/pub/", azure_settings(tmp_path, azurite.connection_string))
    assert dest.read_record("lock.json") is None
    dest.write_record("lock.json", b'{"a": 1}')
    assert dest.read_record("lock.json") == b'{"a": 1}'
    assert dest.stored() == {}

    big, small = os.urandom(5 * MiB + 77), b"hello"
    assert upload(dest, tmp_path, "shards/model.safetensors", big, "a" * 64) == len(big)
    assert upload(dest, tmp_path, "config.json", small, "b" * 40) == len(small)
    assert dest.stored() == {"shards/model.safetensors": Stored(len(big), "a" * 64),
                             "config.json": Stored(len(small), "b" * 40)}
    blob = azurite.service().get_blob_client(container, "pub/shards/model.safetensors")
    props = blob.get_blob_properties()
    assert props.metadata == {AZURE_DIGEST_KEY: "a" * 64}
    assert bytes(props.content_settings.content_md5) == hashlib.md5(big).digest()
    committed, _ = blob.get_block_list("committed")
    assert len(committed) == 6  # 1 MiB blocks (--chunk-size), staged in parallel
    assert blob.download_blob().readall() == big

    dest.remove(["config.json", "never-there.bin"])
    assert set(dest.stored()) == {"shards/model.safetensors"}
    dest.delete_record("lock.json")
    dest.delete_record("lock.json")
    assert dest.read_record("lock.json") is None


@needs_azurite
@pytest.mark.parametrize("size", [3 * MiB, 800 * 1024], ids=["blocks", "one-request"])
def test_azure_a_byte_flipped_on_the_wire_is_caught_and_the_file_sent_again(azurite, tmp_path, size):
    container = unique("a")
    azurite.service().create_container(container)
    proxy = UploadProxy(azurite.port)
    try:
        dest = destination(f"az://{container}/m/",
                           azure_settings(tmp_path, azurite.connection_string.replace(str(azurite.port), str(proxy.port))))
        data = os.urandom(size)
        assert upload(dest, tmp_path, "model.bin", data, "c" * 64) == size
    finally:
        proxy.close()
    assert proxy.struck == 1
    assert azurite.service().get_blob_client(container, "m/model.bin").download_blob().readall() == data


@needs_azurite
def test_azure_a_connection_cut_mid_block_costs_that_block_not_the_file(azurite, tmp_path):
    container = unique("a")
    azurite.service().create_container(container)
    proxy = UploadProxy(azurite.port, fault="cut", skip=3)
    try:
        dest = destination(f"az://{container}/m/", azure_settings(
            tmp_path, azurite.connection_string.replace(str(azurite.port), str(proxy.port)), workers=2))
        data = os.urandom(8 * MiB)
        assert upload(dest, tmp_path, "model.bin", data, "c" * 64) == len(data)
    finally:
        proxy.close()
    assert proxy.struck == 1
    # 8 MiB, plus the 300 kB the cut block had sent (before: the whole file again, 11+ MiB in all).
    assert len(data) < proxy.body_bytes < len(data) + 1 * MiB, proxy.body_bytes
    assert azurite.service().get_blob_client(container, "m/model.bin").download_blob().readall() == data


@needs_azurite
def test_azure_blocks_in_flight_stay_within_workers_across_files(azurite, tmp_path):
    """Two large files at once (the publisher's lanes) share --workers 2: never more than two blocks
    in flight, so never more than 2 x --chunk-size in memory (before: two per file)."""
    container = unique("a")
    azurite.service().create_container(container)
    proxy = UploadProxy(azurite.port, count=0)
    files = {f"shard-{i}.safetensors": os.urandom(4 * MiB) for i in range(2)}
    try:
        dest = destination(f"az://{container}/m/", azure_settings(
            tmp_path, azurite.connection_string.replace(str(azurite.port), str(proxy.port)), workers=2))
        threads = [threading.Thread(target=upload, args=(dest, tmp_path, name, data, "d" * 64))
                   for name, data in files.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        dest.close()
    finally:
        proxy.close()
    assert proxy.max_active == 2, proxy.max_active
    client = azurite.service().get_container_client(container)
    assert {name: client.download_blob("m/" + name).readall() for name in files} == files


@needs_azurite
def test_azure_corruption_that_retrying_does_not_cure_is_exit_5_and_leaves_no_blob(azurite, tmp_path):
    from agent.errors import IntegrityError

    container = unique("a")
    azurite.service().create_container(container)
    proxy = UploadProxy(azurite.port, count=1000)
    try:
        dest = destination(f"az://{container}/m/",
                           azure_settings(tmp_path, azurite.connection_string.replace(str(azurite.port), str(proxy.port))))
        with pytest.raises(IntegrityError, match="MD5"):
            upload(dest, tmp_path, "model.bin", os.urandom(3 * MiB), "c" * 64)
    finally:
        proxy.close()
    assert list(azurite.service().get_container_client(container).list_blobs()) == []


@needs_azurite
def test_azure_a_file_of_more_than_50000_blocks_is_refused_before_a_byte_moves(azurite, tmp_path):
    from agent.errors import InvalidInput

    container = unique("a")
    azurite.service().create_container(container)
    dest = destination(f"az://{container}/m/", azure_settings(tmp_path, azurite.connection_string, chunk_size=16))
    with pytest.raises(InvalidInput, match="--chunk-size 17 or more"):
        upload(dest, tmp_path, "model.bin", os.urandom(50_000 * 16 + 1), "c" * 64)
    assert list(azurite.service().get_container_client(container).list_blobs()) == []


# -- the CLI ------------------------------------------------------------------------------------------

def push_args(dest: str, cache: Path, *more: str) -> list[str]:
    return ["push", REPO, dest, "--cache-dir", str(cache), "--log-format", "json", *more]


def event(r, name: str) -> dict:
    for line in reversed(r.stderr.splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == name:
            return rec
    raise AssertionError(f"no {name!r} event in: {r.stderr[-1500:]}")


def model_files(tmp_path: Path) -> dict[str, bytes]:
    """Small files (git blobs) and a 9 MiB LFS file: with --chunk-size 1Mi it goes up in 9 parts (GCS
    sends a file over 8 MiB as a resumable upload, in --chunk-size pieces)."""
    return {"config.json": b'{"model_type": "llama"}', "tokenizer/vocab.txt": b"a\nb\nc\n",
            "model.safetensors": os.urandom(9 * MiB)}


def check_push_pull_and_rerun(hub, tmp_path: Path, dest: str, store_env: dict[str, str], listed) -> dict:
    """Push REPO to `dest`; the objects and the lockfile are there; a re-run uploads nothing; a pull
    of `dest` gives the Hub's files under the Hub's name and commit. Returns the pull's lockfile."""
    files = model_files(tmp_path)
    commit = hub.add_repo(REPO, files)
    env = hub_env(hub, **store_env)
    prom = tmp_path / "push.prom"
    r = run_agent(*push_args(dest, tmp_path / "staging", "--chunk-size", "1Mi", "--workers", "4",
                             "--metrics-textfile", str(prom)), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    published = event(r, "published")
    assert published["uploaded_files"] == len(files) and published["skipped_files"] == 0
    scheme = dest.split(":")[0]
    uploaded = re.search(rf'model_agent_bytes_uploaded_total{{destination="{scheme}",model="{REPO}"}} (\S+)',
                         prom.read_text())
    assert uploaded and float(uploaded.group(1)) == sum(len(v) for v in files.values())  # counted once each
    objects = listed()
    assert {k: v for k, v in objects.items() if not k.startswith(".model-agent/")} == files
    lock = json.loads(objects[".model-agent/lock.json"])
    assert lock["repo_id"] == REPO and lock["commit"] == commit
    assert ".model-agent/publishing" not in objects

    again = run_agent(*push_args(dest, tmp_path / "staging"), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert event(again, "published")["already_published"] is True

    pulled = run_agent("pull", dest, "--cache-dir", str(tmp_path / "consumer"), "--log-format", "json",
                       env=env_for(store_env))
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    snap = tmp_path / "consumer" / "models--org--published" / "snapshots" / commit
    assert {str(p.relative_to(snap)): p.read_bytes() for p in snap.rglob("*") if p.is_file()} == files
    return json.loads(next((tmp_path / "consumer").rglob(f"{commit}.lock.json")).read_text())


def test_push_a_hub_model_to_gcs_then_pull_it_back(hub, gcs, tmp_path):
    bucket = unique("g")
    gcs.client().create_bucket(bucket)

    def listed() -> dict[str, bytes]:
        return {b.name[len("mirror/"):]: b.download_as_bytes() for b in gcs.client().list_blobs(bucket, prefix="mirror/")}

    check_push_pull_and_rerun(hub, tmp_path, f"gs://{bucket}/mirror/", gcs.env(), listed)


@needs_azurite
def test_push_a_hub_model_to_azure_then_pull_it_back(hub, azurite, tmp_path):
    container = unique("a")
    azurite.service().create_container(container)

    def listed() -> dict[str, bytes]:
        client = azurite.service().get_container_client(container)
        return {b.name[len("mirror/"):]: client.download_blob(b.name).readall()
                for b in client.list_blobs(name_starts_with="mirror/")}

    pulled = check_push_pull_and_rerun(hub, tmp_path, f"az://{container}/mirror/", azurite.env(), listed)
    blob = azurite.service().get_blob_client(container, "mirror/model.safetensors")
    assert len(blob.get_block_list("committed")[0]) == 9  # parallel 1 MiB blocks
    # The pull checked each blob against the Content-MD5 the push set: the whole file's, not a block's.
    md5 = {f["path"]: f.get("content_md5") for f in pulled["files"]}
    assert md5["model.safetensors"] == hashlib.md5(blob.download_blob().readall()).hexdigest()


def test_push_to_gcs_denied_is_exit_3_and_missing_bucket_is_exit_4(hub, gcs, tmp_path):
    hub.add_repo(REPO, model_files(tmp_path))
    server = gcs_that_answers(403, "caller does not have storage.objects.get access")
    try:
        env = hub_env(hub, **gcs.env(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{server.server_port}"), **FAST)
        r = run_agent(*push_args(f"gs://{unique('g')}/m/", tmp_path / "staging"), env=env)
    finally:
        server.shutdown()
    assert r.returncode == 3 and "access refused" in r.stderr, r.stderr[-2000:]
    r = run_agent(*push_args("gs://no-such-push-bucket/m/", tmp_path / "staging"), env=hub_env(hub, **gcs.env()))
    assert r.returncode == 4 and "not found" in r.stderr, r.stderr[-2000:]


@needs_azurite
def test_push_to_azure_denied_is_exit_3_and_missing_container_is_exit_4(hub, azurite, tmp_path):
    hub.add_repo(REPO, model_files(tmp_path))
    container = unique("a")
    azurite.service().create_container(container)
    wrong = azurite.connection_string.replace(AZURITE_KEY, "d3Jvbmcta2V5LXdyb25nLWtleQ==")
    r = run_agent(*push_args(f"az://{container}/m/", tmp_path / "staging"),
                  env=hub_env(hub, AZURE_STORAGE_CONNECTION_STRING=wrong, **FAST))
    assert r.returncode == 3 and "access refused" in r.stderr and "d3Jvbmcta2V5" not in r.stderr, r.stderr[-2000:]
    r = run_agent(*push_args("az://no-such-push-container/m/", tmp_path / "staging"), env=hub_env(hub, **azurite.env()))
    assert r.returncode == 4 and "does not exist" in r.stderr, r.stderr[-2000:]
