"""Xet benchmark over the dev Hub's HTTP CAS: model-agent vs `hf download` (hf_xet's own), and resume.

    python bench/xet.py [--size-gib 1] [--shards 3] [--small-files 40] [--runs 3] [--skip-resume] [--cas http]

Serves a generated model (shards in Xet, small files plain) from devhub with its Xet CAS over HTTP
(HubServer(xet="http"), as the Hub's CAS is served), then pulls it with `model-agent --engine auto`,
`--engine xet`, `hf download` and `hf download` with HF_XET_HIGH_PERFORMANCE=1: wall time and peak
RSS, medians of --runs, every result's sha256 checked (bench/measure.py, bench/suite.py). The resume
part SIGKILLs a model-agent pull once its partial files hold half the model, re-runs it, and reports
the xorb bytes the CAS sent for both runs as a ratio of the model's bytes (the issue's goal: <= 1.15x).
Prints a Markdown section; bench/results.md carries the copy that was measured last.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cgroups
from scenarios import Case, agent_case, hf_case
from suite import base_env, run_suite
from verify import check_tree, expected_hashes

from agent.devhub import HubServer, make_model

MIB, GIB = 2**20, 2**30
REPO = "bench/xet-model"
XORB_PATHS = "/xorbs/*"  # what the HTTP CAS counts as xorb bytes (devhub stats, by request path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="model size, in --shards equal shards (default 1)")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--small-files", type=int, default=40)
    p.add_argument("--runs", type=int, default=3, help="runs per tool; medians are reported (default 3)")
    p.add_argument("--cas", choices=("http", "local"), default="http", help="how the CAS is served (default http)")
    p.add_argument("--cases", default="auto,xet,hf,hf-hp,hf-verify",
                   help="comma-separated subset of auto,xet,hf,hf-hp,hf-verify")
    p.add_argument("--integrity", action="store_true",
                   help="also pull through a CAS that flips 16 bytes of every xorb body, with each tool")
    p.add_argument("--skip-resume", action="store_true")
    p.add_argument("--cas-latency-ms", type=float, default=0,
                   help="hold every CAS request this long before answering: a CAS a round trip away (default 0)")
    p.add_argument("--limits", default="", metavar="512Mi,1Gi",
                   help="also run `auto` in child memory cgroups of these limits (Mi/Gi), as a pod's limit")
    p.add_argument("--kill-at", type=float, default=0.5, help="fraction of the model on disk at the SIGKILL")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/model-agent-bench-xet"))
    p.add_argument("--keep", action="store_true", help="keep the model and the CAS for a faster next run")
    p.add_argument("--agent-env", action="append", default=[], metavar="K=V",
                   help="extra environment for model-agent runs (to try hf_xet settings)")
    p.add_argument("--timeout", type=float, default=600)
    return p.parse_args(argv)


def with_env(case: Case, key: str, label: str, **env: str) -> Case:
    """The same command under extra environment variables (`env` execs it: same pid, same rusage)."""
    prefix = ["env", *(f"{k}={v}" for k, v in env.items())]
    return Case(key, label, lambda dest: prefix + case.argv(dest), case.files_root, case.is_agent)


# sha256 of every file listed in argv[1] ("digest  name" lines), in the folder argv[2]: hashlib's
# OpenSSL sha256 (SHA-NI here), as model-agent's; coreutils' sha256sum 9.1 took 2.9 s for the 1 GiB.
CHECK = ("import hashlib, sys, os; os.chdir(sys.argv[2]); bad = [n for d, n in (l.split('  ', 1) for l in "
         "open(sys.argv[1]).read().splitlines()) if hashlib.file_digest(open(n, 'rb'), 'sha256').hexdigest() != d]; "
         "sys.exit(1 if bad else 0)")


def verified(case: Case, sums: Path) -> Case:
    """`hf download`, then the sha256 of what it wrote: the check model-agent makes on every file,
    which `hf download` skips for Xet files (it wrote corrupted xorb bytes and exited 0: --integrity)."""
    def argv(dest: Path) -> list[str]:
        cmd = " ".join(shlex.quote(a) for a in case.argv(dest))
        check = " ".join(shlex.quote(a) for a in (sys.executable, "-c", CHECK, str(sums), str(case.files_root(dest))))
        return ["sh", "-c", f"{cmd} && {check}"]

    return Case("hf-verify", "hf download, then a sha256 check", argv, case.files_root)


def cases(names: list[str], commit: str, agent_env: dict[str, str], sums: Path) -> list[Case]:
    hf = hf_case(REPO, commit)
    auto, xet = agent_case("auto", REPO, commit), agent_case("xet", REPO, commit)
    if agent_env:
        auto, xet = (with_env(c, c.key, f"{c.label} ({' '.join(agent_env)})", **agent_env) for c in (auto, xet))
    known = {"auto": auto, "xet": xet,
             "hf": Case("hf", "hf download (hf_xet)", hf.argv, hf.files_root),
             "hf-hp": with_env(hf, "hf-hp", "hf download, HF_XET_HIGH_PERFORMANCE=1", HF_XET_HIGH_PERFORMANCE="1"),
             "hf-verify": verified(hf, sums)}
    return [known[n] for n in names]


def medians(records: list[dict]) -> dict:
    ok = [r for r in records if not r["problems"]]
    return {"label": records[0]["label"], "verified": f"{len(ok)}/{len(records)}",
            "wall_s": statistics.median(r["wall_s"] for r in ok) if ok else float("nan"),
            "walls": [r["wall_s"] for r in records], "rss_mib": statistics.median(r["maxrss_mib"] for r in records),
            "rss_runs": [r["maxrss_mib"] for r in records],
            "client_cpu_s": statistics.median(r["client_cpu_s"] for r in records),
            "server_cpu_s": statistics.median(r["server_cpu_s"] for r in records)}


def table(results: dict[str, list]) -> str:
    rows = {k: medians(v) for k, v in results.items()}
    hf = rows.get("hf")
    # CPU: the tool's own (user + sys, all its threads) and the in-process Hub's while it ran. On a
    # machine whose cores are all busy, the sum over the cores bounds the wall time from below.
    lines = ["| run | wall s, median (all runs) | vs hf download | peak RSS MiB, median (all runs) "
             "| CPU s: tool + Hub | sha256 ok |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in rows.values():
        ratio = f"{s['wall_s'] / hf['wall_s']:.2f}x" if hf else "-"
        lines.append(f"| {s['label']} | {s['wall_s']:.2f} ({', '.join(f'{w:.2f}' for w in s['walls'])}) | {ratio} "
                     f"| {s['rss_mib']:.0f} ({', '.join(f'{v:.0f}' for v in s['rss_runs'])}) "
                     f"| {s['client_cpu_s']:.2f} + {s['server_cpu_s']:.2f} | {s['verified']} |")
    return "\n".join(lines)


def integrity_text(work: Path) -> str:
    """Each tool against a CAS that flips 16 bytes inside every xorb body (the chunks still decode)."""
    folder = work / "integrity"
    folder.mkdir(exist_ok=True)
    (folder / "weights.bin").write_bytes(os.urandom(3 * MIB))  # incompressible: stored raw, flips decode
    (folder / "config.json").write_text("{}")
    want = hashlib.sha256((folder / "weights.bin").read_bytes()).hexdigest()
    lines = []
    with HubServer(folder / "hub", xet="http") as hub:
        commit = hub.add_repo("bench/corrupt", {"weights.bin": folder / "weights.bin", "config.json": folder / "config.json"})
        hub.faults.add("corrupt", path_glob="/xorbs/*", host="cas", count=1000, after_bytes=100, span=16)
        for case in (agent_case("auto", "bench/corrupt", commit), hf_case("bench/corrupt", commit)):
            dest = folder / case.key
            env = dict(base_env(hub.url), HF_HOME=str(folder / f"{case.key}-home"))
            rc = subprocess.run(case.argv(dest), env=env, capture_output=True, check=False).returncode
            path = case.files_root(dest) / "weights.bin"
            kept = "no file" if not path.exists() else (
                "right bytes" if hashlib.sha256(path.read_bytes()).hexdigest() == want else "WRONG bytes")
            lines.append(f"{case.label}: exit {rc}, {kept}")
    return "Corrupted xorb bytes (16 bytes flipped in every body, chunks still decode): " + "; ".join(lines) + "."


def parse_limit(text: str) -> int:
    return int(text[:-2]) * {"Mi": MIB, "Gi": GIB}[text[-2:]]


def limited_table(hub, commit: str, expected: dict, work: Path, args: argparse.Namespace) -> str:
    """`auto` under each memory limit, in a real child cgroup (page cache charged, as in a pod)."""
    lines = ["| memory limit | wall s, median (all runs) | peak RSS MiB, median | Xet streams | OOM kills | sha256 ok |",
             "|---|---:|---:|---:|---:|---:|"]
    auto = agent_case("auto", REPO, commit)
    for text in args.limits.split(","):
        path = cgroups.make_child(f"model-agent-bench-{text}", parse_limit(text))
        try:
            case = Case(f"auto-{text}", f"auto, {text}", lambda dest, p=path: cgroups.enter_argv(p, auto.argv(dest)),
                        auto.files_root, is_agent=True)
            records = run_suite([case], hub, expected, work, args.runs, args.timeout)[case.key]
            kills = cgroups.oom_kills(path)
        finally:
            cgroups.remove(path)
        s = medians(records)
        streams = {r["agent_events"].get("memory", {}).get("xet_streams") for r in records} - {None}
        lines.append(f"| {text} | {s['wall_s']:.2f} ({', '.join(f'{w:.2f}' for w in s['walls'])}) | {s['rss_mib']:.0f} "
                     f"| {', '.join(map(str, sorted(streams))) or '-'} | {kills} | {s['verified']} |")
    return "\n".join(lines)


def partial_bytes(cache: Path) -> int:
    total = 0
    for path in cache.rglob("*.incomplete"):
        try:
            total += path.stat().st_size
        except OSError:  # renamed into place meanwhile
            pass
    return total


def kill_when(cmd: list[str], env: dict, cache: Path, at_bytes: int, timeout: float) -> int:
    """Runs cmd and SIGKILLs it once its partial files hold at_bytes; returns what they held then."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, held = time.monotonic() + timeout, 0
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            held = partial_bytes(cache)
            if held >= at_bytes:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return held


