"""Shared fixtures: the project's own Hub-compatible server on 127.0.0.1, generated models, and a
way to run the real CLI in a subprocess with a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.devhub import HubServer, make_demo_model, make_model

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_test_token"


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    return make_demo_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture(scope="session")
def big_files(tmp_path_factory) -> dict[str, Path]:
    """One 96 MiB file (several ranges at the test chunk size) and a few small ones."""
    return make_model(tmp_path_factory.mktemp("big-model"), large_files=1, large_size=96 * 2**20, small_files=3)


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub-data") as srv:
        yield srv


# The object stores the suite runs against: one of each for the whole run (they start in seconds, but
# several of each would add up), on 127.0.0.1; tests keep apart by bucket or container name.
@pytest.fixture(scope="session")
def weed(tmp_path_factory):
    from objstore.servers import SeaweedFS

    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as srv:
        yield srv


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    from objstore.servers import MotoServer

    with MotoServer(tmp_path_factory.mktemp("moto")) as srv:
        yield srv


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    from objstore.servers import FakeGcs

    with FakeGcs(tmp_path_factory.mktemp("fake-gcs")) as srv:
        yield srv


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    from objstore.servers import Azurite

    with Azurite(tmp_path_factory.mktemp("azurite")) as srv:
        yield srv


@pytest.fixture(scope="session")
def registries(tmp_path_factory):
    """Debian's docker-registry (distribution 2.8) behind a private CA: anonymous, basic (htpasswd), plain
    HTTP, and bearer tokens from our token server with blob GETs redirected to a second host
    (tests/oci/servers.py). One set for the whole run: tests keep apart by repository name."""
    from tests.oci.servers import Registries

    regs = Registries(tmp_path_factory.mktemp("oci"))
    try:
        yield regs
    finally:
        regs.stop()


@pytest.fixture(scope="module")
def xet_hub(tmp_path_factory, demo_files):
    # Xet served over HTTP, as the Hub's CAS serves it; HubServer(xet="local") keeps hf_xet's local:// CAS
    with HubServer(tmp_path_factory.mktemp("xet-hub"), xet="http") as srv:
        srv.add_repo("org/xet-model", demo_files)
        yield srv


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODEL_AGENT_", "AWS_", "AZURE_"))}
    env["MODEL_AGENT_DEBUG"] = "1"
    env.update({"HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def log_events(stderr: str, name: str | None = None) -> list[dict]:
    """The agent's JSON log lines (`--log-format json`), those of one event when `name` is given."""
    import json

    found = []
    for line in stderr.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and name in (None, rec.get("event")):
            found.append(rec)
    return found


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def run_agent(*args: str, env: dict | None = None, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(agent_cmd(*args), env=env or clean_env(**extra_env), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def pull_args(hub, repo: str, cache: Path, *more: str) -> list[str]:
    return ["pull", repo, "--cache-dir", str(cache), "--log-format", "json", *more]


def hub_env(hub, **extra: str) -> dict[str, str]:
    return clean_env(HF_ENDPOINT=hub.url, **extra)


CONSUMER = """
import json, sys
from huggingface_hub import snapshot_download
from transformers import AutoConfig
repo, commit, cache = sys.argv[1:4]
path = snapshot_download(repo, revision=commit, cache_dir=cache, local_files_only=True)
config = AutoConfig.from_pretrained(repo, revision=commit, cache_dir=cache, local_files_only=True)
print(json.dumps({"path": path, "model_type": config.model_type}))
"""


def load_offline(cache: Path, repo_id: str, commit: str) -> dict:
    """What a consumer pinned to the Hub commit does (HF_HUB_OFFLINE=1, the GKE guide's and Dynamo's
    recipes): huggingface_hub's snapshot_download and transformers' AutoConfig, from `cache` alone.
    Returns {"path", "model_type"}; fails the test with the consumer's own error otherwise."""
    import json

    r = subprocess.run([sys.executable, "-c", CONSUMER, repo_id, commit, str(cache)], capture_output=True, text=True,
                       env=clean_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache)), timeout=120)
    if r.returncode != 0:
        pytest.fail(f"an offline consumer pinned to {repo_id}@{commit} could not load from {cache}: {r.stderr[-1500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


@contextmanager
def tmpfs(folder: Path, options: str):
    """A small tmpfs at `folder` (created): a disk that is really full, or really read-only. Root only."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
