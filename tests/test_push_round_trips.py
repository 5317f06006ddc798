"""The fleet's promise, store by store: the Hub once into DEST with `push`, then a node with no Hub in
reach pulls DEST and a consumer pinned to the Hub commit (HF_HUB_OFFLINE=1: huggingface_hub's
snapshot_download and transformers' AutoConfig) loads it, as if it had come from the Hub."""

from __future__ import annotations

import json
import uuid

import pytest

from conftest import clean_env, hub_env, load_offline, run_agent
from objstore.servers import azurite_bin

REPO = "org/round-trip"
UNREACHABLE_HUB = "http://127.0.0.1:9"  # the nodes have an HF_ENDPOINT, and nothing answers there


def bucket_for(store: str, request) -> tuple[str, dict[str, str]]:
    """A fresh DEST on the suite's server for `store`, and the environment a pod would give the agent."""
    name = f"rt-{uuid.uuid4().hex[:10]}"
    if store == "s3":
        srv = request.getfixturevalue("weed")
        srv.client().create_bucket(Bucket=name)
        return f"s3://{name}/models/{REPO}/", srv.env()
    if store == "gs":
        srv = request.getfixturevalue("gcs")
        srv.client().create_bucket(name)
        return f"gs://{name}/models/{REPO}/", srv.env()
    if azurite_bin() is None:
        pytest.skip("azurite is not installed (scripts/install-test-tools.sh)")
    srv = request.getfixturevalue("azurite")
    srv.service().create_container(name)
    return f"az://{name}/models/{REPO}/", srv.env()


@pytest.mark.parametrize("store", ["path", "s3", "gs", "az"])
def test_push_then_a_node_pulls_and_a_consumer_pinned_to_the_hub_commit_loads_offline(hub, demo_files, tmp_path,
                                                                                       store, request):
    commit = hub.add_repo(REPO, demo_files)
    dest, store_env = (str(tmp_path / "nfs" / "mirror"), {}) if store == "path" else bucket_for(store, request)
    pushed = run_agent("push", REPO, dest, "--cache-dir", str(tmp_path / "staging"), "--log-format", "json",
                       env=hub_env(hub, **store_env))
    assert pushed.returncode == 0, pushed.stderr[-2000:]

    node_cache = tmp_path / "node"
    pulled = run_agent("pull", dest, "--cache-dir", str(node_cache), "--log-format", "json",
                       env=clean_env(HF_ENDPOINT=UNREACHABLE_HUB, **store_env))
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    summary = [json.loads(line) for line in pulled.stderr.splitlines() if '"summary"' in line][-1]
    assert summary["commit"] == commit and summary["revision"] == "main"
    repo_dir = node_cache / "models--org--round-trip"
    assert (repo_dir / "refs" / "main").read_text().strip() == commit
    for rel, src in demo_files.items():  # the Hub's own blob names: sha256 of LFS files, git sha1 of the rest
        assert (repo_dir / "snapshots" / commit / rel).read_bytes() == src.read_bytes()
    got = load_offline(node_cache, REPO, commit)
    assert got["model_type"] == "llama" and got["path"].endswith(commit)
