"""Xet over HTTP: the dev Hub serves its CAS as the real one does (reconstructions v1/v2, presigned
xorb ranges, short-lived tokens), and every fault on that traffic ends in a verified snapshot or in
the contract's exit code with a one-line message.

The `xet_hub` fixture (tests/conftest.py) serves the demo model (~4 MiB) over the HTTP CAS; this file
runs in 32-40 s. hf_xet retries inside itself with a 3 s base backoff (full jitter), so a fault meant
to be survived is used once: a retried fault costs 0-3 s, an exhausted one (5 attempts) ~45 s.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, hub_env, pull_args, run_agent
from test_pull import assert_snapshot, json_lines

REPO = "org/xet-model"
RANDOM_REPO = "org/xet-random"  # incompressible: chunks are stored raw, so flipped bytes still decode


def cas_requests(hub, glob: str = "") -> list:
    return [r for r in hub.stats.requests if r.host == "cas" and glob in r.path]


def pull(hub, tmp_path: Path, repo: str = REPO, *more: str, timeout: float = 120, env_extra: dict | None = None):
    cache = tmp_path / "cache"
    return cache, run_agent(*pull_args(hub, repo, cache, "--engine", "xet", *more), env=hub_env(hub, **(env_extra or {})),
                            timeout=timeout)


def commit_of(hub, repo: str) -> str:
    return hub.store.get("model", repo).resolve("main").sha


@pytest.fixture(scope="module")
def random_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("xet-random")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "weights.bin").write_bytes(os.urandom(3 * 2**20))
    return {"config.json": folder / "config.json", "weights.bin": folder / "weights.bin"}


@pytest.fixture(autouse=True)
def clean_hub(xet_hub, random_files):
    if xet_hub.store.get("model", RANDOM_REPO) is None:
        xet_hub.add_repo(RANDOM_REPO, random_files)
    xet_hub.faults.clear()
    xet_hub.stats.reset()
    yield
    xet_hub.faults.clear()
    xet_hub.xet_cas.token_ttl = 3600


def test_the_token_route_hands_out_an_http_cas_with_headers_and_body(xet_hub):
    import httpx

    tok = httpx.get(f"{xet_hub.url}/api/models/{REPO}/xet-read-token/main")
    assert tok.status_code == 200
    assert tok.headers["x-xet-cas-url"] == xet_hub.cas_url and xet_hub.cas_url.startswith("http://")
    body = tok.json()
    assert body == {"casUrl": xet_hub.cas_url, "accessToken": tok.headers["x-xet-access-token"],
                    "exp": int(tok.headers["x-xet-token-expiration"])}
    # the CAS itself: a range past the end is 416, the end is cut to the file size, no token is 401
    info = httpx.head(f"{xet_hub.url}/{REPO}/resolve/main/model.safetensors")
    file_hash, size = info.headers["x-xet-hash"], int(info.headers["x-linked-size"])
    auth = {"Authorization": f"Bearer {body['accessToken']}"}
    url = f"{xet_hub.cas_url}/v1/reconstructions/{file_hash}"
    assert httpx.get(url, headers={**auth, "Range": f"bytes={size}-{size + 10}"}).status_code == 416
    assert httpx.get(url, headers={"Range": "bytes=0-10"}).status_code == 401
    v1 = httpx.get(url, headers={**auth, "Range": f"bytes=0-{size * 2}"}).json()
    assert sum(t["unpacked_length"] for t in v1["terms"]) == size and v1["offset_into_first_range"] == 0
    v2 = httpx.get(url.replace("/v1/", "/v2/"), headers={**auth, "Range": "bytes=1000-2000"}).json()
    assert set(v2["xorbs"]) == {t["hash"] for t in v2["terms"]} and v2["offset_into_first_range"] == 1000
    fetch = next(iter(v2["xorbs"].values()))[0]
    rng = fetch["ranges"][0]["bytes"]
    raw = httpx.get(fetch["url"], headers={"Range": f"bytes={rng['start']}-{rng['end']}"})  # no Authorization
    assert raw.status_code == 206 and len(raw.content) == rng["end"] - rng["start"] + 1


@pytest.mark.parametrize("engine", ["xet", "auto"])
def test_pull_over_http_cas_gives_the_bytes_hf_download_gives(xet_hub, demo_files, tmp_path, engine):
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(xet_hub, REPO, cache, "--engine", engine), env=hub_env(xet_hub))
    assert r.returncode == 0, r.stderr[-2000:]
    commit = commit_of(xet_hub, REPO)
    snap = assert_snapshot(cache, REPO, commit, demo_files) / "snapshots" / commit
    assert "xet" in json_lines(r.stderr)[-1]["engine"]
    assert cas_requests(xet_hub, "/reconstructions/") and cas_requests(xet_hub, "/xorbs/")
    assert not [q for q in xet_hub.stats.requests if q.host == "cdn" and "model.safetensors" in q.path]
    hf = subprocess.run([str(ROOT / ".venv/bin/hf"), "download", REPO, "--local-dir", str(tmp_path / "hf")],
                        env=hub_env(xet_hub), capture_output=True, text=True, timeout=120)
    assert hf.returncode == 0, hf.stderr[-2000:]
    for name in demo_files:
        assert (tmp_path / "hf" / name).read_bytes() == (snap / name).read_bytes(), name
    assert len(cas_requests(xet_hub, "/reconstructions/")) >= 4, "hf download must read the HTTP CAS too"


def test_v1_reconstructions_when_the_cas_has_no_v2(xet_hub, demo_files, tmp_path):
    xet_hub.faults.add("status", status=404, path_glob="/v2/*", host="cas", count=100)
    cache, r = pull(xet_hub, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_snapshot(cache, REPO, commit_of(xet_hub, REPO), demo_files)
    assert cas_requests(xet_hub, "/v1/reconstructions/")


@pytest.mark.parametrize("kind,glob,extra", [
    ("status", "/xorbs/*", {"status": 503}),
    ("status", "/v2/reconstructions/*", {"status": 500}),
    ("429", "/xorbs/*", {}),
    ("reset", "/xorbs/*", {"after_bytes": 1000}),
    ("truncate", "/xorbs/*", {"after_bytes": 1000}),
    ("corrupt", "/xorbs/*", {}),  # every byte flipped: chunk headers no longer decode
])
def test_transient_cas_faults_are_survived(xet_hub, demo_files, tmp_path, kind, glob, extra):
    fault = xet_hub.faults.add(kind, path_glob=glob, host="cas", count=1, **extra)
    began = time.monotonic()
    cache, r = pull(xet_hub, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert fault.hits == 1
    assert_snapshot(cache, REPO, commit_of(xet_hub, REPO), demo_files)
    assert time.monotonic() - began < 30


def test_403_on_a_xorb_gets_fresh_urls(xet_hub, demo_files, tmp_path):
    fault = xet_hub.faults.add("status", status=403, path_glob="/xorbs/*", host="cas", count=1)
    cache, r = pull(xet_hub, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    # two Xet files (model.safetensors, tokenizer.json) take two reconstructions; the 403 one more
    assert fault.hits == 1 and len(cas_requests(xet_hub, "/reconstructions/")) >= 3
    assert_snapshot(cache, REPO, commit_of(xet_hub, REPO), demo_files)


def test_a_stalled_xorb_body_is_cut_by_the_stall_timeout(xet_hub, demo_files, tmp_path):
    fault = xet_hub.faults.add("stall", path_glob="/xorbs/*", host="cas", count=1, after_bytes=1000, seconds=120)
    began = time.monotonic()
    cache, r = pull(xet_hub, tmp_path, REPO, "--stall-timeout", "3")
    took = time.monotonic() - began
    assert r.returncode == 0, r.stderr[-2000:]
    assert fault.hits == 1 and took < 40, took
    assert_snapshot(cache, REPO, commit_of(xet_hub, REPO), demo_files)


def test_short_lived_tokens_are_refreshed(xet_hub, demo_files, tmp_path):
    xet_hub.xet_cas.token_ttl = 20  # inside hf_xet's 30 s refresh window: it asks the Hub again
    cache, r = pull(xet_hub, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_snapshot(cache, REPO, commit_of(xet_hub, REPO), demo_files)
    assert len([q for q in xet_hub.stats.requests if "/xet-read-token/" in q.path]) >= 2


def test_one_401_from_the_cas_gets_one_fresh_token(xet_hub, demo_files, tmp_path):
    fault = xet_hub.faults.add("status", status=401, path_glob="/v*/reconstructions/*", host="cas", count=1)
    cache, r = pull(xet_hub, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert fault.hits == 1
    assert_snapshot(cache, REPO, commit_of(xet_hub, REPO), demo_files)


def test_a_cas_that_keeps_refusing_the_token_is_exit_3(xet_hub, tmp_path):
    xet_hub.faults.add("status", status=401, path_glob="/v*/reconstructions/*", host="cas", count=100)
    began = time.monotonic()
    _, r = pull(xet_hub, tmp_path)
    assert r.returncode == 3, r.stderr[-2000:]
    last = json_lines(r.stderr)[-1]
    assert "\n" not in last["msg"] and "Xet" in last["msg"], last
    tokens = [q for q in xet_hub.stats.requests if "/xet-read-token/" in q.path]
    assert len(tokens) == 2, r.stderr[-3000:]  # the first token and exactly one fresh one
    assert time.monotonic() - began < 30


def test_bytes_that_decode_but_are_wrong_are_exit_5_after_one_redownload(xet_hub, tmp_path):
    # 16 bytes flipped inside the first chunk's payload: the chunk still decodes, the sha256 is wrong
    fault = xet_hub.faults.add("corrupt", path_glob="/xorbs/*", host="cas", count=100, after_bytes=100, span=16)
    _, r = pull(xet_hub, tmp_path, RANDOM_REPO)
    assert r.returncode == 5, r.stderr[-2000:]
    last = json_lines(r.stderr)[-1]
    assert "\n" not in last["msg"] and "weights.bin" in last["msg"] and "fresh download" in last["msg"], last
    assert fault.hits == 2, fault.hits  # the first download and exactly one fresh one


def test_wrong_bytes_once_are_cured_by_the_redownload(xet_hub, random_files, tmp_path):
    fault = xet_hub.faults.add("corrupt", path_glob="/xorbs/*", host="cas", count=1, after_bytes=100, span=16)
    cache, r = pull(xet_hub, tmp_path, RANDOM_REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert fault.hits == 1
    assert_snapshot(cache, RANDOM_REPO, commit_of(xet_hub, RANDOM_REPO), random_files)
    got = hashlib.sha256((cache / f"models--org--xet-random/snapshots/{commit_of(xet_hub, RANDOM_REPO)}/weights.bin")
                         .read_bytes()).hexdigest()
    assert got == hashlib.sha256(random_files["weights.bin"].read_bytes()).hexdigest()


def test_local_cas_is_still_an_option(tmp_path, demo_files):
    from agent.devhub import HubServer

    with HubServer(tmp_path / "hub", xet="local") as hub:
        hub.add_repo(REPO, demo_files)
        cache, r = pull(hub, tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert_snapshot(cache, REPO, commit_of(hub, REPO), demo_files)
        assert not cas_requests(hub)


@pytest.mark.parametrize("api", ["1", "2"])
def test_hf_xet_reads_any_byte_range_over_the_http_cas(xet_hub, random_files, api):
    """Reconstructions trimmed to chunk boundaries at both ends, with the offset into the first one:
    hf_xet's ranged streams (hf_xet sends the range as asked) give exactly the file's bytes."""
    import random

    import hf_xet
    import httpx

    info = httpx.head(f"{xet_hub.url}/{RANDOM_REPO}/resolve/main/weights.bin")
    file_hash, size = info.headers["x-xet-hash"], int(info.headers["x-linked-size"])
    tok = httpx.get(info.links["xet-auth"]["url"]).json()
    config = hf_xet.XetConfig().with_config("telemetry.enabled", False)
    config = config.with_config("client.reconstruction_api_version", int(api))
    group = hf_xet.XetSession(config).new_download_stream_group(
        endpoint=tok["casUrl"], token=tok["accessToken"], token_expiry_unix_secs=tok["exp"])
    data = random_files["weights.bin"].read_bytes()
    rng = random.Random(7)
    spans = [(0, size), (size - 1, size), (0, 1)]
    spans += [tuple(sorted(rng.sample(range(size + 1), 2))) for _ in range(20)]
    for start, end in spans:
        got = b"".join(bytes(c) for c in group.download_stream(hf_xet.XetFileInfo(file_hash, size), start=start, end=end))
        assert got == data[start:end], (start, end)
    assert {r.path.split("/")[1] for r in cas_requests(xet_hub, "/reconstructions/")} == {f"v{api}"}


@pytest.mark.parametrize("status,glob,code", [
    (403, "/v*/reconstructions/*", 3),  # the CAS refuses this token the file: no retry cures it
    (404, "/v*/reconstructions/*", 4),  # v2 and then v1 say the CAS has no such file
])
def test_a_cas_refusal_is_mapped_at_once(xet_hub, tmp_path, status, glob, code):
    xet_hub.faults.add("status", status=status, path_glob=glob, host="cas", count=100)
    began = time.monotonic()
    _, r = pull(xet_hub, tmp_path)
    assert r.returncode == code, r.stderr[-2000:]
    last = json_lines(r.stderr)[-1]
    assert "\n" not in last["msg"] and f"({status})" in last["msg"], last
    assert time.monotonic() - began < 15


def test_small_files_do_not_wait_behind_the_xet_ranges(xet_hub, tmp_path):
    """Each reader runs on a pool of its own: plain-HTTP files are fetched while Xet ranges stream. On
    one shared pool the small files of a 1 GiB model queued behind every Xet range and ran last,
    alone (0.26 s of a 2.4 s pull). With --workers 1 each pool has one thread."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(os.urandom(40 * 2**20))  # 5 Xet ranges
    files = {"weights.bin": folder / "weights.bin"}
    for name in ("a.json", "b.json", "c.json"):
        (folder / name).write_text("{}")
        files[name] = folder / name
    xet_hub.add_repo("org/xet-ranges", files)
    xet_hub.stats.reset()
    cache, r = pull(xet_hub, tmp_path, "org/xet-ranges", "--workers", "1")
    assert r.returncode == 0, r.stderr
    order = [(r.path, i) for i, r in enumerate(xet_hub.stats.requests)]
    small = [i for path, i in order if "/resolve/" in path and path.endswith(".json")]
    ranges = [i for path, i in order if "/reconstructions/" in path]
    assert small and len(ranges) >= 5, order
    assert min(small) < max(ranges), "every small file waited for the last Xet range"


