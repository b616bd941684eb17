"""The report: ratios meshkv/LMCache, the issue's targets, the printed table and the plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from tools.bench.lookup.settings import TARGETS, THROUGHPUT_PROMPT_CHUNKS


def cell_lookup(results: dict, path: str, case: str, chunks: int, members: int) -> dict | None:
    for run in results["runs"]:
        if run["members"] == members:
            for row in run["latency"]:
                if (row["path"], row["case"], row["chunks"]) == (path, case, chunks):
                    return row
    return None


def ratios(results: dict) -> list[dict]:
    """meshkv (when measured) and echo over LMCache, per N, case and prompt size."""
    rows = []
    for run in results["runs"]:
        n = run["members"]
        for row in run["latency"]:
            if row["path"] != "lmcache":
                continue
            echo = cell_lookup(results, "echo", row["case"], row["chunks"], n)
            mesh = cell_lookup(results, "meshkv", row["case"], row["chunks"], n)
            rows.append(
                {
                    "members": n,
                    "case": row["case"],
                    "chunks": row["chunks"],
                    "lmcache_p50_us": row["p50_us"],
                    "lmcache_p99_us": row["p99_us"],
                    "echo_p50_us": echo["p50_us"] if echo else None,
                    "lmcache_over_echo_p50": row["p50_us"] / echo["p50_us"] if echo else None,
                    "meshkv_p50_us": mesh["p50_us"] if mesh else None,
                    "meshkv_over_lmcache_p50": mesh["p50_us"] / row["p50_us"] if mesh else None,
                    "meshkv_over_echo_p50": (
                        mesh["p50_us"] / echo["p50_us"] if mesh and echo else None
                    ),
                }
            )
    return rows


def _cells(results: dict, path: str, members: int) -> dict[tuple[str, int], dict]:
    run = next((r for r in results["runs"] if r["members"] == members), None)
    if run is None:
        return {}
    return {(r["case"], r["chunks"]): r for r in run["latency"] if r["path"] == path}


def _cpu_by_side(results: dict, members: int) -> list[dict]:
    """Where a lookup's CPU goes at ``members``, side by side (medians over the cells, µs): the
    answering meshkv member net of idle, per member asked (the same work costs more as N grows
    on a shared host: the member woken is a different, colder process each time), the asker per
    lookup; LMCache's controller and its requester per lookup."""
    mesh = [
        r
        for (case, _), r in _cells(results, "meshkv", members).items()
        if case != "local" and r["servers_asked_mean"] > 0
    ]
    lm = list(_cells(results, "lmcache", members).values())
    if not mesh or not lm:
        return []
    return [
        {
            "target": f"CPU per lookup by side at N={members}, us (medians over the cells)",
            "meshkv_member_per_member_asked_net_of_idle": statistics.median(
                r["server_cpu_us_per_lookup_net_of_idle"] / r["servers_asked_mean"] for r in mesh
            ),
            "meshkv_asker": statistics.median(r["client_cpu_us_per_lookup"] for r in mesh),
            "lmcache_controller": statistics.median(r["server_cpu_us_per_lookup"] for r in lm),
            "lmcache_requester": statistics.median(r["client_cpu_us_per_lookup"] for r in lm),
        }
    ]


def _worst_and_median(values: Sequence[float]) -> dict:
    values = sorted(v for v in values if v == v)  # drop NaN
    if not values:
        return {"worst": None, "median": None, "cells": 0}
    return {"worst": values[-1], "median": statistics.median(values), "cells": len(values)}


