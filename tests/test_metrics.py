"""Metrics while a pull runs: scraped live from /metrics, and written to a node-exporter textfile."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

from conftest import ROOT, agent_cmd, hub_env, pull_args
from test_resilience import largest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_bytes_counter_grows_during_a_slow_pull(hub, big_files, tmp_path):
    commit = hub.add_repo("org/big", big_files)
    hub.faults.add("slow", path_glob=largest(big_files), rate=12 * 2**20, count=1000)
    port = free_port()
    textfile = tmp_path / "prom" / "model_agent.prom"
    proc = subprocess.Popen(agent_cmd(*pull_args(hub, "org/big", tmp_path / "c", "--metrics-port", str(port),
                                                 "--metrics-textfile", str(textfile))),
                            env=hub_env(hub), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and len(seen) < 3:
        try:
            code, text = scrape(port)
        except OSError:
            time.sleep(0.1)
            continue
        got = value(text, 'model_agent_bytes_downloaded_total{model="org/big"')
        if got > 0 and (not seen or got > seen[-1]):
            seen.append(got)
            assert scrape(port, "/readyz")[0] == 503
            assert scrape(port, "/healthz")[0] == 200
        time.sleep(0.5)
    assert len(seen) >= 2, seen  # grew between two scrapes, before the pull finished
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    final = textfile.read_text()
    assert value(final, 'model_agent_snapshot_ready{model="org/big"}') == 1
    assert f'model_agent_snapshot_info{{commit="{commit}",model="org/big",revision="main"}} 1.0' in final
    assert 'model_agent_pulls_total{model="org/big",result="success"} 1.0' in final
    assert "/" not in "".join(l.split("{", 1)[1] for l in final.splitlines() if "model_agent_phase{" in l).replace("org/big", "")
