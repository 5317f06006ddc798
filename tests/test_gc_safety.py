"""GC never deletes what someone needs, and one model's trouble never stops a round (issue 11, items 5-7, 9).

The real CLI against the project's Hub server; leases are plain files written the way a live or a
dead writer leaves them, their mtimes skewed with os.utime the way an NFS server's clock would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from conftest import ROOT, agent_cmd, hub_env, pull_args, run_agent, tmpfs
from test_sync import files, ready, wait_for, write_config

DAY = 24 * 3600


def repo_dir(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def is_ready_commit(cache: Path, repo: str, commit: str) -> bool:
    marker = repo_dir(cache, repo) / ".model-agent" / f"{commit}.ready"
    snap = repo_dir(cache, repo) / "snapshots" / commit
    return marker.exists() and all((snap / name).read_bytes() for name in ("config.json", "weights.bin"))


def lease_path(cache: Path, repo: str) -> Path:
    return cache / ".locks" / ("models--" + repo.replace("/", "--")) / "model-agent.lease"


def pull(hub, repo: str, cache: Path, *more: str) -> None:
    r = run_agent(*pull_args(hub, repo, cache, *more), env=hub_env(hub))
    assert r.returncode == 0, r.stderr


# -- item 5 ------------------------------------------------------------------------------------------

def test_pull_config_never_deletes_another_teams_snapshot(hub, tmp_path):
    other = hub.add_repo("team/other", files("other"))
    hub.add_repo("org/a", files("a"))
    hub.add_repo("org/c", files("c"))
    cache = tmp_path / "cache"
    pull(hub, "team/other", cache)
    tight = {"high_watermark": "1", "low_watermark": "1"}  # any cache is over this
    cfg = write_config(tmp_path / "cm", [{"source": "org/a"}], tight)
    r = run_agent("pull", "--config", str(cfg), "--cache-dir", str(cache), "--log-format", "json", env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert ready(cache, "org/a") and is_ready_commit(cache, "team/other", other)
    # A pull that does not fit is exit 6: it does not make room by deleting others' snapshots.
    cfg = write_config(tmp_path / "cm", [{"source": "org/c"}], tight)
    r = run_agent("pull", "--config", str(cfg), "--cache-dir", str(cache), "--log-format", "json",
                  env=hub_env(hub, MODEL_AGENT_DISK_MARGIN="1000Ti"))
    assert r.returncode == 6, r.stderr
    assert is_ready_commit(cache, "team/other", other) and ready(cache, "org/a")


# -- item 6 ------------------------------------------------------------------------------------------

def test_plain_gc_keeps_snapshots_pulled_by_commit_and_removes_superseded_ones(hub, tmp_path):
    pinned = hub.add_repo("org/pinned", files("p"))
    old_b = hub.add_repo("org/b", files("b"))
    cache = tmp_path / "cache"
    pull(hub, "org/pinned", cache, "--revision", pinned)  # how the documented Job pins
    pull(hub, "org/b", cache)
    new_b = hub.commit("org/b", {**files("b"), "config.json": b'{"model": "b", "v": 2}'})
    pull(hub, "org/b", cache)
    r = run_agent("gc", "--cache-dir", str(cache), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert is_ready_commit(cache, "org/pinned", pinned), r.stdout
    assert is_ready_commit(cache, "org/b", new_b)
    assert not (repo_dir(cache, "org/b") / "snapshots" / old_b).exists(), r.stdout
    assert f"org/b@{old_b}" in r.stdout and "superseded" in r.stdout and "org/pinned" not in r.stdout


# -- item 7 ------------------------------------------------------------------------------------------

class LiveWriter:
    """A writer's lease whose heartbeat changes every 0.1 s, its mtime stamped by a clock a day behind
    (an NFS server whose clock is off: the content is what says it is alive)."""

    def __init__(self, path: Path, skew: float):
        self.path, self.skew = path, skew
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        beat = 0
        while not self.stop.is_set():
            beat += 1
            tmp = self.path.with_name(f".lease.{beat}.tmp")
            tmp.write_text(json.dumps({"host": "node-7", "pid": 4242, "id": "live", "heartbeat": beat, "ttl_seconds": 1}))
            os.replace(tmp, self.path)
            stamp = time.time() + self.skew
            os.utime(self.path, (stamp, stamp))
            self.stop.wait(0.1)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_gc_leaves_a_live_writer_alone_whatever_its_lease_mtime_says(hub, tmp_path):
    a = hub.add_repo("org/a", files("a"))
    hub.add_repo("org/x", files("x"))
    cache = tmp_path / "cache"
    pull(hub, "org/a", cache)
    blobs_before = sorted(p.name for p in (repo_dir(cache, "org/a") / "blobs").iterdir())
    empty = write_config(tmp_path / "cm", [{"source": "org/x"}])
    for skew in (-DAY, +DAY):
        with LiveWriter(lease_path(cache, "org/a"), skew):
            time.sleep(0.3)
            r = run_agent("gc", "--max-bytes", "1", "--lease-ttl", "1s", "--cache-dir", str(cache), "--config", str(empty),
                          env=hub_env(hub))
            assert r.returncode == 0, r.stderr
            assert lease_path(cache, "org/a").exists(), f"skew {skew}: the writer's lease was removed"
        assert is_ready_commit(cache, "org/a", a), f"skew {skew}: {r.stdout}"
        assert sorted(p.name for p in (repo_dir(cache, "org/a") / "blobs").iterdir()) == blobs_before
        assert "org/a" not in r.stdout and "writer lease held by node-7/4242" in r.stderr, r.stderr


def test_sync_reclaims_a_dead_lease_on_its_own_clock_even_with_a_future_mtime(hub, tmp_path):
    hub.add_repo("org/a", files("a"))
    hub.add_repo("org/x", files("x"))
    cache = tmp_path / "cache"
    pull(hub, "org/a", cache)
    dead = lease_path(cache, "org/a")
    dead.write_text(json.dumps({"host": "gone", "pid": 1, "id": "dead", "heartbeat": 3, "ttl_seconds": 1}))
    os.utime(dead, (time.time() + DAY, time.time() + DAY))
    cfg = write_config(tmp_path / "cm", [{"source": "org/x"}], {"high_watermark": "1", "low_watermark": "1"})
    proc = subprocess.Popen(agent_cmd("sync", "--config", str(cfg), "--interval", "0.3s", "--lease-ttl", "1s",
                                      "--cache-dir", str(cache), "--log-format", "json"),
                            env=hub_env(hub), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: not (repo_dir(cache, "org/a") / "snapshots").exists(), timeout=30, what="the dead writer's model to go")
        assert ready(cache, "org/x")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]


def test_lru_follows_recorded_use_not_atime(hub, tmp_path):
    b = hub.add_repo("org/b", files("b"))
    a = hub.add_repo("org/a", files("a"))
    hub.add_repo("org/x", files("x"))
    cache = tmp_path / "cache"
    pull(hub, "org/b", cache)
    time.sleep(0.05)
    pull(hub, "org/a", cache)  # a became ready after b
    time.sleep(0.05)
    r = run_agent("wait", "org/b", "--cache-dir", str(cache), "--timeout", "5s", env=hub_env(hub))  # b is in use
    assert r.returncode == 0, r.stderr
    # atimes say the opposite: a's blobs were just read (a verify, a re-hash), b's never.
    for blob in (repo_dir(cache, "org/a") / "blobs").iterdir():
        os.utime(blob, (time.time() + 3600, blob.stat().st_mtime))
    for blob in (repo_dir(cache, "org/b") / "blobs").iterdir():
        os.utime(blob, (0, blob.stat().st_mtime))
    empty = write_config(tmp_path / "cm", [{"source": "org/x"}])
    size_a = sum(p.stat().st_size for p in (repo_dir(cache, "org/a") / "blobs").iterdir())
    size_b = sum(p.stat().st_size for p in (repo_dir(cache, "org/b") / "blobs").iterdir())
    budget = str(max(size_a, size_b) + 1000)  # room for one of the two
    r = run_agent("gc", "--max-bytes", budget, "--cache-dir", str(cache), "--config", str(empty), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert is_ready_commit(cache, "org/b", b), r.stdout
    assert not (repo_dir(cache, "org/a") / "snapshots" / a).exists(), r.stdout


# -- item 9 ------------------------------------------------------------------------------------------

def test_an_oserror_in_one_model_does_not_stop_the_round(hub, tmp_path):
    hub.add_repo("org/a", files("a"))
    b = hub.add_repo("org/b", files("b"))
    cfg = write_config(tmp_path / "cm", [{"source": "org/a"}, {"source": "org/b"}])
    for command in (["sync", "--once"], ["pull"]):
        cache = tmp_path / command[0]
        cache.mkdir()
        repo_dir(cache, "org/a").write_text("not a folder")  # whatever is in the way: an OSError for org/a only
        r = run_agent(*command, "--config", str(cfg), "--cache-dir", str(cache), "--log-format", "json", env=hub_env(hub))
        assert r.returncode == 1, (command, r.stderr)
        assert ready(cache, "org/b") == b, (command, r.stderr)
        events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
        assert any(e["level"] == "error" and "org/a" in e.get("msg", "") for e in events), r.stderr
        assert "Traceback" not in r.stderr


def test_the_sync_daemon_survives_an_oserror(hub, tmp_path):
    hub.add_repo("org/a", files("a"))
    b = hub.add_repo("org/b", files("b"))
    cache = tmp_path / "cache"
    cache.mkdir()
    repo_dir(cache, "org/a").write_text("not a folder")
    cfg = write_config(tmp_path / "cm", [{"source": "org/a"}, {"source": "org/b"}])
    proc = subprocess.Popen(agent_cmd("sync", "--config", str(cfg), "--interval", "0.3s", "--cache-dir", str(cache),
                                      "--log-format", "json"),
                            env=hub_env(hub), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: ready(cache, "org/b") == b, what="org/b")
        time.sleep(1.5)  # several more rounds, each failing org/a
        assert proc.poll() is None, proc.stderr.read()[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_a_cache_dir_that_does_not_exist_yet_is_created(hub, tmp_path):
    a = hub.add_repo("org/a", files("a"))
    for command in (["sync", "--once"], ["pull"]):
        cache = tmp_path / command[0] / "not" / "yet"
        # The first round's only model fails before writing anything: its own exit code, not 1.
        missing = write_config(tmp_path / "cm-missing", [{"source": "org/missing"}])
        r = run_agent(*command, "--config", str(missing), "--cache-dir", str(cache), "--log-format", "json", env=hub_env(hub))
        assert r.returncode == 4, (command, r.stderr)
        cache = tmp_path / command[0] / "fresh"
        cfg = write_config(tmp_path / "cm", [{"source": "org/a"}])
        r = run_agent(*command, "--config", str(cfg), "--cache-dir", str(cache), "--log-format", "json", env=hub_env(hub))
        assert r.returncode == 0, (command, r.stderr)
        assert ready(cache, "org/a") == a
    r = run_agent("gc", "--config", str(cfg), "--cache-dir", str(tmp_path / "nothing"), env=hub_env(hub))
    assert r.returncode == 0, r.stderr


def test_a_model_on_a_read_only_volume_is_exit_2_and_the_next_is_pulled(hub, tmp_path):
    """EROFS is a mount to fix, not something a retry cures: exit 2 for that model, and the round goes on."""
    hub.add_repo("org/a", files("a"))
    b = hub.add_repo("org/b", files("b"))
    cache = tmp_path / "cache"
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        cfg = write_config(tmp_path / "cm", [{"source": "org/a", "local_dir": str(ro / "a")}, {"source": "org/b"}])
        r = run_agent("pull", "--config", str(cfg), "--cache-dir", str(cache), "--log-format", "json", env=hub_env(hub))
    assert r.returncode == 2, r.stderr
    assert ready(cache, "org/b") == b, r.stderr
    assert "Traceback" not in r.stderr and "Read-only file system" in r.stderr
