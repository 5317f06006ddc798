"""How the transfer puts bytes on disk: O_DIRECT for large files, range-by-range digests.

A reader of our own serves bytes from memory (RangeReader is this project's interface, not an
SDK), so these tests look at the kernel's side alone: which descriptors carry O_DIRECT
(/proc/self/fdinfo), and how many bytes the process read back from disk (/proc/self/io).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zlib
from pathlib import Path

import pytest

from agent import checksums
from agent.errors import AgentError
from agent.retry import RetryPolicy
from agent.sources.base import RangeReader, RemoteFile
from agent import directio
from agent.transfer import FileJob, PartialFile, Transfer

MiB = 2**20
O_DIRECT = getattr(os, "O_DIRECT", 0)
pytestmark = pytest.mark.skipif(not O_DIRECT or not Path("/proc/self/fdinfo").is_dir(), reason="Linux only")


@pytest.fixture(autouse=True)
def needs_o_direct(tmp_path):
    """The temp folder's file system must take O_DIRECT (tmpfs before Linux 6.6 refuses it)."""
    probe = tmp_path / "probe"
    probe.touch()
    fd = directio.open_direct(probe)
    if fd is None:
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    os.close(fd)
    probe.unlink()


class Quiet:
    def add_bytes(self, n: int) -> None: ...
    def add_resumed(self, n: int) -> None: ...
    def file_done(self, file) -> None: ...
    def retry(self, reason, delay, what) -> None: ...


def direct_fds_on(suffix: str) -> list[bool]:
    """For each open descriptor of a file whose name ends in `suffix`: does it carry O_DIRECT?"""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            flags = next(line for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
                         if line.startswith("flags:"))
        except (OSError, StopIteration):
            continue
        if target.endswith(suffix):
            found.append(bool(int(flags.split()[1], 8) & O_DIRECT))
    return found


def bytes_read() -> int:
    """Bytes this process read through read()/pread() so far (its read-back of files)."""
    line = next(x for x in Path("/proc/self/io").read_text().splitlines() if x.startswith("rchar:"))
    return int(line.split()[1])


