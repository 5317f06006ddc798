"""Benchmark: model-agent vs `hf download` vs a plain local copy, against the project's own Hub.

    python bench/run.py [--size-gib 2] [--shards 2] [--runs 2] [--skip-xet] [--keep]

One run serves a generated model of a few GB from devhub (in this process), pulls it with
model-agent under each engine, with `hf download` (same revision) and copies the same bytes
with `cp -r` (the disk's physical limit), verifies every result's sha256, and writes a
Markdown table to bench/results.md (raw records to bench/out/). A second, smaller model
shows whether peak RSS grows with model size, and serves an optional Xet section.
This is a benchmark, not a test: it never fails on a slow number, it reports it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from agent.devhub import HubServer, make_model

import envinfo
import report
import scenarios
from measure import measure_floor
from suite import run_one, run_suite
from verify import expected_hashes

BENCH = Path(__file__).resolve().parent
MIB, GIB = 2**20, 2**30
REPO, SMALL_REPO = "bench/model", "bench/model-small"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=2.0, help="main model size, in --shards equal shards (default 2)")
    p.add_argument("--shards", type=int, default=2,
                   help="safetensors shards per model (default 2; as many as --workers or more fetches each in order)")
    p.add_argument("--small-mib", type=int, default=512,
                   help="second model, as many shards, for RSS vs size and the Xet section (default 512)")
    p.add_argument("--runs", type=int, default=2, help="runs per tool; the best is reported (default 2)")
    p.add_argument("--skip-xet", action="store_true", help="leave out the Xet section")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/model-agent-bench"),
                   help="sources and downloads (same disk for all); deleted at the end unless --keep")
    p.add_argument("--keep", action="store_true", help="keep the generated models for a faster next run")
    p.add_argument("--timeout", type=float, default=600, help="seconds before one run is killed")
    return p.parse_args(argv)


def _timed(what: str, fn, *args, **kwargs):
    """Set-up steps print their duration: the run's total must stay within ~10 minutes."""
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    print(f"{what}: {time.perf_counter() - start:.1f} s", flush=True)
    return value


def make_models(args: argparse.Namespace, work: Path) -> dict:
    """Both models' files and their independently computed sha256s (same seed = same bytes on every run)."""
    # both models have the same number of shards: peak RSS depends on how many files are in flight,
    # so only the size may differ between them for the RSS-vs-size comparison to mean anything
    n = args.shards
    shard = int(args.size_gib * GIB / n) // MIB * MIB
    small_shard = args.small_mib // n * MIB
    main = _timed("generate main model", make_model, work / "src-main", large_files=n, large_size=shard, small_files=5)
    small = _timed("generate small model", make_model, work / "src-small", large_files=n,
                   large_size=small_shard, small_files=5, seed=1)
    return {"main": main, "small": small, "shard": shard, "small_shard": small_shard,
            "main_hashes": _timed("sha256 of main model (bench's own)", expected_hashes, main),
            "small_hashes": _timed("sha256 of small model", expected_hashes, small)}


def _nbytes(hashes: dict) -> int:
    return sum(size for size, _ in hashes.values())


def _summaries(results: dict[str, list], nbytes: int) -> dict[str, dict]:
    out = {key: report.summarize(recs, nbytes) for key, recs in results.items()}
    auto = results.get("agent-auto")
    if auto:  # show what `auto` resolved to on this hub (http when the hub has no xet)
        chosen = auto[0]["agent_events"].get("engine", {}).get("chosen", {})
        out["agent-auto"]["label"] += f" (chose {'+'.join(sorted(chosen)) or '?'})"
    return out


def _warm_up(hub, commit: str, models: dict, work: Path) -> None:
    """One unmeasured pull of the main model first: in trials the first run after set-up was
    often the slowest (cold imports, first connections, this VM's host faulting in memory the
    page cache had not touched yet), which would penalise whichever tool happens to go first."""
    case = scenarios.agent_case("http", REPO, commit)
    rec = run_one(case, -1, hub, models["main_hashes"], work, 300)
    print(f"warm-up (unmeasured pull): {rec['wall_s']:.1f} s, problems: {rec['problems'] or 'none'}", flush=True)


def http_sections(args: argparse.Namespace, work: Path, models: dict) -> dict:
    """The main comparison and the small-model RSS runs, on one hub without Xet."""
    with HubServer(work / "hub", xet=False) as hub:
        commit = _timed("hub ingest main", hub.add_repo, REPO, models["main"])
        small_commit = _timed("hub ingest small", hub.add_repo, SMALL_REPO, models["small"])
        _warm_up(hub, commit, models, work)
        print(f"\n== main model: {_nbytes(models['main_hashes']) / GIB:.2f} GiB, {args.runs} runs per tool", flush=True)
        main = run_suite(scenarios.http_cases(REPO, commit, work / "src-main"), hub, models["main_hashes"],
                         work, args.runs, args.timeout)
        print(f"\n== small model ({args.small_mib} MiB) for peak RSS vs size", flush=True)
        small = run_suite(scenarios.scaling_cases(SMALL_REPO, small_commit), hub, models["small_hashes"],
                          work, args.runs, args.timeout)
    return {"commit": commit, "main": main, "small": small}


