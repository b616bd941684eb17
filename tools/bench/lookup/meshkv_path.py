"""The meshkv lookup path: N members (one of them a `MeshNode` in this process, the asker),
joined through meshkv's ``lmcache_controller`` shim or a plain seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import zmq

from tools.bench.common import cpu_ns, free_port, read_json_line, wait_for_tcp
from tools.bench.lookup.aggregate import collect, order, summarize
from tools.bench.lookup.mesh_member import (
    ask_for,
    start_mesh_node,
    wait_for_ring,
    wait_until_settled,
)
from tools.bench.lookup.paths import Answer, LookupPath, RequesterGroup
from tools.bench.lookup.settings import (
    AGGREGATE_START_DELAY_S,
    BOOTS,
    CHILD_STOP_TIMEOUT_S,
    CONTROLLER_START_TIMEOUT_S,
    LOOKUP_DEADLINE_S,
    PROMPTS_PER_CELL,
    SCRIPT,
)
from tools.bench.lookup.workload import (
    CHAIN_CHUNKS,
    Holdings,
    Prompt,
    lmcache_cases,
    make_prompt,
)

MESH_READY_TIMEOUT_S = 300.0
MESH_START_WAVE = 8
"""Members started at once. 64 processes importing together on 2 cores starve the gossip of
those already running for a minute; suspicions, refutations and ring changes then feed on the
CPU they cost, and the mesh took longer than MESH_READY_TIMEOUT_S to settle."""
MESH_STOP_TIMEOUT_S = 15.0  # all members together, then SIGKILL
MESH_SEED_ID = "bench-seed"
MESH_ASKER_ID = "bench-asker"


class NodeLookupGroup(RequesterGroup):
    """Requesters calling the asker's `MeshNode.lookup` (ring, local store, the prompt's first
    home and, only if needed, other homes).

    In the poll loop's own thread (``background`` False: the answer is there when `begin`
    returns, no thread hop in the latency), or through `MeshNode.lookup_async`: every
    requester's lookups in flight on the node's one request loop, answers handed back through
    an inproc socket the poll loop watches.
    """

    def __init__(self, node, context: zmq.Context, count: int, background: bool) -> None:
        self._node = node
        self._background = background
        self._pull: zmq.Socket | None = None
        if background:
            self._address = f"inproc://bench-node-lookups-{id(self)}"
            self._pull = context.socket(zmq.PULL)
            self._pull.bind(self._address)
            self._context = context
            self._done: queue.SimpleQueue[tuple[int, Answer]] = queue.SimpleQueue()
            self._thread_sockets = threading.local()
            self._pushes: list[zmq.Socket] = []
            self._pushes_lock = threading.Lock()

    def _ask(self, prompt: Prompt) -> Answer:
        try:
            return Answer(hits=self._node.lookup(prompt.keys, timeout_s=LOOKUP_DEADLINE_S))
        except Exception as exc:  # an escaped error is a result to count, not a crash
            return Answer(hits=0, error=f"{type(exc).__name__}: {exc}"[:200])

    def sockets(self) -> Sequence[zmq.Socket]:
        return [self._pull] if self._pull is not None else []

    def begin(self, slot: int, prompt: Prompt) -> Answer | None:
        if not self._background:
            return self._ask(prompt)
        self._node.lookup_async(
            prompt.keys, lambda hits: self._answered(slot, Answer(hits=hits)), LOOKUP_DEADLINE_S
        )
        return None

    def _answered(self, slot: int, answer: Answer) -> None:
        """On the node's request loop (or the caller's thread, for a lookup of local keys)."""
        push = getattr(self._thread_sockets, "push", None)
        if push is None:
            push = self._thread_sockets.push = self._context.socket(zmq.PUSH)
            push.connect(self._address)
            with self._pushes_lock:
                self._pushes.append(push)
        self._done.put((slot, answer))
        push.send(b"")

    def on_readable(self, sock: zmq.Socket) -> list[tuple[int, Answer]]:
        with contextlib.suppress(zmq.Again):
            while True:
                sock.recv(zmq.NOBLOCK)
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._done.get_nowait())
        return out

    def abandon(self, slot: int) -> None:
        """Nothing to do: MeshNode.lookup keeps its own deadline and always answers."""

    def close(self) -> None:
        if self._background:
            for push in self._pushes:  # (the loop thread's socket: its last use has passed)
                push.close(linger=0)
            self._pull.close(linger=0)


def meshkv_shim_missing() -> str | None:
    """Why meshkv's lmcache_controller shim cannot run here, or None."""
    try:
        import meshkv.compat.controller_cli  # noqa: F401
    except Exception as exc:
        return f"import meshkv.compat.controller_cli failed: {type(exc).__name__}: {exc}"
    return None


