"""Smoke tests of the lookup benchmark (`tools.bench.lookup`, run as tools/bench_lookup.py):
its measuring loops on a real echo server, and the LMCache path against LMCache's real
controller when the LMCache venv has been built.

CI does not build the LMCache venv (1.3 GB, minutes); that test skips with the reason and the
command that builds it. Nothing here times anything against a target.
"""

from __future__ import annotations

import argparse
import os

import msgpack
import pytest
import zmq

from tools.bench.common import cpu_ns
from tools.bench.lookup.failure import Lane, failure_timeline
from tools.bench.lookup.main import meshkv_missing
from tools.bench.lookup.measure import Cell, ThroughputCell, latency_block, throughput_block
from tools.bench.lookup.meshkv_path import MeshkvPath
from tools.bench.lookup.paths import (
    Answer,
    EchoPath,
    LMCachePath,
    decode_lmcache_reply,
    encode_lmcache_lookup,
)
from tools.bench.lookup.settings import DEFAULT_VENV, REQUESTER_INSTANCE_ID, VENV_READY_MARK
from tools.bench.lookup.workload import lmcache_cases, make_holdings


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_lmcache_lookup_encoding_is_a_tagged_map_in_field_order():
    payload = encode_lmcache_lookup([1, 2**64 - 1])
    assert list(msgpack.unpackb(payload).items()) == [
        ("type", "BatchedP2PLookupMsg"),
        ("hashes", [1, 2**64 - 1]),
        ("instance_id", REQUESTER_INSTANCE_ID),
        ("worker_id", 0),
    ]


def test_lmcache_reply_decoding_reads_hits_holder_and_errors():
    hit = msgpack.packb(
        {"type": "BatchedP2PLookupRetMsg", "layout_info": [["inst-7", "LocalCPUBackend", 3, "u"]]}
    )
    assert decode_lmcache_reply(hit) == Answer(hits=3, holders=("inst-7",) * 3)
    error = msgpack.packb({"type": "ErrorMsg", "error": "boom"})
    assert decode_lmcache_reply(error).error == "ErrorMsg: boom"


def test_cases_hit_first_and_last_instance_and_miss_nothing():
    holdings = make_holdings(3, 50, seed=5)
    cases = lmcache_cases(holdings, 8, seed=5)
    first, last = set(holdings.member_keys[0]), set(holdings.member_keys[-1])
    every = {k for keys in holdings.member_keys for k in keys}
    assert all(set(p.keys) <= first and p.expected_hits == 8 for p in cases["hit_first"])
    assert all(set(p.keys) <= last and p.expected_hits == 8 for p in cases["hit_last"])
    assert all(not (set(p.keys) & every) and p.expected_hits == 0 for p in cases["miss"])


def test_cpu_ns_grows_with_work_in_both_sources():
    before = cpu_ns([os.getpid()])
    sum(i * i for i in range(2_000_000))
    after = cpu_ns([os.getpid()])
    assert after[0] - before[0] > 10_000_000  # schedstat, ns
    assert after[1] >= before[1]  # stat ticks are coarse


@pytest.mark.processes
def test_echo_floor_measures_and_its_failure_shows_as_timeouts(tmp_path, context):
    echo = EchoPath(context, tmp_path)
    holdings = make_holdings(2, 40, seed=1)
    try:
        echo.setup(holdings)
        prompts = echo.cases(holdings, 4, seed=1)["hit_first"]
        group = echo.requesters(4)
        cell = Cell()
        latency_block(echo, group, prompts, 30, cell)
        assert cell.lookups == 30 and cell.timeouts == 0 and len(cell.latencies_ns) == 30
        assert cell.server_cpu_ns > 0
        tput = ThroughputCell()
        throughput_block(echo, group, 4, prompts, 0.2, tput)
        assert tput.completed > 4 and tput.wall_ns > 0
        group.close()

        lane = Lane(
            label="echo", path=echo, group=echo.requesters(1), prompts=prompts, deadline_s=0.1
        )
        args = argparse.Namespace(
            failure_before_s=0.3, failure_after_s=0.6, failure_interval_s=0.02, failure_drain_s=0.2
        )
        result = failure_timeline([lane], [echo], args)
        lane.group.close()
        before = result["lanes"][0]["before_kill"]["outcomes"]
        after = result["lanes"][0]["after_kill"]["outcomes"]
        assert set(before) == {"answer"}
        assert after.get("timeout", 0) >= 3 and "answer" not in after
    finally:
        echo.teardown()


VENV_PYTHON = DEFAULT_VENV / "bin" / "python"


@pytest.mark.processes
@pytest.mark.timeout(120)
@pytest.mark.skipif(
    not (DEFAULT_VENV / VENV_READY_MARK).exists(),
    reason="LMCache venv absent (CI does not build it): python tools/bench_lookup.py --quick",
)
def test_lmcache_controller_answers_first_last_and_miss_then_dies(tmp_path, context):
    lmcache = LMCachePath(VENV_PYTHON, context, tmp_path)
    holdings = make_holdings(3, 60, seed=3)
    try:
        facts = lmcache.setup(holdings)
        assert facts["encoder_checked_against_msgspec"]
        cases = lmcache.cases(holdings, 16, seed=3)
        first = lmcache.lookup(cases["hit_first"][0])
        last = lmcache.lookup(cases["hit_last"][0])
        miss = lmcache.lookup(cases["miss"][0])
        assert first == Answer(hits=16, holders=("bench-inst-000",) * 16)
        assert last == Answer(hits=16, holders=("bench-inst-002",) * 16)
        assert miss == Answer(hits=0)
        lmcache.kill_server()
        assert lmcache.lookup(cases["hit_first"][0], deadline_s=0.3) is None
    finally:
        lmcache.teardown()


@pytest.mark.processes
@pytest.mark.timeout(120)
@pytest.mark.skipif(meshkv_missing() is not None, reason=f"{meshkv_missing()}")
def test_meshkv_path_answers_every_case_and_keeps_answering_without_its_seed(tmp_path, context):
    mesh = MeshkvPath(context, tmp_path)
    holdings = make_holdings(3, 80, seed=4)
    try:
        facts = mesh.setup(holdings)
        assert facts["members"] == 3 and facts["asker_home_keys"] >= 8
        cases = mesh.cases(holdings, 8, seed=4)
        assert set(cases) == {"hit_first", "hit_last", "miss", "local"}
        for case, prompts in cases.items():
            for prompt in prompts[:3]:
                assert mesh.lookup(prompt) == Answer(hits=prompt.expected_hits), case
        group = mesh.requesters(4, background=True)
        tput = ThroughputCell()
        throughput_block(mesh, group, 4, cases["hit_last"], 0.3, tput)
        group.close()
        assert tput.completed > 4 and tput.wrong == 0 and tput.errors == 0
        mesh.kill_server()
        assert mesh.lookup(cases["hit_first"][0]) == Answer(hits=8)
    finally:
        mesh.teardown()
