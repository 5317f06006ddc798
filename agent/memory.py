"""The memory a pull may use: the pod's limit, hf_xet's settings sized to fit it, and the RSS we report.

The limit is the container's: cgroup v2 `memory.max` or v1 `memory.limit_in_bytes` of this process's
own cgroup (from /proc/self/cgroup) and its ancestors, the tightest wins; without one, the host's RAM.
`--memory-limit` (MODEL_AGENT_MEMORY_LIMIT) overrides both.

hf_xet 1.8.0 already derives its download buffer from min(RAM, cgroup limit), but three things sit
outside that buffer, and they are what OOM-kills a small pod (a 512 MiB pod with the GKE guide's
HF_XET_HIGH_PERFORMANCE=1 was killed within 2 s of a 1 GiB pull):

    per connection      one decompressed xorb, up to 64 MiB; 64 connections by default, 124 with
                        HF_XET_HIGH_PERFORMANCE (HF_XET_CLIENT_AC_MAX_DOWNLOAD_CONCURRENCY)
    per stream          the range a worker holds while it writes it, the next one being decoded, and
                        one that landed ahead of its file's hashing frontier, kept until it is hashed
                        (agent/ahead.py): 3 x 8 MiB (engines/xet.py; items measured at 8 MiB)
    the process         the interpreter, its libraries and hf_xet's runtime: BASE

So the plan for a pull is `BASE + buffer limit + connections x 64 MiB + streams x 24 MiB`, and it
must fit SHARE of the limit (the rest is slack for the allocator and the page cache of the writes,
which a memory cgroup charges too). When hf_xet's own settings fit, they are kept, the
high-performance preset included. When they do not, `plan_xet` bounds them; the budget is
`SHARE x limit - BASE`, split a quarter to our streams, half to connections, the rest to hf_xet's
buffer (never below what one term needs):

    limit      budget    streams  connections  buffer limit / size / per file   planned peak
    256 MiB    96 MiB    1        1            128 / 32 / 8 MiB                  312 MiB (warned)
    512 MiB    288 MiB   3        2            128 / 64 / 8 MiB                  424 MiB
    1 GiB      672 MiB   7        5            184 / 92 / 11 MiB                 768 MiB
    2 GiB      1440 MiB  15       11           376 / 188 / 23 MiB                1536 MiB
    4 GiB      2976 MiB  16       23           1120 / 512 / 70 MiB               3072 MiB
    8 GiB      6048 MiB  16       47           2656 / 1024 / 166 MiB             6144 MiB

These are the rows with HF_XET_HIGH_PERFORMANCE=1 (124 connections, a buffer of half the memory),
with 8 workers (16 Xet streams). Its preset fits from a limit of about 34 GiB; hf_xet's standard
settings (64 connections, a quarter of the memory) from about 10 GiB. A floor can put the plan past
SHARE, never past the limit but at 256 MiB, which is said in the warning.
An HF_XET_* variable the operator set is theirs: it is never overridden, only counted.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

MiB = 2**20
XORB = 64 * MiB  # one decompressed xorb per connection, outside hf_xet's buffer
TERM = 24 * MiB  # per Xet stream: the 8 MiB range it lands, the next being decoded, one kept ahead (agent/ahead.py)
BASE = 96 * MiB  # interpreter + libraries + hf_xet runtime (37 MiB idle, measured; threads and sockets on top)
SHARE = 0.75  # of the limit the plan may use
MIN_BUFFER = 128 * MiB  # hf_xet's buffer: room for one whole term and then some
MIN_BUFFER_SIZE = 64 * MiB
CGROUP_V1_UNLIMITED = 0x7FFF_FFFF_FFFF_F000  # PAGE_COUNTER_MAX: v1's "no limit"

# hf_xet config keys (XetConfig.get / with_config) and the environment variables that set them.
BUFFER_SIZE = "reconstruction.download_buffer_size"
BUFFER_PERFILE = "reconstruction.download_buffer_perfile_size"
BUFFER_LIMIT = "reconstruction.download_buffer_limit"
MAX_CONNECTIONS = "client.ac_max_download_concurrency"
INITIAL_CONNECTIONS = "client.ac_initial_download_concurrency"
MIN_CONNECTIONS = "client.ac_min_download_concurrency"
KEYS = (BUFFER_SIZE, BUFFER_PERFILE, BUFFER_LIMIT, MAX_CONNECTIONS, INITIAL_CONNECTIONS, MIN_CONNECTIONS)
FIXED = "HF_XET_FIXED_DOWNLOAD_CONCURRENCY"  # an alias of the three concurrency keys


def env_names(key: str) -> tuple[str, ...]:
    """`client.ac_max_download_concurrency` -> HF_XET_CLIENT_AC_MAX_DOWNLOAD_CONCURRENCY (and its alias)."""
    name = "HF_XET_" + key.replace(".", "_").upper()
    return (name, FIXED) if key.startswith("client.") else (name,)


@dataclass(frozen=True)
class Limit:
    bytes: int
    source: str  # "cgroup v1 /kubepods/...", "cgroup v2 /...", "--memory-limit", "host RAM"


def _read_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2's "max": no limit here


def cgroup_limit(proc_cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> Limit | None:
    """The tightest memory limit on this process's own cgroup and its ancestors, v2 and v1 alike.
    Reading the controller root instead would say "unlimited" in a nested cgroup (a pod's)."""
    best: Limit | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":
            base, name, kind = root, "memory.max", "cgroup v2"
        elif "memory" in parts[1].split(","):
            base, name, kind = root / "memory", "memory.limit_in_bytes", "cgroup v1"
        else:
            continue
        rel = parts[2].strip("/")
        while True:
            value = _read_number(base / rel / name)
            if value is not None and value < CGROUP_V1_UNLIMITED and (best is None or value < best.bytes):
                best = Limit(value, f"{kind} /{rel}")
            if not rel:
                break
            rel = rel.rpartition("/")[0]
    return best


def host_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect(override: int | None = None, override_from: str = "--memory-limit") -> Limit:
    """--memory-limit, else the cgroup's limit (when below the RAM), else the host's RAM."""
    if override is not None:
        return Limit(override, override_from)
    ram = host_ram()
    try:
        found = cgroup_limit(Path("/proc/self/cgroup").read_text())
    except OSError:
        found = None
    return found if found is not None and found.bytes < ram else Limit(ram, "host RAM")


@dataclass(frozen=True)
class XetPlan:
    limit: int
    streams: int  # Xet files streamed at once by our workers
    settings: dict[str, int]  # the hf_xet config in effect (its own, or bounded)
    overrides: dict[str, int] = field(default_factory=dict)  # what we set on top of hf_xet's own
    planned: int = 0  # planned peak: BASE + buffer + connections x XORB + streams x TERM
    warning: str | None = None  # HF_XET_HIGH_PERFORMANCE asked for but not affordable, or floors

    @property
    def bounded(self) -> bool:
        return bool(self.overrides)


def planned_peak(buffer_limit: int, connections: int, streams: int) -> int:
    return BASE + buffer_limit + connections * XORB + streams * TERM


def plan_xet(limit: int, current: dict[str, int], *, workers: int, high_performance: bool = False,
             operator_set: frozenset[str] = frozenset()) -> XetPlan:
    """Keep hf_xet's settings (`current`, as its XetConfig reads them) when their worst case fits
    SHARE of `limit`; otherwise bound what the operator did not set. Pure: see the module's table."""
    budget = int(limit * SHARE) - BASE
    as_is = planned_peak(current[BUFFER_LIMIT], current[MAX_CONNECTIONS], workers)
    if as_is <= budget + BASE:
        return XetPlan(limit, workers, dict(current), planned=as_is)
    streams = max(1, min(workers, budget // 4 // TERM))
    connections = max(1, min(current[MAX_CONNECTIONS], budget // 2 // XORB))
    buffer_limit = min(current[BUFFER_LIMIT], max(MIN_BUFFER, budget - streams * TERM - connections * XORB))
    wanted = {BUFFER_LIMIT: buffer_limit, BUFFER_SIZE: max(MIN_BUFFER_SIZE, buffer_limit // 2),
              BUFFER_PERFILE: buffer_limit // 16, MAX_CONNECTIONS: connections,
              INITIAL_CONNECTIONS: min(current[INITIAL_CONNECTIONS], connections),
              MIN_CONNECTIONS: min(current[MIN_CONNECTIONS], connections)}
    overrides = {k: v for k, v in wanted.items()
                 if v < current[k] and not any(n in operator_set for n in env_names(k))}
    settings = {**current, **overrides}
    planned = planned_peak(settings[BUFFER_LIMIT], settings[MAX_CONNECTIONS], streams)
    notes = []
    if high_performance:
        notes.append(f"HF_XET_HIGH_PERFORMANCE needs up to {as_is // MiB} MiB here ({current[MAX_CONNECTIONS]} "
                     f"connections x 64 MiB, a {current[BUFFER_LIMIT] // MiB} MiB buffer, {workers} streams)")
    if planned > limit:
        notes.append(f"even bounded, a pull may need {planned // MiB} MiB")
    warning = None
    if notes:
        warning = (f"{'; '.join(notes)}, over {SHARE:.0%} of the {limit // MiB} MiB memory limit: using "
                   f"{settings[MAX_CONNECTIONS]} connections, {streams} Xet streams, a "
                   f"{settings[BUFFER_LIMIT] // MiB} MiB download buffer")
    return XetPlan(limit, streams, settings, overrides, planned, warning)


def peak_rss() -> tuple[int, int]:
    """(this process, its largest finished child) peak RSS in bytes, the kernel's high-water marks.
    Ours is VmHWM, of this program's memory alone: ru_maxrss also keeps the RSS of the process that
    forked us (a Python parent's 580 MB, measured, against our 350). hf_transfer runs in a child."""
    own = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                own = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return own or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, children
