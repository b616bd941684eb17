"""Gossip benchmark on the simulated network: detection and dissemination times, message rate.

For each mesh size N it boots N members through 3 seeds (LAN timing by default), waits for one
member list, then measures:

- crash: time from a crash until every member holds the crashed member DEAD (several crashes);
- join: time from a new member's join until every member holds it ALIVE;
- change: time from a metadata update until every member has it;
- msgs/s: frames sent per member per second at steady state;
- false deaths: deaths of healthy members in a run with 5 % loss and 1 s stalls.

Times are virtual seconds of the deterministic simulation (no CPU noise); every run is
reproducible from its seed. Writes JSON and a PNG plot.

    python tools/bench_gossip.py --sizes 16 64 256 1000 --out bench-results/gossip
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshkv.gossip.config import GossipConfig
from meshkv.gossip.member import MemberState
from meshkv.gossip.simnet import NetworkFaults, SimNet
from tools.bench.common import percentile

TARGETS = {
    "crash_p50_s": 2.0,  # at 64 members
    "crash_p99_s": 3.0,
    "join_max_s": 1.0,
    "change_max_s": 1.0,
    "msgs_per_member_s": 10.0,
    "false_deaths": 0,
}
MAX_WAIT_S = 30.0  # virtual seconds any single measurement may take


def boot(n: int, seed: int, config: GossipConfig, faults: NetworkFaults | None = None) -> SimNet:
    sim = SimNet(seed=seed, config=config, faults=faults)
    names = [f"inst{i}/0" for i in range(n)]
    spread_s = max(1.0, n / 200)
    for i, name in enumerate(names):
        seeds = [s for s in names[:3] if s != name]
        sim.at(i * spread_s / n, lambda name=name, seeds=seeds: sim.add_member(name, seeds=seeds))
    sim.run_for(spread_s)
    if sim.run_until_true(sim.converged, timeout_s=120, step_s=0.5) is None:
        raise RuntimeError(f"{n} members did not converge ({sim!r})")
    quiet_down(sim)
    return sim


def quiet_down(sim: SimNet, limit_s: float = 120.0) -> None:
    """Runs until a whole second passes without any gossip fan-out: the boot's news is spent."""

    def gossip_sent() -> int:
        return sum(m.swim.stats["tx_gossip"] for m in sim.members.values() if m.up)

    start_s, before = sim.now_s, gossip_sent()
    while sim.now_s - start_s < limit_s:
        sim.run_for(1.0)
        after = gossip_sent()
        if after == before:
            return
        before = after
    raise RuntimeError(f"gossip never went quiet ({sim!r})")


def time_until(sim: SimNet, done: Callable[[], bool]) -> float:
    took = sim.run_until_true(done, timeout_s=MAX_WAIT_S, step_s=0.02)
    return float("inf") if took is None else took


def everyone_sees(sim: SimNet, subject: str, state: MemberState) -> Callable[[], bool]:
    return lambda: all(sim.state_seen(o, subject) is state for o in sim.up_names() if o != subject)


def everyone_has(sim: SimNet, subject: str, incarnation: int) -> Callable[[], bool]:
    """Every other member has heard of ``subject`` at ``incarnation`` (an UPDATED event)."""
    views = sim.views
    return lambda: all(views[o][subject][2] >= incarnation for o in sim.up_names() if o != subject)


def measure_size(n: int, seeds: list[int], crashes: int, joins: int, config: GossipConfig) -> dict:
    crash_s: list[float] = []
    join_s: list[float] = []
    change_s: list[float] = []
    rates: list[float] = []
    wall_start = time.monotonic()
    for seed in seeds:
        sim = boot(n, seed, config)
        sent_before, start_s = sim.counters["sent"], sim.now_s
        sim.run_for(10.0)
        rates.append((sim.counters["sent"] - sent_before) / n / (sim.now_s - start_s))
        for k in range(joins):
            name = f"late{k}/0"
            sim.add_member(name, seeds=["inst0/0"])
            join_s.append(time_until(sim, everyone_sees(sim, name, MemberState.ALIVE)))
        for k in range(joins):
            member = sim.members[f"inst{3 + k}/0"]
            member.swim.update_meta({"free_bytes": k + 1}, sim.now_s)
            sim._flush(member)
            change_s.append(
                time_until(sim, everyone_has(sim, member.name, member.swim.incarnation))
            )
        for k in range(crashes):  # crash a member, time it, bring it back: N stays constant
            victim = f"inst{3 + (n // 2 + 7 * k) % (n - 3)}/0"
            sim.crash(victim)
            crash_s.append(time_until(sim, everyone_sees(sim, victim, MemberState.DEAD)))
            sim.restart(victim, seeds=["inst0/0"])
            if sim.run_until_true(sim.converged, timeout_s=MAX_WAIT_S, step_s=0.25) is None:
                raise RuntimeError(f"{victim} did not come back ({sim!r})")
        if sim.false_deaths:
            raise RuntimeError(f"false deaths without faults: {sim.false_deaths[:3]} ({sim!r})")
    return {
        "members": n,
        "seeds": seeds,
        "crash_samples": len(crash_s),
        "crash_p50_s": percentile(sorted(crash_s), 0.5),
        "crash_p99_s": percentile(sorted(crash_s), 0.99),
        "crash_max_s": max(crash_s),
        "join_p50_s": percentile(sorted(join_s), 0.5),
        "join_max_s": max(join_s),
        "change_p50_s": percentile(sorted(change_s), 0.5),
        "change_max_s": max(change_s),
        "msgs_per_member_s": statistics.mean(rates),
        "wall_s": time.monotonic() - wall_start,
    }


