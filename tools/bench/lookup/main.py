"""The command line: setup of every path, the run, and the JSON, table and plot it writes."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import zmq

from tools.bench import lookup
from tools.bench.lookup.aggregate import lmcache_asker
from tools.bench.lookup.failure import run_failure
from tools.bench.lookup.measure import measure_member_count
from tools.bench.lookup.mesh_member import mesh_member
from tools.bench.lookup.meshkv_path import MeshkvPath
from tools.bench.lookup.paths import (
    EchoPath,
    LMCachePath,
    LookupPath,
    echo_server,
    ensure_lmcache_venv,
)
from tools.bench.lookup.report import evaluate_targets, plot, print_table, ratios
from tools.bench.lookup.settings import (
    CONCURRENCIES,
    DEFAULT_VENV,
    KEYS_PER_MEMBER,
    MEMBER_COUNTS,
    PROMPT_CHUNKS,
    THROUGHPUT_PROMPT_CHUNKS,
    VENV_READY_MARK,
)
from tools.bench.lookup.workload import make_holdings


def build_paths(args, context: zmq.Context, log_dir: Path) -> tuple[LMCachePath, list[LookupPath]]:
    python = ensure_lmcache_venv(args.venv)
    lmcache = LMCachePath(python, context, log_dir)
    others: list[LookupPath] = [EchoPath(context, log_dir)]
    if not args.no_meshkv:
        missing = meshkv_missing()
        if missing:
            print(f"[bench_lookup] meshkv path skipped: {missing}", flush=True)
        else:
            others.insert(0, MeshkvPath(context, log_dir, use_shim=args.mesh_seed == "shim"))
    return lmcache, others


def meshkv_missing() -> str | None:
    """Why the meshkv path cannot run here (its data plane not importable), or None."""
    try:
        import meshkv.node  # noqa: F401
    except Exception as exc:  # ImportError, or any error of a module being rewritten
        return f"import meshkv.node failed: {type(exc).__name__}: {exc}"
    return None


def bench(args: argparse.Namespace) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    context = zmq.Context()
    context.setsockopt(zmq.MAX_SOCKETS, 8192)
    lmcache, others = build_paths(args, context, log_dir)
    paths: list[LookupPath] = [lmcache, *others]
    results: dict = {
        "tool": "tools/bench_lookup.py",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)),
            "loadavg_start": os.getloadavg(),
        },
        "config": {
            "members": args.members,
            "chunks": args.chunks,
            "concurrency": args.concurrency,
            "keys_per_member": args.keys,
            "rounds": args.rounds,
            "block": args.block,
            "throughput_s": args.throughput_s,
            "aggregate_s": args.aggregate_s,
            "aggregate_rounds": args.aggregate_rounds,
            "seed": args.seed,
        },
        "paths": [p.name for p in paths],
        "runs": [],
    }
    try:
        for n in args.members:
            holdings = make_holdings(n, args.keys, args.seed + n)
            try:
                results["runs"].append(measure_member_count(paths, holdings, args, args.seed + n))
                (args.out / "lookup.partial.json").write_text(json.dumps(results, indent=1))
            finally:
                for p in paths:
                    if p.name != "echo":
                        p.teardown()
        if args.failure_members:
            holdings = make_holdings(args.failure_members, args.keys, args.seed)
            killable = [p for p in others if p.name != "echo"]
            try:
                results["failure"] = run_failure(lmcache, killable, holdings, args)
            finally:
                for p in (lmcache, *killable):
                    p.teardown()
    finally:
        for p in paths:
            p.teardown()
        context.destroy(linger=0)
    results["ratios"] = ratios(results)
    results["targets"] = evaluate_targets(results)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["lmcache_venv_digest"] = hashlib.sha256(
        (args.venv / VENV_READY_MARK).read_bytes()
    ).hexdigest()[:16]
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=lookup.__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    echo = sub.add_parser("echo-server", help="(internal) the echo floor's server")
    echo.add_argument("--port", type=int, required=True)
    member = sub.add_parser("mesh-member", help="(internal) one meshkv member process")
    member.add_argument("--spec", type=Path, required=True)
    asker = sub.add_parser("lmcache-asker", help="(internal) one LMCache worker under load")
    asker.add_argument("--url", required=True)
    parser.add_argument("--no-meshkv", action="store_true", help="LMCache and echo only")
    parser.add_argument(
        "--mesh-seed",
        choices=("member", "shim"),
        default="member",
        help="what meshkv members join through in the measured rounds (the shim is on no "
        "data path and optional; it idles at a few hundred ms of CPU per s here, which "
        "slows every path on 2 cores); the failure timeline always uses the shim",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="LMCache venv (made once)")
    parser.add_argument("--members", type=int, nargs="+", default=list(MEMBER_COUNTS))
    parser.add_argument("--chunks", type=int, nargs="+", default=list(PROMPT_CHUNKS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES))
    parser.add_argument("--keys", type=int, default=KEYS_PER_MEMBER, help="chunks per member")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per N")
    parser.add_argument("--block", type=int, default=60, help="lookups per latency block")
    parser.add_argument("--throughput-s", type=float, default=0.4, help="seconds per block")
    parser.add_argument("--idle-s", type=float, default=1.0, help="idle CPU window per path")
    parser.add_argument(
        "--aggregate-s", type=float, default=2.0, help="seconds per aggregate-load block"
    )
    parser.add_argument(
        "--aggregate-rounds", type=int, default=3, help="aggregate blocks per path and N; 0: skip"
    )
    parser.add_argument("--failure-members", type=int, default=8, help="N for the kill; 0: skip")
    parser.add_argument("--failure-before-s", type=float, default=3.0)
    parser.add_argument("--failure-after-s", type=float, default=30.0)
    parser.add_argument("--failure-interval-s", type=float, default=0.05)
    parser.add_argument(
        "--failure-drain-s", type=float, default=5.0, help="extra wait for lookups in flight"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small smoke run (~1 min)")
    args = parser.parse_args(argv)
    if args.quick:
        args.members = [2, 8]
        args.chunks = [4, 32]
        args.concurrency = [1, 8]
        args.keys = 200
        args.rounds = 2
        args.block = 20
        args.throughput_s = 0.2
        args.idle_s = 0.2
        args.aggregate_s = 1.0
        args.aggregate_rounds = 1
        args.failure_members = 2
        args.failure_before_s = 1.0
        args.failure_after_s = 3.0
        args.failure_drain_s = 0.0
    if THROUGHPUT_PROMPT_CHUNKS not in args.chunks:
        args.chunks = sorted({*args.chunks, THROUGHPUT_PROMPT_CHUNKS})
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "echo-server":
        echo_server(args.port)
        return
    if args.command == "mesh-member":
        mesh_member(args.spec)
        return
    if args.command == "lmcache-asker":
        lmcache_asker(args.url)
        return
    # SIGTERM unwinds like Ctrl-C, so every child is stopped by the finally blocks
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results = bench(args)
    out_json = args.out / "lookup.json"
    out_json.write_text(json.dumps(results, indent=1))
    plot(results, args.out / "lookup.png")
    print_table(results)
    print(f"\nwrote {out_json} and {args.out / 'lookup.png'}")
