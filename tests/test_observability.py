"""Observability against real tools: promtool, a real Prometheus scraping the agent, a real
Pushgateway receiving its pushes, JSON logs line by line, a terminal progress bar, and no secret
anywhere in what a pull prints or writes."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, TOKEN, agent_cmd, hub_env, pull_args, run_agent
from test_metrics import free_port, scrape
from test_pull import json_lines
from test_resilience import largest

needs = pytest.mark.skipif(
    not (shutil.which("promtool") and shutil.which("prometheus") and shutil.which("prometheus-pushgateway")),
    reason="scripts/install-test-tools.sh installs prometheus and prometheus-pushgateway",
)


@contextmanager
def pushgateway(tmp_path: Path):
    """A real Pushgateway on 127.0.0.1; yields its port."""
    port = free_port()
    # Debian's build persists groups to /var/lib by default: a run would see the groups of runs before it.
    gw = subprocess.Popen(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}",
                           f"--persistence.file={tmp_path / 'pushgateway.data'}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready")
        yield port
    finally:
        gw.terminate()
        gw.wait(timeout=10)


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@needs
def test_metrics_pass_promtool(hub, demo_files, tmp_path):
    hub.add_repo("org/model", demo_files)
    textfile = tmp_path / "m.prom"
    r = run_agent(*pull_args(hub, "org/model", tmp_path / "c", "--metrics-textfile", str(textfile)), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    check = subprocess.run(["promtool", "check", "metrics"], input=textfile.read_text(), capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    names = {line.split("{")[0].split(" ")[0] for line in textfile.read_text().splitlines() if line and line[0] != "#"}
    for name in ("model_agent_bytes_expected", "model_agent_bytes_downloaded_total", "model_agent_files_expected",
                 "model_agent_files_completed_total", "model_agent_pulls_total", "model_agent_snapshot_ready",
                 "model_agent_snapshot_info", "model_agent_phase", "model_agent_pull_duration_seconds_bucket"):
        assert name in names, name


@needs
def test_a_real_prometheus_scrapes_the_agent(hub, big_files, tmp_path):
    hub.add_repo("org/big", big_files)
    hub.faults.add("slow", path_glob=largest(big_files), rate=6 * 2**20, count=1000)
    agent_port, prom_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: model-agent\n    static_configs: [{{targets: ['127.0.0.1:{agent_port}']}}]\n"
    )
    prom = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    agent = subprocess.Popen(agent_cmd(*pull_args(hub, "org/big", tmp_path / "c", "--metrics-port", str(agent_port))),
                             env=hub_env(hub), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{prom_port}/-/ready")
        query = urllib.parse.quote('model_agent_bytes_downloaded_total{model="org/big"}')
        value = 0.0
        deadline = time.monotonic() + 40
        while value <= 0 and time.monotonic() < deadline and agent.poll() is None:
            with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/query?query={query}", timeout=5) as resp:
                result = json.loads(resp.read())["data"]["result"]
            value = float(result[0]["value"][1]) if result else 0.0
            time.sleep(0.5)
        assert value > 0, "Prometheus never saw the bytes counter"
    finally:
        agent.kill()
        prom.terminate()
        prom.wait(timeout=10)


@needs
def test_a_real_pushgateway_receives_the_metrics(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/model", demo_files)
    with pushgateway(tmp_path) as port:
        r = run_agent(*pull_args(hub, "org/model", tmp_path / "c", "--pushgateway", f"http://127.0.0.1:{port}"),
                      env=hub_env(hub))
        assert r.returncode == 0, r.stderr
        _, text = scrape(port)
    ready = [l for l in text.splitlines() if l.startswith("model_agent_snapshot_ready{")]
    assert ready and 'job="model-agent"' in ready[0] and 'model="org/model"' in ready[0] and ready[0].endswith(" 1")
    assert f'commit="{commit}"' in text


def test_json_logs_have_start_progress_retries_and_summary(hub, big_files, tmp_path):
    commit = hub.add_repo("org/big", big_files)
    hub.faults.add("slow", path_glob=largest(big_files), rate=24 * 2**20, count=1000)
    hub.faults.add("status", status=503, path_glob=largest(big_files), host="cdn", count=1)
    r = run_agent(*pull_args(hub, "org/big", tmp_path / "c", "--progress-interval", "0.5s"),
                  env=hub_env(hub, MODEL_AGENT_RETRY_BASE_DELAY="0.05"))
    assert r.returncode == 0, r.stderr
    events = json_lines(r.stderr)  # every line parses
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" or "start" in kinds
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) >= 2
    assert {"bytes", "total", "percent", "rate_bps", "eta_s", "phase"} <= set(progress[-1])
    retry = next(e for e in events if e["event"] == "retry")
    assert retry["reason"] == "http_503"
    summary = events[-1]
    assert summary["event"] == "summary" and summary["commit"] == commit
    assert {"files", "bytes", "seconds", "engine", "avg_rate_bps"} <= set(summary)


def test_a_terminal_gets_a_progress_bar(hub, big_files, tmp_path):
    hub.add_repo("org/big", big_files)
    hub.faults.add("slow", path_glob=largest(big_files), rate=48 * 2**20, count=1000)
    master, slave = pty.openpty()
    proc = subprocess.Popen(agent_cmd("pull", "org/big", "--cache-dir", str(tmp_path / "c")), env=hub_env(hub, COLUMNS="120"),
                            cwd=ROOT, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "org/big" in text and "MiB" in text and "files" in text and "━" in text
    assert not text.lstrip().startswith("{")  # a person gets text, not JSON


def test_no_secret_in_any_output_stream_or_file(hub, demo_files, tmp_path):
    hub.add_repo("org/private", demo_files, private=True)
    secrets = {
        "token": TOKEN,
        "aws": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "sas": "sv=2024-11-04&ss=b&srt=co&sp=rl&se=2030-01-01T00:00:00Z&sig=c2VjcmV0c2lnbmF0dXJlZm9ydGVzdHM%3D",
    }
    env = hub_env(hub, HF_TOKEN=TOKEN, AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY=secrets["aws"],
                  AZURE_STORAGE_SAS_TOKEN=secrets["sas"], MODEL_AGENT_RETRY_BASE_DELAY="0.01",
                  MODEL_AGENT_RETRY_MAX_FAILURES="2")
    textfile = tmp_path / "m.prom"
    outputs = []
    r = run_agent(*pull_args(hub, "org/private", tmp_path / "c", "--metrics-textfile", str(textfile)), env=env)
    assert r.returncode == 0, r.stderr
    outputs += [r.stdout, r.stderr, textfile.read_text()]
    # Failures print the most context: make the CDN (presigned URLs) and the API fail for good.
    hub.faults.add("status", status=500, host="cdn", count=10_000)
    for fmt in ("json", "text"):
        r = run_agent("pull", "org/private", "--cache-dir", str(tmp_path / f"d-{fmt}"), "--log-format", fmt, env=env)
        assert r.returncode == 7, r.stderr
        outputs += [r.stdout, r.stderr]
    hub.faults.clear()
    hub.faults.add("status", status=403, host="cdn", count=10_000)
    r = run_agent("pull", "org/private", "--cache-dir", str(tmp_path / "e"), "--log-format", "text", env=env)
    outputs += [r.stdout, r.stderr]
    files = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()
             and p.stat().st_size < 2_000_000 and "tsdb" not in p.parts]
    blob = "\n".join(outputs + files)
    for name, secret in secrets.items():
        assert secret not in blob, name
    assert "sig=c2Vj" not in blob and "Signature=" not in blob.replace("Signature=***", "")
