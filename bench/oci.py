"""Benchmark: `model-agent push` to and `pull oci://` from a local registry, side by side with skopeo.

    .venv/bin/python bench/oci.py [--model 2x512] [--model 3x1024] [--runs 3] [--profile]

Each --model (SHARDSxMiB, plus 5 small files) is generated, served by devhub (in this process) and
pulled once into a staging cache (not timed). Debian's docker-registry (distribution 2.8), over TLS from
a private CA, anonymous: the test registry of tests/oci/servers.py, imported, not copied. Then:

- **push**: `model-agent push REPO oci://…` from the ready staging cache, against `skopeo copy
  --preserve-digests oci:LAYOUT docker://…` of the very same artifact (the OCI layout is built from our
  first push's manifest and config, its layer blobs hard links to the staging cache's files: no copy).
  Every push run goes to a fresh, empty registry, so nothing is skipped or mounted.
- **pull**: `model-agent pull oci://…` into an empty cache, against `skopeo copy docker://… oci:DIR`
  and `cp -r` of the registry's blob folder (the limit of this disk and page cache).

Each run is measured by bench/measure.py (wall, peak RSS from wait4 and a psutil poll of the process
tree, CPU), checked (pushed manifests layer by layer, pulled files by size, the first model-agent pull
of each model by sha256), and removed. Rounds are rotated; the median of --runs is reported with its
ratio to skopeo. If model-agent's pull is the slower (or with --profile), one more pull of the largest
model runs under cProfile (every thread). Disk: at most twice the largest model (the generated files go
once the staging cache holds them; the staging cache once the pushes are done). Writes bench/oci-results.md.
This is a benchmark, not a test: it never fails on a slow number, it reports it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # bench/ helpers, then `tests.oci` (the registry) from the repo root

from measure import run_measured
from push import PROFILER
from scenarios import VENV_BIN
from suite import base_env
from verify import check_tree, expected_hashes

from agent.devhub import HubServer, make_model
from tests.oci.pki import PrivateCA
from tests.oci.servers import Registry

MiB = 2**20
TAG = "v1"
AGENT_PUSH, SKOPEO_PUSH = "model-agent push", "skopeo copy (layout to registry)"
AGENT_PULL, SKOPEO_PULL, COPY = "model-agent pull", "skopeo copy (registry to layout)", "cp -r of the blobs (the limit)"


@dataclass
class Model:
    label: str  # "3x1024"
    repo: str
    commit: str
    expected: dict  # repo path -> (size, sha256)
    staging: Path

    @property
    def nbytes(self) -> int:
        return sum(size for size, _ in self.expected.values())

    @property
    def layers(self) -> set[tuple[str, int]]:
        return {(f"sha256:{digest}", size) for size, digest in self.expected.values()}


class Bench:
    """The hub, the CA, and one registry at a time (a fresh one per push run)."""

    def __init__(self, work: Path, hub: HubServer):
        self.work, self.hub = work, hub
        self.pki = PrivateCA(work / "pki")
        self.registry: Registry | None = None
        self._registry_dir: Path | None = None
        self._count = 0

    def env(self) -> dict[str, str]:
        """No credentials anywhere (an anonymous registry); the private CA; devhub for the Hub side."""
        env = dict(base_env(self.hub.url), HF_HOME=str(self.work / "home"), SSL_CERT_FILE=str(self.pki.ca),
                   DOCKER_CONFIG="/nonexistent", REGISTRY_AUTH_FILE="", PYTHONPATH=str(ROOT))
        return env

    def fresh_registry(self) -> Registry:
        self.stop_registry()
        self._count += 1
        self._registry_dir = self.work / f"registry-{self._count}"
        self.registry = Registry(self._registry_dir, self.pki, "anonymous")
        return self.registry

    def stop_registry(self) -> None:
        if self.registry is not None:
            self.registry.stop()
            shutil.rmtree(self._registry_dir, ignore_errors=True)
        self.registry = None

    def skopeo(self, *args: str) -> bytes:
        return subprocess.run(["skopeo", *args], capture_output=True, check=True, timeout=120).stdout

    def manifest(self, repository: str, *config: str) -> bytes:
        """`skopeo inspect --raw` (with `--config`: the config blob): what an independent client reads."""
        return self.skopeo("inspect", "--raw", *config, "--cert-dir", str(self.pki.cert_dir),
                           f"docker://{self.registry.host}/{repository}:{TAG}")


def layers_of(raw: bytes) -> set[tuple[str, int]]:
    return {(layer["digest"], layer["size"]) for layer in json.loads(raw)["layers"]}


def build_layout(bench: Bench, model: Model, repository: str, layout: Path) -> None:
    """The artifact our push wrote, as an OCI layout: manifest and config read back with skopeo, each
    layer a hard link to the staging file it was made from (a raw layer is the file)."""
    raw, config = bench.manifest(repository), bench.manifest(repository, "--config")
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    snapshot = model.staging / ("models--" + model.repo.replace("/", "--")) / "snapshots" / model.commit
    for layer in json.loads(raw)["layers"]:
        path = snapshot / layer["annotations"]["org.cncf.model.filepath"]
        os.link(path.resolve(), blobs / layer["digest"].split(":")[1])
    for data in (raw, config):
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifest = json.loads(raw)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": manifest["mediaType"], "artifactType": manifest.get("artifactType"),
        "digest": "sha256:" + hashlib.sha256(raw).hexdigest(), "size": len(raw),
        "annotations": {"org.opencontainers.image.ref.name": TAG}}]}))


def push_runs(bench: Bench, model: Model, runs: int) -> tuple[dict[str, list[dict]], str]:
    """Each run into a fresh registry. Returns the results and the repository left in the last registry
    (which the pull rounds then read)."""
    layout = bench.work / f"layout-{model.label}"
    cert = str(bench.pki.cert_dir)
    argv = {
        AGENT_PUSH: lambda host: [str(VENV_BIN / "model-agent"), "push", model.repo, f"oci://{host}/bench/agent:{TAG}",
                                  "--revision", model.commit, "--cache-dir", str(model.staging), "--log-format", "json"],
        SKOPEO_PUSH: lambda host: ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-cert-dir", cert,
                                   f"oci:{layout}:{TAG}", f"docker://{host}/bench/skopeo:{TAG}"],
    }
    repository = {AGENT_PUSH: "bench/agent", SKOPEO_PUSH: "bench/skopeo"}
    results: dict[str, list[dict]] = {name: [] for name in argv}
    names = list(argv)
    for run in range(runs):
        for name in names[run % 2:] + names[:run % 2]:  # run 0 starts with ours: its manifest makes the layout
            registry = bench.fresh_registry()
            log = bench.work / f"push-{model.label}-{run}-{names.index(name)}.log"
            m = run_measured(argv[name](registry.host), bench.env(), log, timeout=600)
            ok = f"exit {m.rc}: {m.log_tail[-300:]}" if m.rc else (
                "ok" if layers_of(bench.manifest(repository[name])) == model.layers else "layers differ")
            if name == AGENT_PUSH and not layout.exists() and m.rc == 0:
                build_layout(bench, model, repository[name], layout)
            results[name].append({**m.as_dict(), "verified": ok})
            report(name, model, results[name][-1])
            last = repository[name]
    shutil.rmtree(layout, ignore_errors=True)
    return results, last


def pull_runs(bench: Bench, model: Model, repository: str, runs: int) -> dict[str, list[dict]]:
    host, cert = bench.registry.host, str(bench.pki.cert_dir)
    source = f"{host}/{repository}:{TAG}"
    argv = {
        AGENT_PULL: lambda d: [str(VENV_BIN / "model-agent"), "pull", f"oci://{source}", "--cache-dir", str(d),
                               "--log-format", "json"],
        SKOPEO_PULL: lambda d: ["skopeo", "copy", "--quiet", "--preserve-digests", "--src-cert-dir", cert,
                                f"docker://{source}", f"oci:{d}:{TAG}"],
        COPY: lambda d: ["cp", "-r", str(bench.registry.storage / "docker/registry/v2/blobs"), str(d)],
    }
    results: dict[str, list[dict]] = {name: [] for name in argv}
    names = list(argv)
    for run in range(runs):
        for name in names[run % 3:] + names[:run % 3]:
            dest = bench.work / f"pulled-{model.label}"
            m = run_measured(argv[name](dest), bench.env(), bench.work / f"pull-{model.label}-{run}-{names.index(name)}.log")
            ok = f"exit {m.rc}: {m.log_tail[-300:]}" if m.rc else check_pull(name, model, dest, deep=run == 0)
            shutil.rmtree(dest, ignore_errors=True)
            results[name].append({**m.as_dict(), "verified": ok})
            report(name, model, results[name][-1])
    return results


def check_pull(name: str, model: Model, dest: Path, deep: bool) -> str:
    if name == AGENT_PULL:
        snapshot = dest / ("models--" + model.repo.replace("/", "--")) / "snapshots" / model.commit
        if deep:  # sha256 of every file once per model; the other runs by size
            problems = check_tree(snapshot, model.expected)
            return "ok (sha256)" if not problems else problems[0]
        sizes = {str(p.relative_to(snapshot)): p.stat().st_size for p in snapshot.rglob("*") if p.is_file()}
        return "ok" if sizes == {k: s for k, (s, _) in model.expected.items()} else f"differs: {sorted(sizes)[:3]}"
    if name == SKOPEO_PULL:
        missing = [d for d, size in model.layers
                   if (dest / "blobs/sha256" / d.split(":")[1]).stat().st_size != size]
        return "ok" if not missing else f"{len(missing)} layer(s) wrong"
    return "ok"


def report(name: str, model: Model, r: dict) -> None:
    print(f"  {model.label:8} {name:34} {r['wall_s']:6.2f}s {model.nbytes / MiB / r['wall_s']:6.0f} MiB/s  "
          f"rss {r['maxrss_mib']:5.0f} MiB (tree {r['tree_peak_mib']:5.0f})  cpu {r['client_cpu_s']:5.1f}s  "
          f"load {r['load_before']:.1f}  {r['verified'][:160]}", flush=True)


def prepare(bench: Bench, label: str) -> Model:
    shards, shard_mib = (int(x) for x in label.split("x"))
    files = make_model(bench.work / f"src-{label}", large_files=shards, large_size=shard_mib * MiB, small_files=5)
    repo = f"bench/oci-{label}"
    commit = bench.hub.add_repo(repo, files)
    staging = bench.work / f"staging-{label}"
    subprocess.run([str(VENV_BIN / "model-agent"), "pull", repo, "--revision", commit, "--cache-dir", str(staging),
                    "--log-format", "json"], env=bench.env(), check=True, capture_output=True, timeout=600)
    model = Model(label, repo, commit, expected_hashes(files), staging)
    shutil.rmtree(bench.work / f"src-{label}")  # disk: a push from a ready staging cache reads no Hub file body
    return model


def profile_pull(bench: Bench, model: Model, repository: str, top: int = 25) -> str:
    dest, out = bench.work / "profiled", bench.work / "pull.prof"
    argv = [sys.executable, "-c", PROFILER, str(out), "pull", f"oci://{bench.registry.host}/{repository}:{TAG}",
            "--cache-dir", str(dest), "--log-format", "json"]
    start = time.monotonic()
    subprocess.run(argv, env=bench.env(), capture_output=True, timeout=600, check=False)
    wall = time.monotonic() - start
    shutil.rmtree(dest, ignore_errors=True)
    text = io.StringIO()
    pstats.Stats(str(out), stream=text).sort_stats("tottime").print_stats(top)
    return f"{model.label}: wall under cProfile {wall:.2f} s\n" + text.getvalue()


def table(results: dict[str, dict[str, list[dict]]], models: dict[str, Model], reference: str) -> list[str]:
    lines = [("| model | tool | wall s, median (all runs) | MiB/s | time vs skopeo: of medians (each round) "
              "| peak RSS MiB, wait4 (tree) | CPU s | load avg | verified |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for label, by_tool in results.items():
        ref = by_tool[reference]
        ref_med = statistics.median(r["wall_s"] for r in ref)
        for name, rs in by_tool.items():
            med = statistics.median(r["wall_s"] for r in rs)
            rounds = ", ".join(f"{a['wall_s'] / b['wall_s']:.2f}" for a, b in zip(rs, ref))
            ok = next((r["verified"] for r in rs if not r["verified"].startswith("ok")), "all ok")
            walls = ", ".join(f"{r['wall_s']:.2f}" for r in rs)
            lines.append(
                f"| {label} MiB | {name} | {med:.2f} ({walls}) | "
                f"{models[label].nbytes / MiB / med:.0f} | {med / ref_med:.2f}x ({rounds}) | "
                f"{max(r['maxrss_mib'] for r in rs):.0f} ({max(r['tree_peak_mib'] for r in rs):.0f}) | "
                f"{statistics.median(r['client_cpu_s'] for r in rs):.1f} | "
                f"{statistics.median(r['load_before'] for r in rs):.1f} | {ok[:120]} |")
    return lines


def rss_line(results: dict[str, dict[str, list[dict]]], name: str) -> str:
    peaks = [(label, max(r["maxrss_mib"] for r in by_tool[name])) for label, by_tool in results.items()]
    return f"{name}: " + " -> ".join(f"{rss:.0f} MiB ({label})" for label, rss in peaks)


def render(args, models: dict[str, Model], pushes: dict, pulls: dict, prof: str | None, total_s: float) -> str:
    sizes = ", ".join(f"{m.label} MiB ({m.nbytes / MiB:.0f} MiB, {len(m.expected)} files)" for m in models.values())
    lines = [
        "# OCI registry benchmark: model-agent push and pull against skopeo, local docker-registry",
        "",
        (f"`python bench/oci.py {' '.join(args.argv)}` on {os.cpu_count()} cores, Python {platform.python_version()}; "
         "Debian's docker-registry (distribution 2.8) on 127.0.0.1 over TLS (private CA), anonymous, filesystem "
         f"storage, on the same cores as the tool. Models (shards x MiB + 5 small files): {sizes}. Median of "
         f"{args.runs} rotated runs; every push to a fresh empty registry; every result checked. "
         f"Total benchmark time {total_s:.0f} s."),
        "",
        "## Push: a ready staging cache to the registry (skopeo: the same artifact from an OCI layout)",
        "",
        *table(pushes, models, SKOPEO_PUSH),
        "",
        "## Pull: the registry into an empty cache (skopeo: into an OCI layout; cp: the registry's blob files)",
        "",
        *table(pulls, models, SKOPEO_PULL),
        "",
        "## Peak RSS against model size (wait4, max over runs)",
        "",
        *[f"- {rss_line(by, name)}" for by, names in ((pushes, (AGENT_PUSH, SKOPEO_PUSH)),
                                                      (pulls, (AGENT_PULL, SKOPEO_PULL))) for name in names],
        "",
        ("*wall*: spawn to exit, Python start-up included (bench/measure.py). Ratios < 1 are faster than skopeo. "
         "model-agent's push also resolves the commit on the Hub and checks the staging snapshot; its pull checks "
         "every layer's sha256 and fsyncs every file before promoting it; skopeo checks digests too and does not "
         "fsync; `cp -r` checks nothing. *tree*: the psutil-sampled peak of the process tree."),
    ]
    if prof:
        lines += ["", "## model-agent pull under cProfile (one run, top functions by own time, all threads)", "",
                  "```", prof.strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", metavar="SHARDSxMiB", help="default: 2x512 and 3x1024")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="profile one pull even if ours is not the slower")
    ap.add_argument("--work", type=Path, default=Path("/tmp/model-agent-oci-bench"))
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    started, work = time.monotonic(), args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    models, pushes, pulls, prof = {}, {}, {}, None
    try:
        with HubServer(work / "hub") as hub:
            bench = Bench(work, hub)
            try:
                for label in args.model or ["2x512", "3x1024"]:
                    model = models[label] = prepare(bench, label)
                    pushes[label], repository = push_runs(bench, model, args.runs)
                    shutil.rmtree(model.staging, ignore_errors=True)  # disk: only the registry's copy is left
                    pulls[label] = pull_runs(bench, model, repository, args.runs)
                    ours, theirs = (statistics.median(r["wall_s"] for r in pulls[label][n])
                                    for n in (AGENT_PULL, SKOPEO_PULL))
                    if args.profile or ours > theirs:  # the largest model last: the profile of the last one is kept
                        prof = profile_pull(bench, model, repository)
                    bench.stop_registry()
            finally:
                bench.stop_registry()
        md = render(args, models, pushes, pulls, prof, time.monotonic() - started)
        (HERE / "oci-results.md").write_text(md)
        print("\n" + md)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
