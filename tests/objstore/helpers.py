"""What the object-store tests share: running a pull, checking both layouts, the content id."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAST = {"MODEL_AGENT_RETRY_BASE_DELAY": "0.05", "MODEL_AGENT_RETRY_MAX_FAILURES": "4"}


def env_for(server_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "MODEL_AGENT_", "AWS_", "AZURE_", "GOOGLE_", "STORAGE_EMULATOR"))}
    env.update({"MODEL_AGENT_DEBUG": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"})
    env.update(server_env)
    env.update(extra)
    return env


def agent(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args, "--log-format", "json"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def popen(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent", *args, "--log-format", "json"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def events(stderr: str) -> list[dict]:
    out = []
    for line in stderr.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def summary(stderr: str) -> dict:
    return next(e for e in reversed(events(stderr)) if e.get("event") == "summary")


def content_id(entries: list[tuple[str, int, str]]) -> str:
    """Computed here independently of agent/: sha1 of the sorted `path\\tsize\\tversion\\n` lines."""
    return hashlib.sha1("".join(sorted(f"{p}\t{s}\t{v}\n" for p, s, v in entries)).encode()).hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def assert_hf_snapshot(cache: Path, repo: str, commit: str, files: dict[str, bytes], revision: str = "main",
                       clean: bool = True) -> Path:
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    for rel, data in files.items():
        link = snap / rel
        assert link.is_symlink(), rel
        assert not os.path.isabs(os.readlink(link))
        assert hashlib.sha256(link.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest(), rel
    got = {str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_symlink()}
    assert got == set(files), got ^ set(files)
    assert (root / "refs" / revision).read_text() == commit
    assert (root / ".model-agent" / f"{commit}.ready").read_text().strip() == commit
    assert not clean or not [p for p in root.rglob("*") if "incomplete" in p.name]
    return root


def assert_local_dir(dest: Path, files: dict[str, bytes], commit: str) -> None:
    got = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and ".model-agent" not in p.parts}
    assert got == set(files), got ^ set(files)
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data, rel
    assert (dest / ".model-agent" / "ready").read_text().strip() == commit


def hf_loads_offline(cache: Path, repo: str) -> str:
    """huggingface_hub finds the snapshot by name, offline: what vLLM & co. do."""
    script = ("import sys, huggingface_hub as h\n"
              "p = h.snapshot_download(sys.argv[2], cache_dir=sys.argv[1], local_files_only=True)\n"
              "info = h.scan_cache_dir(sys.argv[1]); assert not info.warnings, info.warnings\n"
              "print(p)\n")
    r = subprocess.run([sys.executable, "-c", script, str(cache), repo], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def send_json(handler, status: int, payload: dict) -> None:
    """Answer an http.server request with a JSON body (the tests' small token endpoints)."""
    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