def evaluate_targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured value (worst and median over the cells)."""
    if "meshkv" not in results["paths"]:
        return []
    members = [r["members"] for r in results["runs"]]
    out = []

    def add(name: str, target: float, stat: dict, below: bool = True) -> None:
        value = stat["worst"]
        ok = None if value is None else (value <= target if below else value >= target)
        out.append({"target": name, "limit": target, **stat, "met_in_every_cell": ok})

    def ratio_stat(n: int, field: str, num: str, den: str) -> dict:
        a, b = _cells(results, num, n), _cells(results, den, n)
        return _worst_and_median(
            [a[k][field] / b[k][field] for k in a.keys() & b.keys() if b[k][field] > 0]
        )

    for n, limit in ((8, TARGETS["p50_ratio_at_8"]), (64, TARGETS["p50_ratio_at_64"])):
        if n in members:
            add(
                f"meshkv p50 / lmcache p50 at N={n}",
                limit,
                ratio_stat(n, "p50_us", "meshkv", "lmcache"),
            )
    for n in members:
        add(
            f"meshkv p50 / echo p50 at N={n}",
            TARGETS["p50_over_echo"],
            ratio_stat(n, "p50_us", "meshkv", "echo"),
        )
        add(
            f"meshkv server CPU / lmcache server CPU per lookup at N={n}",
            TARGETS["cpu_ratio"],
            ratio_stat(n, "server_cpu_us_per_lookup", "meshkv", "lmcache"),
        )
        add(
            f"same, each net of its idle rate (gossip, timers; unreliable when idle dominates)"
            f" at N={n}",
            TARGETS["cpu_ratio"],
            ratio_stat(n, "server_cpu_us_per_lookup_net_of_idle", "meshkv", "lmcache"),
        )
        add(
            f"meshkv / lmcache CPU per lookup, client + server, at N={n}",
            TARGETS["cpu_ratio"],
            ratio_stat(n, "cpu_us_per_lookup_client_plus_server", "meshkv", "lmcache"),
        )
    if len(members) > 1:
        lo, hi = min(members), max(members)
        a, b = _cells(results, "meshkv", hi), _cells(results, "meshkv", lo)
        flat = _worst_and_median([a[k]["p50_us"] / b[k]["p50_us"] for k in a.keys() & b.keys()])
        out.append({"target": f"meshkv p50 at N={hi} / at N={lo} (flat in N: ~1)", **flat})
    for n in members:
        local = [r for k, r in _cells(results, "meshkv", n).items() if k[0] == "local"]
        echo = _cells(results, "echo", n)
        ratios_local = [
            r["p50_us"] / echo[("hit_first", r["chunks"])]["p50_us"]
            for r in local
            if ("hit_first", r["chunks"]) in echo
        ]
        if ratios_local:
            out.append(
                {
                    "target": f"meshkv local-home p50 / echo p50 at N={n} (<1: no round trip)",
                    **_worst_and_median(ratios_local),
                }
            )
    for n in members:
        out.extend(_cpu_by_side(results, n))
    for run in results["runs"]:
        tp = {(r["path"], r["concurrency"]): r["lookups_per_s"] for r in run["throughput"]}
        for c in sorted({c for _, c in tp}):
            if ("meshkv", c) in tp and tp.get(("lmcache", c)):
                value = tp[("meshkv", c)] / tp[("lmcache", c)]
                name = f"meshkv / lmcache throughput, {c} requesters, N={run['members']}"
                add(name, TARGETS["throughput_ratio_32_at_64"], _worst_and_median([value]), False)
    for run in results["runs"]:
        agg = {row["path"]: row for row in run.get("aggregate", [])}
        mesh, lm = agg.get("meshkv"), agg.get("lmcache")
        if mesh and lm and mesh["lookups_per_s_median"] and lm["lookups_per_s_median"]:
            n = run["members"]
            value = mesh["lookups_per_s_median"] / lm["lookups_per_s_median"]
            add(
                f"meshkv / lmcache aggregate lookups/s (all {n} ask at once), N={n}",
                TARGETS["aggregate_throughput_ratio"],
                _worst_and_median([value]),
                False,
            )
            cpu = mesh["cpu_us_per_lookup_median"] / lm["cpu_us_per_lookup_median"]
            add(
                f"meshkv / lmcache aggregate CPU per lookup (client + server), N={n}",
                TARGETS["cpu_ratio"],
                _worst_and_median([cpu]),
            )
    failure = results.get("failure")
    if failure:
        for lane in failure["lanes"]:
            out.append(
                {
                    "target": f"after the kill: {lane['label']}",
                    **lane["after_kill"],
                    "before_kill_answer_p50_ms": lane["before_kill"]["answer_p50_ms"],
                }
            )
    return out


def print_table(results: dict) -> None:
    print("\nlatency (us): p50 / p99, server CPU us per lookup")
    header = f"{'N':>3} {'case':<10} {'chunks':>6}  " + "  ".join(
        f"{p:>30}" for p in results["paths"]
    )
    print(header)
    for run in results["runs"]:
        keys = sorted(
            {(row["case"], row["chunks"]) for row in run["latency"]}, key=lambda k: (k[1], k[0])
        )
        for case, chunks in keys:
            line = f"{run['members']:>3} {case:<10} {chunks:>6}  "
            parts = []
            for path in results["paths"]:
                row = cell_lookup(results, path, case, chunks, run["members"])
                if row is None:
                    parts.append(f"{'-':>30}")
                else:
                    cpu = row["server_cpu_us_per_lookup"]
                    parts.append(f"{row['p50_us']:>8.1f} /{row['p99_us']:>8.1f}  cpu {cpu:>7.1f}")
            print(line + "  ".join(parts))
    print("\nthroughput (lookups/s, 32-chunk prompts, closed loop)")
    for run in results["runs"]:
        cells = {(r["path"], r["concurrency"]): r for r in run["throughput"]}
        for c in sorted({r["concurrency"] for r in run["throughput"]}):
            line = f"N={run['members']:>3} c={c:>2}  " + "  ".join(
                f"{p}: {cells[(p, c)]['lookups_per_s']:>8.0f}"
                for p in results["paths"]
                if (p, c) in cells
            )
            print(line)
    print("\naggregate load (every asker at once; medians of the blocks)")
    for run in results["runs"]:
        for row in run.get("aggregate", []):
            print(
                f"N={run['members']:>3} {row['path']:<8} lookups/s {row['lookups_per_s_median']}"
                f"  cpu us/lookup (client+server) {row['cpu_us_per_lookup_median']}"
                f"  wrong {row['wrong']}"
            )
    print("\nlatency cells: CPU us per lookup, client + server")
    for run in results["runs"]:
        for row in run["latency"]:
            print(
                f"N={run['members']:>3} {row['path']:<8} {row['case']:<10} {row['chunks']:>4}"
                f"  {row['cpu_us_per_lookup_client_plus_server']:>8.1f}"
                f"  asked {row['servers_asked_mean']:.2f}"
            )
    for target in results.get("targets", []):
        print(f"  {target}")
    if results.get("failure"):
        print("\nfailure timeline (after the kill)")
        for lane in results["failure"]["lanes"]:
            print(f"  {lane['label']:<45} {lane['after_kill']}")


def plot(results: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    ax = axes[0]
    colors = {"lmcache": "tab:red", "meshkv": "tab:blue", "echo": "tab:gray"}
    styles = {"hit_first": "-", "hit_last": "--", "miss": ":", "local": "-."}
    chunks = THROUGHPUT_PROMPT_CHUNKS
    for path in results["paths"]:
        for case in styles:
            xs, ys = [], []
            for run in results["runs"]:
                row = cell_lookup(results, path, case, chunks, run["members"])
                if row:
                    xs.append(run["members"])
                    ys.append(row["p50_us"])
            if xs:
                ax.plot(
                    xs, ys, styles[case], marker="o", color=colors.get(path), label=f"{path} {case}"
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("members N")
    ax.set_ylabel(f"lookup p50 (us), {chunks}-chunk prompt")
    ax.set_title("lookup latency vs N")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[1]
    run = results["runs"][-1]
    for path in results["paths"]:
        rows = sorted(
            (r for r in run["throughput"] if r["path"] == path), key=lambda r: r["concurrency"]
        )
        ax.plot(
            [r["concurrency"] for r in rows],
            [r["lookups_per_s"] for r in rows],
            marker="o",
            color=colors.get(path),
            label=path,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requesters")
    ax.set_ylabel("lookups/s")
    ax.set_title(f"throughput at N={run['members']}")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[2]
    failure = results.get("failure")
    if failure:
        markers = {
            "answer": "o",
            "miss": "x",
            "timeout": "s",
            "error": "^",
            "partial": "d",
            "waiting": "v",
        }
        lane_colors = ["tab:red", "tab:orange", "tab:blue", "tab:green"]
        sizes = [40, 14, 14, 14]  # the first lane drawn large, so the second cannot hide it
        for lane, color, size in zip(failure["lanes"], lane_colors, sizes, strict=False):
            for outcome, marker in markers.items():
                events = [e for e in lane["events"] if e["outcome"] == outcome]
                if events:
                    ax.scatter(
                        [e["t_s"] for e in events],
                        [max(e["latency_ms"], 1e-3) for e in events],
                        marker=marker,
                        color=color,
                        s=size,
                        alpha=0.6,
                        label=f"{lane['label']}: {outcome}",
                    )
        ax.axvline(0, color="black", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("seconds since the kill")
        ax.set_ylabel("time to answer (ms)")
        ax.set_title(f"failure timeline, N={failure['members']}")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
