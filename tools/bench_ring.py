"""Benchmark of the consistent-hash ring (DESIGN §4 targets): balance, movement, lookup time.

Measures the classic ring (1 probe) against multi-probe rings (2-4 probes, meshkv's default is
`DEFAULT_PROBES`):
- balance: busiest member's share / mean share (`HashRing.shares`) for N members and V vnodes
  each, on the canonical names "engine-{i}/0" and on other clusters (names with random boot
  nonces), so that one lucky name set cannot pass for the rule; plus one check of the share
  model against counted random keys;
- movement: keys whose home changes when one member joins (as a ratio to the ideal 1/(N+1))
  or leaves (ratio to 1/N), over several joins and leaves, on random keys; and whether any key
  moved anywhere but to the joiner or away from the leaver;
- lookup time: ns per key of batched `homes` at several batch sizes and of single `home`, and
  the time to build a ring. Times are this process's CPU time (time.process_time), median of
  several repeats, so that other load on a shared machine counts as little as possible.

Writes DIR/ring.json and DIR/ring.png and prints a summary. Targets: busiest/mean <= 1.10 at 64
members with the default vnodes; join moves <= 1.1 x ideal; batched lookup <= 1000 ns per key.

    python tools/bench_ring.py --out bench-results/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from meshkv.ring import DEFAULT_PROBES, DEFAULT_VNODES, HashRing, member_points, positions_of

MEMBER_COUNTS = (4, 16, 64, 256)
VNODE_COUNTS = (64, 128, 256, 512, 1024)
BALANCE_PROBES = (1, 2, 3, 4)
COMPARED_PROBES = (1, DEFAULT_PROBES)  # movement and lookup time
BATCH_SIZES = (1, 64, 1024, 65536)
LOOKUP_MEMBERS = (64, 1024)
SINGLE_LOOKUP_KEYS = 2000
BUILD_MEMBERS = (64, 1000)
SAMPLED_ROUNDS = 10  # rounds of --keys random keys for the share-model check
TARGET_BALANCE = 1.10
TARGET_MOVES = 1.10
TARGET_LOOKUP_NS = 1000.0
FOCUS_MEMBERS = 64


def canonical_names(count: int) -> list[str]:
    return [f"engine-{i}/0" for i in range(count)]


def nonce_names(count: int, rng: np.random.Generator) -> list[str]:
    return [f"engine-{i}/0:{int(n):08x}" for i, n in enumerate(rng.integers(0, 2**32, count))]


def busiest_over_mean(ring: HashRing) -> float:
    return max(ring.shares().values()) * len(ring.members)


def measure_balance(name_sets: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for members in MEMBER_COUNTS:
        clusters = [canonical_names(members)]
        clusters += [nonce_names(members, rng) for _ in range(name_sets)]
        for vnodes in VNODE_COUNTS:
            for probes in BALANCE_PROBES:
                ratios = [busiest_over_mean(HashRing(c, vnodes, probes=probes)) for c in clusters]
                rows.append(
                    {
                        "members": members,
                        "vnodes": vnodes,
                        "probes": probes,
                        "canonical": ratios[0],
                        "other_median": statistics.median(ratios[1:]),
                        "other_max": max(ratios[1:]),
                    }
                )
    return rows


def sampled_balance(keys: int, seed: int) -> dict:
    """Busiest/mean counted on random keys, beside the share model's figure (probes > 1)."""
    rng = np.random.default_rng(seed)
    ring = HashRing(canonical_names(FOCUS_MEMBERS), DEFAULT_VNODES, probes=DEFAULT_PROBES)
    counts = np.zeros(FOCUS_MEMBERS, dtype=np.int64)
    for _ in range(SAMPLED_ROUNDS):
        sample = rng.integers(0, 2**64, size=keys, dtype=np.uint64, endpoint=False)
        counts += np.bincount(ring.homes(sample), minlength=FOCUS_MEMBERS)
    model = np.array(list(ring.shares().values()))
    counted = counts / counts.sum()
    return {
        "members": FOCUS_MEMBERS,
        "vnodes": DEFAULT_VNODES,
        "probes": DEFAULT_PROBES,
        "keys": int(counts.sum()),
        "counted_busiest_over_mean": float(counted.max() * FOCUS_MEMBERS),
        "model_busiest_over_mean": float(model.max() * FOCUS_MEMBERS),
        "largest_share_error_over_mean": float(np.abs(counted - model).max() * FOCUS_MEMBERS),
    }


def home_names(ring: HashRing, positions: np.ndarray) -> np.ndarray:
    return np.array(ring.members)[ring.homes(positions)]


