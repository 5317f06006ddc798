"""Memory bounded by the pod (issue 15): the limit read from the process's own cgroup, hf_xet's buffers
and connections sized to fit it, the RSS on /metrics and the peak in the summary.

The key test is real: a 1 GiB Xet pull in a child memory cgroup of this test's own cgroup, limited to
512 MiB, with the GKE guide's HF_XET_HIGH_PERFORMANCE=1. Without the sizing the kernel OOM-kills it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import ROOT, agent_cmd, hub_env, run_agent

from agent import memory
from agent.devhub import HubServer, make_model
from agent.memory import (
    BUFFER_LIMIT,
    BUFFER_PERFILE,
    BUFFER_SIZE,
    INITIAL_CONNECTIONS,
    MAX_CONNECTIONS,
    MIN_CONNECTIONS,
    MiB,
    plan_xet,
)

GiB = 1024 * MiB


def high_performance(limit: int) -> dict[str, int]:
    """hf_xet 1.8.0's HF_XET_HIGH_PERFORMANCE settings as it derives them for `limit` (XetConfig.get)."""
    return {BUFFER_SIZE: limit // 8, BUFFER_PERFILE: limit // 32, BUFFER_LIMIT: limit // 2,
            MAX_CONNECTIONS: 124, INITIAL_CONNECTIONS: 16, MIN_CONNECTIONS: 4}


# limit -> streams, connections, buffer limit / size / per file (MiB), planned peak (MiB): memory.py's table
TABLE = [
    (256 * MiB, 1, 1, (128, 32, 8), 312),
    (512 * MiB, 3, 2, (128, 64, 8), 424),
    (1 * GiB, 7, 5, (184, 92, 11), 768),
    (2 * GiB, 15, 11, (376, 188, 23), 1536),
    (4 * GiB, 16, 23, (1120, 512, 70), 3072),
    (8 * GiB, 16, 47, (2656, 1024, 166), 6144),
]
STREAMS = 16  # the Xet streams of --workers 8 (engines/xet.py: XET_STREAMS_PER_WORKER)


