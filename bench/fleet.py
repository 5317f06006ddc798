"""Benchmark: a fleet of node agents filling their caches, straight from the Hub or from one published bucket.

    .venv/bin/python bench/fleet.py [--nodes 4 8 16] [--shards 4] [--shard-mib 80]

One run serves a generated model from devhub (in this process) and starts SeaweedFS (`weed mini`),
both on 127.0.0.1. For each N, N `model-agent pull` processes, each with its own cache directory,
are started together, two ways:

- (a) hub: `model-agent pull ORG/NAME --revision COMMIT`, every node from the Hub server;
- (b) bucket: ONE `model-agent push ORG/NAME s3://fleet/model/` first, then every node
  `model-agent pull s3://fleet/model/ --revision COMMIT` (the published mirror, rebuilt under the
  Hub repo id and commit).

It reports the origin (Hub) body bytes (devhub counts what it writes to sockets), the bucket bytes
(the agents' own JSON summaries), the Hub's resolver requests, the time until all N are ready, the
slowest node and the push. Every node's snapshot is verified by sha256. A first round with N = 1
calibrates the model of this machine (bench/fleetmodel.py), which then predicts N = 4, 8, 16; the
same formulas with a real cluster's parameters project 100 and 1,000 nodes. Writes
bench/fleet-results.md. This is a benchmark, not a test: it never fails on a slow number, it reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "tests"), str(HERE), str(ROOT)]  # tests/objstore/ (the servers) before this file

import fleetmodel  # noqa: E402
import psutil  # noqa: E402
from measure import _machine_busy  # noqa: E402
from objstore.servers import SeaweedFS  # noqa: E402
from scenarios import VENV_BIN  # noqa: E402
from suite import agent_events, base_env  # noqa: E402
from verify import check_tree, expected_hashes  # noqa: E402

from agent.devhub import HubServer, make_model  # noqa: E402

MiB = 2**20
REPO = "bench/fleet-model"
BUCKET, PREFIX = "fleet", "model/"


@dataclass
class Round:
    """N nodes started together, one way (hub or bucket)."""

    way: str
    n: int
    ready_s: list[float] = field(default_factory=list)  # per node: start of the fleet to its exit
    problems: list[str] = field(default_factory=list)
    origin_bytes: int = 0  # file bodies the Hub sent during the round
    resolver_requests: int = 0  # the Hub's /resolve/ calls: what its per-IP rate limit counts
    api_requests: int = 0  # every request to the Hub's API host (resolve included)
    bucket_bytes: int = 0  # what the agents say they fetched from the bucket
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0  # busy CPU of the whole machine: what is not ours is other tenants' and the kernel's

    @property
    def all_ready_s(self) -> float:
        return max(self.ready_s) if self.ready_s else float("nan")


@dataclass
class Servers:
    hub: HubServer
    weed: SeaweedFS
    commit: str
    expected: dict  # repo path -> (size, sha256)
    work: Path

    @property
    def model_bytes(self) -> int:
        return sum(size for size, _ in self.expected.values())

    def env(self, home: Path) -> dict[str, str]:
        """A node's environment: the Hub (so any Hub read would be counted) and the bucket's keys."""
        env = dict(base_env(self.hub.url), HF_HOME=str(home), **self.weed.env(AWS_DEFAULT_REGION="us-east-1"))
        env["PYTHONPATH"] = str(ROOT)
        return env

    def weed_cpu(self) -> float:
        weed = psutil.Process(self.weed.proc.pid).cpu_times()
        return weed.user + weed.system

    def cpu(self) -> float:
        """CPU of both servers so far: devhub runs in this process, SeaweedFS in its own."""
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime + self.weed_cpu()


def snapshot_of(cache: Path, commit: str) -> Path | None:
    """The node's snapshot: under the Hub commit when the mirror kept its identity, else the only one."""
    pinned = cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit
    if pinned.is_dir():
        return pinned
    found = sorted(cache.glob("models--*/snapshots/*"))
    return found[0] if len(found) == 1 else None


