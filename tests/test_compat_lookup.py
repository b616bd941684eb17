"""POST /lookup answered from the ring and the homes: LMCache's layout_info from real MeshNodes
(tcp channel, real ZMQ on 127.0.0.1), and the pure rules that turn holders into token counts."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest

from meshkv.compat.mesh_lookup import (
    LOCATION,
    combine_namespaces,
    is_namespace_digest,
    matched_tokens,
)
from meshkv.config import MeshConfig
from meshkv.keys import chunk_keys, root_key
from meshkv.node import MeshNode
from meshkv.node.chunk_count_advert import CHUNK_COUNT_REFRESH_INTERVAL_S
from meshkv.ring import HashRing
from tests.conftest import wait_until
from tests.test_compat_http_api import DEADLINE_S, Shim

NAMESPACE = "cd" * 16
CHUNK_TOKENS = 16
CHUNK_BYTES = 4096
ADVERT_WAIT_S = 4 * CHUNK_COUNT_REFRESH_INTERVAL_S + DEADLINE_S


@pytest.mark.parametrize(
    ("holders", "expected"),
    [
        ([], {}),
        (["a/0", "a/0", "a/0"], {"a": 48}),
        (["a/0", "b/0", "a/0"], {"a": 48, "b": 32}),  # LMCache: end of the last chunk held
        (["b/1", "a/0"], {"b": 16, "a": 32}),
    ],
)
def test_matched_tokens_is_the_end_of_the_last_leading_chunk_held(holders, expected):
    assert matched_tokens(holders, CHUNK_TOKENS) == expected


def test_an_instance_with_tp_ranks_reports_what_every_rank_can_load():
    per_namespace = {"ns0": {"tp": 64, "store": 32}, "ns1": {"tp": 32, "store": 48}}
    ranks_of = {"tp": {"ns0", "ns1"}, "solo": {"ns0"}}
    assert combine_namespaces(per_namespace, ranks_of) == {"tp": 32, "store": 48}
    assert combine_namespaces({"ns0": {"tp": 64}}, ranks_of) == {"tp": 0}  # rank 1 has nothing


def test_only_full_namespace_digests_are_looked_up():
    assert is_namespace_digest("ab" * 16)
    assert not is_namespace_digest("ab" * 6)  # a short label cannot seed the key chain
    assert not is_namespace_digest("zz" * 16)
    assert not is_namespace_digest(None)


def _tokens(n_chunks: int, extra_tokens: int = 0) -> list[int]:
    return [(7 * i) % 4001 for i in range(n_chunks * CHUNK_TOKENS + extra_tokens)]


def _keys(tokens: list[int]) -> list[bytes]:
    return chunk_keys(root_key(bytes.fromhex(NAMESPACE)), tokens, CHUNK_TOKENS)


def _chunk(key: bytes) -> np.ndarray:
    return np.frombuffer(key * (CHUNK_BYTES // len(key)), dtype=np.uint8)


@pytest.fixture
def shim() -> Iterator[Shim]:
    started = Shim()  # chunk_size 256: the engines' own (16) reaches it in their metadata
    yield started
    started.shim.stop()


@pytest.fixture
def nodes() -> Iterator[list[MeshNode]]:
    started: list[MeshNode] = []
    yield started
    for node in started:
        node.stop()


def _start_node(started: list[MeshNode], name: str, seeds: list[str]) -> MeshNode:
    config = MeshConfig(
        enable_p2p=True,
        max_local_cpu_size=0.0625,
        transfer_channel="tcp",
        lmcache_instance_id=name,
        chunk_size=CHUNK_TOKENS,
        enable_controller=True,
        controller_pull_url=seeds[0],
        controller_reply_url=seeds[1],
        mesh_gossip_profile="test",
    )
    node = MeshNode(config, namespace=NAMESPACE)
    node.start()
    started.append(node)
    return node


def test_lookup_reports_each_holder_instance_and_its_matched_tokens(shim, nodes):
    producer = _start_node(nodes, "inst1", shim.seeds)
    _start_node(nodes, "inst2", shim.seeds)
    wait_until("both engines listed", lambda: len(shim.workers()) == 2)
    wait_until("engines see each other", lambda: all(len(n.members()) == 2 for n in nodes))
    tokens = _tokens(3, extra_tokens=5)  # a trailing partial chunk is never counted
    keys = _keys(tokens)
    assert producer.put(keys, [_chunk(k) for k in keys]) == 3
    ring = HashRing(["inst1/0", "inst2/0"], producer.config.mesh_vnodes)
    by_name = {node.name: node for node in nodes}
    wait_until(
        "every chunk at its home", lambda: all(by_name[ring.home(k)].store.lookup(k) for k in keys)
    )
    expected = matched_tokens([ring.home(k) for k in keys], CHUNK_TOKENS)
    status, body = shim.post("/lookup", {"tokens": tokens})
    assert status == 200 and body["event_id"].startswith("Lookup")
    assert body["layout_info"] == {inst: [LOCATION, n] for inst, n in expected.items()}
    assert max(n for _, n in body["layout_info"].values()) == 3 * CHUNK_TOKENS
    status, body = shim.post("/lookup", {"tokens": _tokens(2)[::-1]})
    assert (status, body["layout_info"]) == (200, {})  # nobody holds this prompt


def test_lookup_stops_at_the_first_chunk_nobody_holds(shim, nodes):
    producer = _start_node(nodes, "inst1", shim.seeds)
    wait_until("engine listed", lambda: len(shim.workers()) == 1)
    tokens = _tokens(4)
    keys = _keys(tokens)
    assert producer.put(keys[:2], [_chunk(k) for k in keys[:2]]) == 2
    status, body = shim.post("/lookup", {"tokens": tokens})
    assert (status, body["layout_info"]) == (200, {"inst1": [LOCATION, 2 * CHUNK_TOKENS]})


def test_key_stats_count_the_chunks_each_member_advertises(shim, nodes):
    producer = _start_node(nodes, "inst1", shim.seeds)
    _start_node(nodes, "inst2", shim.seeds)
    wait_until("engines see each other", lambda: all(len(n.members()) == 2 for n in nodes))
    keys = _keys(_tokens(6))
    assert producer.put(keys, [_chunk(k) for k in keys]) == 6
    # (the 6 chunks are one home group: the other engine holds them too, or none of them)

    def advertised() -> dict[str, int | None]:
        _, stats = shim.get("/controller/key-stats")
        return {i["instance_id"]: i["key_count"] for i in stats["instances"]}

    def held() -> dict[str, int]:
        return {n.config.lmcache_instance_id: n.store.stats().chunks for n in nodes}

    wait_until("key counts advertised", lambda: advertised() == held(), ADVERT_WAIT_S)
    assert advertised()["inst1"] == 6  # the producer keeps its own copy of every chunk


def test_an_engine_logs_lmcaches_connection_line_when_it_first_reaches_a_peer(shim, nodes, caplog):
    caplog.set_level(logging.INFO, logger="vllm.meshkv.node")
    producer = _start_node(nodes, "inst1", shim.seeds)
    reader = _start_node(nodes, "inst2", shim.seeds)
    wait_until("engines see each other", lambda: all(len(n.members()) == 2 for n in nodes))
    keys = _keys(_tokens(2))
    assert producer.put(keys, [_chunk(k) for k in keys]) == 2
    with reader.get(keys, CHUNK_BYTES) as lease:  # from the producer, or from the home it fed
        assert lease.count == 2
    lines = [r.getMessage() for r in caplog.records if "Established connection" in r.getMessage()]
    expected = {
        f"Established connection to peer_init_url: {n.gossip_address}, "
        f"peer_lookup_url: {n.data_address}"
        for n in nodes
    }
    assert lines and set(lines) <= expected
    assert len(lines) == len(set(lines))  # once per peer


def test_an_instance_with_neither_controller_nor_seeds_runs_alone_and_says_so_once(caplog, nodes):
    caplog.set_level(logging.INFO, logger="vllm.meshkv")
    config = MeshConfig(
        enable_p2p=True,
        max_local_cpu_size=0.0625,
        transfer_channel="tcp",
        lmcache_instance_id="alone",
        mesh_gossip_profile="test",
    )
    node = MeshNode(config, namespace=NAMESPACE)
    node.start()
    nodes.append(node)
    said = [r for r in caplog.records if "no mesh_seeds and no controller" in r.getMessage()]
    assert len(said) == 1
    assert [p.name for p in node.members()] == ["alone/0"]
