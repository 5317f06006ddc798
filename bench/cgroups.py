"""Child memory cgroups of this process's own, for running a tool under a pod-like memory limit.

Only a cgroup made here is touched: created under the one /proc/self/cgroup names, limited, and
removed afterwards. A case enters it through `sh`, which writes its own pid there and execs the
tool, so the tool and whatever it starts are charged to it, page cache included, as in a pod.
"""

from __future__ import annotations

import time
from pathlib import Path


def own_memory_cgroup() -> tuple[Path, str]:
    """(this process's memory cgroup folder, the file that sets a limit there)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory" + rel), "memory.limit_in_bytes"
        if controllers == "":
            return Path("/sys/fs/cgroup" + rel), "memory.max"
    raise RuntimeError("no memory cgroup for this process")


def make_child(name: str, limit: int) -> Path:
    parent, limit_file = own_memory_cgroup()
    path = parent / name
    path.mkdir()
    (path / limit_file).write_text(str(limit))
    return path


def enter_argv(path: Path, argv: list[str]) -> list[str]:
    """argv run inside the cgroup at `path` (same pid, so the caller's rusage is the tool's)."""
    return ["sh", "-c", f'echo $$ > {path}/cgroup.procs && exec "$@"', "sh", *argv]


def oom_kills(path: Path) -> int:
    for name in ("memory.oom_control", "memory.events"):
        try:
            fields = dict(line.split() for line in (path / name).read_text().splitlines())
            return int(fields.get("oom_kill", 0))
        except OSError:
            continue
    return 0


def remove(path: Path) -> None:
    for _ in range(50):  # an exited tool leaves the cgroup a moment later
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)
