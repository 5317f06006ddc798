"""Readiness that notices huggingface_hub's own deletion, and gated repos through Xet (issue 13, items 3-4).

Real CLI in a subprocess against the project's Hub server; the deletion is huggingface_hub's own
`scan_cache_dir(...).delete_revisions(...)`, which is what `hf cache rm` runs.
"""

from __future__ import annotations

import pytest
from huggingface_hub import scan_cache_dir

from agent.devhub import HubServer
from tests.conftest import TOKEN, hub_env, pull_args, run_agent
from tests.test_pull import assert_snapshot, json_lines

NO_ACCESS = "hf_valid_but_not_granted"


def hf_cache_rm(cache, commit: str) -> None:
    scan_cache_dir(cache).delete_revisions(commit).execute()


def pulled_then_removed(hub, demo_files, cache) -> str:
    """Two revisions in the cache, the older one removed by huggingface_hub. (Removing a repo's
    only revision removes its whole folder, our records with it: nothing to get wrong there.)"""
    old = hub.add_repo("org/model", demo_files)
    hub.commit("org/model", {"README.md": b"# v2"})
    assert run_agent(*pull_args(hub, "org/model", cache, "--revision", old), env=hub_env(hub)).returncode == 0
    assert run_agent(*pull_args(hub, "org/model", cache), env=hub_env(hub)).returncode == 0
    hf_cache_rm(cache, old)
    records = cache / "models--org--model" / ".model-agent"
    assert (records / f"{old}.ready").exists() and not (cache / "models--org--model" / "snapshots" / old).exists()
    return old


def test_pull_after_hf_cache_rm_fetches_again(hub, demo_files, tmp_path):
    cache = tmp_path / "cache"
    commit = pulled_then_removed(hub, demo_files, cache)

    r = run_agent(*pull_args(hub, "org/model", cache, "--revision", commit), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    done = json_lines(r.stderr)[-1]
    assert done["bytes_fetched"] > 0, done
    assert_snapshot(cache, "org/model", commit, demo_files)
    assert run_agent("verify", "org/model", "--revision", commit, "--cache-dir", str(cache),
                     env=hub_env(hub)).returncode == 0


def test_wait_after_hf_cache_rm_keeps_waiting(hub, demo_files, tmp_path):
    cache = tmp_path / "cache"
    commit = pulled_then_removed(hub, demo_files, cache)
    r = run_agent("wait", "org/model", "--revision", commit, "--cache-dir", str(cache), "--timeout", "3s",
                  "--poll-interval", "0.5s", env=hub_env(hub))
    assert r.returncode == 8, r.stderr


def test_wait_notices_one_missing_blob(hub, demo_files, tmp_path):
    """Cheaper than a whole revision: one blob gone (a half-done `hf cache rm`, a hand cleanup)."""
    commit = hub.add_repo("org/model", demo_files)
    cache = tmp_path / "cache"
    assert run_agent(*pull_args(hub, "org/model", cache), env=hub_env(hub)).returncode == 0
    (cache / "models--org--model" / "snapshots" / commit / "config.json").resolve().unlink()
    r = run_agent("wait", "org/model", "--revision", commit, "--cache-dir", str(cache), "--timeout", "1s",
                  "--poll-interval", "0.5s", env=hub_env(hub))
    assert r.returncode == 8, r.stderr


def test_devhub_answers_403_gated_repo_to_a_token_without_access(tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError

    with HubServer(tmp_path / "hub") as hub:
        hub.tokens.add(NO_ACCESS)
        hub.tokens_without_gated_access.add(NO_ACCESS)
        hub.add_repo("org/gated", {"w.bin": b"x" * 20_000}, gated=True)
        with pytest.raises(GatedRepoError) as err:
            hf_hub_download("org/gated", "w.bin", token=NO_ACCESS, endpoint=hub.url, cache_dir=tmp_path / "c")
        assert err.value.response.status_code == 403
        assert hf_hub_download("org/gated", "w.bin", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path / "c2")


@pytest.mark.parametrize("engine", ["xet", "auto"])
def test_gated_repo_through_xet_without_access_is_exit_3_at_once(tmp_path, demo_files, engine):
    with HubServer(tmp_path / "hub", xet=True) as hub:
        hub.tokens.add(NO_ACCESS)
        hub.tokens_without_gated_access.add(NO_ACCESS)
        # Xet-backed files only: the small ones would go through /resolve, which says "gated" by itself
        hub.add_repo("org/gated", {k: v for k, v in demo_files.items() if v.stat().st_size >= 10_000}, gated=True)
        r = run_agent(*pull_args(hub, "org/gated", tmp_path / "c", "--engine", engine),
                      env=hub_env(hub, HF_TOKEN=NO_ACCESS), timeout=60)
        token_calls = [q for q in hub.stats.requests if "xet-read-token" in q[2]]
    assert r.returncode == 3, r.stderr
    errors = [l for l in json_lines(r.stderr) if l.get("level") == "error"]
    assert len(errors) == 1 and "gated repo" in errors[0]["msg"], r.stderr
    assert NO_ACCESS not in r.stderr
    assert len(token_calls) == 1, token_calls  # refused is not transient: asked once, not retried


def test_pull_with_other_filters_after_hf_cache_rm_ends_ready(hub, demo_files, tmp_path):
    """A lockfile merges what earlier pulls of the commit with other filters left; after `hf cache rm`
    those files are gone, so the stale lockfile must not be merged into the new one."""
    cache = tmp_path / "cache"
    commit = pulled_then_removed(hub, demo_files, cache)
    r = run_agent(*pull_args(hub, "org/model", cache, "--revision", commit, "--include", "*.json"), env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    r = run_agent("wait", "org/model", "--revision", commit, "--cache-dir", str(cache), "--timeout", "1s",
                  env=hub_env(hub))
    assert r.returncode == 0, r.stderr
