"""Units that land ahead of a file's hashing frontier (agent/ahead.py): which may be kept, within what
budget, and that a Xet pull then neither leaves its shards in the page cache nor reads them back."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from agent import directio
from agent.ahead import AheadBudget, AheadStash, units_of
from conftest import hub_env, pull_args, run_agent

MiB = 2**20


def test_units_come_with_a_view_only_when_one_piece_holds_them_whole():
    buf = memoryview(bytearray(4))
    got = [(bytes(buf[:n]), None if v is None else bytes(v)) for n, v in units_of([b"abcdefghij", b"kl", b"mnop", b"q"], buf)]
    assert got == [(b"abcd", b"abcd"), (b"efgh", b"efgh"), (b"ijkl", None), (b"mnop", b"mnop"), (b"q", b"q")]


def test_only_read_only_units_that_end_on_the_grain_or_the_file_are_kept():
    size = 3 * directio.ALIGN + 100
    stash = AheadStash(AheadBudget(10 * directio.ALIGN), size)
    unit = memoryview(bytes(directio.ALIGN))
    stash.keep(0, memoryview(bytearray(directio.ALIGN)), frontier=0)  # writable: its buffer is reused
    stash.keep(directio.ALIGN, unit[:100], frontier=0)  # ends off the grain: its tail may be re-sent
    stash.keep(2 * directio.ALIGN, unit, frontier=3 * directio.ALIGN)  # behind the frontier: hashed already
    stash.keep(3 * directio.ALIGN, memoryview(bytes(100)), frontier=0)  # the file's tail: kept
    assert [stash.take(p) is not None for p in (0, directio.ALIGN, 2 * directio.ALIGN, 3 * directio.ALIGN)] == \
        [False, False, False, True]
    assert stash.budget.held == 0


def test_the_budget_bounds_what_all_stashes_hold_and_comes_back():
    budget = AheadBudget(2 * MiB)
    a, b = AheadStash(budget, 8 * MiB), AheadStash(budget, 8 * MiB)
    a.keep(MiB, memoryview(bytes(MiB)), 0)
    b.keep(MiB, memoryview(bytes(MiB)), 0)
    b.keep(2 * MiB, memoryview(bytes(MiB)), 0)  # a third piece: over the budget, left to be read back
    assert budget.held == 2 * MiB and b.next_after(0) == MiB and b.take(2 * MiB) is None
    a.drop_below(4 * MiB)  # the frontier passed it (hashed from disk by another thread)
    b.clear()
    assert budget.held == 0 and budget.peak == 2 * MiB


def test_a_piece_is_charged_whole_with_its_first_unit_and_given_back_with_its_last():
    """A kept unit is a view: the reader's whole piece stays in memory while any unit of it is kept."""
    budget = AheadBudget(8 * MiB)
    stash = AheadStash(budget, 64 * MiB)
    piece = memoryview(bytes(8 * MiB))
    stash.keep(0, piece[:MiB], 0)
    stash.keep(MiB, piece[MiB:2 * MiB], 0)
    assert budget.held == 8 * MiB
    stash.keep(8 * MiB, memoryview(bytes(MiB)), 0)  # another piece: no room left
    assert stash.next_after(MiB) is None
    assert stash.take(0) is not None and budget.held == 8 * MiB
    assert stash.take(MiB) is not None and budget.held == 0


