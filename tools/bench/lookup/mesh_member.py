"""A meshkv member process of the lookup benchmark, and what it does: join, store its ring home
keys, hold the chain entries of the prompts homed at it, and ask under aggregate load.

`mesh_member` is the child's main (``bench_lookup.py mesh-member --spec FILE``); the asker in
the benchmark's own process is built by the same `start_mesh_node`.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tools.bench.lookup.settings import LOOKUP_DEADLINE_S

MESH_CHUNK_BYTES = 64  # chunk payload size in the members' stores (lookups never read it)
MESH_STORE_GIB = 0.05
MESH_CONVERGE_POLL_S = 0.05
MESH_NAMESPACE = "bench-lookup"
PUT_ATTEMPTS = 3
PUT_RETRY_S = 0.5

log = logging.getLogger("tools.bench.lookup.mesh_member")


def mesh_config(instance_id: str, seeds: Sequence[str], controller: Sequence[str] = ()):
    """A member on 127.0.0.1 with any free ports, tcp channel, one-host gossip timing.

    ``controller``: the shim's pull and reply addresses, given the way an LMCache config gives
    them (enable_controller, controller_pull_url, controller_reply_url).
    """
    from meshkv.config import MeshConfig

    return MeshConfig(
        lmcache_instance_id=instance_id,
        p2p_host="127.0.0.1",
        p2p_init_ports=0,
        p2p_lookup_ports=0,
        transfer_channel="tcp",
        max_local_cpu_size=MESH_STORE_GIB,
        mesh_seeds=list(seeds),
        mesh_gossip_profile="local",
        enable_p2p=False,  # each member stores only its own home keys: nothing to push
        enable_controller=bool(controller),
        controller_pull_url=controller[0] if controller else None,
        controller_reply_url=controller[1] if controller else None,
    )


def chunk_payload(key: bytes) -> bytes:
    return (key * (MESH_CHUNK_BYTES // len(key) + 1))[:MESH_CHUNK_BYTES]


def wait_for_ring(node, members: int, timeout_s: float) -> int:
    """Polls until the node's ring has `members` members; returns the count it saw."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = len(node.membership.ring().current.members)
        if seen >= members or time.monotonic() >= deadline:
            return seen
        time.sleep(MESH_CONVERGE_POLL_S)


def wait_until_settled(node, timeout_s: float) -> float:
    """Waits until the node's ring has been unchanged `meshkv.node.locate.SETTLING_S`, so its
    lookups are measured in steady state (before that, a first home's miss also asks others);
    returns how long the ring had been unchanged."""
    from meshkv.node.locate import SETTLING_S

    deadline = time.monotonic() + timeout_s
    while True:
        unchanged_s = node.membership.ring_unchanged_s()
        if unchanged_s >= SETTLING_S or time.monotonic() >= deadline:
            return unchanged_s
        time.sleep(min(SETTLING_S - unchanged_s, max(0.0, deadline - time.monotonic())))


def record_chains(node, chains: Sequence[dict]) -> int:
    """Fills the node's chain index with the chains whose first key it is home for, each run
    of one holder as a producer's ``CHAIN_AT`` would (the holders are the keys' ring homes,
    where this benchmark stores every chunk); returns the keys recorded."""
    recorded = 0
    for chain in chains:
        keys = [bytes.fromhex(k) for k in chain["keys"]]
        holders = chain["holders"]
        start = 0
        for end in range(1, len(keys) + 1):
            if end == len(keys) or holders[end] != holders[start]:
                recorded += node.directory.chains.record(
                    keys[0], start, keys[start:end], holders[start]
                )
                start = end
    return recorded


def start_mesh_node(spec: dict):
    """A real MeshNode holding spec's keys (its ring home keys) and the chain entries of the
    prompts whose first chunk is homed at it, started and joined."""
    from meshkv.node import MeshNode

    node = MeshNode(
        mesh_config(spec["instance_id"], spec["seeds"], spec.get("controller", ())),
        namespace=MESH_NAMESPACE,
        role=spec["role"],
    )
    node.start()
    keys = [bytes.fromhex(k) for k in spec["keys"]]
    missing = keys
    for _ in range(PUT_ATTEMPTS):  # a put refused while the host is starved is tried again
        node.put(missing, [chunk_payload(k) for k in missing])
        held = node.store.held_among(missing)
        missing = [k for k in missing if k not in held]
        if not missing:
            break
        log.warning("%s: %d home keys not stored; again", node.name, len(missing))
        time.sleep(PUT_RETRY_S)
    if missing:
        raise RuntimeError(f"{node.name} stored {len(keys) - len(missing)} of its {len(keys)} "
                           f"home keys in {PUT_ATTEMPTS} attempts")  # fmt: skip
    record_chains(node, spec.get("chains", []))
    return node


def mesh_member(spec_path: Path) -> None:
    """(Subprocess) one meshkv member: spec from a file, ready line on stdout, stop at EOF."""
    spec = json.loads(spec_path.read_text())
    node = start_mesh_node(spec)
    ready = {"gossip": node.gossip_address, "data": node.data_address}
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:  # aggregate-load orders (`aggregate`), until stdin closes
        order = json.loads(line)
        done = ask_for(node, **order)
        sys.stdout.write(json.dumps(done) + "\n")
        sys.stdout.flush()
    node.stop(leave=False)


def ask_for(
    node,
    prompts: list[list[str]],
    expected: list[int],
    start_at: float,
    seconds: float,
    in_flight: int,
) -> dict:
    """(A member under aggregate load) from wall time ``start_at``, keeps ``in_flight`` lookups
    of ``prompts`` in flight with `MeshNode.lookup_async` for ``seconds``; the counts."""
    keys = [[bytes.fromhex(k) for k in p] for p in prompts]
    rng = random.Random(node.name)
    counts = {"completed": 0, "wrong": 0}
    lock = threading.Lock()
    idle = threading.Condition(lock)
    active = [0]
    end_s = 0.0

    def start() -> None:
        i = rng.randrange(len(keys))
        node.lookup_async(keys[i], lambda hits: finished(i, hits), timeout_s=LOOKUP_DEADLINE_S)

    def finished(i: int, hits: int) -> None:
        with lock:
            counts["completed"] += 1
            counts["wrong"] += hits != expected[i]
            again = time.monotonic() < end_s
            if not again:
                active[0] -= 1
                idle.notify_all()
        if again:
            start()

    time.sleep(max(0.0, start_at - time.time()))  # every member starts at once
    end_s = time.monotonic() + seconds
    with lock:
        active[0] = in_flight
    for _ in range(in_flight):
        start()
    with lock:
        idle.wait_for(lambda: active[0] == 0, timeout=seconds + 2 * LOOKUP_DEADLINE_S)
        return {**counts, "unfinished": active[0]}
