"""A ready marker means the right bytes, durably: `--local-dir` across commits, duplicate paths, `verify`
of Hub files in a local dir, and the fsync of snapshot links and copies before the marker (under strace)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, agent_cmd, hub_env, run_agent

BIG = 24 * 2**20


def commit_files(tag: bytes) -> dict[str, bytes]:
    """Same paths and sizes for every tag, other bytes: only the content tells two commits apart."""
    return {
        "config.json": b'{"tag": "' + tag + b'"}' + b" " * 200,
        "original/params.json": b'{"tag": "' + tag + b'", "dim": 8}' + b" " * 100,
        "big.bin": tag * (BIG // len(tag)),
    }


def local_pull(hub, dest: Path, *more: str) -> list[str]:
    return ["pull", "org/model", "--local-dir", str(dest), "--log-format", "json", *more]


def on_disk(dest: Path, files: dict[str, bytes]) -> dict[str, bool]:
    return {p: (dest / p).read_bytes() == data for p, data in files.items()}


# -- item 3, trigger one -----------------------------------------------------------------------------
def test_killed_pull_of_another_commit_never_leaves_its_bytes_under_a_marker(hub, tmp_path):
    a_files, b_files = commit_files(b"AAAA"), commit_files(b"BBBB")
    commit_a = hub.add_repo("org/model", a_files)
    dest = tmp_path / "flat"
    assert run_agent(*local_pull(hub, dest, "--revision", commit_a), env=hub_env(hub)).returncode == 0

    commit_b = hub.commit("org/model", b_files)
    hub.faults.add("slow", path_glob="big.bin", rate=2 * 2**20, count=1000)
    short_lease = ("--lease-ttl", "2s")  # the killed writer's lease is taken over quickly
    proc = subprocess.Popen(agent_cmd(*local_pull(hub, dest, "--revision", commit_b, *short_lease)), env=hub_env(hub), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not all(on_disk(dest, {p: b_files[p] for p in ("config.json", "original/params.json")}).values()):
        assert time.monotonic() < deadline and proc.poll() is None, "the small files of B never landed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    hub.faults.clear()
    # From the first byte of B on, nothing in the folder vouches for A any more.
    assert not (dest / ".model-agent" / "ready").exists()
    assert not (dest / ".model-agent" / "lock.json").exists()

    sent_before = hub.stats.bytes_sent("big.bin")
    r = run_agent(*local_pull(hub, dest, "--revision", commit_a, *short_lease), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert (dest / ".model-agent" / "ready").read_text().strip() == commit_a
    assert on_disk(dest, a_files) == {p: True for p in a_files}
    # big.bin still held A's bytes: re-hashed, not fetched again.
    assert hub.stats.bytes_sent("big.bin") - sent_before < BIG
    assert run_agent("verify", "org/model", "--local-dir", str(dest), "--revision", commit_a,
                     env=hub_env(hub)).returncode == 0


def test_a_commit_that_does_not_fit_leaves_the_old_one_ready(hub, tmp_path):
    commit_a = hub.add_repo("org/model", commit_files(b"AAAA"))
    dest = tmp_path / "flat"
    assert run_agent(*local_pull(hub, dest, "--revision", commit_a), env=hub_env(hub)).returncode == 0
    commit_b = hub.commit("org/model", commit_files(b"BBBB"))
    r = run_agent(*local_pull(hub, dest, "--revision", commit_b), env=hub_env(hub, MODEL_AGENT_DISK_MARGIN="1000Ti"))
    assert r.returncode == 6, r.stderr
    assert (dest / ".model-agent" / "ready").read_text().strip() == commit_a


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_files_a_new_commit_shares_with_a_ready_local_dir_are_not_rehashed(hub, tmp_path):
    a_files = commit_files(b"AAAA")
    commit_a = hub.add_repo("org/model", a_files)
    dest = tmp_path / "flat"
    assert run_agent(*local_pull(hub, dest, "--revision", commit_a), env=hub_env(hub)).returncode == 0
    b_files = {**a_files, "config.json": commit_files(b"BBBB")["config.json"]}
    commit_b = hub.commit("org/model", b_files)
    out = tmp_path / "strace.txt"
    r = subprocess.run([shutil.which("strace"), "-f", "-qq", "-s", "4096", "-o", str(out), "-e", "trace=open,openat",
                        *agent_cmd(*local_pull(hub, dest, "--revision", commit_b))],
                       env=hub_env(hub), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert on_disk(dest, b_files) == {p: True for p in b_files}
    assert f'"{dest / "big.bin"}"' not in out.read_text(), "big.bin was read again though A's lockfile vouched for it"


# -- item 3, trigger two -----------------------------------------------------------------------------
def test_a_duplicate_path_gets_the_new_commits_bytes(hub, tmp_path):
    old = {"a.json": b'{"x": "one"}', "b.json": b'{"x": "two"}'}
    new = {"a.json": b'{"x": "new"}', "b.json": b'{"x": "new"}'}  # one blob under two names, same size
    commit_old = hub.add_repo("org/model", old)
    dest = tmp_path / "flat"
    assert run_agent(*local_pull(hub, dest, "--revision", commit_old), env=hub_env(hub)).returncode == 0
    commit_new = hub.commit("org/model", new)
    r = run_agent(*local_pull(hub, dest, "--revision", commit_new), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert (dest / ".model-agent" / "ready").read_text().strip() == commit_new
    assert on_disk(dest, new) == {"a.json": True, "b.json": True}
    assert not [p.name for p in dest.iterdir() if p.name.startswith(".") and p.name != ".model-agent"]


# -- item 4 ------------------------------------------------------------------------------------------
def test_verify_of_a_local_dir_checks_the_git_sha1_of_small_hub_files(hub, demo_files, tmp_path):
    hub.add_repo("org/model", demo_files)
    dest = tmp_path / "flat"
    assert run_agent(*local_pull(hub, dest), env=hub_env(hub)).returncode == 0
    assert run_agent("verify", "org/model", "--local-dir", str(dest), env=hub_env(hub)).returncode == 0
    config = dest / "config.json"
    data = bytearray(config.read_bytes())
    data[5] = ord("X") if data[5] != ord("X") else ord("Y")  # same size, other bytes
    config.write_bytes(bytes(data))
    r = run_agent("verify", "org/model", "--local-dir", str(dest), env=hub_env(hub))
    assert r.returncode == 5, r.stderr
    assert "config.json" in r.stderr and "git_sha1" in r.stderr


# -- item 10, second bullet --------------------------------------------------------------------------
STRACE = shutil.which("strace")
PID = r"^(?:\[pid\s+)?(\d+)\]?\s+"
CALL = re.compile(PID + r"(\w+)\((.*?)(?:\)\s+=\s+(-?\d+).*| <unfinished \.\.\.>)$")
RESUMED = re.compile(PID + r"<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(-?\d+)")


def strace_calls(text: str) -> list[tuple[str, list[str]]]:
    """(syscall, paths) of every successful call, in the order they returned. Paths: the fds' with -y
    (fsync), the quoted absolute names otherwise (a symlink's relative target is left out)."""
    calls, pending = [], {}
    for line in text.splitlines():
        if m := CALL.match(line):
            pid, name, args, ret = m.groups()
            if ret is None:
                pending[pid] = args  # another thread ran in between: completed by its "resumed" line
                continue
        elif m := RESUMED.match(line):
            pid, name, rest, ret = m.groups()
            args = pending.pop(pid, "") + rest
        else:
            continue
        if ret == "0":
            pattern = r"<(/[^>]*)>" if name in ("fsync", "fdatasync") else r'"(/[^"]*)"'
            calls.append((name, re.findall(pattern, args)))
    return calls


def traced_pull(hub, tmp_path: Path, *args: str) -> list[tuple[str, list[str]]]:
    """Run the CLI under strace and return its file-system calls that matter for durability."""
    out = tmp_path / "strace.txt"
    cmd = [STRACE, "-f", "-qq", "-y", "-s", "4096", "-o", str(out),
           "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,symlink,symlinkat", *agent_cmd(*args)]
    r = subprocess.run(cmd, env=hub_env(hub), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return strace_calls(out.read_text())


def assert_folders_synced_before_marker(calls, folders: set[Path], marker: Path) -> None:
    renames = [(i, Path(p[-1])) for i, (name, p) in enumerate(calls) if name.startswith("rename") and p]
    marked = next(i for i, dst in renames if dst == marker)
    for folder in folders:
        last_entry = max(i for i, dst in renames if dst.parent == folder)
        synced = [i for i, (name, p) in enumerate(calls) if name == "fsync" and p and Path(p[0]) == folder]
        assert any(last_entry < i < marked for i in synced), \
            f"{folder}: no fsync between its last entry (call {last_entry}) and the ready marker (call {marked})"


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_snapshot_links_are_fsynced_before_the_marker(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/model", demo_files)
    cache = tmp_path / "cache"
    calls = traced_pull(hub, tmp_path, "pull", "org/model", "--cache-dir", str(cache), "--log-format", "json")
    root = cache / "models--org--model"
    snap = root / "snapshots" / commit
    folders = {snap, snap / "original"}
    assert folders == {(snap / p).parent for p in demo_files}
    assert_folders_synced_before_marker(calls, folders, root / ".model-agent" / f"{commit}.ready")


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_duplicate_copies_are_fsynced_before_the_marker(hub, tmp_path):
    same = b'{"shared": true}'
    hub.add_repo("org/model", {"a.json": same, "sub/b.json": same, "sub/deeper/c.json": same})
    dest = tmp_path / "flat"
    calls = traced_pull(hub, tmp_path, *local_pull(hub, dest))
    copies = [(i, Path(p[0]), Path(p[-1])) for i, (name, p) in enumerate(calls)
              if name.startswith("rename") and len(p) == 2 and Path(p[-1]).name in ("b.json", "c.json")]
    assert {dst for _, _, dst in copies} == {dest / "sub" / "b.json", dest / "sub" / "deeper" / "c.json"}
    for i, tmp, dst in copies:
        assert any(name == "fsync" and p and Path(p[0]) == tmp for name, p in calls[:i]), f"{dst}: copy not fsynced"
    assert_folders_synced_before_marker(calls, {dest / "sub", dest / "sub" / "deeper"}, dest / ".model-agent" / "ready")