def resume(hub, commit: str, expected: dict, work: Path, kill_at: float, timeout: float,
           agent_env: dict[str, str]) -> dict:
    """Xorb bytes sent for a pull SIGKILLed at kill_at of the model, plus its re-run, over the model's bytes."""
    nbytes = sum(size for size, _ in expected.values())
    run_dir = work / "runs" / "resume"
    shutil.rmtree(run_dir, ignore_errors=True)
    cache = run_dir / "out"
    env = dict(base_env(hub.url), HF_HOME=str(run_dir / "hf_home"), **agent_env)
    # a 2 s lease: the re-run takes the dead writer's lease over without waiting the default 60 s
    cmd = agent_case("auto", REPO, commit).argv(cache) + ["--lease-ttl", "2s"]
    hub.stats.reset()
    held = kill_when(cmd, env, cache, int(nbytes * kill_at), timeout)
    first = hub.stats.bytes_sent(XORB_PATHS)
    hub.stats.reset()
    rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout,
                        check=False).returncode
    second = hub.stats.bytes_sent(XORB_PATHS)
    problems = check_tree(agent_case("auto", REPO, commit).files_root(cache), expected) if rc == 0 else [f"exit {rc}"]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"held_at_kill": held, "first": first, "second": second, "ratio": (first + second) / nbytes,
            "problems": problems, "model_bytes": nbytes}


