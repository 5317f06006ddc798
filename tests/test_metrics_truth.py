"""Metrics and readiness that tell the truth: one entry per declared model, one info series per
revision, the node as the Pushgateway instance, network bytes apart from resumed ones, one `model`
label per model. The real CLI against the project's Hub server, a local folder and a real Pushgateway."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import ROOT, agent_cmd, clean_env, hub_env, pull_args, run_agent
from test_metrics import free_port, scrape, value
from test_observability import pushgateway
from test_pull import json_lines
from test_resilience import largest
from test_sync import files, ready, wait_for, write_config


def rounds_done(port: int) -> float:
    try:
        text = scrape(port)[1]
    except OSError:
        return 0
    return sum(value(line, "model_agent_sync_rounds_total") for line in text.splitlines()
               if line.startswith("model_agent_sync_rounds_total"))


def sync_daemon(hub, cfg, cache, port: int) -> subprocess.Popen:
    return subprocess.Popen(agent_cmd("sync", "--config", str(cfg), "--interval", "1h", "--cache-dir", str(cache),
                                      "--metrics-port", str(port), "--log-format", "json"),
                            env=hub_env(hub), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def test_readyz_waits_for_every_declared_revision_of_the_same_repo(hub, tmp_path):
    hub.add_repo("org/m", files("m"))
    # The missing tag first: keyed by repo id, `main` succeeding afterwards hid its failure.
    declared = [{"source": "org/m", "revision": "v-missing"}, {"source": "org/m", "revision": "main"}]
    cfg, cache, port = write_config(tmp_path / "cm", declared), tmp_path / "cache", free_port()
    proc = sync_daemon(hub, cfg, cache, port)
    try:
        wait_for(lambda: rounds_done(port) >= 1, what="the first round")
        assert scrape(port, "/readyz")[0] == 503
        text = scrape(port)[1]
        assert value(text, "model_agent_models_declared") == 2
        assert value(text, "model_agent_models_ready") == 1
        assert value(text, 'model_agent_snapshot_ready{model="org/m"}') == 0
    finally:
        stop(proc)
    # Two missing tags: both errors are kept, and the round fails with their code.
    cfg = write_config(tmp_path / "cm", [*declared, {"source": "org/m", "revision": "v-also-missing"}])
    r = run_agent("sync", "--config", str(cfg), "--once", "--cache-dir", str(cache), "--log-format", "json",
                  env=hub_env(hub))
    assert r.returncode == 4, r.stderr  # not found: the first failure's code
    line = [e for e in json_lines(r.stderr) if e["event"] == "sync_round"][-1]
    assert (line["ready"], line["declared"], len(line["failed"])) == (1, 3, 2), line


def test_snapshot_info_keeps_one_series_per_declared_revision(hub, tmp_path):
    commits = [hub.add_repo("org/m", files("m"))]
    cm, cache, port = tmp_path / "cm", tmp_path / "cache", free_port()
    cfg = write_config(cm, [{"source": "org/m"}])
    proc = sync_daemon(hub, cfg, cache, port)
    try:
        for n in range(2, 4):
            wait_for(lambda: ready(cache, "org/m") == commits[-1], what=f"commit {n - 1} ready")
            commits.append(hub.commit("org/m", files(f"m{n}")))
            write_config(cm, [{"source": "org/m"}])  # a ConfigMap edit wakes the loop now
        wait_for(lambda: f'commit="{commits[-1]}"' in scrape(port)[1], what="the last commit in the metrics")
        info = [l for l in scrape(port)[1].splitlines() if l.startswith("model_agent_snapshot_info{")]
        assert info == [f'model_agent_snapshot_info{{commit="{commits[-1]}",model="org/m",revision="main"}} 1.0'], info
    finally:
        stop(proc)


@pytest.mark.skipif(not shutil.which("prometheus-pushgateway"), reason="scripts/install-test-tools.sh installs it")
def test_sync_pushes_under_the_node_name_not_the_pod_name(hub, tmp_path):
    hub.add_repo("org/m", files("m"))
    cfg = write_config(tmp_path / "cm", [{"source": "org/m"}])
    with pushgateway(tmp_path) as port:
        r = run_agent("sync", "--once", "--config", str(cfg), "--cache-dir", str(tmp_path / "c"),
                      "--pushgateway", f"http://127.0.0.1:{port}", env=hub_env(hub, MODEL_AGENT_NODE_NAME="gpu-node-7"))
        assert r.returncode == 0, r.stderr
        pushed = [l for l in scrape(port)[1].splitlines()
                  if l.startswith("model_agent_snapshot_ready{") and 'model="org/m"' in l]
        assert pushed and all('instance="gpu-node-7"' in l for l in pushed), pushed


def test_resumed_bytes_are_not_counted_as_fetched(hub, big_files, tmp_path):
    hub.add_repo("org/big", big_files)
    big = largest(big_files)
    size = big_files[big].stat().st_size
    hub.faults.add("slow", path_glob=big, rate=8 * 2**20, count=1000)
    cache, textfile = tmp_path / "cache", tmp_path / "m.prom"
    args = pull_args(hub, "org/big", cache, "--chunk-size", "16Mi", "--workers", "2", "--lease-ttl", "2s")
    proc = subprocess.Popen(agent_cmd(*args), env=hub_env(hub), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(lambda: hub.stats.bytes_sent(big) >= size * 0.5, what="half of the large file sent")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    hub.faults.clear()
    before = -1
    while before != hub.stats.bytes_sent():  # the server's threads notice the dead sockets
        before = hub.stats.bytes_sent()
        time.sleep(0.3)
    r = run_agent(*args, "--metrics-textfile", str(textfile), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    sent = hub.stats.bytes_sent() - before
    summary = [e for e in json_lines(r.stderr) if e["event"] == "summary"][-1]
    assert sent < size * 0.7, sent  # the pull did resume
    # Before: bytes_fetched was the whole file. The slack: what was in flight when the client died.
    assert abs(summary["bytes_fetched"] - sent) < 2 * 2**20, (summary, sent)
    assert summary["bytes_resumed"] >= size * 0.3, summary
    assert summary["avg_rate_bps"] <= summary["bytes_fetched"] / summary["seconds"] * 1.01  # seconds are rounded
    text = textfile.read_text()
    assert value(text, 'model_agent_bytes_downloaded_total{model="org/big"') == summary["bytes_fetched"]
    assert value(text, 'model_agent_bytes_resumed_total{model="org/big"') == summary["bytes_resumed"]


def test_a_folder_source_has_one_model_label_everywhere(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files("local").items():
        (src / name).write_bytes(data)
    cfg = write_config(tmp_path / "cm", [{"source": f"file://{src}", "repo_id": "acme/local"}])
    textfile = tmp_path / "m.prom"
    r = run_agent("sync", "--once", "--config", str(cfg), "--cache-dir", str(tmp_path / "c"),
                  "--metrics-textfile", str(textfile), env=clean_env())
    assert r.returncode == 0, r.stderr
    text = textfile.read_text()
    labels = set(re.findall(r'model="([^"]*)"', text))
    assert labels == {"acme/local"}, labels
    for name in ("model_agent_phase", "model_agent_bytes_downloaded_total", "model_agent_snapshot_ready",
                 "model_agent_pulls_total"):
        assert f'{name}{{' in text and 'model="acme/local"' in next(l for l in text.splitlines() if l.startswith(name + "{"))
    assert 'source="file"' in text  # the bytes' source is the folder, not the Hub
