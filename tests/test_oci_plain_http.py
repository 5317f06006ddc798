"""`--plain-http`: an in-cluster registry without TLS (tests/oci/servers.py `plain`, distribution 2.8 over
http://). With the flag, `push` and `pull oci://…` work end to end through the CLI; without it, both stop at
once with exit 2 naming the flag (no retries, nothing written): TLS is never silently dropped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import clean_env, run_agent

from tests.oci.servers import skopeo

pytestmark = [pytest.mark.skipif(not (shutil.which("docker-registry") and shutil.which("skopeo")),
                                 reason="docker-registry and skopeo: scripts/install-test-tools.sh"),
              pytest.mark.timeout(120)]
REPO = "org/plain-http"
FAST = {"MODEL_AGENT_RETRY_BASE_DELAY": "0.05", "MODEL_AGENT_RETRY_MAX_FAILURES": "3"}


def env_for(hub) -> dict[str, str]:
    """No credentials anywhere (an anonymous registry), the Hub for the staging pull."""
    return clean_env(HF_ENDPOINT=hub.url, HOME="/nonexistent", DOCKER_CONFIG="/nonexistent", REGISTRY_AUTH_FILE="",
                     **FAST)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_and_pull_over_plain_http_only_with_the_flag(hub, demo_files, registries, tmp_path):
    commit = hub.add_repo(REPO, demo_files)
    registry = registries.plain
    dest = f"oci://{registry.host}/plain/model:v1"
    staging, cache = tmp_path / "staging", tmp_path / "cache"

    refused = run_agent("push", REPO, dest, "--cache-dir", str(staging), env=env_for(hub))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "--plain-http" in refused.stderr.strip().splitlines()[-1]
    assert skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/plain/model:v1",
                  check=False).returncode != 0  # nothing was pushed

    r = run_agent("push", REPO, dest, "--cache-dir", str(staging), "--plain-http", env=env_for(hub))
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                                 f"docker://{registry.host}/plain/model:v1").stdout)
    assert manifest["annotations"]["model-cache-agent.hf.commit"] == commit

    refused = run_agent("pull", dest, "--cache-dir", str(cache), env=env_for(hub))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "--plain-http" in refused.stderr.strip().splitlines()[-1]
    assert not list(cache.glob("models--*/snapshots/*"))

    r = run_agent("pull", dest, "--cache-dir", str(cache), "--plain-http", env=env_for(hub))
    assert r.returncode == 0, r.stderr[-3000:]
    snapshot = cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit
    assert files_under(snapshot) == {name: path.read_bytes() for name, path in demo_files.items()}


def test_the_push_refusal_names_only_the_flag_that_helps(hub, demo_files, registries, tmp_path):
    hub.add_repo(REPO, demo_files)
    refused = run_agent("push", REPO, f"oci://{registries.plain.host}/plain/hint:v1", "--cache-dir",
                        str(tmp_path / "staging"), env=env_for(hub))
    assert refused.returncode == 2 and "--plain-http" in refused.stderr
    assert "--overwrite" not in refused.stderr  # --overwrite cannot help: the registry does not speak TLS