class MemoryReader(RangeReader):
    """Serves `data` in pieces; can hold range 0 back until the others landed, or die after `fail_after` bytes."""

    name = "memory"

    def __init__(self, data: bytes, *, piece: int = 64 * 1024, hold_first: bool = False, fail_after: int | None = None):
        self.data, self.piece = data, piece
        self.starts: list[int] = []
        self.direct_seen: list[bool] = []
        self.hold_first = hold_first
        self.others_left = -(-len(data) // MiB) - 1
        self.others_done = threading.Event()
        self.fail_after = fail_after
        self.sent = 0
        self.lock = threading.Lock()

    def read_range(self, file, start, end):
        with self.lock:
            self.starts.append(start)
        if self.hold_first and start == 0:
            self.others_done.wait(10)  # range 0 lands last: the file-order frontier stays at byte 0
        self.direct_seen += direct_fds_on(".incomplete")
        for pos in range(start, end, self.piece):
            piece = self.data[pos:min(end, pos + self.piece)]
            with self.lock:
                if self.fail_after is not None and self.sent + len(piece) > self.fail_after:
                    raise AgentError("the test stops this pull here")
                self.sent += len(piece)
            yield piece
        if start:
            with self.lock:
                self.others_left -= 1
                if self.others_left == 0:
                    self.others_done.set()


def pull(tmp_path: Path, data: bytes, reader: MemoryReader, *, direct: bool, checks: dict | None = None,
         workers: int = 4, name: str = "model.safetensors") -> Path:
    file = RemoteFile(path=name, size=len(data), etag="e" * 8, checksums=checks or {})
    final = tmp_path / "out" / name
    Transfer(reader, Quiet(), workers=workers, chunk_size=MiB, policy=RetryPolicy(1, 0.0),
             direct_io=direct).run([FileJob(file, final, tmp_path / "partial")])
    return final


@pytest.mark.parametrize("direct", [True, False])
def test_large_files_are_written_past_the_page_cache_and_cut_to_size(tmp_path, direct):
    data = os.urandom(5 * MiB + 123)  # the last unit is short: written padded, then cut back
    reader = MemoryReader(data)
    final = pull(tmp_path, data, reader, direct=direct, checks={"crc32": f"{zlib.crc32(data):08x}"})
    assert final.read_bytes() == data
    assert reader.direct_seen and any(reader.direct_seen) is direct


@pytest.mark.parametrize("size, checks", [
    (MiB // 2, {}),  # one range: no second descriptor, no alignment games
    (3 * MiB, {"sha256": "x"}),  # hashed in file order: what lands ahead is read back, from memory
])
def test_small_files_and_file_order_checksums_stay_on_the_page_cache(tmp_path, size, checks):
    data = os.urandom(size)
    if checks:
        checks = {"sha256": hashlib.sha256(data).hexdigest()}
    reader = MemoryReader(data)
    assert pull(tmp_path, data, reader, direct=True, checks=checks).read_bytes() == data
    assert reader.direct_seen and not any(reader.direct_seen)


def test_file_order_checksums_take_o_direct_when_each_file_is_fetched_in_order(tmp_path):
    """As many large files as workers: a file's next range starts after its previous one landed, so
    sha256 is hashed from memory as the bytes arrive, and the page cache has nothing to offer."""
    files = {f"model-{i}.safetensors": os.urandom(3 * MiB + i) for i in range(2)}
    reader = MultiReader(files)
    jobs = [FileJob(RemoteFile(path=name, size=len(data), etag=f"e{i}" * 4,
                               checksums={"sha256": hashlib.sha256(data).hexdigest()}),
                    tmp_path / "out" / name, tmp_path / "partial") for i, (name, data) in enumerate(files.items())]
    before = bytes_read()
    Transfer(reader, Quiet(), workers=1, chunk_size=MiB, policy=RetryPolicy(1, 0.0), direct_io=True).run(jobs)
    assert bytes_read() - before < 256 * 1024
    assert all((tmp_path / "out" / name).read_bytes() == data for name, data in files.items())
    assert any(reader.direct_seen)  # each temp file: its buffered descriptor and an O_DIRECT one


class MultiReader(RangeReader):
    name = "memory"

    def __init__(self, files: dict[str, bytes]):
        self.files, self.direct_seen = files, []

    def read_range(self, file, start, end):
        self.direct_seen += direct_fds_on(".incomplete")
        yield self.files[file.path][start:end]


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path):
    """Some file systems accept O_DIRECT at open and refuse it at write (EINVAL). A misaligned
    buffer draws the same EINVAL from this kernel, for real."""
    data = os.urandom(3 * MiB)
    file = RemoteFile(path="m.bin", size=len(data), etag="e" * 8)
    (tmp_path / "p").mkdir()
    pf = PartialFile(FileJob(file, tmp_path / "m.bin", tmp_path / "p"), MiB, True, [], direct=True)
    assert pf.direct_fd is not None
    misaligned = memoryview(bytearray(directio.ALIGN + 1))[1:]
    assert pf.write_direct(misaligned, 0) is False
    aligned = directio.staging_buffer()[:directio.ALIGN]
    assert pf.write_direct(aligned, 0) is False  # from now on the buffered path, for every worker
    assert pf.direct_fd is not None  # but still open: another worker may be inside a pwrite on it
    pf.close(keep=False)
    assert pf.direct_fd is None


def test_resume_from_a_buffered_record_rewinds_to_the_alignment(tmp_path):
    """A buffered writer records byte counts off the 4096 grain O_DIRECT needs: the direct run that
    takes its partial over fetches the range again from the aligned byte below."""
    data = os.urandom(3 * MiB)
    first = MemoryReader(data, piece=10_000, fail_after=MiB + 123_456)  # dies inside range 1
    with pytest.raises(AgentError):
        pull(tmp_path, data, first, direct=False, workers=1)
    [record] = list((tmp_path / "partial").glob("*.json"))
    landed = json.loads(record.read_text())["done"][1]
    assert landed % directio.ALIGN
    second = MemoryReader(data)
    final = pull(tmp_path, data, second, direct=True, checks={"crc32": f"{zlib.crc32(data):08x}"})
    assert final.read_bytes() == data
    assert [s for s in second.starts if MiB <= s < 2 * MiB] == [MiB + landed // directio.ALIGN * directio.ALIGN]


@pytest.mark.parametrize("algo", ["crc32", "crc32c", "crc32_composite", "sha256"])
def test_combinable_checksums_never_read_a_byte_back(tmp_path, algo):
    """Range 0 lands last. In file order, everything after it would be read back from disk to be
    hashed; CRCs and composite checksums are hashed range by range instead."""
    data = os.urandom(6 * MiB + 5)
    expected = {
        "crc32": lambda: f"{zlib.crc32(data):08x}",
        "crc32c": lambda: f"{__import__('google_crc32c').value(data):08x}",
        "crc32_composite": lambda: composite(data, MiB // 4),
        "sha256": lambda: hashlib.sha256(data).hexdigest(),
    }[algo]()
    reader = MemoryReader(data, hold_first=True)
    before = bytes_read()
    final = pull(tmp_path, data, reader, direct=True, checks={algo: expected})
    read_back = bytes_read() - before
    assert final.read_bytes() == data
    if algo == "sha256":
        assert read_back >= 4 * MiB  # the honest contrast: file order has to read back
    else:
        assert read_back < 256 * 1024


def composite(data: bytes, part: int) -> str:
    h = checksums._hasher("crc32_composite", len(data), f"x-0:{part}")
    h.update(data)
    return h.hexdigest()


def test_crc_combine_and_range_digests_agree_with_whole_file_hashing():
    import google_crc32c

    data = os.urandom(3 * MiB + 777)
    for cut in (0, 1, 4096, MiB, len(data) - 1, len(data)):
        a, b = data[:cut], data[cut:]
        assert checksums.crc_combine("crc32", zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)
        assert (checksums.crc_combine("crc32c", google_crc32c.value(a), google_crc32c.value(b), len(b))
                == google_crc32c.value(data))
    expected = {"crc32": f"{zlib.crc32(data):08x}", "crc32_composite": composite(data, MiB // 2)}
    digests = checksums.RangeDigests(len(data), expected, MiB)
    for idx in reversed(range(4)):  # any order
        digests.update(idx, data[idx * MiB:(idx + 1) * MiB])
    assert digests.problems() == []
    bad = checksums.RangeDigests(len(data), {"crc32": expected["crc32"]}, MiB)
    for idx in range(4):
        chunk = bytearray(data[idx * MiB:(idx + 1) * MiB])
        chunk[-1] ^= idx == 2
        bad.update(idx, chunk)
    assert bad.problems() and bad.problems()[0].startswith("crc32")
    # what cannot be combined, or parts that straddle ranges, stays in file order
    assert not checksums.RangeDigests.possible({"sha256": "ab"}, MiB)
    assert not checksums.RangeDigests.possible({"md5": "ab"}, MiB)
    assert not checksums.RangeDigests.possible({"crc32_composite": f"x-2:{3 * MiB // 2}"}, MiB)
    assert checksums.RangeDigests.possible({"crc32_composite": f"x-2:{MiB // 2}", "md5": "ab"}, MiB)


def test_auto_picks_o_direct_by_the_file_system_of_the_destination(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        "40 22 0:50 / /mnt/models rw,relatime shared:20 - nfs4 10.0.0.2:/export rw,vers=4.2\n"
        "41 22 0:51 / /mnt/models\\040local rw,relatime shared:21 - xfs /dev/nvme0n1 rw\n"
        "42 22 0:52 / /mnt/models-fuse rw shared:22 - fuse.gcsfuse bucket rw\n"
    )
    kind = lambda p: directio.fs_type(Path(p), str(mountinfo))  # noqa: E731
    assert kind("/var/cache/hf") == "ext4"
    assert kind("/mnt/models/hub/x") == "nfs4" and kind("/mnt/models") == "nfs4"
    assert kind("/mnt/models local/x") == "xfs"  # \040 is a space in mountinfo
    assert kind("/mnt/models-fuse/x") == "fuse.gcsfuse"  # a prefix of the name is not a parent
    assert {"ext4", "xfs"} <= directio.LOCAL_BLOCK_FS and "nfs4" not in directio.LOCAL_BLOCK_FS
    assert directio.wanted("off", tmp_path) is False and directio.wanted("on", tmp_path) is True
    assert directio.wanted("auto", tmp_path) is (directio.fs_type(tmp_path) in directio.LOCAL_BLOCK_FS)


def test_sha256_follows_ranges_that_land_ahead_of_the_hashing_frontier(tmp_path):
    """Ranges in flight land out of order, each in one piece (an Xet range is one ~8 MiB item). Once
    range 0 lands, the ranges that landed before it are hashed at once, not by the final check: a 1
    GiB Xet pull hashed 325 of each 341 MiB shard after its last byte (0.3 s of 1.9 s)."""
    data = os.urandom(4 * MiB)
    file = RemoteFile(path="m.bin", size=len(data), etag="e" * 8,
                      checksums={"sha256": hashlib.sha256(data).hexdigest()})
    (tmp_path / "p").mkdir()
    pf = PartialFile(FileJob(file, tmp_path / "m.bin", tmp_path / "p"), MiB, True, [])
    for idx in (3, 1, 2, 0):  # range 0, the frontier, lands last
        piece = data[idx * MiB:(idx + 1) * MiB]
        os.pwrite(pf.fd, piece, idx * MiB)
        pf.advance(idx, len(piece))
        pf.hash_landed(idx, idx * MiB, piece)
    assert pf.digests.fed == len(data), f"{(len(data) - pf.digests.fed) // MiB} MiB left for the final check"
    assert pf.problems() == []
    pf.close(keep=False)
