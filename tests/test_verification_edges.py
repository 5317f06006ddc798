"""Verification at its edges, through the real CLI against real emulators (issue 12, items 3-5):
S3 composite checksums of objects uploaded in unequal parts, a range re-sent after an early end
under O_DIRECT, and GCS objects stored with Content-Encoding: gzip."""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import os
import socket
import zlib
from pathlib import Path

import pytest

from objstore.helpers import FAST, agent, env_for
from objstore.proxy import FaultProxy
from objstore.servers import BIN, MotoServer, free_port, wait_until

pytestmark = pytest.mark.timeout(180)
MiB = 2**20
_names = itertools.count()


class SmallPartMoto(MotoServer):
    """moto's server with S3's 5 MiB minimum part size lowered, so that many parts stay small."""

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._spawn([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)], workdir,
                    env={**os.environ, "S3_UPLOAD_PART_MIN_SIZE": "4096"})
        c = self.client()
        wait_until(lambda: c.list_buckets() is not None, 30, "moto_server", self.proc, self.log)


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with SmallPartMoto(tmp_path_factory.mktemp("moto")) as srv:
        yield srv


def lock_entries(dest: Path) -> dict[str, dict]:
    return {f["path"]: f for f in json.loads((dest / ".model-agent" / "lock.json").read_text())["files"]}


# -- item 3: S3 COMPOSITE checksums of unequal parts ---------------------------------------------
UNEQUAL = [int(5.25 * MiB), 5 * MiB, 1 * MiB]  # what a streaming uploader (smart_open, s3fs) leaves


