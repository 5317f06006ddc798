"""Edges of the contract (issue 11, items 8 and 9): servers that ignore Range, connections left with
an unread body, revision names git would refuse, listings with unsafe blob ids, and the models-file
keys `local_dir`, `workers` and `engine`. The real CLI against the project's Hub server."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest

from agent import httpio
from agent.devhub import make_model
from conftest import hub_env, pull_args, run_agent
from objstore.proxy import FaultProxy
from test_pull import assert_snapshot, json_lines
from test_sync import files as small_files
from test_sync import write_config

MiB = 2**20


@pytest.fixture(scope="module")
def file_32m(tmp_path_factory) -> dict[str, Path]:
    return make_model(tmp_path_factory.mktemp("m32"), large_files=1, large_size=32 * MiB, small_files=2)


def _models_file(tmp_path: Path, models: list, **top) -> Path:
    import yaml

    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models, **top}))
    return path


# -- item 8: a server that ignores Range ------------------------------------------------------------

@pytest.mark.parametrize("workers", ["8", "1"])  # 1: the file's ranges go in order, written with O_DIRECT
def test_a_server_that_ignores_range_sends_each_file_once(hub, file_32m, tmp_path, workers):
    commit = hub.add_repo("org/big", file_32m)
    hub.faults.add("ignore_range", count=100_000)  # every ranged request, Hub and CDN, gets 200 + the whole body
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(hub, "org/big", cache, "--chunk-size", "1Mi", "--workers", workers), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert_snapshot(cache, "org/big", commit, file_32m)
    size = file_32m["model.safetensors"].stat().st_size
    sent = hub.stats.bytes_sent("model.safetensors")
    assert sent < size * 1.2, f"the server sent {sent / MiB:.0f} MiB for a {size / MiB:.0f} MiB file"
    retries = [e for e in json_lines(r.stderr) if e["event"] == "retry"]
    assert retries == [], retries  # no connection came back from the pool with a body still on it
    v = run_agent("verify", "org/big", "--cache-dir", str(cache), env=hub_env(hub))
    assert v.returncode == 0, v.stderr


class RangeIgnoringProxy(FaultProxy):
    """The fault proxy, but every request goes on without its Range header: the store answers 200
    with the whole object, as a proxy or gateway that drops Range does."""

    @staticmethod
    def _up(client, server, methods) -> None:
        try:
            while data := client.recv(65536):
                server.sendall(re.sub(rb"\r\nrange: [^\r]*", b"", data, flags=re.IGNORECASE))
        except OSError:
            pass
        finally:
            try:
                server.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def test_an_object_store_that_ignores_range_sends_each_object_once(tmp_path):
    from objstore.helpers import agent, assert_hf_snapshot, env_for, summary
    from objstore.servers import SeaweedFS

    data = {"config.json": b"{}", "model.safetensors": os.urandom(24 * MiB)}
    with SeaweedFS(tmp_path / "weed") as weed:
        weed.client().create_bucket(Bucket="models")
        for rel, body in data.items():
            weed.client().put_object(Bucket="models", Key=f"m/{rel}", Body=body)
        proxy = RangeIgnoringProxy(weed.port)
        try:
            cache = tmp_path / "cache"
            r = agent("pull", "s3://models/m/", "--repo-id", "acme/m", "--cache-dir", str(cache), "--chunk-size", "1Mi",
                      env=env_for(weed.env(AWS_ENDPOINT_URL=proxy.url)))
            assert r.returncode == 0, r.stderr
            assert_hf_snapshot(cache, "acme/m", summary(r.stderr)["commit"], data)
            assert proxy.body_bytes < 24 * MiB * 1.2, f"{proxy.body_bytes / MiB:.0f} MiB sent for a 24 MiB object"
        finally:
            proxy.close()


def test_a_whole_file_stream_cut_mid_way_starts_over_and_verifies(hub, file_32m, tmp_path):
    commit = hub.add_repo("org/big", file_32m)
    hub.faults.add("ignore_range", count=100_000)
    cut = hub.faults.add("reset", path_glob="model.safetensors", host="cdn", after_bytes=8 * MiB, count=1)
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(hub, "org/big", cache, "--chunk-size", "1Mi"),
                  env=hub_env(hub, MODEL_AGENT_RETRY_BASE_DELAY="0.05"))
    assert r.returncode == 0, r.stderr
    assert cut.remaining == 0
    assert_snapshot(cache, "org/big", commit, file_32m)
    size = file_32m["model.safetensors"].stat().st_size
    assert hub.stats.bytes_sent("model.safetensors") < size * 1.5  # the cut body, then the file once
    assert [e["reason"] for e in json_lines(r.stderr) if e["event"] == "retry"] == ["connection"]


def test_a_body_abandoned_mid_way_never_goes_back_to_the_pool(hub, file_32m):
    """The next request on a connection whose body was not read to its end would read that body's
    bytes as its status line. A real urllib3 pool against our own server, one connection per host."""
    hub.add_repo("org/big", file_32m)
    # 64 KiB every 50 ms: after a 1 MiB read the socket is empty, so urllib3 cannot see the rest coming.
    hub.faults.add("slow", path_glob="model.safetensors", rate=20 * 64 * 1024, count=1, host="cdn")
    pools = httpio.Pools(workers=1, stall_timeout=10)
    try:
        first = httpio.request(pools, "GET", f"{hub.url}/org/big/resolve/main/model.safetensors", {}, "resolve")
        cdn = first.headers["Location"]
        httpio.drain(first)
        resp = httpio.request(pools, "GET", cdn, {"Accept-Encoding": "identity"}, "first read")
        pieces = httpio.stream_body(resp, "first read")
        assert len(next(pieces)) > 0
        pieces.close()  # the consumer stops early: the rest of the body is still on its way
        again = httpio.request(pools, "GET", cdn, {"Accept-Encoding": "identity", "Range": "bytes=0-9"}, "second read")
        assert again.status == 206, again.status
        assert b"".join(bytes(p) for p in httpio.stream_body(again, "second read")) == \
            file_32m["model.safetensors"].read_bytes()[:10]
    finally:
        pools.clear()


# -- item 9: revision names git would refuse --------------------------------------------------------

BAD_REVISIONS = [".", "..", "a/./b", ".hidden", "feature/.x", "main.lock", "a/b.lock", "a//b", "main/", "main.",
                 "@", "main@{1}", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[0]", "a\\b", "a\x01b", "a\x7fb", "/main"]


@pytest.mark.parametrize("revision", BAD_REVISIONS)
def test_a_revision_git_would_refuse_is_exit_2_and_writes_nothing(hub, demo_files, tmp_path, revision):
    hub.add_repo("org/model", demo_files)
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(hub, "org/model", cache, "--revision", revision), env=hub_env(hub))
    assert r.returncode == 2, r.stderr
    assert "revision" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (cache / "models--org--model" / "refs").exists()


@pytest.mark.parametrize("how", ["uri", "env", "wait", "verify", "models_file"])
def test_every_way_a_revision_enters_is_checked(hub, demo_files, tmp_path, how):
    hub.add_repo("org/model", demo_files)
    cache = str(tmp_path / "cache")
    args = {
        "uri": ["pull", "hf://org/model@.", "--cache-dir", cache],
        "env": ["pull", "org/model", "--cache-dir", cache],
        "wait": ["wait", "org/model", "--revision", ".", "--cache-dir", cache, "--timeout", "1s"],
        "verify": ["verify", "org/model", "--revision", ".", "--cache-dir", cache],
        "models_file": ["pull", "--config", str(_models_file(tmp_path, [{"source": "org/model", "revision": "."}])),
                        "--cache-dir", cache],
    }[how]
    r = run_agent(*args, env=hub_env(hub, **({"MODEL_AGENT_REVISION": "a..b"} if how == "env" else {})))
    assert r.returncode == 2, r.stderr
    assert "invalid revision" in r.stderr, r.stderr


def test_real_revision_forms_still_work(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/model", demo_files, tags=["v1.0"])
    hub.create_branch("org/model", "feature/x")
    hub.create_branch("org/model", "refs/pr/1")
    cache = tmp_path / "cache"
    for revision in ("v1.0", "feature/x", "refs/pr/1", commit[:7], commit, "release-2024.1_rc"):
        if revision == "release-2024.1_rc":
            hub.create_branch("org/model", revision)
        r = run_agent(*pull_args(hub, "org/model", cache, "--revision", revision), env=hub_env(hub))
        assert r.returncode == 0, (revision, r.stderr)
    assert_snapshot(cache, "org/model", commit, demo_files)
    assert (cache / "models--org--model" / "refs" / "refs" / "pr" / "1").read_text() == commit


# -- item 9: a listing whose blob ids are not hex ---------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("oid", "../../../../escape"),  # a small (git) file's blob id
    ("oid", "abc"),
    ("lfs_oid", "../../escape-lfs"),  # an LFS file's sha256
    ("lfs_oid", "A" * 64),
    ("xetHash", "../xet"),
])
def test_a_listed_blob_id_that_is_not_hex_is_exit_2(hub, demo_files, tmp_path, field, value):
    hub.add_repo("org/model", demo_files)
    path = "config.json" if field == "oid" else "model.safetensors"
    hub.listing_overrides[("org/model", path)] = {field: value}
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(hub, "org/model", cache), env=hub_env(hub))
    assert r.returncode == 2, r.stderr
    errors = [e for e in json_lines(r.stderr) if e.get("level") == "error" or "exit_code" in e]
    assert len(errors) == 1 and path in errors[0]["msg"], r.stderr
    strays = [p for p in tmp_path.rglob("*") if "escape" in p.name or p.name.startswith("xet")]
    assert strays == [], strays


# -- item 9: models-file keys that were accepted and ignored ----------------------------------------

def test_models_file_local_dir_puts_that_model_flat_in_its_folder(hub, tmp_path):
    a, b = hub.add_repo("org/a", small_files("a")), hub.add_repo("org/b", small_files("b"))
    flat = tmp_path / "flat-a"
    cfg = write_config(tmp_path / "cm", [{"source": "org/a", "local_dir": str(flat)}, {"source": "org/b"}])
    cache = tmp_path / "cache"
    r = run_agent("sync", "--config", str(cfg), "--once", "--cache-dir", str(cache), "--log-format", "json",
                  env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert (flat / "weights.bin").read_bytes() == small_files("a")["weights.bin"]
    assert (flat / ".model-agent" / "ready").read_text().strip() == a
    assert not (cache / "models--org--a").exists()
    assert (cache / "models--org--b" / ".model-agent" / f"{b}.ready").exists()


@pytest.mark.parametrize("models,pattern", [
    ([{"source": "org/a", "local_dir": "relative/dir"}], "absolute"),
    ([{"source": "org/a", "local_dir": "/tmp/x"}, {"source": "org/b", "local_dir": "/tmp/x/"}], "local_dir"),
    ([{"source": "org/a", "engine": "fast"}], "engine"),
])
def test_models_file_values_that_cannot_work_are_exit_2(hub, tmp_path, models, pattern):
    hub.add_repo("org/a", small_files("a"))
    cfg = _models_file(tmp_path, models)
    r = run_agent("sync", "--config", str(cfg), "--once", "--cache-dir", str(tmp_path / "c"), "--log-format", "json",
                  env=hub_env(hub))
    assert r.returncode == 2, r.stderr
    assert pattern in r.stderr


def test_local_dir_flag_with_a_models_file_is_refused_not_ignored(hub, tmp_path):
    hub.add_repo("org/a", small_files("a"))
    cfg = _models_file(tmp_path, ["org/a"])
    cache = tmp_path / "cache"
    cache.mkdir()
    r = run_agent("pull", "--config", str(cfg), "--local-dir", str(tmp_path / "flat"), "--log-format", "json",
                  env=hub_env(hub, HF_HUB_CACHE=str(cache)))
    assert r.returncode == 2, r.stderr
    assert "local_dir" in r.stderr and not (tmp_path / "flat" / "weights.bin").exists()


@pytest.mark.parametrize("top", [{"workers": 0}, {"workers": "many"}, {"engine": "fast"}])
def test_models_file_top_level_values_are_checked(hub, tmp_path, top):
    cfg = _models_file(tmp_path, ["org/a"], **top)
    r = run_agent("pull", "--config", str(cfg), "--cache-dir", str(tmp_path / "c"), env=hub_env(hub))
    assert r.returncode == 2, r.stderr


def _lock_engine(cache: Path, repo: str, commit: str) -> str:
    lock = cache / ("models--" + repo.replace("/", "--")) / ".model-agent" / f"{commit}.lock.json"
    return json.loads(lock.read_text())["engine"]


@pytest.mark.parametrize("flag,expected", [([], "hf_transfer"), (["--engine", "http"], "http"),
                                           (["env"], "http")])
def test_models_file_engine_is_the_default_and_a_flag_or_env_wins(hub, big_files, tmp_path, flag, expected):
    commit = hub.add_repo("org/big", big_files)
    cfg = _models_file(tmp_path, ["org/big"], engine="hf_transfer")
    env = hub_env(hub, MODEL_AGENT_ENGINE="http") if flag == ["env"] else hub_env(hub)
    cache = tmp_path / "cache"
    r = run_agent("pull", "--config", str(cfg), "--cache-dir", str(cache), *[f for f in flag if f != "env"], env=env)
    assert r.returncode == 0, r.stderr
    assert _lock_engine(cache, "org/big", commit) == expected


@pytest.mark.parametrize("flag,expected", [([], 2), (["--workers", "3"], 3)])
def test_models_file_workers_is_the_default_and_a_flag_wins(hub, tmp_path, flag, expected):
    model = make_model(tmp_path / "m", large_files=1, large_size=8 * MiB, small_files=0)
    hub.add_repo("org/w", model)
    hub.faults.add("slow", path_glob="model.safetensors", rate=8 * MiB, count=1000)
    cfg = _models_file(tmp_path, ["org/w"], workers=2)
    r = run_agent("sync", "--config", str(cfg), "--once", "--cache-dir", str(tmp_path / "c"), *flag,
                  env=hub_env(hub, MODEL_AGENT_CHUNK_SIZE="1Mi"))
    assert r.returncode == 0, r.stderr
    assert hub.stats.peak_bodies == expected  # file bodies the server was sending at the same time