def resident_bytes(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


@pytest.fixture(scope="module")
def eight_ranges(xet_hub, tmp_path_factory) -> tuple[str, str]:
    """A 64 MiB incompressible Xet file (8 ranges; flipped bytes still decode) and its sha256."""
    folder = tmp_path_factory.mktemp("xet-direct")
    data = os.urandom(64 * MiB)
    (folder / "weights.bin").write_bytes(data)
    xet_hub.add_repo("org/xet-direct", {"weights.bin": folder / "weights.bin"})
    return "org/xet-direct", hashlib.sha256(data).hexdigest()


def pull(xet_hub, repo: str, cache):
    return run_agent(*pull_args(xet_hub, repo, cache, "--engine", "xet", "--workers", "4"),
                     env=hub_env(xet_hub, MODEL_AGENT_RETRY_BASE_DELAY="0.05"))


def test_a_xet_pull_writes_past_the_page_cache_and_hashes_from_memory(xet_hub, eight_ranges, tmp_path):
    """Several ranges of one shard are in flight at once, so most land ahead of its sha256 frontier.
    They used to be read back to be hashed, so the shard went through the page cache (a 1 GiB pull
    spent ~1 CPU-s in the kernel on it). Now it is written with O_DIRECT and the ranges that land
    ahead wait in memory: the finished blob is not in the page cache. Written buffered, or read back
    to be hashed, all 64 MiB of it would be (40 MiB with O_DIRECT but nothing kept)."""
    if directio.fs_type(tmp_path) not in directio.LOCAL_BLOCK_FS:
        pytest.skip(f"O_DIRECT is used on local block file systems only, not {directio.fs_type(tmp_path)}")
    repo, digest = eight_ranges
    cache = tmp_path / "cache"
    r = pull(xet_hub, repo, cache)
    assert r.returncode == 0, r.stderr[-2000:]
    blob = next((cache / "models--org--xet-direct" / "blobs").iterdir())
    assert blob.name == digest and blob.stat().st_size == 64 * MiB
    assert resident_bytes(blob) < 8 * MiB


def test_wrong_bytes_in_ranges_kept_ahead_are_caught(xet_hub, eight_ranges, tmp_path):
    """Kept ranges are hashed like any other: 16 bytes flipped in the first three xorb bodies served
    (of four ranges in flight, at least two land ahead) cost one fresh download and end verified;
    flipped in every body, exit 5 and no blob. The flip is 256 KiB into a body: a range's first chunk
    starts before the range (chunks do not fall on 8 MiB), so bytes near the start of a body are
    mostly cut off by the reconstruction's offset, and random data's chunks decode with any payload."""
    repo, digest = eight_ranges
    xet_hub.faults.clear()
    few = xet_hub.faults.add("corrupt", path_glob="/xorbs/*", host="cas", count=3, after_bytes=256 * 1024, span=16)
    cache = tmp_path / "once"
    r = pull(xet_hub, repo, cache)
    assert r.returncode == 0 and few.hits == 3, r.stderr[-2000:]
    assert "integrity" in r.stdout + r.stderr
    blob = next((cache / "models--org--xet-direct" / "blobs").iterdir())
    assert blob.name == digest and hashlib.sha256(blob.read_bytes()).hexdigest() == digest
    xet_hub.faults.add("corrupt", path_glob="/xorbs/*", host="cas", count=1000, after_bytes=256 * 1024, span=16)
    cache = tmp_path / "always"
    r = pull(xet_hub, repo, cache)
    xet_hub.faults.clear()
    assert r.returncode == 5, r.stderr[-2000:]
    assert not list((cache / "models--org--xet-direct" / "blobs").glob("[0-9a-f]" * 64))


def test_a_full_disk_under_direct_xet_writes_is_exit_6_and_no_marker(xet_hub, eight_ranges, tmp_path):
    """O_DIRECT writes meet a full volume as buffered ones do: exit 6, no ready marker. Someone else
    fills the volume while the Xet ranges land (the free-space check before the first byte passed);
    tmpfs takes O_DIRECT on this kernel, and `--direct-io on` skips the file-system check."""
    import time

    from conftest import agent_cmd

    vol = tmp_path / "vol"
    vol.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(vol)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        repo, _ = eight_ranges
        xet_hub.faults.clear()
        xet_hub.faults.add("slow", path_glob="/xorbs/*", host="cas", rate=16 * MiB, count=1000)
        xet_hub.stats.reset()
        cache = vol / "cache"
        proc = subprocess.Popen(agent_cmd(*pull_args(xet_hub, repo, cache, "--engine", "xet", "--workers", "4",
                                                     "--direct-io", "on", "--disk-margin", "0")),
                                env=hub_env(xet_hub), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while xet_hub.stats.bytes_sent("/xorbs/*") < 8 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(vol / "filler", "wb") as f:
            try:
                f.write(b"\0" * 40 * MiB)
            except OSError:
                pass
        _, err = proc.communicate(timeout=60)
        xet_hub.faults.clear()
        assert proc.returncode == 6, err[-2000:]
        assert "space" in err.lower()
        assert not list(cache.glob("models--*/.model-agent/*.ready"))
    finally:
        subprocess.run(["umount", "-l", str(vol)], capture_output=True)
