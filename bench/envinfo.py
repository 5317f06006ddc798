"""Machine and tool versions, plus the fixed prose that says how to read the tables.

Numbers without their conditions mislead: the notes state what every column includes.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil

PACKAGES = ("model-agent", "huggingface_hub", "hf_transfer", "hf_xet")


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _filesystem(path: Path) -> str:
    """Type and device of the mount holding `path` (the longest matching mount point)."""
    path = path.resolve()
    best = max((p for p in psutil.disk_partitions(all=True) if path.is_relative_to(p.mountpoint)),
               key=lambda p: len(p.mountpoint), default=None)
    return f"{best.fstype} on {best.device}" if best else "?"


def collect(work: Path) -> dict:
    cp = subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "fs": _filesystem(work),
            "cp": cp[0] if cp else "?", "versions": {p: _version(p) for p in PACKAGES},
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load": os.getloadavg()[0]}


def preamble(command: str, env: dict, work: Path) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (f"# model-agent benchmark\n\n`{command}` on {env['date']}  \n"
            f"{env['cores']} cores ({env['cpu']}), {env['ram_gib']} GiB RAM, Linux {env['kernel']}, "
            f"Python {env['python']}; data on {env['fs']} ({work}); load average at start "
            f"{env['load']:.2f}  \n{versions}; {env['cp']}\n")


def main_notes(floor_mib: float) -> str:
    return f"""How to read it:
- Hub: devhub (ThreadingHTTPServer threads, file bodies via `os.sendfile`) in the benchmark's own process,
  on the same 2 cores as the tool measured; *hub CPU s* is what the server used during the run.
  *other CPU s*: busy CPU of the rest of the machine meanwhile (other processes, kernel writeback): on a
  shared machine, a run with a lot of it was disturbed.
  LFS files 302 from the API port to a separate CDN port, as on the real Hub.
- Source files are hot in the page cache for every run (nothing is dropped; the copy reads them from RAM too).
  Each run writes into a fresh empty directory on the same filesystem; `os.sync()` runs before each run.
- *wall s*: spawn to exit, Python start-up included; best verified run, all runs in parentheses.
  *MiB/s* = model bytes / wall. *vs* columns are throughput ratios (> 1 = faster than the reference).
- *until durable s* = wall + an `os.sync()` right after exit. model-agent fsyncs every file before its
  atomic rename, so its wall already includes most of that cost; `hf download` and `cp -r` leave dirty
  pages behind. The *durable* columns compare all tools at equal durability.
- *peak RSS*: the tool's `ru_maxrss` from `os.wait4` (kernel high-water mark, no sampling gaps), worst of
  all runs. Tools are started from a tiny launcher, whose own RSS is the floor of this number
  ({floor_mib:.1f} MiB: `cp` sits on it). A 50 ms psutil poll of the process tree is in the raw JSON as a cross-check.
- *sha256 ok*: every run's files were re-hashed by the benchmark against the source. `hf download` does
  not verify sha256 itself; model-agent verifies every file before it commits the snapshot.
- Defaults on both sides: model-agent 8 workers over 64 MiB ranges (hf_transfer: parallel 16 MiB ranges
  per file); `hf download` 8 workers, one HTTP stream per file.
"""


SCALING_NOTE = """Both models have the same number of shards, so only the size differs. A bounded-memory engine stays near 1x:
its buffers depend on workers, range size and files in flight, not on how many bytes it moves.
All runs are listed because one run can hit a transient peak.
"""


def xet_notes(agent_served_kib: float, hf_served_kib: float) -> str:
    return ("- The CAS is hf_xet's `local://` store: Xet clients read xorbs straight from disk, not over HTTP, "
            "so this measures hf_xet's reconstruction and write path, not a network.\n"
            f"- Bytes the hub sent over HTTP per run: model-agent {agent_served_kib:.1f} KiB, "
            f"hf download {hf_served_kib:.1f} KiB (only the small non-LFS files when Xet is used).")