def upload_in_parts(client, bucket: str, key: str, data: bytes, sizes: list[int]) -> None:
    """A real boto3 multipart upload with the CRC32 that boto3 >= 1.36 adds by default."""
    up = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")
    parts, off = [], 0
    for number, size in enumerate(sizes, 1):
        r = client.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=number,
                               Body=data[off:off + size], ChecksumAlgorithm="CRC32")
        parts.append({"PartNumber": number, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
        off += size
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": parts})


def composite_crc32(data: bytes, sizes: list[int]) -> str:
    bounds = list(itertools.accumulate([0] + sizes))
    inner = b"".join(zlib.crc32(data[a:b]).to_bytes(4, "big") for a, b in itertools.pairwise(bounds))
    return f"{zlib.crc32(inner):08x}-{len(sizes)}"


@pytest.mark.parametrize("store", ["weed", "moto"])
def test_unequal_multipart_parts_are_verified_by_their_real_boundaries(store, request, tmp_path):
    srv = request.getfixturevalue(store)
    data = os.urandom(sum(UNEQUAL))
    bucket = f"parts-{os.getpid()}-{next(_names)}"
    srv.client().create_bucket(Bucket=bucket)
    upload_in_parts(srv.client(), bucket, "m/model.safetensors", data, UNEQUAL)
    proxy = FaultProxy(srv.port)
    try:
        env = env_for(srv.env(AWS_ENDPOINT_URL=proxy.url), **FAST)
        # Ranged (4 MiB ranges, the checksum from a HEAD) and whole (one GET, from its headers).
        for chunk in ("4Mi", "64Mi"):
            dest = tmp_path / f"d-{chunk}"
            r = agent("pull", f"s3://{bucket}/m/", "--local-dir", str(dest), "--chunk-size", chunk, env=env)
            assert r.returncode == 0, r.stderr
            assert (dest / "model.safetensors").read_bytes() == data
            entry = lock_entries(dest)["model.safetensors"]
            assert entry["checksum_crc32"] == composite_crc32(data, UNEQUAL), entry
            r = agent("verify", f"s3://{bucket}/m/", "--local-dir", str(dest), env=env)
            assert r.returncode == 0, r.stderr

        proxy.add("corrupt", after=100, count=10_000)
        dest = tmp_path / "bad"
        r = agent("pull", f"s3://{bucket}/m/", "--local-dir", str(dest), "--chunk-size", "4Mi", env=env)
        assert r.returncode == 5, r.stderr
        assert "crc32_composite" in r.stderr
        assert not (dest / "model.safetensors").exists()
    finally:
        proxy.close()


def test_a_composite_whose_part_sizes_the_store_does_not_tell_is_left_to_the_size_check(moto, tmp_path):
    """moto answers GetObjectAttributes without ObjectParts, and 65 parts are more HEADs than the agent
    makes: the composite is not checked (never guessed), and the lockfile says so."""
    sizes = [64 * 1024 + 4096 * i for i in range(65)]
    data = os.urandom(sum(sizes))
    bucket = f"many-{os.getpid()}-{next(_names)}"
    moto.client().create_bucket(Bucket=bucket)
    upload_in_parts(moto.client(), bucket, "m/model.safetensors", data, sizes)
    dest = tmp_path / "d"
    r = agent("pull", f"s3://{bucket}/m/", "--local-dir", str(dest), "--chunk-size", "1Mi", env=env_for(moto.env()))
    assert r.returncode == 0, r.stderr
    assert (dest / "model.safetensors").read_bytes() == data
    entry = lock_entries(dest)["model.safetensors"]
    assert entry["checksum_crc32"] == composite_crc32(data, sizes) and "part_size" not in entry, entry
    assert "65 parts are unknown" in entry["checksum_unchecked"]


# -- item 4: a range re-sent after an early end, under O_DIRECT ----------------------------------
class CutThenCorrupt(FaultProxy):
    """The first large body ends cleanly (FIN) after exactly `cut` bytes; the next one, the re-send
    of that range, has its byte `flip` inverted."""

    def __init__(self, upstream_port: int, cut: int, flip: int):
        super().__init__(upstream_port)
        self.cut, self.flip, self.large = cut, flip, 0

    def _body(self, server, client, buf: bytes, length: int, large: bool):
        if not large or self.large >= 2:
            return super()._body(server, client, buf, length, large)
        self.large += 1
        first = self.large == 1
        limit = self.cut if first else length
        body = bytearray()
        while len(body) < limit:
            if not buf:
                buf = server.recv(65536)
                if not buf:
                    return None
            take = min(len(buf), limit - len(body))
            body += buf[:take]
            buf = buf[take:]
        if not first:
            body[self.flip] ^= 0xFF
        client.sendall(bytes(body))
        if first:  # FIN now: a close() alone waits for the thread still reading this socket
            client.shutdown(socket.SHUT_RDWR)
            return None
        return buf


@pytest.mark.parametrize("hashing", ["range by range", "in file order"])
def test_a_range_resent_after_an_unaligned_early_end_is_hashed_again(weed, tmp_path, hashing):
    data = os.urandom(12 * MiB)
    bucket = f"direct-{os.getpid()}-{next(_names)}"
    weed.client().create_bucket(Bucket=bucket)
    if hashing == "range by range":  # a whole-object CRC32: RangeDigests
        weed.client().put_object(Bucket=bucket, Key="m/model.safetensors", Body=data, ChecksumAlgorithm="CRC32")
    else:  # a composite of unequal parts: Digests, fed in file order (one worker: ranges in order)
        upload_in_parts(weed.client(), bucket, "m/model.safetensors", data, [int(5.25 * MiB), 5 * MiB, int(1.75 * MiB)])
    # Range 0 ends 1000 bytes past its first 1 MiB unit; its re-send carries a flipped byte among
    # those 1000, which were hashed the first time.
    proxy = CutThenCorrupt(weed.port, cut=MiB + 1000, flip=10)
    try:
        dest = tmp_path / "d"
        r = agent("pull", f"s3://{bucket}/m/", "--local-dir", str(dest), "--chunk-size", "4Mi", "--workers", "1",
                  "--direct-io", "on", env=env_for(weed.env(AWS_ENDPOINT_URL=proxy.url), **FAST))
        assert proxy.large == 2, "both faults fired"
        assert r.returncode in (0, 5), r.stderr
        if r.returncode == 0:  # a re-fetch after the mismatch: the right bytes
            assert (dest / "model.safetensors").read_bytes() == data
        else:
            assert not (dest / "model.safetensors").exists()
    finally:
        proxy.close()


# -- item 5: GCS objects stored with Content-Encoding: gzip -------------------------------------
def test_gcs_objects_stored_gzip_encoded_are_refused_with_exit_2(gcs, tmp_path):
    plain = b'{"vocab": [' + b", ".join(b'"tok%d"' % i for i in range(200_000)) + b"]}"
    name = f"gzip-{os.getpid()}-{next(_names)}"
    bucket = gcs.client().create_bucket(name)
    blob = bucket.blob("m/tokenizer.json")
    blob.content_encoding = "gzip"  # what `gsutil cp -z json` stores
    blob.upload_from_string(gzip.compress(plain), content_type="application/json")
    bucket.blob("m/config.json").upload_from_string(b"{}")
    env = env_for(gcs.env(), **FAST)
    dest = tmp_path / "d"
    r = agent("pull", f"gs://{name}/m/", "--local-dir", str(dest), "--chunk-size", "1Mi", env=env)
    assert r.returncode == 2, r.stderr
    assert "tokenizer.json" in r.stderr and "gzip" in r.stderr
    assert not (dest / ".model-agent" / "ready").exists() and not (dest / "tokenizer.json").exists()

    # The other files of the bucket still pull when the encoded one is left out.
    r = agent("pull", f"gs://{name}/m/", "--local-dir", str(dest), "--exclude", "tokenizer.json", env=env)
    assert r.returncode == 0, r.stderr
    assert (dest / "config.json").read_bytes() == b"{}"


def test_crc32_composite_reference_matches_the_stores(weed):
    """The test's own composite CRC agrees with SeaweedFS's (and so with S3's definition)."""
    data = os.urandom(sum(UNEQUAL))
    bucket = f"ref-{os.getpid()}-{next(_names)}"
    weed.client().create_bucket(Bucket=bucket)
    upload_in_parts(weed.client(), bucket, "k", data, UNEQUAL)
    got = weed.client().head_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")["ChecksumCRC32"]
    hexed, parts = composite_crc32(data, UNEQUAL).split("-")
    assert got == base64.b64encode(bytes.fromhex(hexed)).decode() + "-" + parts
