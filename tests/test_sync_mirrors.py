"""A models-file entry can name a published mirror (issue 14): `source: /path/` or `s3://bucket/prefix/`
holding `.model-agent/lock.json`, with no `repo_id`. Sync stores it under the repo id and commit the
lockfile names, and GC keeps it by that identity; while an entry's identity is unknown, GC removes
nothing that could be it.

The real CLI against the project's Hub; the mirror is a folder published the way `push` writes one
(files flat, the lockfile last, written here with agent/published.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import hub_env, pull_args, run_agent
from test_pull import json_lines
from test_sync import files, ready, write_config

TIGHT = {"high_watermark": "1", "low_watermark": "1"}  # any cache is over this: GC runs every round


def publish(folder: Path, content: dict[str, bytes], *, repo_id: str, revision: str, tag: str) -> str:
    """Publish `content` at `folder` as push does; returns the commit the lockfile names."""
    from agent.published import LOCK_NAME, RECORDS, PublishedFile, PublishedLock

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, data in sorted(content.items()):
        (folder / name).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        entries.append(PublishedFile(name, len(data), digest, sha256=digest))
    commit = hashlib.sha1(tag.encode()).hexdigest()
    lock = PublishedLock(repo_id=repo_id, repo_type="model", revision=revision, commit=commit,
                         files=tuple(entries), source=f"hf://{repo_id}")
    (folder / RECORDS).mkdir(exist_ok=True)
    (folder / RECORDS / LOCK_NAME).write_bytes(lock.to_bytes())
    return commit


def repo_dir(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def ready_at(cache: Path, repo: str, commit: str) -> bool:
    root = repo_dir(cache, repo)
    return (root / ".model-agent" / f"{commit}.ready").exists() and (root / "snapshots" / commit).is_dir()


def sync_once(hub, cfg: Path, cache: Path):
    return run_agent("sync", "--config", str(cfg), "--once", "--cache-dir", str(cache), "--log-format", "json",
                     env=hub_env(hub))


def test_sync_fills_the_cache_from_a_published_mirror_under_its_hub_identity(hub, tmp_path):
    mirror = tmp_path / "nfs" / "published"
    content = files("pub")
    commit = publish(mirror, content, repo_id="org/published", revision="v1", tag="pub-1")
    cache = tmp_path / "cache"
    r = sync_once(hub, write_config(tmp_path / "cm", [{"source": str(mirror)}]), cache)
    assert r.returncode == 0, r.stderr
    snap = repo_dir(cache, "org/published") / "snapshots" / commit
    assert ready_at(cache, "org/published", commit), r.stderr
    assert (repo_dir(cache, "org/published") / "refs" / "v1").read_text() == commit
    assert (snap / "weights.bin").read_bytes() == content["weights.bin"]
    # What a consumer pinned to the Hub commit does, and huggingface_hub's own scan: nothing to tell apart.
    from huggingface_hub import scan_cache_dir, snapshot_download

    assert Path(snapshot_download("org/published", revision=commit, cache_dir=cache, local_files_only=True)) == snap
    assert scan_cache_dir(cache).warnings == []


def test_gc_under_pressure_keeps_a_published_mirror_declared_without_repo_id(hub, tmp_path):
    a, old = hub.add_repo("org/a", files("a")), hub.add_repo("org/old", files("old"))
    mirror = tmp_path / "nfs" / "published"
    first = publish(mirror, files("pub"), repo_id="org/published", revision="v1", tag="pub-1")
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(hub, "org/old", cache), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    cfg = write_config(tmp_path / "cm", [{"source": "org/a"}, {"source": str(mirror)}], TIGHT)
    r = sync_once(hub, cfg, cache)
    assert r.returncode == 0, r.stderr
    removed = {(e["model"], e["commit"]) for e in json_lines(r.stderr) if e["event"] == "gc"}
    assert removed == {("org/old", old)}, r.stderr
    assert ready(cache, "org/a") == a and ready_at(cache, "org/published", first)
    # A one-shot `gc --config` asks the mirror who it is, and `list` calls it declared.
    r = run_agent("gc", "--config", str(cfg), "--cache-dir", str(cache), env=hub_env(hub))
    assert r.returncode == 0 and "removed 0 snapshots" in r.stdout, (r.stdout, r.stderr)
    r = run_agent("list", "--json", "--config", str(cfg), "--cache-dir", str(cache), env=hub_env(hub))
    rows = {row["repo_id"]: row for row in json.loads(r.stdout)["snapshots"]}
    assert rows["org/published"]["declared"] is True, rows
    # Published again at another commit: the next round pulls it, and the old one is superseded.
    second = publish(mirror, files("pub2"), repo_id="org/published", revision="v1", tag="pub-2")
    r = sync_once(hub, cfg, cache)
    assert r.returncode == 0, r.stderr
    assert ready_at(cache, "org/published", second) and not ready_at(cache, "org/published", first), r.stderr


def test_an_entry_whose_identity_is_unknown_keeps_gc_from_removing_anything(hub, tmp_path):
    a, old = hub.add_repo("org/a", files("a")), hub.add_repo("org/old", files("old"))
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(hub, "org/old", cache), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    # Not published yet (no lockfile, no repo_id): the pull fails, and nothing says which repo it is.
    unpublished = tmp_path / "nfs" / "not-yet"
    unpublished.mkdir(parents=True)
    (unpublished / "weights.bin").write_bytes(b"x" * 1000)
    cfg = write_config(tmp_path / "cm", [{"source": "org/a"}, {"source": str(unpublished)}], TIGHT)
    r = sync_once(hub, cfg, cache)
    assert r.returncode != 0, r.stderr
    lines = json_lines(r.stderr)
    assert not [e for e in lines if e["event"] == "gc"], r.stderr
    skipped = [e for e in lines if e["event"] == "gc_skipped"]
    assert skipped and skipped[0]["level"] == "warning" and str(unpublished) in skipped[0]["model"], r.stderr
    assert ready(cache, "org/old") == old and ready(cache, "org/a") == a
    # Once it is published, its identity is known and GC goes on: org/old was never it.
    publish(unpublished, files("late"), repo_id="org/late", revision="main", tag="late-1")
    r = sync_once(hub, cfg, cache)
    assert r.returncode == 0, r.stderr
    assert {e["model"] for e in json_lines(r.stderr) if e["event"] == "gc"} == {"org/old"}, r.stderr
