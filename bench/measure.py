"""Run one command in a child process and measure it: wall time, peak RSS, CPU.

Peak RSS is the kernel's high-water mark, `ru_maxrss` from wait4. Linux carries the spawning
process's high-water mark over into the child across fork/exec, so the child is started from a
tiny `python -I -S` launcher (~8 MiB) rather than from this process (which holds the hub and
hf_xet, hundreds of MiB): the launcher's RSS is then the measurement floor (`measure_floor`).
A psutil poll of the child's process tree every 50 ms is kept as a cross-check.

The hub server runs in *this* process, so the CPU this process used during a run is the
server's CPU (plus the negligible poller). The machine's total busy CPU is recorded too: what
is left after the tool and the hub is other processes (and kernel writeback), i.e. noise.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

POLL_S = 0.05
MIB = 2**20

# argv: report-file, command... ; times and reaps the command, writes what wait4 saw
LAUNCHER = """
import json, os, sys, time
t = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t
with open(sys.argv[1], "w") as f:
    json.dump({"wall_s": wall, "rc": os.waitstatus_to_exitcode(status), "maxrss_kib": ru.ru_maxrss,
               "cpu_s": ru.ru_utime + ru.ru_stime}, f)
"""


@dataclass
class Measured:
    cmd: list[str]
    rc: int
    timed_out: bool
    wall_s: float  # spawn to exit of the command (not the launcher): includes Python start-up
    sync_s: float  # os.sync() right after exit: what making the leftover dirty pages durable costs
    maxrss_mib: float  # wait4 ru_maxrss of the command
    tree_peak_mib: float  # psutil-sampled peak of the summed RSS of the command's process tree
    client_cpu_s: float  # user + sys of the command
    server_cpu_s: float  # user + sys of this process (the in-process hub) during the run
    machine_cpu_s: float  # busy CPU of the whole machine during the run, all cores
    load_before: float  # 1-minute load average when the run started
    log_tail: str

    def as_dict(self) -> dict:
        return asdict(self)


class TreePoller(threading.Thread):
    """Samples the summed RSS of the launcher's descendants until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak = pid, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(POLL_S):
            self.peak = max(self.peak, self._tree_rss())

    def _tree_rss(self) -> int:
        total = 0
        try:
            procs = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # exited between listing and sampling
                pass
        return total


def _cpu(ru: resource.struct_rusage) -> float:
    return ru.ru_utime + ru.ru_stime


def _machine_busy() -> float:
    t = psutil.cpu_times()  # on Linux guest time is already inside user; steal is the host's, not ours
    return t.user + t.nice + t.system + t.irq + t.softirq


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the launcher; on timeout kill its whole session (launcher + command). True if killed."""
    try:
        proc.wait(timeout)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we created for this run, by its id
        proc.wait()
        return True


def _tail(path: Path, n: int = 2500) -> str:
    return path.read_bytes()[-n:].decode(errors="replace")


def run_measured(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 600) -> Measured:
    os.sync()  # start every run with no dirty pages left by the previous one (page cache is kept)
    report = log.with_suffix(".rusage.json")
    load = os.getloadavg()[0]
    before, busy_before = resource.getrusage(resource.RUSAGE_SELF), _machine_busy()
    with open(log, "wb") as out:  # a file, not a pipe: progress bars can never block the child
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *cmd], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        poller = TreePoller(proc.pid)
        poller.start()
        timed_out = _wait(proc, timeout)
    poller.done.set()
    poller.join()
    server_cpu = _cpu(resource.getrusage(resource.RUSAGE_SELF)) - _cpu(before)
    machine_cpu = _machine_busy() - busy_before
    sync_start = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - sync_start
    r = json.loads(report.read_text()) if report.exists() else {"wall_s": timeout, "rc": -9, "maxrss_kib": 0, "cpu_s": 0}
    return Measured(cmd, r["rc"], timed_out, r["wall_s"], sync_s, r["maxrss_kib"] / 1024, poller.peak / MIB,
                    r["cpu_s"], server_cpu, machine_cpu, load, _tail(log))


def measure_floor(tmp: Path) -> float:
    """Peak RSS reported for /bin/true: the launcher's share, below which no number means anything."""
    return run_measured(["true"], dict(os.environ), tmp / "floor.log", 30).maxrss_mib
