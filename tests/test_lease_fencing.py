"""The writer lease under adversity: paused writers, heartbeats that fail, partials a crash cut short,
descriptors that pile up in a long-lived process, sparse partials that hide a full disk.

Every test drives the real CLI against the project's Hub server (or a mounted folder as the source);
faults come from the server, the file system (chattr, tmpfs) or signals, never from patching our code.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, agent_cmd, hub_env, pull_args, run_agent, tmpfs
from test_pull import assert_snapshot, json_lines
from test_resilience import FAST_RETRY, largest

MiB = 2**20


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _sidecars(blobs: Path) -> list[Path]:
    return list(blobs.glob("*.incomplete.json")) if blobs.is_dir() else []


def _recorded_bytes(blobs: Path) -> int:
    total = 0
    for sidecar in _sidecars(blobs):
        try:
            total += sum(json.loads(sidecar.read_text())["done"])
        except (OSError, ValueError):
            pass
    return total


@contextmanager
def immutable(folder: Path):
    """chattr +i: even root cannot create or rename files in `folder` (ext4, xfs, btrfs)."""
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_paused_writer_taken_over_cannot_touch_the_ready_blob(hub, big_files, tmp_path):
    """Writer A is SIGSTOPped past its TTL, B takes over and finishes, then A resumes against a server
    that now corrupts every body: the ready snapshot must still verify."""
    commit = hub.add_repo("org/big", big_files)
    big = largest(big_files)
    size = big_files[big].stat().st_size
    hub.faults.add("slow", path_glob=big, rate=8 * MiB, count=1000)
    cache = tmp_path / "cache"
    blobs = cache / "models--org--big" / "blobs"
    args = pull_args(hub, "org/big", cache, "--chunk-size", "8Mi", "--workers", "2", "--lease-ttl", "2s")
    a = subprocess.Popen(agent_cmd(*args), env=hub_env(hub, **FAST_RETRY), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _recorded_bytes(blobs) >= 16 * MiB, 60, "writer A to record 16 MiB")
        a.send_signal(signal.SIGSTOP)
        hub.faults.clear()
        b = run_agent(*args, env=hub_env(hub, **FAST_RETRY), timeout=120)
        assert b.returncode == 0, b.stderr
        assert any(e["event"] == "lease_takeover" for e in json_lines(b.stderr)), b.stderr
        assert_snapshot(cache, "org/big", commit, big_files)
        # A wakes up to a server that corrupts every byte it sends from now on.
        hub.faults.add("corrupt", path_glob=big, after_bytes=0, count=10_000)
        a.send_signal(signal.SIGCONT)
        _, a_err = a.communicate(timeout=120)
    finally:
        a.kill()
    assert a.returncode in (0, 5, 7), a_err  # a contract code, never a crash
    assert "Traceback" not in a_err
    assert_snapshot(cache, "org/big", commit, big_files)
    v = run_agent("verify", "org/big", "--cache-dir", str(cache), env=hub_env(hub))
    assert v.returncode == 0, v.stderr
    assert size > 8 * MiB * 4  # several ranges, so A had ranges left to fetch when it woke


@contextmanager
def slow_pull_of_big(hub, big_files, cache: Path):
    """Writer A pulling org/big slowly with a 2 s lease TTL: yields (commit, args, lease path, process)."""
    commit = hub.add_repo("org/big", big_files)
    hub.faults.add("slow", path_glob=largest(big_files), rate=12 * MiB, count=1000)
    args = pull_args(hub, "org/big", cache, "--chunk-size", "16Mi", "--workers", "2", "--lease-ttl", "2s")
    lease = cache / ".locks" / "models--org--big" / "model-agent.lease"
    a = subprocess.Popen(agent_cmd(*args), env=hub_env(hub), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lease.exists, 30, "writer A's lease")
        yield commit, args, lease, a
    finally:
        a.kill()


def test_a_heartbeat_survives_a_transient_write_error(hub, big_files, tmp_path):
    """The lease folder refuses writes for a moment (an NFS blip): the heartbeat must keep going after,
    so a second writer started then waits instead of taking the live writer over."""
    cache = tmp_path / "cache"
    with slow_pull_of_big(hub, big_files, cache) as (commit, args, lease, a):
        with immutable(lease.parent):
            time.sleep(1.2)  # two heartbeats (every 0.5 s) fail
        b = run_agent(*args, env=hub_env(hub), timeout=120)
        _, a_err = a.communicate(timeout=120)
    assert a.returncode == 0, a_err
    assert b.returncode == 0, b.stderr
    assert "Traceback" not in a_err
    assert not any(e["event"] == "lease_takeover" for e in json_lines(b.stderr)), b.stderr
    assert_snapshot(cache, "org/big", commit, big_files)


def test_a_writer_whose_heartbeat_cannot_renew_stops_writing_then_recovers(hub, big_files, tmp_path):
    """Renewal impossible for longer than the TTL: the writer must consider the lease lost, stop writing
    (a waiter may take over by now), say so in one line, and come back once it can hold it again."""
    cache = tmp_path / "cache"
    with slow_pull_of_big(hub, big_files, cache) as (commit, args, lease, a):
        with immutable(lease.parent):
            time.sleep(3.5)
        hub.faults.clear()
        _, a_err = a.communicate(timeout=120)
    assert a.returncode == 0, a_err
    assert "Traceback" not in a_err
    assert "lease_lost" in [e["event"] for e in json_lines(a_err)], a_err
    assert_snapshot(cache, "org/big", commit, big_files)


def _kill_midway(args: list[str], env: dict, blobs: Path, want: int) -> None:
    proc = subprocess.Popen(agent_cmd(*args), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _recorded_bytes(blobs) >= want, 60, f"{want} recorded bytes")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def crash_after_last_range(folder: Path) -> int:
    """What a node crash on NFS leaves when every range had landed: the record (flushed on close) says
    the file is complete, the partial's last dirty pages were lost. Returns how many partials were cut."""
    cut = 0
    for sidecar in folder.glob("*.incomplete.json"):
        partial = sidecar.with_name(sidecar.name[: -len(".json")])
        state = json.loads(sidecar.read_text())
        chunk, size = state["chunk"], state["size"]
        state["done"] = [min(chunk, size - i * chunk) for i in range(len(state["done"]))]
        sidecar.write_text(json.dumps(state))
        os.truncate(partial, partial.stat().st_size // 3)
        cut += 1
    return cut


def test_a_partial_shorter_than_its_record_is_fetched_again_sha256(hub, big_files, tmp_path):
    commit = hub.add_repo("org/big", big_files)
    big = largest(big_files)
    hub.faults.add("slow", path_glob=big, rate=8 * MiB, count=1000)
    cache = tmp_path / "cache"
    blobs = cache / "models--org--big" / "blobs"
    args = pull_args(hub, "org/big", cache, "--chunk-size", "16Mi", "--workers", "2", "--lease-ttl", "1s")
    _kill_midway(args, hub_env(hub), blobs, 24 * MiB)
    assert crash_after_last_range(blobs)
    hub.faults.clear()
    r = run_agent(*args, env=hub_env(hub), timeout=60)  # today: spins at 100% CPU, holding the lease
    assert r.returncode == 0, r.stderr
    assert_snapshot(cache, "org/big", commit, big_files)


def open_partials(pid: int) -> int:
    """How many partial files the process holds open right now."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += ".incomplete" in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return count


def test_failed_rounds_do_not_leak_descriptors(hub, big_files, tmp_path):
    """A sync daemon whose model fails every round (the CDN answers 503 for good) must not keep the
    partial files of each failed round open: they grow toward EMFILE over days."""
    hub.add_repo("org/big", big_files)
    hub.faults.add("status", path_glob=largest(big_files), status=503, host="cdn", count=100_000, after_bytes=0)
    cache = tmp_path / "cache"
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - source: org/big\n")
    env = hub_env(hub, MODEL_AGENT_RETRY_BASE_DELAY="0.01", MODEL_AGENT_RETRY_MAX_FAILURES="1",
                  MODEL_AGENT_CHUNK_SIZE="16Mi")
    proc = subprocess.Popen(agent_cmd("sync", "--config", str(models), "--cache-dir", str(cache), "--interval", "1s",
                                      "--log-format", "json"),
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    counts: list[int] = []
    deadline = time.monotonic() + 60
    try:
        for line in proc.stderr:  # between rounds no partial file is being written
            if '"sync_round"' in line:
                counts.append(open_partials(proc.pid))
            if len(counts) >= 5 or time.monotonic() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert len(counts) >= 5, counts
    assert counts == [0] * len(counts), f"partial files left open after each failed round: {counts}"


def test_a_sparse_partial_does_not_hide_a_full_disk(hub, big_files, tmp_path):
    """A partial extended by a write far into the file is sparse: its size says 96 MiB, the disk holds
    almost nothing of it. The space check must see that before the first byte, not hit ENOSPC later."""
    hub.add_repo("org/big", big_files)
    big = largest(big_files)
    size = big_files[big].stat().st_size
    with tmpfs(tmp_path / "vol", "size=64m") as volume:  # a disk that is really almost full
        cache = volume / "cache"
        blobs = cache / "models--org--big" / "blobs"
        blobs.mkdir(parents=True)
        etag = hashlib.sha256(big_files[big].read_bytes()).hexdigest()  # the Hub's LFS oid: the blob's name
        with open(blobs / f"{etag}.ma-1-deadbeef.incomplete", "wb") as sparse:
            sparse.truncate(size)
        r = run_agent(*pull_args(hub, "org/big", cache, "--chunk-size", "16Mi", "--disk-margin", "1Mi"),
                      env=hub_env(hub), timeout=60)
    assert r.returncode == 6, r.stderr
    assert hub.stats.bytes_sent(big) == 0, "the space check let the transfer start"


def test_a_partial_too_large_to_copy_on_a_full_disk_is_started_over_not_exit_6(hub, tmp_path):
    """Resuming copies a partial, which needs its bytes twice for a moment. On a volume where that does
    not fit but fetching the file again does (a 24+ MiB partial of a 48 MiB file, 64 MiB tmpfs), the
    partial must make way: the pull starts that file over instead of failing for disk space."""
    data = os.urandom(48 * MiB)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(data)
    commit = hub.add_repo("org/tight", {"model.safetensors": tmp_path / "m" / "model.safetensors"})
    hub.faults.add("slow", path_glob="model.safetensors", rate=4 * MiB, count=1000)  # a record every 4 MiB
    with tmpfs(tmp_path / "vol", "size=64m") as volume:
        cache = volume / "cache"
        blobs = cache / "models--org--tight" / "blobs"
        args = pull_args(hub, "org/tight", cache, "--chunk-size", "8Mi", "--workers", "2", "--lease-ttl", "1s",
                         "--disk-margin", "1Mi")
        _kill_midway(args, hub_env(hub), blobs, 24 * MiB)  # copying needs 48 MiB, 64 - 24 are free
        hub.faults.clear()
        r = run_agent(*args, env=hub_env(hub), timeout=60)
        assert r.returncode == 0, r.stderr
        assert "partials_dropped" in [e["event"] for e in json_lines(r.stderr)], r.stderr
        assert_snapshot(cache, "org/tight", commit, {"model.safetensors": tmp_path / "m" / "model.safetensors"})
