"""How long a frozen member takes to be declared dead, and whether a short freeze is survived.

Starts ``--members`` real ``meshkv join`` processes on 127.0.0.1 (one gossip profile), then for
``--rounds`` rounds freezes one member (SIGSTOP, a different one each round) and measures the
seconds until every other member lists it dead; thaws it (SIGCONT) and waits until every member
lists every member alive again (the thawed boot refutes). Then ``--rounds`` short freezes of
``--stall-s`` each, counting those after which any member had declared the frozen one dead.
What is seen comes from the members' own tables (the state query), polled every ``POLL_S``.

    python tools/bench_frozen_member.py [--members 5] [--rounds 5] [--stall-s 1.0]
        [--profile local] [--out bench-results/frozen]

Writes <out>/frozen.json: each round's time to dead everywhere, median and max, and the short
freezes that became deaths. Compare two versions of meshkv by running it with each on the path.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from meshkv.cli.common import codec_of
from meshkv.config import MeshConfig
from meshkv.errors import TransportError
from meshkv.gossip.member import MemberState
from meshkv.gossip.runner import query_members
from tools.bench.common import free_ports, percentile, stop_process

START_S = 60.0
CONVERGE_S = 30.0
DEAD_LIMIT_S = 60.0
"""A frozen member not dead everywhere by then counts as never (the rule is broken)."""
SETTLE_S = 3.0
"""A round starts only after every member listed every member alive this long without a break
(a member thawed after its death was re-frozen at once and declared dead again: its peers'
fresh connections to it were not up yet, so nothing held its suspicion)."""
QUERY_TIMEOUT_S = 0.5
POLL_S = 0.05


class Members:
    """``count`` ``meshkv join`` processes, each seeded by the first two."""

    def __init__(self, count: int, profile: str, work: Path) -> None:
        self.ports = free_ports(count)
        self.codec = codec_of(MeshConfig(mesh_gossip_profile=profile))
        config = work / "mesh.yaml"
        config.write_text(f"p2p_host: 127.0.0.1\nmesh_gossip_profile: {profile}\n")
        seeds = [a for port in self.ports[:2] for a in ("--seed", f"127.0.0.1:{port}")]
        self.procs: list[subprocess.Popen[bytes]] = []
        for i, port in enumerate(self.ports):
            with (work / f"f{i}.log").open("wb") as log:
                command = [sys.executable, "-m", "meshkv", "join", "--config", str(config),
                           "--port", str(port), "--id", f"f{i}", *seeds]  # fmt: skip
                self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        self.names = [f"f{i}/0" for i in range(count)]

    def states(self, index: int) -> dict[str, MemberState] | None:
        try:
            views = query_members(f"127.0.0.1:{self.ports[index]}", timeout_s=QUERY_TIMEOUT_S,
                                  codec=self.codec)  # fmt: skip
        except TransportError:
            return None
        return {v.name: v.state for v in views}

    def all_alive(self) -> bool:
        for index in range(len(self.ports)):
            states = self.states(index)
            if states is None or any(states.get(n) is not MemberState.ALIVE for n in self.names):
                return False
        return True

    def dead_at_others(self, victim: int) -> bool:
        for index in range(len(self.ports)):
            if index == victim:
                continue
            states = self.states(index)
            if states is None or states.get(self.names[victim]) is not MemberState.DEAD:
                return False
        return True

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)


def wait(condition, limit_s: float) -> float | None:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit_s:
            return None
        time.sleep(POLL_S)
    return time.monotonic() - started


def settle(members: Members) -> float | None:
    """Seconds until every member listed every member alive for SETTLE_S in a row (None past
    CONVERGE_S)."""
    started = time.monotonic()
    alive_since: float | None = None
    while time.monotonic() - started < CONVERGE_S:
        now = time.monotonic()
        if not members.all_alive():
            alive_since = None
        elif alive_since is None:
            alive_since = now
        elif now - alive_since >= SETTLE_S:
            return now - started
        time.sleep(POLL_S)
    return None


def measure(args) -> dict:
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    members = Members(args.members, args.profile, work)
    try:
        if wait(members.all_alive, START_S) is None:
            raise TimeoutError("the members never all saw each other alive")
        to_dead: list[float | None] = []
        for round_index in range(args.rounds):
            victim = round_index % args.members
            os.kill(members.procs[victim].pid, signal.SIGSTOP)
            try:
                to_dead.append(wait(lambda v=victim: members.dead_at_others(v), DEAD_LIMIT_S))
            finally:
                os.kill(members.procs[victim].pid, signal.SIGCONT)
            if settle(members) is None:
                raise TimeoutError(f"f{victim}/0 did not come back after its thaw")
        short_deaths = 0
        for round_index in range(args.rounds):
            victim = round_index % args.members
            frozen_at = datetime.now().strftime("%H:%M:%S.%f")[:-3]  # the members' log clock
            os.kill(members.procs[victim].pid, signal.SIGSTOP)
            try:
                time.sleep(args.stall_s)  # the freeze itself is the scenario
            finally:
                os.kill(members.procs[victim].pid, signal.SIGCONT)
            if settle(members) is None:
                raise TimeoutError(f"f{victim}/0 did not come back after a short freeze")
            short_deaths += _dead_events_since(work, members.names[victim], frozen_at) > 0
        seen = sorted(t for t in to_dead if t is not None)
        return {
            "command": " ".join(sys.argv),
            "settings": vars(args),
            "frozen_to_dead_everywhere_s": [None if t is None else round(t, 2) for t in to_dead],
            "frozen_to_dead_p50_s": round(percentile(seen, 0.5), 2),
            "frozen_to_dead_max_s": round(seen[-1], 2) if seen else None,
            "frozen_never_dead": sum(t is None for t in to_dead),
            "short_freezes_declared_dead": short_deaths,
            "short_freezes": args.rounds,
        }
    finally:
        members.stop()


def _dead_events_since(work: Path, name: str, clock: str) -> int:
    """How many times the members' logs say ``name`` was declared dead at or after ``clock``
    (their "HH:MM:SS.mmm" line stamps; a run does not cross midnight)."""
    return sum(
        line >= clock
        for log in work.glob("f*.log")
        for line in log.read_text().splitlines()
        if f" dead {name} " in line
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stall-s", type=float, default=1.0)
    parser.add_argument("--profile", default="local")
    parser.add_argument("--out", default="bench-results/frozen")
    args = parser.parse_args()
    result = measure(args)
    path = Path(args.out) / "frozen.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
