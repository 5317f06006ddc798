"""Markdown tables from the raw run records.

Per case: wall time and throughput are the best (fastest) verified run; peak RSS is the worst
(largest) of all runs, because a memory bound is only as good as its worst case. Ratios are
throughput ratios: > 1 means faster than the reference.
"""

from __future__ import annotations

MIB = 2**20


def summarize(records: list[dict], nbytes: int) -> dict:
    ok = [r for r in records if not r["problems"]]
    summary = {"label": records[0]["label"], "verified": f"{len(ok)}/{len(records)}",
               "rss_mib": max(r["maxrss_mib"] for r in records), "rss_runs": [r["maxrss_mib"] for r in records]}
    if not ok:
        return {**summary, "failed": True}
    best = min(ok, key=lambda r: r["wall_s"])
    durable = min(r["wall_s"] + r["sync_s"] for r in ok)
    return {**summary, "failed": False, "wall_s": best["wall_s"], "walls": [r["wall_s"] for r in records],
            "mibps": nbytes / best["wall_s"] / MIB, "durable_s": durable, "durable_mibps": nbytes / durable / MIB,
            "client_cpu_s": best["client_cpu_s"], "server_cpu_s": best["server_cpu_s"],
            # what the rest of the machine burnt meanwhile: the noise this number was taken under
            "other_cpu_s": max(0.0, best["machine_cpu_s"] - best["client_cpu_s"] - best["server_cpu_s"])}


def _ratio(value: dict, ref: dict | None, field: str) -> str:
    if not ref or value["failed"] or ref["failed"]:
        return "-"
    return f"{value[field] / ref[field]:.2f}x"


def _row(s: dict, hf: dict | None, copy: dict | None) -> str:
    if s["failed"]:
        return f"| {s['label']} | FAILED | | | | | | | | {s['rss_mib']:.0f} | | | | {s['verified']} |"
    walls = ", ".join(f"{w:.2f}" for w in s["walls"])
    cells = [s["label"], f"{s['wall_s']:.2f} ({walls})", f"{s['mibps']:.0f}", _ratio(s, hf, "mibps"),
             _ratio(s, copy, "mibps"), f"{s['durable_s']:.2f}", f"{s['durable_mibps']:.0f}",
             _ratio(s, hf, "durable_mibps"), _ratio(s, copy, "durable_mibps"), f"{s['rss_mib']:.0f}",
             f"{s['client_cpu_s']:.1f}", f"{s['server_cpu_s']:.1f}", f"{s['other_cpu_s']:.1f}", s["verified"]]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| run | wall s, best (all runs) | MiB/s | vs hf download | vs copy | until durable s | durable MiB/s "
          "| durable vs hf | durable vs copy | peak RSS MiB | client CPU s | hub CPU s | other CPU s | sha256 ok |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def table(summaries: dict[str, dict]) -> str:
    hf, copy = summaries.get("hf"), summaries.get("copy")
    return "\n".join([HEADER, *(_row(s, hf, copy) for s in summaries.values())])


def _rss(s: dict) -> str:
    return f"{s['rss_mib']:.0f} ({', '.join(f'{v:.0f}' for v in s['rss_runs'])})"


def scaling_table(small: dict[str, dict], large: dict[str, dict], small_name: str, large_name: str) -> str:
    lines = [f"| run | peak RSS MiB, {small_name}: worst (all runs) | peak RSS MiB, {large_name}: worst (all runs) "
             "| large / small |",
             "|---|---:|---:|---:|"]
    for key, s in small.items():
        big = large.get(key)
        if big is None:
            continue
        lines.append(f"| {s['label']} | {_rss(s)} | {_rss(big)} | {big['rss_mib'] / s['rss_mib']:.2f}x |")
    return "\n".join(lines)
