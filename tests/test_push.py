"""`model-agent push` to a path (an NFS export): the order that makes a published prefix trustworthy.

The lockfile goes up last; a push killed mid-upload leaves none (and its re-run uploads only what is
missing); a push of another commit removes the old lockfile before its first byte lands; a prefix
holding another model is refused; a destination that refuses writes is exit 3. Kills land mid-upload
because strace slows each in-kernel copy of the path destination (copy_file_range) by a set delay.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, agent_cmd, hub_env, load_offline, log_events, run_agent

REPO = "org/pushed"
STRACE = shutil.which("strace")


def push(hub, cache: Path, dest: Path, *more: str, repo: str = REPO) -> subprocess.CompletedProcess:
    return run_agent("push", repo, str(dest), "--cache-dir", str(cache), "--log-format", "json", *more,
                     env=hub_env(hub))


def events(r: subprocess.CompletedProcess, name: str) -> list[dict]:
    return log_events(r.stderr, name)


def lock_of(dest: Path) -> dict | None:
    try:
        return json.loads((dest / ".model-agent" / "lock.json").read_text())
    except FileNotFoundError:
        return None


def slow_push(hub, cache: Path, dest: Path, delay_s: float) -> subprocess.Popen:
    """A push whose every 64 MiB copy into DEST waits `delay_s` first (strace fault injection)."""
    cmd = [STRACE, "-f", "-qq", "-o", "/dev/null", "-e", "trace=copy_file_range",
           "-e", f"inject=copy_file_range:delay_enter={int(delay_s * 1e6)}",
           *agent_cmd("push", REPO, str(dest), "--cache-dir", str(cache), "--log-format", "json", "--workers", "1")]
    return subprocess.Popen(cmd, env=hub_env(hub), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def kill_mid_upload(proc: subprocess.Popen, dest: Path, timeout: float = 60) -> None:
    """SIGKILL the push (and strace) once it is writing a file into DEST."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (dest / ".model-agent" / "publishing").exists() and any(dest.rglob("*.ma-push-tmp")):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            return
        if proc.poll() is not None:
            pytest.fail(f"the push ended before it could be killed: {proc.stderr.read().decode()[-800:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the push never started uploading")


def test_push_to_a_path_writes_the_files_flat_and_the_lockfile_last(hub, big_files, tmp_path):
    commit = hub.add_repo(REPO, big_files)
    dest = tmp_path / "nfs" / "pushed"
    r = push(hub, tmp_path / "staging", dest, "--metrics-textfile", str(tmp_path / "push.prom"))
    assert r.returncode == 0, r.stderr[-2000:]
    lock = lock_of(dest)
    assert lock["repo_id"] == REPO and lock["commit"] == commit and lock["revision"] == "main"
    assert sorted(f["path"] for f in lock["files"]) == sorted(big_files)
    for f in lock["files"]:
        assert (dest / f["path"]).read_bytes() == Path(big_files[f["path"]]).read_bytes()
        assert f.get("sha256") or f.get("git_sha1")
    assert not (dest / ".model-agent" / "publishing").exists()
    # The lockfile is the newest thing under DEST: nothing was written after it.
    newest_file = max(p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file() and ".model-agent" not in p.parts)
    assert (dest / ".model-agent" / "lock.json").stat().st_mtime_ns >= newest_file
    summary = events(r, "published")[0]
    assert summary["uploaded_files"] == len(big_files) and summary["skipped_files"] == 0
    prom = (tmp_path / "push.prom").read_text()
    assert f'model_agent_bytes_uploaded_total{{destination="file",model="{REPO}"}}' in prom

    again = push(hub, tmp_path / "staging", dest)
    assert again.returncode == 0, again.stderr[-2000:]
    assert events(again, "published")[0]["already_published"] is True
    assert events(again, "summary")[0]["bytes_fetched"] == 0  # the staging snapshot is reused, never re-downloaded


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_a_killed_push_leaves_no_lockfile_and_its_rerun_uploads_only_what_is_missing(hub, big_files, tmp_path):
    hub.add_repo(REPO, big_files)
    dest, staging = tmp_path / "mirror", tmp_path / "staging"
    proc = slow_push(hub, staging, dest, delay_s=1.0)
    kill_mid_upload(proc, dest)
    assert lock_of(dest) is None
    assert (dest / ".model-agent" / "publishing").exists()  # a pull sees a push under way, never a model
    landed = [p for p in dest.rglob("*") if p.is_file() and ".model-agent" not in p.parts and ".ma-push-" not in p.name]
    r = push(hub, staging, dest)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = events(r, "published")[0]
    assert summary["skipped_files"] == len(landed)  # what the killed push finished is not sent again
    assert summary["uploaded_files"] == len(big_files) - len(landed)
    assert lock_of(dest) is not None and not any(dest.rglob("*.ma-push-tmp*"))


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_publishing_another_commit_removes_the_old_lockfile_before_any_file_changes(hub, big_files, tmp_path):
    hub.add_repo(REPO, big_files)
    dest, staging = tmp_path / "mirror", tmp_path / "staging"
    assert push(hub, staging, dest).returncode == 0
    big = max(big_files, key=lambda p: Path(big_files[p]).stat().st_size)
    changed = dict(big_files)
    changed[big] = tmp_path / "new-weights"
    changed[big].write_bytes(os.urandom(Path(big_files[big]).stat().st_size))
    new_commit = hub.commit(REPO, changed)
    proc = slow_push(hub, staging, dest, delay_s=1.0)
    kill_mid_upload(proc, dest)
    assert lock_of(dest) is None  # the old commit's lockfile went before the new weights began to land
    r = push(hub, staging, dest)
    assert r.returncode == 0, r.stderr[-2000:]
    assert lock_of(dest)["commit"] == new_commit
    assert (dest / big).read_bytes() == changed[big].read_bytes()


