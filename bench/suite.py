"""Runs a list of cases N times against one hub and verifies every result.

Runs are interleaved (run 1 of every case, then run 2 ...) and each round starts one case later,
so that drift on the machine (background writeback, other tenants) and "who runs right after the
copy" spread over all tools instead of always hitting the same one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from measure import run_measured
from scenarios import Case
from verify import check_tree

MIB = 2**20


def base_env(endpoint: str) -> dict[str, str]:
    """The caller's environment minus anything that could steer a tool (tokens, caches, options)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODEL_AGENT_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1")
    return env


def agent_events(log: Path) -> dict[str, dict]:
    """model-agent's JSON log lines we keep: which engine it chose, and its own summary."""
    events: dict[str, dict] = {}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") in ("engine", "memory", "summary") or rec.get("level") == "error":
                events[rec.get("event") or "error"] = rec
    return events


def run_one(case: Case, run: int, hub, expected: dict, work: Path, timeout: float) -> dict:
    run_dir = work / "runs" / f"{case.key}-{run}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    # a fresh HF_HOME per run: no token, no shared hf_xet chunk cache between runs
    env = dict(base_env(hub.url), HF_HOME=str(run_dir / "hf_home"))
    hub.stats.reset()
    m = run_measured(case.argv(run_dir / "out"), env, run_dir / "log.txt", timeout)
    served = hub.stats.bytes_sent()
    ok_exit = m.rc == 0 and not m.timed_out
    if ok_exit:
        problems = check_tree(case.files_root(run_dir / "out"), expected)
    else:
        problems = [f"timed out after {timeout:.0f} s" if m.timed_out else f"exit code {m.rc}"]
    events = agent_events(run_dir / "log.txt") if case.is_agent else {}
    shutil.rmtree(run_dir)  # keep the disk footprint at one download at a time
    return {"case": case.key, "label": case.label, "run": run, **m.as_dict(), "served_bytes": served,
            "problems": problems, "agent_events": events}


def _progress(rec: dict, nbytes: int) -> str:
    state = "ok" if not rec["problems"] else "FAILED: " + "; ".join(rec["problems"][:3])
    rate = nbytes / rec["wall_s"] / MIB
    return (f"  {rec['label']:<28} run {rec['run'] + 1}: {rec['wall_s']:6.2f} s  {rate:7.0f} MiB/s  "
            f"+sync {rec['sync_s']:5.2f} s  rss {rec['maxrss_mib']:6.0f} MiB  sha256 {state}")


def run_suite(cases: list[Case], hub, expected: dict, work: Path, runs: int, timeout: float) -> dict[str, list]:
    nbytes = sum(size for size, _ in expected.values())
    results: dict[str, list] = {c.key: [] for c in cases}
    for run in range(runs):
        shift = run % len(cases)
        for case in cases[shift:] + cases[:shift]:
            rec = run_one(case, run, hub, expected, work, timeout)
            print(_progress(rec, nbytes), flush=True)
            if rec["problems"] and rec["rc"] != 0:
                print("    log tail: " + rec["log_tail"][-800:].replace("\n", "\n    "), flush=True)
            results[case.key].append(rec)
    return results
