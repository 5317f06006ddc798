"""Sync mode, list and gc: the real CLI against the project's Hub server, config swapped like a ConfigMap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import ROOT, agent_cmd, hub_env, run_agent
from test_metrics import free_port, scrape
from test_pull import json_lines

SMALL = {"config.json": b'{"v": 1}', "weights.bin": b"W" * 300_000, "shared.bin": b"S" * 200_000}


def files(tag: str) -> dict[str, bytes]:
    return {"config.json": f'{{"model": "{tag}"}}'.encode(), "weights.bin": tag.encode() * 50_000,
            "shared.bin": b"S" * 200_000}


def write_config(dirpath: Path, models: list[dict], gc: dict | None = None, name: str = "models.yaml") -> Path:
    """Write the models file the way the kubelet updates a ConfigMap: new folder, then a symlink swap."""
    import yaml

    dirpath.mkdir(parents=True, exist_ok=True)
    version = dirpath / f"..{time.time_ns()}"
    version.mkdir()
    (version / name).write_text(yaml.safe_dump({"models": models, **({"gc": gc} if gc else {})}))
    tmp = dirpath / "..data_tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version.name)
    os.replace(tmp, dirpath / "..data")
    link = dirpath / name
    if not link.is_symlink():
        link.symlink_to(f"..data/{name}")
    return link


def ready(cache: Path, repo: str) -> str | None:
    root = cache / ("models--" + repo.replace("/", "--"))
    try:
        commit = (root / "refs" / "main").read_text()
    except OSError:
        return None
    return commit if (root / ".model-agent" / f"{commit}.ready").exists() else None


def wait_for(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_once_converges_two_models(hub, tmp_path):
    a, b = hub.add_repo("org/a", files("a")), hub.add_repo("org/b", files("b"))
    cfg = write_config(tmp_path / "cm", [{"source": "org/a"}, {"source": "hf://org/b", "include": ["*.json", "*.bin"]}])
    cache = tmp_path / "cache"
    r = run_agent("sync", "--config", str(cfg), "--once", "--cache-dir", str(cache), "--log-format", "json", env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert ready(cache, "org/a") == a and ready(cache, "org/b") == b
    round_line = [e for e in json_lines(r.stderr) if e["event"] == "sync_round"][-1]
    assert round_line["ready"] == 2 and round_line["declared"] == 2


def test_pull_config_pulls_every_model_and_reports_the_first_failure(hub, tmp_path):
    a = hub.add_repo("org/a", files("a"))
    cfg = write_config(tmp_path / "cm", [{"source": "org/missing"}, {"source": "org/a"}])
    r = run_agent("pull", "--config", str(cfg), "--cache-dir", str(tmp_path / "c"), "--log-format", "json", env=hub_env(hub))
    assert r.returncode == 4, r.stderr
    assert ready(tmp_path / "c", "org/a") == a


def test_long_running_sync_follows_configmap_swaps_and_collects_only_over_the_watermark(hub, tmp_path):
    for name in ("a", "b", "c", "p"):
        hub.add_repo(f"org/{name}", files(name))
    cache, cm = tmp_path / "cache", tmp_path / "cm"
    roomy = {"high_watermark": "1Gi", "low_watermark": "1Gi"}
    cfg = write_config(cm, [{"source": "org/a"}, {"source": "org/b"}, {"source": "org/p", "pin": True}], roomy)
    port = free_port()
    proc = subprocess.Popen(agent_cmd("sync", "--config", str(cfg), "--interval", "1h", "--cache-dir", str(cache),
                                      "--metrics-port", str(port), "--log-format", "json"),
                            env=hub_env(hub), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: ready(cache, "org/a") and ready(cache, "org/b") and ready(cache, "org/p"), what="first round")
        wait_for(lambda: scrape(port, "/readyz")[0] == 200, what="readyz")
        old_b, old_p = ready(cache, "org/b"), ready(cache, "org/p")
        # A reader opens a file of b's current snapshot and holds it across the flip.
        reader = open(cache / "models--org--b" / "snapshots" / old_b / "weights.bin", "rb")
        new_b = hub.commit("org/b", {**files("b"), "config.json": b'{"model": "b", "v": 2}'})
        new_p = hub.commit("org/p", {**files("p"), "config.json": b'{"model": "p", "v": 2}'})
        # Swap: add c, drop a. The loop wakes on the change instead of waiting its hour.
        write_config(cm, [{"source": "org/b"}, {"source": "org/c"}, {"source": "org/p", "pin": True}], roomy)
        wait_for(lambda: ready(cache, "org/c") and ready(cache, "org/b") == new_b and ready(cache, "org/p") == new_p,
                 what="second round")
        assert reader.read() == b"b" * 50_000  # old bytes, intact, through the old path
        reader.close()
        # Under the watermark: the dropped model and the superseded commits stay.
        assert (cache / "models--org--a" / "snapshots").is_dir()
        assert (cache / "models--org--b" / "snapshots" / old_b).is_dir()
        # Tighten the budget to what b, c and p (both commits, pinned) take: now a and b's old commit go.
        write_config(cm, [{"source": "org/b"}, {"source": "org/c"}, {"source": "org/p", "pin": True}],
                     {"high_watermark": "700000", "low_watermark": "700000"})
        wait_for(lambda: not (cache / "models--org--a").exists(), what="gc of the dropped model")
        wait_for(lambda: not (cache / "models--org--b" / "snapshots" / old_b).exists(), what="gc of b's old commit")
        assert (cache / "models--org--p" / "snapshots" / old_p).is_dir()  # pinned: survives
        # Blobs shared by the removed commit and the kept one survive.
        for name, data in files("b").items():
            if name != "config.json":
                assert (cache / "models--org--b" / "snapshots" / new_b / name).read_bytes() == data
        _, text = scrape(port)
        assert "model_agent_sync_rounds_total" in text and "model_agent_gc_freed_bytes_total" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert not [p for p in cache.rglob("*") if p.name.endswith((".tmp", ".link"))]
    assert not list((cache / ".locks").rglob("model-agent.lease"))


def test_a_source_failing_every_round_does_not_stop_the_others(hub, tmp_path):
    a = hub.add_repo("org/a", files("a"))
    cfg = write_config(tmp_path / "cm", [{"source": "org/missing"}, {"source": "org/a"}])
    port = free_port()
    proc = subprocess.Popen(agent_cmd("sync", "--config", str(cfg), "--interval", "0.5s", "--cache-dir", str(tmp_path / "c"),
                                      "--metrics-port", str(port), "--log-format", "json"),
                            env=hub_env(hub), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def failed_rounds() -> float:
            try:
                _, text = scrape(port)
            except OSError:
                return 0
            line = next((l for l in text.splitlines() if l.startswith('model_agent_pulls_total{model="org/missing",result="not_found"}')), "")
            return float(line.rsplit(" ", 1)[1]) if line else 0

        wait_for(lambda: failed_rounds() >= 2, what="two failed rounds")
        assert ready(tmp_path / "c", "org/a") == a
        assert scrape(port, "/readyz")[0] == 503  # not every declared snapshot is ready
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_list_and_gc_dry_run(hub, tmp_path):
    hub.add_repo("org/a", files("a"))
    hub.add_repo("org/b", files("b"))
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "cm", [{"source": "org/a"}, {"source": "org/b", "pin": True}])
    assert run_agent("sync", "--config", str(cfg), "--once", "--cache-dir", str(cache), env=hub_env(hub)).returncode == 0
    cfg = write_config(tmp_path / "cm", [{"source": "org/b", "pin": True}])
    r = run_agent("list", "--json", "--cache-dir", str(cache), "--config", str(cfg), env=hub_env(hub))
    listing = {s["repo_id"]: s for s in json.loads(r.stdout)["snapshots"]}
    assert listing["org/a"]["declared"] is False and listing["org/b"]["pinned"] is True
    assert listing["org/a"]["ready"] and listing["org/a"]["revisions"] == ["main"] and listing["org/a"]["size"] > 0
    r = run_agent("gc", "--dry-run", "--max-bytes", "1", "--cache-dir", str(cache), "--config", str(cfg), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert "would remove org/a@" in r.stdout and "not declared" in r.stdout and "org/b" not in r.stdout
    assert (cache / "models--org--a").exists()
    r = run_agent("gc", "--max-bytes", "1", "--cache-dir", str(cache), "--config", str(cfg), env=hub_env(hub))
    assert r.returncode == 0 and not (cache / "models--org--a").exists() and (cache / "models--org--b").exists()


def test_a_pull_that_cannot_fit_after_gc_is_exit_6(hub, tmp_path):
    hub.add_repo("org/a", files("a"))
    cfg = write_config(tmp_path / "cm", [{"source": "org/a"}])
    r = run_agent("sync", "--config", str(cfg), "--once", "--cache-dir", str(tmp_path / "c"), "--log-format", "text",
                  env=hub_env(hub, MODEL_AGENT_DISK_MARGIN="1000Ti"))
    assert r.returncode == 6, r.stderr
    assert "GiB free" in r.stderr and "garbage collection" in r.stderr


def test_gc_leaves_a_model_alone_while_its_writer_lease_is_live(hub, tmp_path):
    hub.add_repo("org/a", files("a"))
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "cm", [{"source": "org/a"}])
    assert run_agent("sync", "--config", str(cfg), "--once", "--cache-dir", str(cache), env=hub_env(hub)).returncode == 0
    empty = write_config(tmp_path / "cm2", [{"source": "org/other"}])
    lease = cache / ".locks" / "models--org--a" / "model-agent.lease"
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_text(json.dumps({"host": "node-1", "pid": 1, "id": "x", "heartbeat": 1}))  # a pull in progress
    r = run_agent("gc", "--dry-run", "--max-bytes", "1", "--cache-dir", str(cache), "--config", str(empty), env=hub_env(hub))
    assert r.returncode == 0 and "org/a" not in r.stdout, r.stdout
    lease.unlink()
    r = run_agent("gc", "--dry-run", "--max-bytes", "1", "--cache-dir", str(cache), "--config", str(empty), env=hub_env(hub))
    assert "would remove org/a@" in r.stdout
