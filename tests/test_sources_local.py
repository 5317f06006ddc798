"""A mounted directory as the source: /abs/path and file:///abs/path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from objstore.helpers import agent, assert_hf_snapshot, assert_local_dir, content_id, env_for, events, hf_loads_offline, summary

MiB = 2**20


def make_tree(root, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_local_path_into_both_layouts_and_noop(tmp_path):
    files = {"config.json": b"{}", "model.safetensors": os.urandom(9 * MiB), "tok/a.txt": b"a"}
    src = tmp_path / "nfs" / "model"
    make_tree(src, files)
    cache, env = tmp_path / "cache", env_for({})
    r = agent("pull", f"file://{src}", "--repo-id", "acme/local", "--cache-dir", str(cache), "--chunk-size", "4Mi", env=env)
    assert r.returncode == 0, r.stderr
    want = content_id([(rel, len(d), str((src / rel).stat().st_mtime_ns)) for rel, d in files.items()])
    assert summary(r.stderr)["commit"] == want
    assert_hf_snapshot(cache, "acme/local", want, files)
    assert hf_loads_offline(cache, "acme/local").endswith(want)
    r = agent("pull", str(src), "--repo-id", "acme/local", "--cache-dir", str(cache), env=env)
    assert r.returncode == 0 and summary(r.stderr)["already_ready"] is True, r.stderr

    dest = tmp_path / "flat"
    r = agent("pull", str(src), "--local-dir", str(dest), env=env)
    assert r.returncode == 0, r.stderr
    assert_local_dir(dest, files, want)
    # A local dir made by model-agent is itself a valid source: its records are not copied.
    again = tmp_path / "again"
    r = agent("pull", str(dest), "--local-dir", str(again), env=env)
    assert r.returncode == 0, r.stderr
    assert_local_dir(again, files, summary(r.stderr)["commit"])  # its own mtimes: another content id


def test_symlinks_out_of_the_tree_and_lost_found_are_skipped(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside")
    (tmp_path / "outside-dir").mkdir()
    (tmp_path / "outside-dir" / "x").write_bytes(b"outside too")
    src = tmp_path / "vol"
    make_tree(src, {"config.json": b"{}", "weights/w.bin": b"w" * 100, "lost+found/#1234": b"orphan"})
    os.symlink(secret, src / "leak.txt")
    os.symlink("../outside-dir", src / "leakdir")
    os.symlink("weights/w.bin", src / "alias.bin")  # inside the tree: followed
    os.symlink("nowhere", src / "dangling")
    dest = tmp_path / "dest"
    r = agent("pull", str(src), "--local-dir", str(dest), env=env_for({}))
    assert r.returncode == 0, r.stderr
    assert_local_dir(dest, {"config.json": b"{}", "weights/w.bin": b"w" * 100, "alias.bin": b"w" * 100}, summary(r.stderr)["commit"])
    skipped = {e.get("path") for e in events(r.stderr) if e.get("event") == "source_skipped"}
    assert {"leak.txt", "leakdir", "lost+found", "dangling"} <= skipped


def test_an_hf_snapshot_folder_is_a_source_its_links_stay_in_the_repo(tmp_path):
    files = {"config.json": b'{"x": 1}', "model.safetensors": os.urandom(MiB)}
    src = tmp_path / "first"
    make_tree(src, files)
    cache = tmp_path / "cache"
    r = agent("pull", str(src), "--repo-id", "acme/snap", "--cache-dir", str(cache), env=env_for({}))
    assert r.returncode == 0, r.stderr
    snap = cache / "models--acme--snap" / "snapshots" / summary(r.stderr)["commit"]
    dest = tmp_path / "copy"
    r = agent("pull", str(snap), "--local-dir", str(dest), env=env_for({}))
    assert r.returncode == 0, r.stderr
    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file() and ".model-agent" not in p.parts}
    assert got == files


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to run the agent as another user")
def test_unreadable_folders_are_skipped_and_logged(tmp_path):
    base = tmp_path / "shared"
    base.mkdir()
    os.chmod(tmp_path, 0o755)
    src = base / "vol"
    make_tree(src, {"config.json": b"{}", "private/key.bin": b"k"})
    os.chmod(src / "private", 0o700)  # owned by root: the agent below runs as nobody
    dest = base / "dest"
    dest.mkdir()
    for p in (base, src, src / "config.json", dest):
        os.chmod(p, 0o777 if p.is_dir() else 0o644)
    os.chmod(tmp_path.parent, 0o755)
    os.chmod(tmp_path.parent.parent, 0o755)
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "agent", "pull", str(src),
           "--local-dir", str(dest), "--log-format", "json"]
    r = subprocess.run(cmd, env=env_for({"HOME": str(base)}), capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if r.returncode != 0 and "Permission denied" in r.stderr and "agent" not in r.stderr:
        pytest.skip("the venv is not readable by nobody here")
    assert r.returncode == 0, r.stderr
    assert (dest / "config.json").read_bytes() == b"{}" and not (dest / "private").exists()
    assert any(e.get("event") == "source_skipped" and e.get("path") == "private/" for e in events(r.stderr))


def test_errors(tmp_path):
    env = env_for({})
    r = agent("pull", str(tmp_path / "missing"), "--local-dir", str(tmp_path / "d"), env=env)
    assert r.returncode == 4, r.stderr
    (tmp_path / "empty").mkdir()
    r = agent("pull", str(tmp_path / "empty"), "--local-dir", str(tmp_path / "d"), env=env)
    assert r.returncode == 4 and "no objects" in r.stderr, r.stderr
    r = agent("pull", "file://otherhost/x", "--local-dir", str(tmp_path / "d"), env=env)
    assert r.returncode == 2, r.stderr
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_bytes(b"a")
    r = agent("pull", str(tmp_path / "src"), "--cache-dir", str(tmp_path / "c"), env=env)
    assert r.returncode == 2 and "--repo-id" in r.stderr, r.stderr