def measure_moves(keys: int, changes: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    sample = rng.integers(0, 2**64, size=keys, dtype=np.uint64, endpoint=False)
    rows = []
    for members in MEMBER_COUNTS:
        names = canonical_names(members)
        leavers = [names[i] for i in np.linspace(0, members - 1, min(changes, members), dtype=int)]
        joiners = [f"engine-{members + j}/0" for j in range(changes)]
        for vnodes in VNODE_COUNTS:
            for probes in COMPARED_PROBES:
                ring = HashRing(names, vnodes, probes=probes)
                before = home_names(ring, sample)
                join, leave, only_expected = [], [], True
                for name in joiners:
                    after = home_names(ring.with_member(name), sample)
                    moved = before != after
                    only_expected &= bool((after[moved] == name).all())
                    join.append(moved.mean() * (members + 1))
                for name in leavers:
                    after = home_names(ring.without_member(name), sample)
                    moved = before != after
                    only_expected &= bool((before[moved] == name).all())
                    leave.append(moved.mean() * members)
                rows.append(
                    {
                        "members": members,
                        "vnodes": vnodes,
                        "probes": probes,
                        "join_mean": statistics.fmean(join),
                        "join_max": max(join),
                        "leave_mean": statistics.fmean(leave),
                        "leave_max": max(leave),
                        "only_joiner_or_leaver_moved": only_expected,
                    }
                )
    return rows


def median_cpu_seconds(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        action()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure_lookups(repeats: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    total = max(BATCH_SIZES)
    positions = rng.integers(0, 2**64, size=total, dtype=np.uint64, endpoint=False)
    keys = [rng.bytes(16) for _ in range(total)]
    rows = []
    for members in LOOKUP_MEMBERS:
        for probes in COMPARED_PROBES:
            ring = HashRing(canonical_names(members), DEFAULT_VNODES, probes=probes)
            where = {"members": members, "vnodes": DEFAULT_VNODES, "probes": probes}
            for batch in BATCH_SIZES:
                batches = [positions[i : i + batch] for i in range(0, total, batch)]

                def run(batches: list[np.ndarray] = batches, ring: HashRing = ring) -> None:
                    for b in batches:
                        ring.homes(b)

                seconds = median_cpu_seconds(run, repeats)
                rows.append(
                    {**where, "mode": "batched", "batch": batch, "ns": seconds / total * 1e9}
                )
            single = keys[:SINGLE_LOOKUP_KEYS]
            seconds = median_cpu_seconds(lambda r=ring, s=single: [r.home(k) for k in s], repeats)
            rows.append({**where, "mode": "single", "batch": 1, "ns": seconds / len(single) * 1e9})
    seconds = median_cpu_seconds(lambda: positions_of(keys), repeats)
    rows.append({"mode": "positions_of", "batch": total, "ns": seconds / total * 1e9})
    return rows


def measure_builds(repeats: int) -> list[dict]:
    rows = []
    for members in BUILD_MEMBERS:
        names = canonical_names(members)

        def cold(names: list[str] = names) -> None:
            member_points.cache_clear()
            HashRing(names, DEFAULT_VNODES)

        HashRing(names, DEFAULT_VNODES)
        warm = median_cpu_seconds(lambda names=names: HashRing(names, DEFAULT_VNODES), repeats)
        rows.append({"members": members, "cache": "warm", "seconds": warm})
        rows.append({"members": members, "cache": "cold", "seconds": median_cpu_seconds(cold, 3)})
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((focus, balance), (moves, lookups)) = plt.subplots(2, 2, figsize=(13, 9.5))
    style = {1: "--", DEFAULT_PROBES: "-"}  # colour: member count; dashed: the classic ring
    colour = {m: f"C{i}" for i, m in enumerate(sorted({*MEMBER_COUNTS, *LOOKUP_MEMBERS}))}
    for probes in BALANCE_PROBES:
        rows = [
            r for r in results["balance"] if r["members"] == FOCUS_MEMBERS and r["probes"] == probes
        ]
        vnodes = [r["vnodes"] for r in rows]
        line = focus.plot(vnodes, [r["canonical"] for r in rows], marker="o", label=f"{probes}")
        focus.plot(vnodes, [r["other_max"] for r in rows], ":", color=line[0].get_color())
    focus.set_title(
        f"{FOCUS_MEMBERS} members: canonical names (solid), worst other cluster (dotted)"
    )
    focus.legend(title="probes", fontsize=8)
    for members in MEMBER_COUNTS:
        for probes in COMPARED_PROBES:
            rows = [
                r for r in results["balance"] if r["members"] == members and r["probes"] == probes
            ]
            balance.plot(
                [r["vnodes"] for r in rows],
                [r["canonical"] for r in rows],
                style[probes],
                color=colour[members],
                marker="o",
                label=f"N={members}, probes={probes}",
            )
            rows = [
                r for r in results["moves"] if r["members"] == members and r["probes"] == probes
            ]
            moves.plot(
                [r["vnodes"] for r in rows],
                [r["join_max"] for r in rows],
                style[probes],
                color=colour[members],
                marker="o",
                label=f"N={members}, probes={probes}",
            )
    balance.set_title("busiest / mean share, canonical names")
    balance.legend(fontsize=7, ncol=2)
    moves.set_title("keys moved on a join / ideal 1/(N+1), worst of the joins")
    for axis, target in ((focus, TARGET_BALANCE), (balance, TARGET_BALANCE), (moves, TARGET_MOVES)):
        axis.axhline(target, color="red", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("vnodes per member")
        axis.grid(alpha=0.3)
    for members in LOOKUP_MEMBERS:
        for probes in COMPARED_PROBES:
            rows = [
                r
                for r in results["lookups"]
                if r["mode"] == "batched" and r["members"] == members and r["probes"] == probes
            ]
            lookups.plot(
                [r["batch"] for r in rows],
                [r["ns"] for r in rows],
                style[probes],
                color=colour[members],
                marker="o",
                label=f"N={members}, probes={probes}",
            )
    lookups.axhline(TARGET_LOOKUP_NS, color="red", linewidth=0.8)
    lookups.set_xscale("log")
    lookups.set_yscale("log")
    lookups.set_xlabel(f"keys per batch ({DEFAULT_VNODES} vnodes)")
    lookups.set_title("batched home lookup, CPU ns per key")
    lookups.legend(fontsize=8)
    lookups.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(results: dict) -> None:
    print("busiest/mean share: canonical names / worst of the other clusters")
    print("  N    V   " + "".join(f"probes={p:<11}" for p in BALANCE_PROBES))
    for members in MEMBER_COUNTS:
        for vnodes in VNODE_COUNTS:
            cells = [
                f"{r['canonical']:.3f}/{r['other_max']:.3f}   "
                for r in results["balance"]
                if r["members"] == members and r["vnodes"] == vnodes
            ]
            print(f"  {members:<4} {vnodes:<5}" + "".join(cells))
    print("share model check:", results["sampled_balance"])
    print("keys moved / ideal: join mean, max | leave mean, max")
    for r in results["moves"]:
        flag = "" if r["only_joiner_or_leaver_moved"] else "  OTHER KEYS MOVED"
        print(
            f"  N={r['members']:<4} V={r['vnodes']:<5} probes={r['probes']}: "
            f"{r['join_mean']:.3f}, {r['join_max']:.3f} | "
            f"{r['leave_mean']:.3f}, {r['leave_max']:.3f}{flag}"
        )
    print("lookup, CPU ns per key")
    for r in results["lookups"]:
        ring = f"N={r['members']:<5} probes={r['probes']}" if "members" in r else ""
        print(f"  {r['mode']:<12} batch={r['batch']:<6} {ring:<18} {r['ns']:10.0f}")
    print(f"ring build, CPU seconds ({DEFAULT_VNODES} vnodes)")
    for r in results["builds"]:
        print(f"  {r['members']} members, {r['cache']} point cache: {r['seconds']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    parser.add_argument("--keys", type=int, default=200_000, help="random keys for movement")
    parser.add_argument("--changes", type=int, default=8, help="joins and leaves measured per ring")
    parser.add_argument("--name-sets", type=int, default=10, help="other clusters per balance cell")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats (median taken)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = {
        "config": {
            "default_vnodes": DEFAULT_VNODES,
            "default_probes": DEFAULT_PROBES,
            "keys": args.keys,
            "changes": args.changes,
            "name_sets": args.name_sets,
            "repeats": args.repeats,
            "seed": args.seed,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
        },
        "balance": measure_balance(args.name_sets, args.seed),
        "sampled_balance": sampled_balance(args.keys, args.seed),
        "moves": measure_moves(args.keys, args.changes, args.seed),
        "lookups": measure_lookups(args.repeats, args.seed),
        "builds": measure_builds(args.repeats),
    }
    results["config"]["load_average_at_end"] = os.getloadavg()
    results["config"]["wall_seconds"] = time.monotonic() - started
    (args.out / "ring.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "ring.png")
    print_summary(results)
    print(f"wrote {args.out / 'ring.json'} and {args.out / 'ring.png'}")


if __name__ == "__main__":
    main()
