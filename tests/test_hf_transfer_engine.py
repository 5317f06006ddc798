"""--engine hf_transfer through the real CLI: it runs in a child process per file, so the agent's own
threads (lease heartbeat, health endpoints, signal handling, an embedded Hub) keep running, and its
failures are retried like the http engine's."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request

import pytest
from conftest import ROOT, agent_cmd, hub_env, pull_args, run_agent
from test_metrics import free_port
from test_pull import assert_snapshot, json_lines

pytest.importorskip("hf_transfer")

MiB = 2**20
FAST_RETRY = {"MODEL_AGENT_RETRY_BASE_DELAY": "0.05", "MODEL_AGENT_RETRY_MAX_FAILURES": "6"}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """32 MiB: four of hf_transfer's 8 MiB chunks, all in flight at once."""
    from agent.devhub import make_model

    return make_model(tmp_path_factory.mktemp("shard"), large_files=1, large_size=32 * MiB, small_files=2)


def start_pull(hub, cache, *more, **env):
    args = pull_args(hub, "org/m", cache, "--engine", "hf_transfer", *more)
    return subprocess.Popen(agent_cmd(*args), env=hub_env(hub, **env), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_bytes(hub, path, at_least, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while hub.stats.bytes_sent(path) < at_least:
        if proc.poll() is not None:
            pytest.fail(f"the pull ended first (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "the pull never started its file"
        time.sleep(0.05)


def test_healthz_answers_within_a_second_throughout_a_pull(hub, shard, tmp_path):
    commit = hub.add_repo("org/m", shard)
    hub.faults.add("slow", path_glob="model.safetensors", rate=2 * MiB, count=1000)  # 4 chunks x 2 MiB/s: ~4 s
    port = free_port()
    proc = start_pull(hub, tmp_path / "c", "--metrics-port", str(port))
    try:
        wait_for_bytes(hub, "model.safetensors", 1, proc)
        slowest, answered = 0.0, 0
        while hub.stats.bytes_sent("model.safetensors") < 30 * MiB and proc.poll() is None:
            began = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                assert resp.status == 200
            slowest, answered = max(slowest, time.monotonic() - began), answered + 1
            time.sleep(0.2)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert answered >= 5 and slowest < 1.0, (answered, slowest)
    summary = next(e for e in json_lines(err) if e["event"] == "summary")
    assert summary["bytes_fetched"] == summary["bytes"], summary  # hf_transfer's progress, byte-exact
    assert_snapshot(tmp_path / "c", "org/m", commit, shard)


def test_demo_completes_with_hf_transfer(tmp_path):
    r = run_agent("demo", "--engine", "hf_transfer", "--cache-dir", str(tmp_path / "c"), "--log-format", "json",
                  timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Snapshot ready" in r.stdout


def test_connection_resets_past_hf_transfers_own_retries_are_retried(hub, shard, tmp_path):
    commit = hub.add_repo("org/m", shard)
    # More resets than hf_transfer absorbs on its own (4 retries per chunk): it gives up, we retry.
    fault = hub.faults.add("reset", path_glob="model.safetensors", after_bytes=100, host="cdn", count=30)
    proc = start_pull(hub, tmp_path / "c", **FAST_RETRY)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert fault.remaining == 0
    assert any(e["event"] == "retry" for e in json_lines(err)), err
    assert_snapshot(tmp_path / "c", "org/m", commit, shard)


def test_an_expired_cdn_url_is_resolved_again(hub, big_files, tmp_path):
    """96 MiB is 12 chunks: the last 4 start once 8 are in, after the first presigned URL expired."""
    big = max(big_files, key=lambda p: big_files[p].stat().st_size)
    commit = hub.add_repo("org/m", big_files)
    hub.cdn_url_ttl = 1
    hub.faults.add("slow", path_glob=big, rate=4 * MiB, count=1000)  # 2 s per chunk
    proc = start_pull(hub, tmp_path / "c", **FAST_RETRY)
    wait_for_bytes(hub, big, 1, proc)
    hub.cdn_url_ttl = 3600  # URLs signed from now on last an hour, as the real Hub's do
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert any(e["event"] == "retry" and "403" in e.get("detail", "") for e in json_lines(err)), err
    assert_snapshot(tmp_path / "c", "org/m", commit, big_files)


def test_a_repo_with_an_empty_file(hub, shard, tmp_path):
    files = {**shard, "pkg/__init__.py": b"", ".gitkeep": b""}
    commit = hub.add_repo("org/m", files)
    proc = start_pull(hub, tmp_path / "c")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    snap = tmp_path / "c" / "models--org--m" / "snapshots" / commit
    assert (snap / "pkg" / "__init__.py").read_bytes() == b""
    assert (snap / ".gitkeep").read_bytes() == b""


def test_sigterm_stops_an_hf_transfer_file_within_two_seconds(hub, shard, tmp_path):
    hub.add_repo("org/m", shard)
    hub.faults.add("slow", path_glob="model.safetensors", rate=MiB // 2, count=1000)
    proc = start_pull(hub, tmp_path / "c")
    try:
        wait_for_bytes(hub, "model.safetensors", MiB, proc)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - began
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert took < 2.5, took
    # and its child is gone with it: nothing more leaves the CDN
    time.sleep(0.5)
    sent = hub.stats.bytes_sent("model.safetensors")
    time.sleep(1.5)
    assert hub.stats.bytes_sent("model.safetensors") == sent


def test_a_live_hf_transfer_writer_keeps_its_lease(hub, shard, tmp_path):
    commit = hub.add_repo("org/m", shard)
    hub.faults.add("slow", path_glob="model.safetensors", rate=MiB, count=4)  # ~8 s
    cache = tmp_path / "c"
    first = start_pull(hub, cache, "--lease-ttl", "4s")
    try:
        wait_for_bytes(hub, "model.safetensors", 1, first)
        second = run_agent(*pull_args(hub, "org/m", cache, "--engine", "hf_transfer", "--lease-ttl", "4s",
                                      "--lock-timeout", "6s"), env=hub_env(hub), timeout=60)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert not any(e["event"] == "lease_takeover" for e in json_lines(second.stderr)), second.stderr
    assert second.returncode == 8, second.stderr
    assert first.returncode == 0, err
    assert_snapshot(cache, "org/m", commit, shard)


def test_a_stalled_hf_transfer_file_is_retried_after_the_stall_timeout(hub, big_files, tmp_path):
    """96 MiB is 12 chunks: the 9th starts once 8 are in, and its connection goes silent."""
    big = max(big_files, key=lambda p: big_files[p].stat().st_size)
    commit = hub.add_repo("org/m", big_files)
    hub.faults.add("slow", path_glob=big, rate=4 * MiB, count=1000)  # 2 s per chunk
    began = time.monotonic()
    proc = start_pull(hub, tmp_path / "c", "--stall-timeout", "2s", **FAST_RETRY)
    wait_for_bytes(hub, big, 4 * MiB, proc)  # the first 8 chunks are under way
    # hf_transfer's client has no read timeout: a silent connection held it for as long as it lasted.
    hub.faults.clear()  # the first live fault is taken: the stall goes ahead of the slow one
    stall = hub.faults.add("stall", path_glob=big, after_bytes=MiB, seconds=60, host="cdn", count=1)
    hub.faults.add("slow", path_glob=big, rate=4 * MiB, count=1000)
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - began
    assert proc.returncode == 0, err
    assert stall.remaining == 0
    assert took < 30, took
    assert any(e["event"] == "retry" and e.get("reason") == "stall" for e in json_lines(err)), err
    assert_snapshot(tmp_path / "c", "org/m", commit, big_files)