def resume_text(r: dict) -> str:
    return (f"SIGKILL once the partial files held {r['held_at_kill'] / MIB:.0f} MiB of "
            f"{r['model_bytes'] / MIB:.0f} MiB, then a re-run: the CAS sent {r['first'] / MIB:.0f} MiB of xorbs "
            f"before the kill and {r['second'] / MIB:.0f} MiB after, {r['ratio']:.2f}x the model's bytes "
            f"(re-run verified: {'yes' if not r['problems'] else '; '.join(r['problems'][:2])}).")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir.resolve()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        shard = int(args.size_gib * GIB / args.shards)
        files = make_model(work / "src", large_files=args.shards, large_size=shard, small_files=args.small_files)
        expected = expected_hashes(files)
        agent_env = dict(kv.split("=", 1) for kv in args.agent_env)
        with HubServer(work / "hub", xet=args.cas) as hub:
            commit = hub.add_repo(REPO, files)
            if args.cas_latency_ms:
                hub.faults.add("latency", host="cas", count=2**62, seconds=args.cas_latency_ms / 1000)
            served = "over HTTP" if args.cas == "http" else "as local://"
            served += f", {args.cas_latency_ms:g} ms per CAS request" if args.cas_latency_ms else ""
            out = [(f"Model: {args.shards} x {shard / MIB:.0f} MiB shards + {args.small_files} small files, "
                    f"Xet CAS served {served}, medians of {args.runs}."), ""]
            if args.cases:
                sums = work / "sha256sums"
                sums.write_text("".join(f"{digest}  {name}\n" for name, (_, digest) in expected.items()))
                chosen = cases(args.cases.split(","), commit, agent_env, sums)
                results = run_suite(chosen, hub, expected, work, args.runs, args.timeout)
                out.append(table(results))
            if args.integrity:
                out += ["", integrity_text(work)]
            if args.limits:
                out += ["", limited_table(hub, commit, expected, work, args)]
            if not args.skip_resume:
                out += ["", resume_text(resume(hub, commit, expected, work, args.kill_at, args.timeout, agent_env))]
        print("\n" + "\n".join(out))
    finally:
        if not args.keep:  # a few GB: never left behind unless asked
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