def measure_false_deaths(n: int, seed: int, duration_s: float, config: GossipConfig) -> dict:
    faults = NetworkFaults(loss=0.05, jitter_s=0.005)
    sim = boot(n, seed, config, faults)
    stalled = [f"inst{(5 + 11 * k) % n}/0" for k in range(int(duration_s // 5))]
    for k, name in enumerate(stalled):
        sim.at(sim.now_s + 1 + 5 * k, lambda name=name: sim.stall(name, 1.0))
    sent_before = sim.counters["sent"]
    sim.run_for(duration_s)
    return {
        "members": n,
        "seed": seed,
        "loss": faults.loss,
        "stalls_1s": len(stalled),
        "duration_s": duration_s,
        "false_deaths": len(sim.false_deaths),
        "refutations": sum(m.swim.stats["refute"] for m in sim.members.values()),
        "msgs_per_member_s": (sim.counters["sent"] - sent_before) / n / duration_s,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["members"] for r in results["sizes"]]
    fig, (times, rate) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in [
        ("crash_p50_s", "crash seen by all, p50"),
        ("crash_p99_s", "crash seen by all, p99"),
        ("join_max_s", "join reaches all, max"),
        ("change_max_s", "change reaches all, max"),
    ]:
        times.plot(sizes, [r[key] for r in results["sizes"]], marker="o", label=label)
    times.axhline(TARGETS["crash_p50_s"], color="grey", linestyle=":", linewidth=1)
    times.axhline(TARGETS["crash_p99_s"], color="grey", linestyle="--", linewidth=1)
    times.set_xscale("log")
    times.set_xlabel("members")
    times.set_ylabel("virtual seconds")
    times.set_title("detection and dissemination (targets at 64: 2 s / 3 s)")
    times.legend(fontsize=8)
    rate.bar([str(s) for s in sizes], [r["msgs_per_member_s"] for r in results["sizes"]])
    rate.axhline(TARGETS["msgs_per_member_s"], color="red", linestyle="--", linewidth=1)
    rate.set_xlabel("members")
    rate.set_ylabel("frames sent per member per second")
    rate.set_title("steady-state message rate (target <= 10)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--profile", choices=["lan", "local", "test"], default="lan")
    parser.add_argument("--false-death-members", type=int, default=64)
    parser.add_argument("--false-death-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("bench-results/gossip"))
    args = parser.parse_args(argv)
    config = getattr(GossipConfig, args.profile)()
    results: dict = {"profile": args.profile, "config": _config_dict(config), "targets": TARGETS}
    results["sizes"] = []
    for n in args.sizes:
        seeds = args.seeds if n <= 256 else args.seeds[:1]
        crashes = 10 if n <= 64 else 5 if n <= 256 else 3
        row = measure_size(n, seeds, crashes, joins=3, config=config)
        results["sizes"].append(row)
        print(json.dumps(row), flush=True)
    results["false_deaths"] = [
        measure_false_deaths(args.false_death_members, seed, args.false_death_seconds, config)
        for seed in args.seeds
    ]
    print(json.dumps(results["false_deaths"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gossip.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "gossip.png")
    print(f"wrote {args.out / 'gossip.json'} and {args.out / 'gossip.png'}")
    return 0


def _config_dict(config: GossipConfig) -> dict:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


if __name__ == "__main__":
    sys.exit(main())
