"""The user's environment, read as huggingface_hub 2.4 reads it, and settings read like every other
option: each test runs the real CLI with exactly the variables it is about (clean_env drops the rest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TOKEN, agent_cmd, clean_env
from test_sync import files, ready, wait_for, write_config

# Variables the shared clean_env does not drop but that change where the cache is or who we are.
USER_VARS = ("XDG_CACHE_HOME", "HUGGINGFACE_HUB_CACHE", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE")


def env_for(tmp_path: Path, hub=None, **extra: str) -> dict[str, str]:
    """A clean environment whose HOME is a fresh folder: the real ~/.cache is never touched."""
    env = {k: v for k, v in clean_env().items() if k not in USER_VARS}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    env.update(extra)
    return env


def agent(tmp_path: Path, *args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    # cwd is the test's folder: a relative path the agent wrongly creates never lands in the repo
    return subprocess.run(agent_cmd(*args), env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def hub_finds(env: dict, repo: str) -> str:
    """huggingface_hub itself, in the same environment, offline: the consumer's view of the cache."""
    code = f"from huggingface_hub import snapshot_download as s; print(s({repo!r}, local_files_only=True))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


# -- item 7: where the cache is and who we are ---------------------------------------------------

def test_xdg_cache_home_alone_places_the_cache_where_consumers_look(hub, tmp_path):
    commit = hub.add_repo("org/m", files("m"))
    env = env_for(tmp_path, hub, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    r = agent(tmp_path, "pull", "org/m", "--log-format", "json", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    cache = tmp_path / "xdg" / "huggingface" / "hub"
    assert ready(cache, "org/m") == commit
    assert hub_finds(env, "org/m") == str(cache / "models--org--m" / "snapshots" / commit)


def test_legacy_cache_and_token_variables_are_honoured(hub, demo_files, tmp_path):
    commit = hub.add_repo("org/private", demo_files, private=True)
    env = env_for(tmp_path, hub, HUGGINGFACE_HUB_CACHE=str(tmp_path / "legacy"), HUGGING_FACE_HUB_TOKEN=TOKEN)
    r = agent(tmp_path, "pull", "org/private", "--log-format", "json", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ready(tmp_path / "legacy", "org/private") == commit
    assert TOKEN not in r.stderr + r.stdout


@pytest.mark.parametrize("hf_home", ["$MY_VOLUME/hf", "${MY_VOLUME}/hf", "~/hf"])
def test_hf_home_expands_variables_and_tilde(hub, tmp_path, hf_home):
    commit = hub.add_repo("org/m", files("m"))
    env = env_for(tmp_path, hub, HF_HOME=hf_home, MY_VOLUME=str(tmp_path / "home"))
    r = agent(tmp_path, "pull", "org/m", "--log-format", "json", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ready(tmp_path / "home" / "hf" / "hub", "org/m") == commit
    assert not any(p.name.startswith(("$", "~")) for p in tmp_path.iterdir())


def test_transformers_offline_serves_a_ready_snapshot_without_network(hub, tmp_path):
    commit = hub.add_repo("org/m", files("m"))
    cache = tmp_path / "c"
    env = env_for(tmp_path, hub, HF_HUB_CACHE=str(cache))
    assert agent(tmp_path, "pull", "org/m", "--log-format", "json", env=env).returncode == 0
    # nothing listens there: any request would fail
    offline = {**env, "HF_ENDPOINT": "http://127.0.0.1:9", "TRANSFORMERS_OFFLINE": "1"}
    r = agent(tmp_path, "pull", "org/m", "--log-format", "json", env=offline, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ready(cache, "org/m") == commit


def test_hf_hub_disable_xet_makes_auto_choose_http(xet_hub, tmp_path):
    cache = tmp_path / "c"
    env = env_for(tmp_path, xet_hub, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_XET="1")
    r = agent(tmp_path, "pull", "org/xet-model", "--log-format", "json", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    commit = ready(cache, "org/xet-model")
    lock = json.loads((cache / "models--org--xet-model" / ".model-agent" / f"{commit}.lock.json").read_text())
    assert lock["engine"] == "http", lock["engine"]


def test_missing_hf_token_path_means_anonymous_like_huggingface_hub(hub, demo_files, tmp_path):
    hub.add_repo("org/private", demo_files, private=True)
    public = hub.add_repo("org/public", files("p"))
    home = tmp_path / "hf"
    home.mkdir()
    (home / "token").write_text(TOKEN)  # a login token is there, but HF_TOKEN_PATH names another file
    env = env_for(tmp_path, hub, HF_HOME=str(home), HF_TOKEN_PATH=str(tmp_path / "mounted" / "token"))
    code = "from huggingface_hub import get_token; print(get_token())"
    seen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert seen.stdout.strip() == "None"  # what huggingface_hub does: anonymous, no fallback
    r = agent(tmp_path, "pull", "org/private", "--log-format", "json", env=env)
    assert r.returncode in (3, 4), r.stderr[-2000:]  # anonymous: the Hub hides the private repo
    r = agent(tmp_path, "pull", "org/public", "--log-format", "json", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ready(home / "hub", "org/public") == public


@pytest.mark.parametrize("how", ["HF_TOKEN_PATH", "--token-file"])
def test_a_token_file_with_several_lines_is_invalid_input(hub, tmp_path, how):
    hub.add_repo("org/m", files("m"))
    token_file = tmp_path / "token"
    token_file.write_text("hf_firstsecretline\nhf_secondsecretline\n")
    env = env_for(tmp_path, hub, HF_HUB_CACHE=str(tmp_path / "c"))
    args = ["pull", "org/m", "--log-format", "json"]
    if how == "HF_TOKEN_PATH":
        env["HF_TOKEN_PATH"] = str(token_file)
    else:
        args += ["--token-file", str(token_file)]
    r = agent(tmp_path, *args, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    errs = [line for line in lines if line.get("level") == "error"]
    assert len(errs) == 1 and "2 lines" in errs[0]["msg"] and str(token_file) in errs[0]["msg"], errs
    assert "secretline" not in r.stderr + r.stdout
    assert not any(line.get("event") == "retry" for line in lines)


def write_secret(folder: Path, token: str) -> Path:
    """Update a Secret volume the way the kubelet does: a new ..<ts> folder, then the ..data symlink swapped."""
    folder.mkdir(parents=True, exist_ok=True)
    version = folder / f"..{time.time_ns()}"
    version.mkdir()
    (version / "token").write_text(token)
    tmp = folder / "..data_tmp"
    tmp.symlink_to(version.name)
    os.replace(tmp, folder / "..data")
    link = folder / "token"
    if not link.is_symlink():
        link.symlink_to("..data/token")
    return link


def test_sync_keeps_pulling_a_private_repo_after_the_token_rotates(hub, tmp_path):
    first = hub.add_repo("org/private", files("v1"), private=True)
    cache = tmp_path / "c"
    token_path = write_secret(tmp_path / "secret", TOKEN)
    cfg = write_config(tmp_path / "cm", [{"source": "org/private"}])
    env = env_for(tmp_path, hub, HF_HUB_CACHE=str(cache), HF_TOKEN_PATH=str(token_path))
    proc = subprocess.Popen(agent_cmd("sync", "--config", str(cfg), "--interval", "1s", "--log-format", "json"),
                            env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: ready(cache, "org/private") == first, what="first pull with the first token")
        hub.tokens.add("hf_rotated_token")
        write_secret(tmp_path / "secret", "hf_rotated_token\n")
        hub.tokens.discard(TOKEN)  # the old token is revoked
        second = hub.commit("org/private", files("v2"))
        wait_for(lambda: ready(cache, "org/private") == second, timeout=30, what="a pull with the rotated token")
    finally:
        hub.tokens.add(TOKEN)
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "hf_rotated_token" not in err and TOKEN not in err


# -- item 8: settings --------------------------------------------------------------------------

def test_unparsable_workers_from_the_environment_is_invalid_input(tmp_path):
    r = agent(tmp_path, "pull", "org/m", "--log-format", "json", env=env_for(tmp_path, MODEL_AGENT_WORKERS="eight"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "MODEL_AGENT_WORKERS" in r.stderr or "--workers" in r.stderr


@pytest.mark.parametrize("flag", ["--stall-timeout", "--lease-ttl"])
def test_zero_timeouts_are_refused(tmp_path, flag):
    r = agent(tmp_path, "pull", "org/m", flag, "0", "--log-format", "json", env=env_for(tmp_path))
    assert r.returncode == 2, r.stderr[-2000:]
    assert flag in r.stderr


def test_once_and_config_read_from_the_environment(hub, tmp_path):
    commit = hub.add_repo("org/m", files("m"))
    cfg = write_config(tmp_path / "cm", [{"source": "org/m"}])
    env = env_for(tmp_path, hub, HF_HUB_CACHE=str(tmp_path / "c"), MODEL_AGENT_ONCE="1", MODEL_AGENT_CONFIG=str(cfg))
    r = agent(tmp_path, "sync", "--log-format", "json", env=env, timeout=60)  # before: ran forever
    assert r.returncode == 0, r.stderr[-2000:]
    assert ready(tmp_path / "c", "org/m") == commit


def test_dry_run_and_max_bytes_read_from_the_environment(hub, tmp_path):
    commit = hub.add_repo("org/m", files("m"))
    cache = tmp_path / "c"
    env = env_for(tmp_path, hub, HF_HUB_CACHE=str(cache))
    assert agent(tmp_path, "pull", "org/m", "--log-format", "json", env=env).returncode == 0
    newer = hub.commit("org/m", files("m2"))
    assert agent(tmp_path, "pull", "org/m", "--log-format", "json", env=env).returncode == 0
    old = cache / "models--org--m" / "snapshots" / commit  # no ref points at it: gc may take it
    r = agent(tmp_path, "gc", "--log-format", "json", env={**env, "MODEL_AGENT_DRY_RUN": "1", "MODEL_AGENT_MAX_BYTES": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "would remove 1 snapshots" in r.stdout, r.stdout  # a 1-byte budget: the old one would go...
    assert old.is_dir() and ready(cache, "org/m") == newer  # ...but a dry run removes nothing
    r = agent(tmp_path, "gc", "--log-format", "json", env={**env, "MODEL_AGENT_DRY_RUN": "true", "MODEL_AGENT_MAX_BYTES": "1Gi"})
    assert r.returncode == 0 and "would remove 0 snapshots" in r.stdout, r.stdout + r.stderr[-2000:]


def cache_dir_line(stderr: str) -> dict:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    found = [line for line in lines if line.get("event") == "cache_dir"]
    assert found, stderr[-2000:]
    return found[0]


def test_models_file_cache_dir_wins_over_hf_home_and_the_log_says_so(hub, tmp_path):
    commit = hub.add_repo("org/m", files("m"))
    import yaml

    cfg = tmp_path / "models.yaml"
    cfg.write_text(yaml.safe_dump({"cache_dir": str(tmp_path / "from-file"), "models": [{"source": "org/m"}]}))
    env = env_for(tmp_path, hub, HF_HOME=str(tmp_path / "image-home"))
    r = agent(tmp_path, "sync", "--config", str(cfg), "--once", "--log-format", "json", env=env, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ready(tmp_path / "from-file", "org/m") == commit
    line = cache_dir_line(r.stderr)
    assert line["cache_dir"] == str(tmp_path / "from-file") and line["from"] == "models file"
    assert any(x.startswith("HF_HOME") for x in line["ignored"]), line
    r = agent(tmp_path, "pull", "--config", str(cfg), "--cache-dir", str(tmp_path / "flag"), "--log-format", "json",
              env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ready(tmp_path / "flag", "org/m") == commit
    line = cache_dir_line(r.stderr)
    assert line["from"] == "--cache-dir" and any(x.startswith("models file") for x in line["ignored"]), line
