"""The Hub API calls of a pull (agent/sources/hubapi.py): made with the agent's own HTTP client, in
huggingface_hub's shapes. What huggingface_hub decided for us before (errors, pages, the token's
origin) is tested where it always was (test_pull, test_hub_manners, test_resilience); this file
holds what the change itself must keep: no huggingface_hub import, redirects, pages, a broken Hub."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, TOKEN, agent_cmd, hub_env, pull_args, run_agent
from test_pull import assert_snapshot

SHORT_RETRY = {"MODEL_AGENT_RETRY_BASE_DELAY": "0.05", "MODEL_AGENT_RETRY_MAX_FAILURES": "3"}


def test_a_pull_never_imports_huggingface_hub(hub, demo_files, tmp_path):
    """Importing huggingface_hub.hf_api and making its first request took 0.24 s of every pull's
    start-up, before any byte moved."""
    commit = hub.add_repo("org/model", demo_files)
    cmd = [sys.executable, "-X", "importtime", *agent_cmd(*pull_args(hub, "org/model", tmp_path / "c"))[1:]]
    r = subprocess.run(cmd, env=hub_env(hub), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_snapshot(tmp_path / "c", "org/model", commit, demo_files)
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "agent.sources.hubapi" in imported
    assert not [m for m in imported if m.startswith(("huggingface_hub", "httpx"))]


def test_api_redirects_keep_the_token_on_the_hub_and_drop_it_elsewhere(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/private", demo_files, private=True)
    # a renamed repo: the Hub answers 307 on its own origin, and the token goes along
    hub.faults.add("redirect", path_glob="/api/models/org/private/revision/*", host="api", location=hub.url)
    r = run_agent(*pull_args(hub, "org/private", tmp_path / "c"), env=hub_env(hub, HF_TOKEN=TOKEN))
    assert r.returncode == 0, r.stderr[-2000:]
    assert_snapshot(tmp_path / "c", "org/private", commit, demo_files)
    asked = [q for q in hub.stats.requests if q.host == "api" and "/revision/" in q.path]
    assert len(asked) == 2 and all(q.headers.get("authorization") == f"Bearer {TOKEN}" for q in asked), asked
    # sent to another host, the same request goes without it (and that host knows no such repo)
    hub.faults.add("redirect", path_glob="/api/models/org/private/tree/*", host="api", location=hub.cdn_url)
    r = run_agent(*pull_args(hub, "org/private", tmp_path / "d"), env=hub_env(hub, HF_TOKEN=TOKEN, **SHORT_RETRY))
    assert r.returncode != 0
    elsewhere = [q for q in hub.stats.requests if q.host == "cdn" and "/tree/" in q.path]
    assert elsewhere and all("authorization" not in q.headers for q in elsewhere), elsewhere
    assert TOKEN not in r.stderr + r.stdout


def test_a_tree_listed_in_pages_is_read_to_the_last_page(hub, demo_files, tmp_path):
    hub.tree_page_size = 2
    commit = hub.add_repo("org/model", demo_files)
    r = run_agent(*pull_args(hub, "org/model", tmp_path / "c"), env=hub_env(hub))
    assert r.returncode == 0, r.stderr[-2000:]
    assert_snapshot(tmp_path / "c", "org/model", commit, demo_files)
    pages = [q for q in hub.stats.requests if q.host == "api" and "/tree/" in q.path]
    assert len(pages) == -(-len(demo_files) // 2) and all("recursive=true" in q.path for q in pages), pages


def test_an_endpoint_that_is_not_a_hub_is_said_so(hub, demo_files, tmp_path):
    """A 200 that is not JSON (a web server, a captive portal at HF_ENDPOINT): one line that says so."""
    hub.add_repo("org/model", demo_files)
    hub.faults.add("status", status=200, path_glob="/api/models/org/model/revision/*", host="api", count=10)
    r = run_agent(*pull_args(hub, "org/model", tmp_path / "c"), env=hub_env(hub, **SHORT_RETRY))
    assert r.returncode not in (0,), r.stderr[-2000:]
    assert "is HF_ENDPOINT a Hub?" in r.stderr


def test_an_untrusted_hub_certificate_is_exit_3_at_once(tmp_path):
    """A Hub (or a mirror) whose TLS certificate is not trusted: one line naming SSL_CERT_FILE, exit 3,
    no retries. Through huggingface_hub it was a connection error, retried until exit 7."""
    import http.server

    from objstore.tls import serve_self_signed

    class Refused(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # never reached: the handshake fails first
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = serve_self_signed(tmp_path, Refused)
    try:
        endpoint = f"https://127.0.0.1:{server.server_address[1]}"
        from conftest import clean_env

        r = run_agent("pull", "org/model", "--cache-dir", str(tmp_path / "c"), "--log-format", "json",
                      env=clean_env(HF_ENDPOINT=endpoint, MODEL_AGENT_RETRY_BASE_DELAY="0.05"))
    finally:
        server.shutdown()
    assert r.returncode == 3, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if '"level": "error"' in line]
    assert len(lines) == 1 and "SSL_CERT_FILE" in lines[0] and "not trusted" in lines[0], r.stderr[-2000:]
    assert '"event": "retry"' not in r.stderr