def test_a_missing_xorb_is_retried_then_exit_7(xet_hub, tmp_path):
    """A 404 on a presigned xorb URL is the CAS's storage missing a chunk it listed: hf_xet gives up at
    once, the agent retries (a replica catching up cures it), then exits 7, not 4: the file exists.
    hf_xet reports some of those failures as a RuntimeError that names no cause (about 1 attempt in 15):
    the message then names the status the CAS last answered, so 4 attempts all but always show it."""
    once = xet_hub.faults.add("status", status=404, path_glob="/xorbs/*", host="cas", count=1)
    cache, r = pull(xet_hub, tmp_path, RANDOM_REPO, env_extra={"MODEL_AGENT_RETRY_BASE_DELAY": "0.05"})
    assert r.returncode == 0 and once.hits == 1, r.stderr[-2000:]
    xet_hub.faults.add("status", status=404, path_glob="/xorbs/*", host="cas", count=1000)
    _, r = pull(xet_hub, tmp_path / "again", RANDOM_REPO,
                env_extra={"MODEL_AGENT_RETRY_BASE_DELAY": "0.05", "MODEL_AGENT_RETRY_MAX_FAILURES": "4"})
    assert r.returncode == 7, r.stderr[-2000:]
    last = json_lines(r.stderr)[-1]
    assert "\n" not in last["msg"] and "weights.bin" in last["msg"] and "404" in last["msg"], last


