"""huggingface_hub's own cache tools on a cache model-agent filled (issue 14): `hf cache prune` keeps a
snapshot pulled by full commit SHA, and `hf cache ls` / `scan_cache_dir` find nothing to warn about,
after pulls and after model-agent's GC alike.

The real CLIs in subprocesses (`.venv/bin/hf` is huggingface_hub 2.4's) against the project's Hub.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, clean_env, hub_env, pull_args, run_agent
from test_sync import files, write_config

HF = str(Path(sys.executable).with_name("hf"))


def pull(hub, repo: str, cache: Path, *more: str) -> None:
    r = run_agent(*pull_args(hub, repo, cache, *more), env=hub_env(hub))
    assert r.returncode == 0, r.stderr


def hf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HF, *args], env=clean_env(NO_COLOR="1"), cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def scan_warnings(cache: Path) -> list[str]:
    from huggingface_hub import scan_cache_dir

    return [str(w) for w in scan_cache_dir(cache).warnings]


def hf_ls_is_clean(cache: Path) -> None:
    r = hf("cache", "ls", "--revisions", "--show-warnings", "--cache-dir", str(cache))
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "inconsisten" not in out and "ignored" not in out.lower(), out
    assert scan_warnings(cache) == []


def loads_offline(cache: Path, repo: str, commit: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=commit, cache_dir=cache, local_files_only=True))


def test_a_snapshot_pulled_by_commit_survives_hf_cache_prune(hub, tmp_path):
    commit = hub.add_repo("org/pinned", files("p"))
    cache = tmp_path / "cache"
    pull(hub, "org/pinned", cache, "--revision", commit)  # how the documented Job pins
    r = hf("cache", "prune", "-y", "--cache-dir", str(cache))
    assert r.returncode == 0, r.stderr
    for verb, *more in (("wait", "--timeout", "2s", "--poll-interval", "0.2s"), ("verify",)):
        r = run_agent(verb, "org/pinned", "--revision", commit, "--cache-dir", str(cache), *more, env=hub_env(hub))
        assert r.returncode == 0, (verb, r.stderr)
    assert (loads_offline(cache, "org/pinned", commit) / "weights.bin").read_bytes() == files("p")["weights.bin"]
    hf_ls_is_clean(cache)


def test_hf_cache_tools_find_nothing_to_warn_about_after_pulls_and_gc(hub, tmp_path):
    pinned = hub.add_repo("org/pinned", files("p"))
    old_b, old_c = hub.add_repo("org/b", files("b")), hub.add_repo("org/c", files("c"))
    cache = tmp_path / "cache"
    pull(hub, "org/pinned", cache, "--revision", pinned)
    for repo in ("org/b", "org/c"):
        pull(hub, repo, cache)
    pull(hub, "org/b", cache, "--revision", old_b)  # also pinned by a Job
    hub.create_branch("org/b", "refs/pr/1")
    pull(hub, "org/b", cache, "--revision", "refs/pr/1")  # a nested ref, as huggingface_hub writes one
    new_b = hub.commit("org/b", {**files("b"), "config.json": b'{"model": "b", "v": 2}'})
    new_c = hub.commit("org/c", {**files("c"), "config.json": b'{"model": "c", "v": 2}'})
    for repo in ("org/b", "org/c"):
        pull(hub, repo, cache)
    r = run_agent("wait", "org/b", "--cache-dir", str(cache), "--timeout", "2s", env=hub_env(hub))  # writes .used
    assert r.returncode == 0, r.stderr
    hf_ls_is_clean(cache)
    # Plain gc: the superseded commit of org/c goes; org/b's old commit stays, a Job pinned it.
    r = run_agent("gc", "--cache-dir", str(cache), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert f"org/c@{old_c}" in r.stdout and "org/b@" not in r.stdout and "org/pinned" not in r.stdout, r.stdout
    hf_ls_is_clean(cache)
    # A models file that declares neither: both go, and so do the refs naming them (a ref naming a
    # missing commit is what scan_cache_dir calls a corrupted repo, and org/b's folder stays).
    cfg = write_config(tmp_path / "cm", [{"source": "org/b"}, {"source": "org/c"}],
                       {"high_watermark": "1", "low_watermark": "1"})
    r = run_agent("gc", "--config", str(cfg), "--cache-dir", str(cache), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert f"org/pinned@{pinned}" in r.stdout and f"org/b@{old_b}" in r.stdout, r.stdout
    assert not (cache / "models--org--pinned").exists()
    assert sorted(p.name for p in (cache / "models--org--b" / "refs").rglob("*") if p.is_file()) == ["main"]
    hf_ls_is_clean(cache)
    for repo, commit in (("org/b", new_b), ("org/c", new_c)):
        assert loads_offline(cache, repo, commit).is_dir()


def test_a_commit_also_pulled_by_sha_stays_when_its_branch_moves_on(hub, tmp_path):
    old = hub.add_repo("org/m", files("m"))
    cache = tmp_path / "cache"
    pull(hub, "org/m", cache)  # its lockfile says `main`
    pull(hub, "org/m", cache, "--revision", old)  # a Job pinned to it: already there
    new = hub.commit("org/m", {**files("m"), "config.json": b'{"v": 2}'})
    pull(hub, "org/m", cache)
    r = run_agent("gc", "--cache-dir", str(cache), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert "org/m@" not in r.stdout, r.stdout
    for commit in (old, new):
        assert loads_offline(cache, "org/m", commit).is_dir()
    r = hf("cache", "prune", "-y", "--cache-dir", str(cache))
    assert r.returncode == 0, r.stderr
    assert loads_offline(cache, "org/m", old).is_dir()
    r = run_agent("list", "--json", "--cache-dir", str(cache), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    rows = {row["commit"]: row for row in json.loads(r.stdout)["snapshots"]}
    assert rows[new]["revisions"] == ["main"] and rows[old]["revisions"] == [], rows
    hf_ls_is_clean(cache)