def xet_section(args: argparse.Namespace, work: Path, models: dict) -> dict:
    """Smaller model on a hub whose LFS files are also in a local hf_xet CAS."""
    shutil.rmtree(work / "hub-xet", ignore_errors=True)  # fresh CAS: the upload time printed is real
    with HubServer(work / "hub-xet", xet="http") as hub:
        start = time.perf_counter()
        commit = hub.add_repo(REPO, models["small"])
        upload_s = time.perf_counter() - start
        print(f"\n== xet: CAS upload of {args.small_mib} MiB took {upload_s:.1f} s", flush=True)
        runs = run_suite(scenarios.xet_cases(REPO, commit, work / "src-small"), hub, models["small_hashes"],
                         work, args.runs, args.timeout)
    return {"commit": commit, "upload_s": upload_s, "runs": runs}


def render(args: argparse.Namespace, models: dict, http: dict, xet: dict | None, command: str, env: dict) -> str:
    main_bytes, small_bytes = _nbytes(models["main_hashes"]), _nbytes(models["small_hashes"])
    main_sum = _summaries(http["main"], main_bytes)
    shard_name, small_name = _shards(args.shards, models["shard"]), _shards(args.shards, models["small_shard"])
    parts = [envinfo.preamble(command, env, args.work_dir),
             f"## Main: {shard_name} safetensors + 5 small files ({main_bytes / MIB:.0f} MiB), "
             f"best of {args.runs} runs", "",
             "Hub server in the benchmark's own process on the same 2 cores as the client: they compete for CPU.", "",
             report.table(main_sum), "", envinfo.main_notes(models["floor_mib"]),
             f"## Peak RSS vs model size ({small_name} vs {shard_name}), worst of {args.runs} runs", "",
             report.scaling_table(_summaries(http["small"], small_bytes), main_sum, small_name, shard_name), "",
             envinfo.SCALING_NOTE]
    parts += _xet_part(args, xet, small_bytes, small_name)
    return "\n".join(parts)


def _shards(n: int, size: int) -> str:
    return f"{n} x {size / GIB:g} GiB" if size >= GIB else f"{n} x {size // MIB} MiB"


def _xet_part(args: argparse.Namespace, xet: dict | None, small_bytes: int, small_name: str) -> list[str]:
    if xet is None:
        return ["## Xet", "", "Skipped (--skip-xet).", ""]
    served = {k: max(r["served_bytes"] for r in recs) / 1024 for k, recs in xet["runs"].items()}
    return [f"## Xet: {small_name} + 5 small files on a hub with a local hf_xet CAS, "
            f"best of {args.runs} runs", "",
            f"CAS upload at hub start: {xet['upload_s']:.1f} s (not timed in the table). Same shared 2 cores.", "",
            report.table(_summaries(xet["runs"], small_bytes)), "",
            envinfo.xet_notes(served.get("agent-xet", 0), served.get("hf", 0)), ""]


def results_file(args: argparse.Namespace) -> Path:
    """bench/results.md for the default 2 shards; another shard count keeps its own file."""
    return BENCH / ("results.md" if args.shards == 2 else f"results-{args.shards}-shards.md")


def write_outputs(markdown: str, raw: dict, results: Path) -> Path:
    results.write_text(markdown)
    out_dir = BENCH / "out"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / time.strftime("results-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(raw, indent=1, default=str))
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = envinfo.collect(work)  # before we load the machine: the load average is the others'
    shutil.rmtree(work / "runs", ignore_errors=True)  # leftovers of an interrupted run
    try:
        models = make_models(args, work)
        models["floor_mib"] = measure_floor(work)
        http = http_sections(args, work, models)
        xet = None if args.skip_xet else xet_section(args, work, models)
        markdown = render(args, models, http, xet, command, env)
        markdown += f"\nTotal benchmark time: {time.perf_counter() - started:.0f} s.\n"
        raw = {"args": vars(args), "env": env, "rss_floor_mib": models["floor_mib"],
               "sha256": {k: models[k] for k in ("main_hashes", "small_hashes")}, "http": http, "xet": xet}
        path = write_outputs(markdown, raw, results_file(args))  # before printing: a closed stdout must not lose them
        print("\n" + markdown)
        print(f"wrote {results_file(args)} and {path}")
    finally:
        if not args.keep:  # several GB: never leave them behind, not even after a failure or ^C
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
