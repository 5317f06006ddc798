"""How the agent behaves towards the Hub, as huggingface_hub 2.4 does: rate-limit windows, partly
matching --include, file modes under the umask, and which URLs get the token. Real CLI, real devhub."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TOKEN, agent_cmd, clean_env, hub_env, pull_args, run_agent
from test_pull import assert_snapshot, json_lines

from agent.devhub import HubServer

# A budget our own backoff spends in well under a second: only a wait the server asked for gets through.
SHORT_RETRY = {"MODEL_AGENT_RETRY_BASE_DELAY": "0.05", "MODEL_AGENT_RETRY_MAX_FAILURES": "4"}


def retry_delays(stderr: str) -> list[float]:
    return [e["delay_s"] for e in json_lines(stderr) if e["event"] == "retry"]


# -- 5. rate limits: RateLimit "…";r=0;t=N, no Retry-After --------------------------------------
@pytest.mark.parametrize("path_glob", ["model.safetensors", "/api/models/org/model/revision/*"],
                         ids=["resolve", "metadata"])
def test_a_ratelimit_window_without_retry_after_is_waited_out(hub, demo_files, tmp_path, path_glob):
    commit = hub.add_repo("org/model", demo_files)
    quota = hub.faults.add("429", path_glob=path_glob, host="api", window=3, send_retry_after=False)
    cache = tmp_path / "cache"
    started = time.monotonic()
    r = run_agent(*pull_args(hub, "org/model", cache), env=hub_env(hub, **SHORT_RETRY))
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr[-2000:]
    assert_snapshot(cache, "org/model", commit, demo_files)
    # huggingface_hub waits t+1 s: the first 429 says t=3, so one wait of 4 s, then the window is over
    assert quota.hits == 1, quota.hits
    assert retry_delays(r.stderr) == [4.0], r.stderr[-2000:]
    assert took >= 4, took


# -- 6. --include that partly matches -------------------------------------------------------------
def test_include_that_partly_matches_pulls_and_logs_the_unmatched_pattern(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/model", demo_files)
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(hub, "org/model", cache, "--include", "*.bin", "--include", "*.safetensors"),
                  env=hub_env(hub))
    assert r.returncode == 0, r.stderr[-2000:]
    snap = cache / "models--org--model" / "snapshots" / commit
    assert sorted(p.name for p in snap.iterdir()) == ["model.safetensors"]
    unmatched = [e for e in json_lines(r.stderr) if e["event"] == "include_unmatched"]
    assert [e["patterns"] for e in unmatched] == [["*.bin"]], r.stderr[-2000:]


def test_include_that_matches_nothing_at_all_is_exit_2(hub, demo_files, tmp_path):
    hub.add_repo("org/model", demo_files)
    r = run_agent(*pull_args(hub, "org/model", tmp_path / "cache", "--include", "*.bin", "--include", "*.gguf"),
                  env=hub_env(hub))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "'*.bin'" in r.stderr and "'*.gguf'" in r.stderr, r.stderr[-2000:]


# -- 9. modes: 0666 & ~umask, as huggingface_hub gives its blobs and .incomplete files ---------------
def _with_umask(mask: int):
    return lambda: os.umask(mask)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_partials_and_blobs_follow_the_umask_like_huggingface_hub(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/model", demo_files)
    hub.faults.add("slow", path_glob="model.safetensors", rate=1 << 20, count=1)
    cache = tmp_path / "cache"
    blobs = cache / "models--org--model" / "blobs"
    proc = subprocess.Popen(agent_cmd(*pull_args(hub, "org/model", cache)), env=hub_env(hub), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_with_umask(0o002))
    partial_modes: set[int] = set()
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        partial_modes |= {_mode(p) for p in blobs.glob("*.incomplete") if p.exists()}
        time.sleep(0.02)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    assert partial_modes == {0o664}, [oct(m) for m in partial_modes]
    assert_snapshot(cache, "org/model", commit, demo_files)
    ours = {_mode(p) for p in blobs.iterdir()}

    # huggingface_hub itself, same umask, same Hub
    theirs_cache = tmp_path / "hf-cache"
    code = ("import sys; from huggingface_hub import snapshot_download; "
            "snapshot_download('org/model', cache_dir=sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(theirs_cache)], env=hub_env(hub), check=True,
                   capture_output=True, preexec_fn=_with_umask(0o002), timeout=120)
    theirs = {_mode(p) for p in (theirs_cache / "models--org--model" / "blobs").iterdir()}
    assert ours == theirs == {0o664}, ([oct(m) for m in ours], [oct(m) for m in theirs])


# -- 9. the token goes to the Hub's origin, its default port spelled out or not -------------------
@pytest.fixture
def hub_on_port_80(tmp_path):
    """A devhub whose API listens on port 80 of a loopback address of its own (no clash with others)."""
    addr = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    srv = HubServer(tmp_path / "hub80", host=addr, ports={"api": 80})
    try:
        srv.start()
    except OSError as exc:
        pytest.skip(f"cannot listen on {addr}:80 ({exc})")
    try:
        yield srv
    finally:
        srv.stop()


def test_the_token_goes_to_the_hub_origin_with_its_default_port_spelled_out(hub_on_port_80, demo_files, tmp_path):
    hub = hub_on_port_80
    commit = hub.add_repo("org/private", demo_files, private=True)
    assert hub.url.endswith(":80")
    # HF_ENDPOINT without the port; the Hub sends the client to the same origin with ":80" spelled out
    hub.faults.add("redirect", path_glob="config.json", host="api", location=hub.url)
    endpoint = f"http://{hub.host}"
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(hub, "org/private", cache), env=clean_env(HF_ENDPOINT=endpoint, HF_TOKEN=TOKEN))
    assert r.returncode == 0, r.stderr[-2000:]
    assert_snapshot(cache, "org/private", commit, demo_files)
    config = [q for q in hub.stats.requests if q.host == "api" and q.path.endswith("/config.json")]
    assert len(config) == 2 and all(q.headers.get("authorization") == f"Bearer {TOKEN}" for q in config), config


def test_the_token_does_not_follow_a_redirect_to_another_port(hub_on_port_80, demo_files, tmp_path):
    hub = hub_on_port_80
    hub.add_repo("org/private", demo_files, private=True)
    hub.faults.add("redirect", path_glob="config.json", host="api", location=hub.cdn_url)
    r = run_agent(*pull_args(hub, "org/private", tmp_path / "cache"),
                  env=clean_env(HF_ENDPOINT=f"http://{hub.host}", HF_TOKEN=TOKEN, **SHORT_RETRY))
    assert r.returncode != 0
    redirected = [q for q in hub.stats.requests if q.host == "cdn" and "/config.json" in q.path]
    assert redirected and all("authorization" not in q.headers for q in redirected), redirected
    assert TOKEN not in r.stderr + r.stdout


def test_origin_and_ratelimit_parsing_match_huggingface_hub():
    from agent.httpio import origin, retry_after

    assert origin("https://hf.co/x") == origin("https://HF.co:443/y") == origin("https://user@hf.co/")
    assert origin("https://hf.co") not in (origin("https://hf.co:8443"), origin("http://hf.co"), origin("https://x.hf.co"))
    window = {"RateLimit": '"resolvers";r=0;t=55', "RateLimit-Policy": '"fixed window";"resolvers";q=3000;w=300'}
    assert retry_after(window, 429) == 56  # t+1, as huggingface_hub waits
    assert retry_after({**window, "Retry-After": "9"}, 429) == 56  # RateLimit first, as huggingface_hub
    assert retry_after({"RateLimit": '"api";r=12;t=55', "Retry-After": "9"}, 429) == 9  # quota left: not a window
    assert retry_after(window, 503) is None
