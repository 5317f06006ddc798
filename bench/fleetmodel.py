"""The fleet's time and egress model, written down once (FORMULAS): checked on this machine, then projected."""

from __future__ import annotations

import argparse
import math

GB, MiB = 1e9, 2**20

FORMULAS = """\
Every node needs the whole model (S bytes). What differs between the two ways is which shared
resource all N nodes queue on, so both are "the slowest of: one node alone, and N nodes' demand on
each shared resource divided by its capacity":

    (a) every node from the Hub, behind one NAT IP:
        origin bytes = N * S          Hub resolver requests = N * F
        T_a(N) >= max( S / NIC,  N * S / HUB,  W * floor((N * F - 1) / L) )
    (b) one push, then every node from the bucket:
        origin bytes = S              Hub resolver requests = F
        T_push  = S / min(HUB, NIC) + S / min(NIC, BUCKET)       (pull into staging, then upload)
        T_b(N) = T_push + max( S / NIC,  N * S / BUCKET,  N * g / G ),   g = ceil(S / C) + 2 * F

S model bytes, F files, NIC one node's link, HUB the Hub's egress to the cluster's one IP, L resolver
requests allowed per window W, BUCKET the bucket's aggregate bandwidth into the cluster, G GET/HEAD
requests per second per prefix, C the agent's range size (one GET per range, plus a HEAD and a
listing share per file). On this machine the shared resources are the 2 cores (every byte crosses
loopback in software, client and server on the same cores) and the disk, so the same form reads

    T(N) = max( T_1,  N * c / cores,  N * S / DISK )

with T_1 and c (CPU seconds of client + server per node) measured in the N = 1 round.
"""


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("projection parameters (a real cluster)")
    g.add_argument("--project", type=int, nargs="+", default=[100, 1000], help="node counts to project to")
    g.add_argument("--size-gb", type=float, default=140, help="model size, GB (default 140: a 70B model in bf16)")
    g.add_argument("--files", type=int, default=50, help="files in that model (30 shards + configs, tokenizer, original/)")
    g.add_argument("--hub-gbps", type=float, default=10, help="Hub egress to the cluster's one NAT IP, Gb/s (assumed)")
    g.add_argument("--hub-limit", type=int, default=3000, help="resolver requests per window per IP (anonymous)")
    g.add_argument("--hub-window-s", type=float, default=300)
    g.add_argument("--bucket-gbps", type=float, default=400, help="bucket's aggregate bandwidth into the cluster, Gb/s")
    g.add_argument("--bucket-gets", type=float, default=5500, help="GET/HEAD per second per prefix (S3)")
    g.add_argument("--nic-gbps", type=float, default=25, help="one node's NIC, Gb/s")
    g.add_argument("--chunk-mib", type=float, default=64, help="the agent's range size (--chunk-size)")


def direct(p, n: int) -> dict:
    s, nic, hub = p.size_gb * GB, p.nic_gbps * GB / 8, p.hub_gbps * GB / 8
    waits = math.floor((n * p.files - 1) / p.hub_limit) * p.hub_window_s
    terms = {"node NIC": s / nic, "Hub egress": n * s / hub, "Hub rate limit": waits}
    bound = max(terms, key=terms.get)
    return {"origin": n * s, "requests": n * p.files, "gets": 0, "t": terms[bound], "bound": bound, "waits": waits}


def bucket(p, n: int) -> dict:
    s, nic, hub, store = p.size_gb * GB, p.nic_gbps * GB / 8, p.hub_gbps * GB / 8, p.bucket_gbps * GB / 8
    gets = math.ceil(s / (p.chunk_mib * MiB)) + 2 * p.files
    push = s / min(hub, nic) + s / min(nic, store)
    terms = {"node NIC": s / nic, "bucket bandwidth": n * s / store, "bucket GET rate": n * gets / p.bucket_gets}
    bound = max(terms, key=terms.get)
    return {"origin": s, "requests": p.files, "gets": n * gets, "t": push + terms[bound], "push": push,
            "bound": f"push + {bound}"}


def _predict(calib, n: int, model_bytes: int, disk_bps: float, cores: int) -> tuple[float, str]:
    c = (calib.client_cpu_s + calib.server_cpu_s) / calib.n  # CPU seconds per node at the calibration's N
    terms = {"one node": calib.all_ready_s if calib.n == 1 else 0.0, "CPU": n * c / cores,
             "disk": n * model_bytes / disk_bps}
    bound = max(terms, key=terms.get)
    return terms[bound], bound