def test_latency_holds_each_cas_request_and_nothing_else(xet_hub, demo_files, tmp_path):
    """bench/xet.py --cas-latency-ms: a CAS a round trip away. Every CAS request waits, the Hub's own
    routes do not, and a pull still lands."""
    import httpx

    xet_hub.faults.add("latency", host="cas", count=10**6, seconds=0.3)
    began = time.monotonic()
    tok = httpx.get(f"{xet_hub.url}/api/models/{REPO}/xet-read-token/main")
    api_s = time.monotonic() - began
    began = time.monotonic()
    httpx.post(f"{xet_hub.cas_url}/v1/telemetry", headers={"Authorization": f"Bearer {tok.json()['accessToken']}"})
    cas_s = time.monotonic() - began
    assert cas_s >= 0.3 and api_s < 0.3, (cas_s, api_s)
    cache, r = pull(xet_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    assert_snapshot(cache, REPO, commit_of(xet_hub, REPO), demo_files)


def test_hf_xet_starts_with_a_connection_per_stream(xet_hub, tmp_path):
    """hf_xet's adaptive concurrency starts at 4 connections: more streams than that queued inside
    it, each waiting on a xorb fetch, which a CAS a round trip away turns into lost time. The agent
    starts it at one connection per stream (within the memory plan's connections); an operator's
    HF_XET_CLIENT_AC_INITIAL_DOWNLOAD_CONCURRENCY is kept."""
    data = os.urandom(48 * 2**20)  # 6 ranges of 8 MiB, all streamed at once with --workers 8
    (tmp_path / "weights.bin").write_bytes(data)
    if xet_hub.store.get("model", "org/xet-six-ranges") is None:
        xet_hub.add_repo("org/xet-six-ranges", {"weights.bin": tmp_path / "weights.bin"})
    xet_hub.faults.add("latency", path_glob="/xorbs/*", host="cas", count=10**6, seconds=0.5)
    peaks = {}
    for case, extra in (("ours", {}), ("operator's", {"HF_XET_CLIENT_AC_INITIAL_DOWNLOAD_CONCURRENCY": "2"})):
        xet_hub.stats.reset()
        cache, r = pull(xet_hub, tmp_path / case, "org/xet-six-ranges", "--workers", "8", "--log-format", "json",
                        env_extra=extra)
        assert r.returncode == 0, r.stderr
        memory = [e for e in json_lines(r.stderr) if e["event"] == "memory"][0]
        peaks[case] = (xet_hub.stats.peak_handling["xorb"], memory["xet_first_connections"])
    assert peaks["ours"][1] == 16 and peaks["ours"][0] >= 6, peaks  # hf_xet's own start: 4 at most
    assert peaks["operator's"][1] == 2 and peaks["operator's"][0] < 6, peaks  # queued inside hf_xet again