class MeshkvPath(LookupPath):
    """N meshkv members (the asker, in this process, and N-1 member processes) plus a seed.

    Every chunk is stored at its ring home only (names are fixed, so the driver computes the
    ring the members will form). The seed is meshkv's own ``lmcache_controller`` shim, which
    the members name as LMCache configs do (enable_controller, controller_pull_url,
    controller_reply_url); where the shim is not importable, a member of role "seed" (on no
    ring, as the shim's members are) stands in. The failure timeline kills it.
    """

    name = "meshkv"

    def __init__(self, context: zmq.Context, log_dir: Path, use_shim: bool = True) -> None:
        self._context = context
        self._log_dir = log_dir
        self.use_shim = use_shim
        self._seed: subprocess.Popen | None = None
        self._members: list[subprocess.Popen] = []
        self._asker = None
        self._asker_name = f"{MESH_ASKER_ID}/0"
        self._homes: dict[bytes, str] = {}
        self._ring = None
        self.seed_kind = ""

    @property
    def asker(self):
        """The asking `MeshNode` in this process (None before setup)."""
        return self._asker

    def _spawn(self, spec: dict, log_name: str) -> subprocess.Popen:
        """A member process; its spec goes by file (a pipe would block on a slow start)."""
        spec_path = self._log_dir / f"{log_name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        with open(self._log_dir / log_name, "wb") as log:
            return subprocess.Popen(
                [sys.executable, str(SCRIPT), "mesh-member", "--spec", str(spec_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )

    def setup(self, holdings: Holdings) -> dict:
        from meshkv.config import MeshConfig
        from meshkv.member_meta import ROLE_ENGINE, ROLE_SEED
        from meshkv.ring import HashRing

        n = holdings.members
        t0 = time.monotonic()
        ids = [MESH_ASKER_ID] + [f"bench-mesh-{i:03d}" for i in range(1, n)]
        ring = self._ring = HashRing([f"{i}/0" for i in ids], MeshConfig().mesh_vnodes)
        every_key = [k for keys in holdings.member_keys for k in keys]
        by_home: dict[str, list[str]] = {f"{i}/0": [] for i in ids}
        self._homes = {}
        for key in every_key:
            home = ring.home(key)
            self._homes[key] = home
            by_home[home].append(key.hex())
        chains: dict[str, list[dict]] = {f"{i}/0": [] for i in ids}
        for keys in holdings.member_keys:  # each member's keys are whole prompt chains
            for start in range(0, len(keys), CHAIN_CHUNKS):
                chain = keys[start : start + CHAIN_CHUNKS]
                chains[self._homes[chain[0]]].append(
                    {"keys": [k.hex() for k in chain], "holders": [self._homes[k] for k in chain]}
                )
        join = self._start_seed(n, ROLE_SEED)
        self._members = []
        for wave in range(1, n, MESH_START_WAVE):  # a wave starts once the last is running
            started = [
                self._spawn(
                    {
                        "instance_id": i,
                        "role": ROLE_ENGINE,
                        **join,
                        "keys": by_home[f"{i}/0"],
                        "chains": chains[f"{i}/0"],
                    },
                    f"meshkv-{i}-n{n}-{next(BOOTS)}.log",
                )
                for i in ids[wave : wave + MESH_START_WAVE]
            ]
            self._members += started
            for member in started:  # each has started and stored its home keys
                read_json_line(member, MESH_READY_TIMEOUT_S)
        self._asker = start_mesh_node(
            {
                "instance_id": MESH_ASKER_ID,
                "role": ROLE_ENGINE,
                **join,
                "keys": by_home[self._asker_name],
                "chains": chains[self._asker_name],
            }
        )
        started_s = time.monotonic() - t0
        seen = wait_for_ring(self._asker, n, MESH_READY_TIMEOUT_S)
        if tuple(sorted(self._asker.membership.ring().current.members)) != tuple(
            sorted(ring.members)
        ):
            raise RuntimeError(
                f"the asker's ring has {seen} of {n} members after {MESH_READY_TIMEOUT_S} s"
            )
        converged_s = time.monotonic() - t0
        wait_until_settled(self._asker, MESH_READY_TIMEOUT_S)
        return {
            "members": n,
            "start_s": started_s,
            "start_and_converge_s": converged_s,
            "ring_settled_s": time.monotonic() - t0,
            "asker_home_keys": len(by_home[self._asker_name]),
            "keys_per_home_max": max(len(v) for v in by_home.values()),
            "keys_per_home_min": min(len(v) for v in by_home.values()),
            "transfer_channel": "tcp",
            "seed": self.seed_kind,
        }

    def _start_seed(self, n: int, seed_role: str) -> dict:
        """Starts the shim (or a seed member); returns how members are told to join."""
        shim_ok = self.use_shim and meshkv_shim_missing() is None
        self.seed_kind = "shim" if shim_ok else "seed member"
        if self.seed_kind == "seed member":
            self._seed = self._spawn(
                {
                    "instance_id": MESH_SEED_ID,
                    "role": seed_role,
                    "seeds": [],
                    "keys": [],
                },
                f"meshkv-seed-n{n}-{next(BOOTS)}.log",
            )
            return {"seeds": [read_json_line(self._seed, MESH_READY_TIMEOUT_S)["gossip"]]}
        http_port, pull_port, reply_port = free_port(), free_port(), free_port()
        with open(self._log_dir / f"meshkv-shim-n{n}-{next(BOOTS)}.log", "wb") as log:
            self._seed = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meshkv.compat.controller_cli",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(http_port),
                    "--monitor-ports",
                    json.dumps({"pull": pull_port, "reply": reply_port}),
                    "mesh_gossip_profile=local",
                    "mesh_state_file=",
                ],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_tcp(http_port, self._seed, CONTROLLER_START_TIMEOUT_S)
        return {"seeds": [], "controller": [f"127.0.0.1:{pull_port}", f"127.0.0.1:{reply_port}"]}

    def cases(self, holdings: Holdings, chunks: int, seed: int) -> dict[str, list[Prompt]]:
        """LMCache's three cases (same prompts) plus "local": every chunk homed at the asker."""
        out = lmcache_cases(holdings, chunks, seed)
        mine = [k for k, home in self._homes.items() if home == self._asker_name]
        rng = random.Random(seed * 1000 + chunks + 1)
        if len(mine) >= chunks:
            out["local"] = [
                make_prompt(rng.sample(mine, chunks), chunks) for _ in range(PROMPTS_PER_CELL)
            ]
        return out

    def requesters(self, count: int, background: bool = False) -> RequesterGroup:
        return NodeLookupGroup(self._asker, self._context, count, background or count > 1)

    def servers_asked(self, prompt: Prompt) -> int:
        """Members one lookup asks (`meshkv.node.locate`): none if every key is local or the
        asker is the prompt's first home (it answers from its own chain index), else that home
        alone; every prompt here is a whole chain its first home has an entry for."""
        if all(self._homes.get(k) == self._asker_name for k in prompt.keys):
            return 0
        return int(self._ring.home(prompt.keys[0]) != self._asker_name)

    def first_home(self, prompt: Prompt) -> str:
        """The member a lookup of ``prompt`` asks first: the home of its first key."""
        return self._ring.home(prompt.keys[0])

    def server_pids(self) -> list[int]:
        return [p.pid for p in (self._seed, *self._members) if p and p.poll() is None]

    def aggregate(self, prompts: Sequence[Prompt], seconds: float, in_flight: int) -> dict:
        """Every member asks at once (`meshkv.node.MeshNode.lookup_async`), the asker in this
        process included; CPU of every member (and this process) counted."""
        spec = order(prompts, seconds, in_flight, time.time() + AGGREGATE_START_DELAY_S,
                     hashes=False)  # fmt: skip
        line = (json.dumps(spec) + "\n").encode()
        pids = [*self.server_pids(), os.getpid()]
        cpu0 = cpu_ns(pids)[0]
        for member in self._members:
            member.stdin.write(line)
            member.stdin.flush()
        asked: list[dict] = []
        asker = threading.Thread(target=lambda: asked.append(ask_for(self._asker, **spec)))
        asker.start()
        counts = collect(self._members, seconds)
        asker.join(seconds + AGGREGATE_START_DELAY_S + 4 * LOOKUP_DEADLINE_S)
        for key in counts:
            counts[key] += asked[0][key] if asked else 0
        return summarize(counts, cpu_ns(pids)[0] - cpu0, seconds)

    def kill_server(self) -> str:
        self._seed.send_signal(signal.SIGKILL)
        self._seed.wait(CHILD_STOP_TIMEOUT_S)
        if self.seed_kind == "shim":
            return f"meshkv's lmcache_controller shim (pid {self._seed.pid}), SIGKILL"
        return (
            f"meshkv seed member (pid {self._seed.pid}, role seed, on no ring, as the "
            "lmcache_controller shim's members are), SIGKILL"
        )

    def teardown(self) -> None:
        members = [p for p in (*self._members, self._seed) if p is not None]
        for process in members:  # stdin EOF: members stop; SIGTERM: the shim leaves
            if process.poll() is None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
        if self._seed is not None and self._seed.poll() is None:
            self._seed.terminate()
        deadline = time.monotonic() + MESH_STOP_TIMEOUT_S
        for process in members:  # all stop at once; what outlives the bound is killed
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
        for process in members:
            if process.poll() is None:
                process.kill()
                process.wait(CHILD_STOP_TIMEOUT_S)
        if self._asker is not None:
            self._asker.stop(leave=False)
        self._members, self._seed, self._asker = [], None, None
