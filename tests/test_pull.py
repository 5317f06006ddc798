"""End to end: the real CLI in a subprocess against our Hub-compatible server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import TOKEN, hub_env, pull_args, run_agent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_snapshot(cache: Path, repo: str, commit: str, files: dict[str, Path]) -> Path:
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    for rel, src in files.items():
        link = snap / rel
        assert link.is_symlink(), rel
        target = os.readlink(link)
        assert not os.path.isabs(target) and "blobs/" in target, target
        assert sha256(link) == sha256(src), rel
    assert (root / ".model-agent" / f"{commit}.ready").read_text().strip() == commit
    return root


def test_pull_writes_the_hf_layout_lockfile_and_marker(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/model", demo_files)
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(hub, "org/model", cache), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    root = assert_snapshot(cache, "org/model", commit, demo_files)
    assert (root / "refs" / "main").read_text() == commit
    lock = json.loads((root / ".model-agent" / f"{commit}.lock.json").read_text())
    assert lock["commit"] == commit and lock["revision"] == "main" and lock["source"] == "hf://org/model"
    assert {f["path"] for f in lock["files"]} == set(demo_files)
    st = next(f for f in lock["files"] if f["path"] == "model.safetensors")
    assert st["sha256"] == sha256(demo_files["model.safetensors"]) and st["size"] == demo_files["model.safetensors"].stat().st_size
    summary = json_lines(r.stderr)[-1]
    assert summary["event"] == "summary" and summary["commit"] == commit
    # Nothing at the top level of the cache but what huggingface_hub itself creates.
    assert {p.name for p in cache.iterdir()} <= {"models--org--model", ".locks"}
    leftovers = [p for p in root.rglob("*") if "incomplete" in p.name or p.name.endswith(".tmp")]
    assert leftovers == []


def test_huggingface_hub_reads_the_cache_offline(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/model", demo_files)
    cache = tmp_path / "cache"
    assert run_agent(*pull_args(hub, "org/model", cache), env=hub_env(hub)).returncode == 0
    hub.stop()  # consumers load with the network gone
    script = (
        "import sys, huggingface_hub as h\n"
        f"p = h.snapshot_download('org/model', revision='{commit}', cache_dir=sys.argv[1], local_files_only=True)\n"
        "q = h.snapshot_download('org/model', cache_dir=sys.argv[1], local_files_only=True)\n"
        "info = h.scan_cache_dir(sys.argv[1])\n"
        "assert p == q, (p, q)\n"
        "assert not info.warnings, info.warnings\n"
        "repo = next(iter(info.repos)); assert repo.nb_files == %d, repo.nb_files\n"
        "print(p)\n" % len(demo_files)
    )
    r = subprocess.run([os.sys.executable, "-c", script, str(cache)], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(commit)


def test_second_pull_is_a_noop_and_full_sha_needs_no_network(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/model", demo_files)
    cache = tmp_path / "cache"
    assert run_agent(*pull_args(hub, "org/model", cache), env=hub_env(hub)).returncode == 0
    sent = hub.stats.bytes_sent()
    r = run_agent(*pull_args(hub, "org/model", cache), env=hub_env(hub))
    assert r.returncode == 0 and hub.stats.bytes_sent() == sent
    assert json_lines(r.stderr)[-1]["already_ready"] is True
    hub.stats.reset()
    r = run_agent(*pull_args(hub, "org/model", cache, "--revision", commit), env=hub_env(hub, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    assert hub.stats.requests == []  # not a single request
    env = hub_env(hub)
    hub.stop()
    r = run_agent(*pull_args(hub, "org/model", cache, "--revision", commit), env=env)
    assert r.returncode == 0, r.stderr
    r = run_agent(*pull_args(hub, "org/model", cache), env={**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr  # offline, main is answered from refs/main + marker


def test_tags_short_shas_and_hf_uri_revisions(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/model", demo_files, tags=["v1.0"])
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(hub, "hf://org/model@v1.0", cache), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    root = assert_snapshot(cache, "org/model", commit, demo_files)
    assert (root / "refs" / "v1.0").read_text() == commit
    r = run_agent(*pull_args(hub, "org/model", cache, "--revision", commit[:7]), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert json_lines(r.stderr)[-1]["commit"] == commit


def test_include_exclude_and_local_dir(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/model", demo_files)
    dest = tmp_path / "flat"
    r = run_agent("pull", "org/model", "--local-dir", str(dest), "--include", "*.json", "--exclude", "tokenizer*",
                  "--log-format", "json", env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and ".model-agent" not in p.parts)
    want = sorted(p for p in demo_files if p.endswith(".json") and not p.split("/")[-1].startswith("tokenizer"))
    assert got == want
    assert (dest / ".model-agent" / "ready").read_text().strip() == commit
    lock = json.loads((dest / ".model-agent" / "lock.json").read_text())
    assert sorted(f["path"] for f in lock["files"]) == want


@pytest.mark.parametrize("engine", ["http", "hf_transfer"])
def test_each_http_engine_pulls_and_verifies(hub, big_files, tmp_path, engine):
    commit = hub.add_repo("org/big", big_files)
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(hub, "org/big", cache, "--engine", engine, "--chunk-size", "16Mi"), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert_snapshot(cache, "org/big", commit, big_files)
    assert json_lines(r.stderr)[-1]["engine"] == engine


@pytest.mark.parametrize("engine", ["xet", "auto"])
def test_xet_engine_downloads_through_hf_xet(xet_hub, demo_files, tmp_path, engine):
    xet_hub.stats.reset()
    cache = tmp_path / "cache"
    r = run_agent(*pull_args(xet_hub, "org/xet-model", cache, "--engine", engine), env=hub_env(xet_hub))
    assert r.returncode == 0, r.stderr
    commit = json_lines(r.stderr)[-1]["commit"]
    assert_snapshot(cache, "org/xet-model", commit, demo_files)
    assert "xet" in json_lines(r.stderr)[-1]["engine"]
    # The LFS file came from the Xet CAS, not from the HTTP CDN.
    assert not [r for r in xet_hub.stats.requests if r[0] == "cdn" and "model.safetensors" in r[2]]


def test_token_goes_to_the_hub_only_and_never_into_output(hub, demo_files, tmp_path):
    hub.add_repo("org/private", demo_files, private=True)
    cache = tmp_path / "cache"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    r = run_agent(*pull_args(hub, "org/private", cache, "--token-file", str(token_file)), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert TOKEN not in r.stderr + r.stdout
    cdn = [req for req in hub.stats.requests if req[0] == "cdn"]
    assert cdn and all("authorization" not in req[3] for req in cdn)
    api = [req for req in hub.stats.requests if req[0] == "api"]
    assert all(req[3].get("authorization") == f"Bearer {TOKEN}" for req in api)
    for path in cache.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 1_000_000:
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("args,code,pattern", [
    (["org/na me"], 2, "invalid repo id"),
    (["org/missing"], 4, "not found"),
    (["org/model", "--revision", "nope"], 4, "revision not found"),
    (["org/gated"], 3, "gated"),
    (["org/model", "--include", "*.gguf"], 2, "matches no file"),
])
def test_bad_input_gets_the_contract_exit_code(hub, demo_files, tmp_path, args, code, pattern):
    hub.add_repo("org/model", demo_files)
    hub.add_repo("org/gated", demo_files, gated=True)
    r = run_agent("pull", *args, "--cache-dir", str(tmp_path / "c"), "--log-format", "text", env=hub_env(hub))
    assert r.returncode == code, r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0], re.I), r.stderr


def test_listing_that_escapes_the_snapshot_is_refused(hub, tmp_path):
    hub.add_repo("org/evil", {"config.json": b"{}", "../../escape.txt": b"gotcha"})
    r = run_agent(*pull_args(hub, "org/evil", tmp_path / "c"), env=hub_env(hub))
    assert r.returncode == 2, r.stderr
    assert "escape" in r.stderr
    assert not list(tmp_path.rglob("escape.txt"))


def test_not_enough_disk_space_is_exit_6_before_the_first_byte(hub, big_files, tmp_path):
    hub.add_repo("org/big", big_files)
    r = run_agent(*pull_args(hub, "org/big", tmp_path / "c"), env=hub_env(hub, MODEL_AGENT_DISK_MARGIN="1000Ti"))
    assert r.returncode == 6, r.stderr
    assert re.search(r"needs [\d.]+ GiB .* only [\d.]+ GiB free", r.stderr)
    assert hub.stats.bytes_sent() == 0


def test_verify_and_wait_commands(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/model", demo_files)
    cache = tmp_path / "cache"
    r = run_agent("wait", "org/model", "--cache-dir", str(cache), "--timeout", "1s", "--poll-interval", "0.2s", env=hub_env(hub))
    assert r.returncode == 8, r.stderr
    assert run_agent(*pull_args(hub, "org/model", cache), env=hub_env(hub)).returncode == 0
    r = run_agent("wait", "org/model", "--cache-dir", str(cache), "--timeout", "1s", env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert run_agent("verify", "org/model", "--cache-dir", str(cache), env=hub_env(hub)).returncode == 0
    blob = (cache / "models--org--model" / "snapshots" / commit / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    r = run_agent("verify", "org/model", "--cache-dir", str(cache), env=hub_env(hub))
    assert r.returncode == 5 and "model.safetensors" in r.stderr


def test_demo_runs_offline(tmp_path):
    r = run_agent("demo", "--cache-dir", str(tmp_path / "mc"), "--log-format", "json")
    assert r.returncode == 0, r.stderr
    assert "Snapshot ready" in r.stdout
    assert list((tmp_path / "mc").glob("models--*/.model-agent/*.ready"))


def test_a_subset_pulled_first_does_not_satisfy_a_full_pull(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/model", demo_files)
    cache = tmp_path / "cache"
    assert run_agent(*pull_args(hub, "org/model", cache, "--include", "*.json"), env=hub_env(hub)).returncode == 0
    r = run_agent(*pull_args(hub, "org/model", cache), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert json_lines(r.stderr)[-1]["already_ready"] is False
    assert_snapshot(cache, "org/model", commit, demo_files)
    lock = json.loads((cache / "models--org--model" / ".model-agent" / f"{commit}.lock.json").read_text())
    assert {f["path"] for f in lock["files"]} == set(demo_files)