def test_a_prefix_holding_another_model_is_refused_unless_overwrite(hub, demo_files, tmp_path):
    hub.add_repo("org/first", demo_files)
    hub.add_repo("org/second", demo_files)
    dest, staging = tmp_path / "mirror", tmp_path / "staging"
    assert push(hub, staging, dest, repo="org/first").returncode == 0
    r = push(hub, staging, dest, repo="org/second")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "org/first" in events(r, "invalid_input")[0]["msg"] and "--overwrite" in r.stderr
    assert lock_of(dest)["repo_id"] == "org/first"
    r = push(hub, staging, dest, "--overwrite", repo="org/second")
    assert r.returncode == 0, r.stderr[-2000:]
    assert lock_of(dest)["repo_id"] == "org/second"


@pytest.mark.skipif(shutil.which("chattr") is None or os.geteuid() != 0, reason="needs root and chattr")
def test_a_destination_that_refuses_writes_is_exit_3(hub, demo_files, tmp_path):
    hub.add_repo(REPO, demo_files)
    dest = tmp_path / "locked"
    dest.mkdir()
    if subprocess.run(["chattr", "+i", str(dest)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable attribute")
    try:
        r = push(hub, tmp_path / "staging", dest)
    finally:
        subprocess.run(["chattr", "-i", str(dest)], check=False)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "permission denied" in r.stderr and str(dest) in r.stderr


def test_a_new_commit_takes_the_old_commits_files_away_but_never_a_strangers(hub, demo_files, tmp_path):
    hub.add_repo(REPO, demo_files)
    dest, staging = tmp_path / "mirror", tmp_path / "staging"
    dest.mkdir()
    (dest / "notes.txt").write_text("someone else's file\n")
    r = push(hub, staging, dest)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (dest / "notes.txt").exists() and events(r, "foreign_files")  # never ours to remove
    renamed = {("weights-renamed.safetensors" if p == "model.safetensors" else p): f for p, f in demo_files.items()}
    hub.commit(REPO, renamed)
    r = push(hub, staging, dest)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (dest / "model.safetensors").exists()  # the old commit's name: gone before the new lockfile
    assert (dest / "weights-renamed.safetensors").exists()
    assert (dest / "notes.txt").exists()


def test_a_pull_of_a_pushed_path_is_loaded_offline_by_a_consumer_pinned_to_the_hub_commit(hub, demo_files, tmp_path):
    commit = hub.add_repo(REPO, demo_files)
    dest = tmp_path / "nfs" / "mirror"
    assert push(hub, tmp_path / "staging", dest).returncode == 0
    node_cache = tmp_path / "node-cache"
    r = run_agent("pull", str(dest), "--cache-dir", str(node_cache), "--log-format", "json")  # no Hub in sight
    assert r.returncode == 0, r.stderr[-2000:]
    assert events(r, "summary")[0]["commit"] == commit
    got = load_offline(node_cache, REPO, commit)
    assert got["model_type"] == "llama" and got["path"].endswith(f"snapshots/{commit}")