def machine_check(rounds: list, model_bytes: int, disk_bps: float, cores: int) -> list[dict]:
    """Predicted vs measured time to all ready for each N, calibrated on the N = 1 round of the same
    way, and again on the smallest N > 1 (where N processes already time-share the cores)."""
    rows = []
    for way in ("hub", "bucket"):
        mine = sorted((r for r in rounds if r.way == way), key=lambda r: r.n)
        if not mine or mine[0].n != 1:
            continue
        first, shared = mine[0], (mine[1] if len(mine) > 1 else None)
        for r in mine[1:]:
            predicted, bound = _predict(first, r.n, model_bytes, disk_bps, cores)
            again = _predict(shared, r.n, model_bytes, disk_bps, cores)[0] if r is not shared else None
            rows.append({"n": r.n, "way": way, "predicted": predicted, "measured": r.all_ready_s, "bound": bound,
                         "predicted_shared": again, "shared_n": shared.n, "t1": first.all_ready_s,
                         "cpu_per_node": (first.client_cpu_s + first.server_cpu_s),
                         "own_cpu": r.client_cpu_s + r.server_cpu_s, "cores": cores,
                         "others_cpu": max(0.0, r.machine_cpu_s - r.client_cpu_s - r.server_cpu_s)})
    return rows


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _bytes(b: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


WAYS = {"hub": "(a) every node from the Hub", "bucket": "(b) from the bucket, after one push"}


def measured_table(result: dict) -> list[str]:
    s = result["model_bytes"]
    lines = ["| N | way | origin (Hub) bytes | copies | bucket bytes read | copies | Hub resolver requests "
             "| all ready s | slowest node s | fastest node s | aggregate MiB/s | CPU s nodes + servers | sha256 |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rounds"]:
        ok = "all ok" if not r.problems else f"{len(r.problems)} problems: {r.problems[0][:100]}"
        lines.append(f"| {r.n} | {WAYS[r.way]} | {_bytes(r.origin_bytes)} | {r.origin_bytes / s:.2f} | "
                     f"{_bytes(r.bucket_bytes)} | {r.bucket_bytes / s:.2f} | {r.resolver_requests} | "
                     f"{r.all_ready_s:.2f} | {r.all_ready_s:.2f} (node {r.ready_s.index(max(r.ready_s))}) | "
                     f"{min(r.ready_s):.2f} | {r.n * s / MiB / r.all_ready_s:.0f} | "
                     f"{r.client_cpu_s:.1f} + {r.server_cpu_s:.1f} | {ok} |")
    return lines


def check_table(rows: list[dict]) -> list[str]:
    shared = rows[0]["shared_n"] if rows else "?"
    lines = [f"| N | way | predicted from N = 1, s | measured s | measured / predicted | bound by | predicted from "
             f"N = {shared}, s | measured / predicted | CPU s per node, this N (N = 1) | others' CPU s meanwhile "
             "| own CPU / cores, s | (own + others' CPU) / cores, s |",
             "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        again = r["predicted_shared"]
        again_cells = f"{again:.2f} | {r['measured'] / again:.2f}" if again else "(calibration) | -"
        lines.append(f"| {r['n']} | {WAYS[r['way']]} | {r['predicted']:.2f} | {r['measured']:.2f} | "
                     f"{r['measured'] / r['predicted']:.2f} | {r['bound']} | {again_cells} | "
                     f"{r['own_cpu'] / r['n']:.2f} ({r['cpu_per_node']:.2f}) | {r['others_cpu']:.1f} | "
                     f"{r['own_cpu'] / r['cores']:.2f} | {(r['own_cpu'] + r['others_cpu']) / r['cores']:.2f} |")
    return lines


def projection_table(p) -> list[str]:
    lines = ["| N | way | origin (Hub) bytes | Hub resolver requests | rate-limit wait alone | bucket GETs "
             "| time to all ready | bound by |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for n in p.project:
        for way, f in (("hub", direct), ("bucket", bucket)):
            r = f(p, n)
            gets = f"{r['gets']:,}" if r["gets"] else "-"
            waits = _dur(r["waits"]) if "waits" in r else "-"
            lines.append(f"| {n:,} | {WAYS[way]} | {_bytes(r['origin'])} | {r['requests']:,} | {waits} | {gets} | "
                         f"{_dur(r['t'])} | {r['bound']} |")
    return lines


def render(args, result: dict, command: str) -> str:
    push, s = result["push"], result["model_bytes"]
    checks = machine_check(result["rounds"], s, result["disk_bps"], result["cores"])
    calib = {r["way"]: r for r in checks}
    upload = f", of which the upload {push['upload_s']:.2f} s" if push.get("upload_s") is not None else ""
    lines = [
        "# Fleet benchmark: N node caches from the Hub, or from one published bucket", "",
        f"`{command}` on {result['machine']}; devhub (in the benchmark's process) and "
        f"SeaweedFS `weed mini` on 127.0.0.1, on the same cores as every node. One model: {result['files']} files, "
        f"{s / MiB:.0f} MiB ({args.shards} x {args.shard_mib} MiB safetensors + 5 small files). "
        f"One run; total benchmark time {result['total_s']:.0f} s.", "",
        "## Measured", "",
        f"The push (`model-agent push {'ORG/NAME'} s3://{'fleet/model/'}`, Hub -> staging cache -> bucket, once): "
        f"exit {push['rc']}, {push['wall_s']:.2f} s{upload}; the Hub sent {_bytes(push['origin_bytes'])} "
        f"({push['origin_bytes'] / s:.2f} copies) and answered {push['resolver_requests']} resolver requests.", "",
        *measured_table(result), "",
        "*origin (Hub) bytes*: file bodies devhub wrote to sockets during the round; in (b) any Hub read by a "
        "node would be counted (the nodes have HF_ENDPOINT set): the whole cluster's origin egress is the push's one "
        "copy. *bucket bytes read*: the nodes' own summaries (`bytes_fetched`). *all ready*: from starting the N "
        "processes to the last one's exit 0 (its snapshot marked ready); every node's snapshot is then re-hashed "
        "by the benchmark and must sit under the Hub commit.", "",
        "## The model, checked on this machine", "",
        "```", *FORMULAS.splitlines(), "```", "",
        f"Here: T_1 and c from the N = 1 rounds (hub: T_1 {calib.get('hub', {}).get('t1', float('nan')):.2f} s, "
        f"c {calib.get('hub', {}).get('cpu_per_node', float('nan')):.2f} CPU s; bucket: T_1 "
        f"{calib.get('bucket', {}).get('t1', float('nan')):.2f} s, c {calib.get('bucket', {}).get('cpu_per_node', float('nan')):.2f} "
        f"CPU s), {result['cores']} cores, DISK {result['disk_bps'] / MiB:.0f} MiB/s (256 MiB written and fsynced).", "",
        *check_table(checks), "",
        "*own CPU / cores*: this round's CPU seconds (nodes + servers) over the cores, the time it could not "
        "have beaten; *(own + others') / cores* adds what the rest of this shared machine burnt meanwhile (other "
        "tenants, kernel writeback): when it is close to the measured time, the cores were saturated and the "
        "time is the CPU term of the model. Where measured / predicted is above 1, the CPU per node grew with N "
        "(N processes time-sharing the cores: context switches, cold caches, more connections for the servers) "
        "and others took CPU meanwhile. The second prediction takes c from the smallest N > 1, where the cores "
        "are already shared: the same formula, calibrated where the contention is.", "",
        "On one machine the Hub and the bucket are both software on the same cores, so (a) and (b) take about "
        "the same time here and neither shows the Hub's real limits: this run checks the form of the model "
        "(one node alone, or N nodes' demand on the one shared resource) and the egress accounting (one origin "
        "copy in (b) for every N), not a cluster's bandwidths.", "",
        "## Projection to a cluster", "", "Parameters (flags of bench/fleet.py; the Hub's egress per IP is not "
        "published, the 10 Gb/s is an assumption):", "",
        f"S = {args.size_gb:g} GB, F = {args.files} files, NIC = {args.nic_gbps:g} Gb/s, HUB = {args.hub_gbps:g} Gb/s "
        f"for the cluster's one NAT IP, L = {args.hub_limit:,} resolver requests per W = {args.hub_window_s:g} s "
        f"(anonymous), BUCKET = {args.bucket_gbps:g} Gb/s aggregate, G = {args.bucket_gets:,.0f} GET/s per prefix, "
        f"C = {args.chunk_mib:g} MiB ranges.", "",
        *projection_table(args), "",
        "Time in (a) is a lower bound: past L requests per window the Hub answers 429 and the nodes back off; "
        "(b) adds the push once per model version (no node can start before its lockfile is up). "
        "Origin egress per model per cluster: N copies in (a), one in (b), for any N.", ""]
    return "\n".join(lines)
