"""The release as a user gets it: `python -m build` makes an sdist and a wheel that `twine check`
passes, and the wheel installed into a fresh venv, far from any source tree, runs the demo.

pip installs the wheel's dependencies from the machine's configured index, through pip's cache, so
a second run takes seconds; the first can take a minute.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import agent

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ("pyproject.toml", "README.md", "LICENSE", "agent")  # what the sdist is made of


def _run(argv, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, **kw)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _clean_env() -> dict:
    # No PYTHONPATH, no MODEL_AGENT_* or HF_* leaking in: the installed wheel alone must work.
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("MODEL_AGENT_", "HF_"))}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    # Build from a copy: the build writes egg-info next to the sources, never in the working tree.
    src = tmp_path_factory.mktemp("src")
    for name in SOURCE:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if name == "agent" else {}))
    out = src / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(src)], env=_clean_env())
    return out


def test_build_makes_an_sdist_and_a_wheel_twine_accepts(dist):
    wheel, = dist.glob("model_cache_agent-*.whl")
    sdist, = dist.glob("model_cache_agent-*.tar.gz")
    assert wheel.name.startswith(f"model_cache_agent-{agent.__version__}-py3-none-any")
    assert sdist.name == f"model_cache_agent-{agent.__version__}.tar.gz"
    _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)])
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "License-Expression: Apache-2.0" in meta
    assert "agent/devhub/server.py" in names  # the demo's Hub ships with the wheel
    assert not any(n.startswith("tests/") for n in names)


def test_the_wheel_in_a_fresh_venv_runs_the_demo_and_its_extras(dist, tmp_path):
    wheel, = dist.glob("model_cache_agent-*.whl")
    venv = tmp_path / "venv"
    env = _clean_env()
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    _run([str(venv / "bin/python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
          f"{wheel}[s3,gcs,azure]"], env=env, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"  # no source tree here or above it on the import path
    elsewhere.mkdir()
    env["HF_HOME"] = str(tmp_path / "hf")
    version = _run([str(venv / "bin/model-agent"), "--version"], env=env, cwd=elsewhere).stdout
    assert version.splitlines()[0] == f"model-agent {agent.__version__} (model-cache-agent)"
    for lib in ("huggingface_hub", "hf_xet", "hf_transfer", "botocore", "google-cloud-storage", "azure-storage-blob"):
        line = next(x for x in version.splitlines() if x.split()[0] == lib)
        assert "not installed" not in line, version  # the extras brought every SDK
    demo = _run([str(venv / "bin/model-agent"), "demo"], env=env, cwd=elsewhere)
    assert "Snapshot ready" in demo.stdout + demo.stderr
    assert (elsewhere / "model-cache").is_dir()
    where = _run([str(venv / "bin/python"), "-c", "import agent; print(agent.__file__)"], env=env, cwd=elsewhere).stdout
    assert where.startswith(str(venv)), where
    # each extra's SDK imports where the agent imports it
    _run([str(venv / "bin/python"), "-c", "import boto3, google.cloud.storage, azure.storage.blob"], env=env, cwd=elsewhere)


def _fake_venv(venv: Path, python_body: str) -> None:
    """A venv whose python stands in for pip: it prints pip's kind of chatter and answers `python_body`.
    What is under test is ./dev itself: what it shows of a set-up step, and what it hides."""
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\necho 'Collecting huggingface_hub (from model-cache-agent)'\n"
                      "echo 'setuptools: SetuptoolsDeprecationWarning: editable install' >&2\n" + python_body)
    agent_cmd = venv / "bin" / "model-agent"
    agent_cmd.write_text("#!/bin/sh\necho 'demo ran'\n")
    for script in (python, agent_cmd):
        script.chmod(0o755)


def test_dev_set_up_prints_a_line_per_step_and_keeps_pip_in_its_log(tmp_path):
    venv = tmp_path / "venv"
    _fake_venv(venv, "exit 0\n")
    r = subprocess.run([str(ROOT / "dev"), "demo"], env={**os.environ, "MODEL_AGENT_VENV": str(venv)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    screen = r.stdout + r.stderr
    assert "Collecting" not in screen and "Deprecation" not in screen, screen
    assert len(screen.splitlines()) <= 6, screen
    assert "demo ran" in r.stdout
    assert "Collecting" in (venv / "setup.log").read_text()


def test_dev_set_up_shows_its_log_when_a_step_fails(tmp_path):
    venv = tmp_path / "venv"
    _fake_venv(venv, "echo 'ERROR: No matching distribution found for hf_xet' >&2\nexit 1\n")
    r = subprocess.run([str(ROOT / "dev"), "demo"], env={**os.environ, "MODEL_AGENT_VENV": str(venv)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "failed" in r.stderr and "No matching distribution found for hf_xet" in r.stderr, r.stderr
    assert "demo ran" not in r.stdout