def node_argv(way: str, cache: Path, commit: str) -> list[str]:
    source = REPO if way == "hub" else f"s3://{BUCKET}/{PREFIX}"
    return [str(VENV_BIN / "model-agent"), "pull", source, "--revision", commit, "--cache-dir", str(cache),
            "--log-format", "json"]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # every child reaped so far: the node agents
    return ru.ru_utime + ru.ru_stime


def _start_nodes(srv: Servers, way: str, n: int, root: Path) -> list[tuple[subprocess.Popen, Path]]:
    nodes = []
    for i in range(n):
        node = root / f"node-{i:02d}"
        node.mkdir(parents=True)
        with open(node / "log.txt", "wb") as log:  # a file, not a pipe: a chatty node can never block
            proc = subprocess.Popen(node_argv(way, node / "cache", srv.commit), env=srv.env(node / "hf_home"),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        nodes.append((proc, node))
    return nodes


def run_round(srv: Servers, way: str, n: int, timeout: float) -> Round:
    root = srv.work / "nodes"
    shutil.rmtree(root, ignore_errors=True)
    os.sync()  # no dirty pages of the previous round left to pay for
    srv.hub.stats.reset()
    cpu0, server0, machine0 = _children_cpu(), srv.cpu(), _machine_busy()
    start = time.monotonic()
    nodes = _start_nodes(srv, way, n, root)
    ends: list[float] = [0.0] * n

    def reap(i: int, proc: subprocess.Popen) -> None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # that node's own session, by its id
            proc.wait()
        ends[i] = time.monotonic() - start

    threads = [threading.Thread(target=reap, args=(i, p)) for i, (p, _) in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r = Round(way, n, ready_s=ends, client_cpu_s=_children_cpu() - cpu0, server_cpu_s=srv.cpu() - server0,
              machine_cpu_s=_machine_busy() - machine0)
    _account(srv, r, nodes)
    shutil.rmtree(root, ignore_errors=True)  # N caches of the model: gone before the next round
    return r


def _account(srv: Servers, r: Round, nodes: list[tuple[subprocess.Popen, Path]]) -> None:
    r.origin_bytes = srv.hub.stats.bytes_sent()
    api = [q for q in srv.hub.stats.requests if q.host == "api"]
    r.api_requests, r.resolver_requests = len(api), sum("/resolve/" in q.path for q in api)
    for i, (proc, node) in enumerate(nodes):
        events = agent_events(node / "log.txt")
        summary = events.get("summary", {})
        if r.way == "bucket":
            r.bucket_bytes += int(summary.get("bytes_fetched", 0))
        snap = snapshot_of(node / "cache", srv.commit) if proc.returncode == 0 else None
        if proc.returncode != 0:
            tail = (node / "log.txt").read_text(errors="replace")[-300:].replace("\n", " ")
            r.problems.append(f"node {i}: exit {proc.returncode}: {tail}")
        elif snap is None:
            r.problems.append(f"node {i}: no single snapshot in its cache")
        else:
            if snap.name != srv.commit:
                r.problems.append(f"node {i}: snapshot {snap.name[:12]} is not the Hub commit")
            r.problems += [f"node {i}: {p}" for p in check_tree(snap, srv.expected)]


def push_once(srv: Servers, timeout: float) -> dict:
    """The publish Job: Hub -> staging cache -> bucket, once. Its Hub bytes are the cluster's only ones."""
    srv.weed.client().create_bucket(Bucket=BUCKET)
    staging = srv.work / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    srv.hub.stats.reset()
    log = srv.work / "push.log"
    argv = [str(VENV_BIN / "model-agent"), "push", REPO, f"s3://{BUCKET}/{PREFIX}", "--revision", srv.commit,
            "--cache-dir", str(staging), "--log-format", "json"]
    start = time.monotonic()
    with open(log, "wb") as out:
        rc = subprocess.run(argv, env=srv.env(srv.work / "push-home"), stdout=out, stderr=subprocess.STDOUT, check=False,
                            timeout=timeout).returncode
    wall = time.monotonic() - start
    text = log.read_text(errors="replace")
    published = next((e for e in json_events(text) if e.get("event") == "published"), {})
    shutil.rmtree(staging, ignore_errors=True)
    return {"rc": rc, "wall_s": wall, "upload_s": published.get("seconds"), "origin_bytes": srv.hub.stats.bytes_sent(),
            "resolver_requests": sum(q.host == "api" and "/resolve/" in q.path for q in srv.hub.stats.requests),
            "log_tail": text[-600:] if rc else ""}


def json_events(text: str) -> list[dict]:
    """The agent's JSON log lines (`--log-format json` writes each whole, one per line)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"ts"')]


def disk_write_rate(work: Path, nbytes: int = 256 * MiB) -> float:
    """Sequential write + fsync of this disk, bytes/s: the shared resource a fleet on one machine also queues on."""
    path = work / "disk-probe"
    block = os.urandom(8 * MiB)
    start = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(nbytes // len(block)):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    rate = nbytes / (time.monotonic() - start)
    path.unlink()
    return rate


def print_round(r: Round, model_bytes: int) -> None:
    ok = "ok" if not r.problems else f"{len(r.problems)} problems: {r.problems[0][:160]}"
    print(f"  N={r.n:<3} {r.way:6} all ready {r.all_ready_s:6.2f}s (fastest {min(r.ready_s):5.2f}s)  "
          f"origin {r.origin_bytes / model_bytes:5.2f} copies  bucket {r.bucket_bytes / model_bytes:5.2f} copies  "
          f"resolver {r.resolver_requests:4}  cpu {r.client_cpu_s:5.1f}+{r.server_cpu_s:4.1f}s  {ok}", flush=True)


def measure(args, work: Path) -> dict:
    files = make_model(work / "src", large_files=args.shards, large_size=args.shard_mib * MiB, small_files=5)
    expected = expected_hashes(files)
    with HubServer(work / "hub") as hub, SeaweedFS(work / "weed") as weed:
        srv = Servers(hub, weed, hub.add_repo(REPO, files), expected, work)
        print(f"model: {len(expected)} files, {srv.model_bytes / MiB:.0f} MiB; commit {srv.commit[:12]}", flush=True)
        push = push_once(srv, args.timeout)
        print(f"  push: exit {push['rc']} in {push['wall_s']:.2f}s, origin {push['origin_bytes'] / srv.model_bytes:.2f} "
              f"copies {push['log_tail']}", flush=True)
        rounds = []
        for n in [1, *args.nodes]:  # N = 1 first: the calibration of this machine, and everyone's warm-up
            for way in ("hub", "bucket"):
                rounds.append(run_round(srv, way, n, args.timeout))
                print_round(rounds[-1], srv.model_bytes)
        return {"files": len(expected), "model_bytes": srv.model_bytes, "push": push, "rounds": rounds,
                "disk_bps": disk_write_rate(work), "commit": srv.commit}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=80)
    ap.add_argument("--timeout", type=float, default=300, help="seconds before a node is killed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/model-agent-fleet"))
    ap.add_argument("--out", type=Path, default=HERE / "fleet-results.md")
    fleetmodel.add_arguments(ap)
    args = ap.parse_args(argv)
    assert args.shards * args.shard_mib * max(args.nodes) <= 8 * 1024, "keep the fleet's caches at 8 GiB or less"
    started = time.monotonic()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        result = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["total_s"], result["cores"] = time.monotonic() - started, os.cpu_count() or 1
    result["machine"] = (f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
                         f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end")
    md = fleetmodel.render(args, result, shlex.join(["python", "bench/fleet.py", *(sys.argv[1:] if argv is None else argv)]))
    args.out.write_text(md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