@pytest.mark.parametrize("limit, streams, connections, buffers, planned", TABLE)
def test_plan_table(limit, streams, connections, buffers, planned):
    plan = plan_xet(limit, high_performance(limit), workers=STREAMS, high_performance=True)
    s = plan.settings
    assert (plan.streams, s[MAX_CONNECTIONS]) == (streams, connections)
    assert (s[BUFFER_LIMIT] // MiB, s[BUFFER_SIZE] // MiB, s[BUFFER_PERFILE] // MiB) == buffers
    assert plan.planned // MiB == planned
    assert s[BUFFER_SIZE] + 8 * s[BUFFER_PERFILE] <= s[BUFFER_LIMIT]  # hf_xet's own invariant
    assert plan.bounded and "HF_XET_HIGH_PERFORMANCE" in plan.warning


def test_plan_keeps_what_fits_and_what_the_operator_set():
    roomy = plan_xet(64 * GiB, high_performance(64 * GiB), workers=STREAMS, high_performance=True)
    assert not roomy.bounded and roomy.warning is None and roomy.streams == STREAMS
    mine = plan_xet(512 * MiB, high_performance(512 * MiB), workers=STREAMS,
                    operator_set=frozenset({"HF_XET_FIXED_DOWNLOAD_CONCURRENCY"}))
    assert MAX_CONNECTIONS not in mine.overrides and mine.settings[MAX_CONNECTIONS] == 124
    assert mine.overrides[BUFFER_LIMIT] == 128 * MiB


def _write(root: Path, rel: str, name: str, text: str) -> None:
    (root / rel).mkdir(parents=True, exist_ok=True)
    (root / rel / name).write_text(text)


def test_cgroup_limit_is_the_tightest_of_the_own_cgroup_and_its_ancestors(tmp_path):
    # v1: the pod's cgroup is limited, the container's below it reads "unlimited", the root too
    _write(tmp_path, "memory", "memory.limit_in_bytes", str(memory.CGROUP_V1_UNLIMITED))
    _write(tmp_path, "memory/kubepods/pod1", "memory.limit_in_bytes", str(2 * GiB))
    _write(tmp_path, "memory/kubepods/pod1/c1", "memory.limit_in_bytes", str(memory.CGROUP_V1_UNLIMITED))
    v1 = memory.cgroup_limit("4:memory:/kubepods/pod1/c1\n3:cpu:/x\n", tmp_path)
    assert v1 == memory.Limit(2 * GiB, "cgroup v1 /kubepods/pod1")
    # v2: "max" means no limit at that level
    _write(tmp_path, "a", "memory.max", str(768 * MiB))
    _write(tmp_path, "a/b", "memory.max", "max\n")
    assert memory.cgroup_limit("0::/a/b\n", tmp_path) == memory.Limit(768 * MiB, "cgroup v2 /a")
    assert memory.cgroup_limit("0::/elsewhere\n1:memory:/none\n", tmp_path) is None


# -- the real thing --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def gib_files(tmp_path_factory) -> dict[str, Path]:
    """1 GiB: 3 shards and 40 small files, the issue's model (about 4 s to generate)."""
    return make_model(tmp_path_factory.mktemp("gib-model"), large_files=3, large_size=(GiB - 40 * 2000) // 3,
                      small_files=40)


@pytest.fixture(scope="module")
def gib_hubs(tmp_path_factory, gib_files):
    """The 1 GiB model behind a Hub per Xet CAS mode ("local": hf_xet's local://, "http": served as the
    Hub's CAS serves it), started on first use."""
    with ExitStack() as stack:
        def hub(mode: str) -> HubServer:
            if mode not in hubs:
                hubs[mode] = stack.enter_context(HubServer(tmp_path_factory.mktemp(f"gib-hub-{mode}"), xet=mode))
                hubs[mode].add_repo("org/gib", gib_files)
            return hubs[mode]

        hubs: dict[str, HubServer] = {}
        yield hub


class ChildCgroup:
    """A child memory cgroup of this test process's own, with only the agent in it; removed after."""

    def __init__(self, name: str, limit: int):
        self.path, self.limit = self._create(name, limit)

    @staticmethod
    def _create(name: str, limit: int) -> tuple[Path, int]:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                path, limit_file = Path("/sys/fs/cgroup/memory" + rel) / name, "memory.limit_in_bytes"
                break
        else:
            rel = next((l.split(":", 2)[2] for l in Path("/proc/self/cgroup").read_text().splitlines()
                        if l.startswith("0::")), None)
            if rel is None:
                pytest.skip("no memory cgroup for this process")
            path, limit_file = Path("/sys/fs/cgroup" + rel) / name, "memory.max"
        try:
            path.mkdir()
            (path / limit_file).write_text(str(limit))
        except OSError as exc:
            if path.is_dir():
                path.rmdir()
            pytest.skip(f"cannot make a child memory cgroup under {path.parent}: {exc.strerror}")
        return path, limit

    def enter(self) -> None:  # in the child, between fork and exec: only the agent goes in
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        try:
            fields = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        except OSError:
            fields = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
        return int(fields.get("oom_kill", 0))

    def remove(self) -> None:
        for _ in range(50):  # the exited agent leaves the cgroup a moment later
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


# Before the sizing: local CAS at 512 MiB with HF_XET_HIGH_PERFORMANCE=1 was OOM-killed within 2 s; the
# HTTP CAS at 384 MiB too, with or without it (at 512 MiB it got through, peaking at 452 MiB).
@pytest.mark.parametrize("cas, limit, extra", [("local", 512 * MiB, {"HF_XET_HIGH_PERFORMANCE": "1"}),
                                               ("http", 384 * MiB, {})], ids=["local-512MiB-hp", "http-384MiB"])
def test_1gib_xet_pull_completes_in_a_small_memory_cgroup(gib_hubs, tmp_path, cas, limit, extra):
    cg = ChildCgroup(f"model-agent-test-{os.getpid()}", limit)
    try:
        args = agent_cmd("pull", "org/gib", "--cache-dir", str(tmp_path / "cache"), "--log-format", "json")
        proc = subprocess.run(args, env=hub_env(gib_hubs(cas), **extra), cwd=ROOT, capture_output=True, text=True,
                              check=False, timeout=300, preexec_fn=cg.enter)
        kills = cg.oom_kills()
    finally:
        cg.remove()
    assert proc.returncode == 0, f"rc {proc.returncode}, {kills} OOM kill(s): {proc.stderr[-2000:]}"
    got = events(proc.stderr)
    mem = [e for e in got if e["event"] == "memory"]
    assert mem and mem[0]["limit_bytes"] == limit and mem[0]["limit_from"].startswith("cgroup")
    assert mem[0]["bounded"] and mem[0]["planned_peak_bytes"] <= limit
    if extra:
        assert mem[0]["level"] == "warning" and "HF_XET_HIGH_PERFORMANCE" in mem[0]["msg"]
        assert f"{limit // MiB} MiB memory limit" in mem[0]["msg"]
    summary = next(e for e in got if e["event"] == "summary")
    assert summary["bytes"] >= GiB - 40 * 2000 and 0 < summary["peak_rss_bytes"] <= limit


def test_memory_limit_flag_overrides_and_rss_is_exported(xet_hub, tmp_path):
    textfile = tmp_path / "agent.prom"
    proc = run_agent("pull", "org/xet-model", "--cache-dir", str(tmp_path / "cache"), "--log-format", "json",
                     "--engine", "xet", "--memory-limit", "1Gi", "--metrics-textfile", str(textfile),
                     env=hub_env(xet_hub))
    assert proc.returncode == 0, proc.stderr
    got = events(proc.stderr)
    mem = next(e for e in got if e["event"] == "memory")
    assert (mem["limit_bytes"], mem["limit_from"]) == (GiB, "--memory-limit")
    summary = next(e for e in got if e["event"] == "summary")
    assert summary["peak_rss_bytes"] > 30 * MiB
    text = textfile.read_text()
    rss = [l for l in text.splitlines() if l.startswith("process_resident_memory_bytes ")]
    assert rss and float(rss[0].split()[1]) > 30 * MiB
    assert any(l.startswith("model_agent_peak_resident_memory_bytes ") for l in text.splitlines())


def test_memory_limit_is_checked(tmp_path):
    proc = run_agent("pull", "org/x", "--cache-dir", str(tmp_path), MODEL_AGENT_MEMORY_LIMIT="lots")
    assert proc.returncode == 2 and "MODEL_AGENT_MEMORY_LIMIT" in proc.stderr
