"""The chaos harness in CI: 4 real members on 127.0.0.1, readers and writers, >= 60 s of seeded
kill -9 / SIGSTOP+SIGCONT / restart faults (>= 10 of them) and a stream of bad frames, then the
report's invariants.

The harness (`tools/chaos.py`) checks every read against ground-truth digests and times every
call against its deadline; this test asserts what it counted. The mesh must also be one ring
again after every fault, no member may crash on the bad frames (each is dropped and counted),
and none may grow past its byte budget + a fixed overhead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import chaos
from tools.chaos_misses import cause_of

pytestmark = pytest.mark.processes

AVAILABILITY_MIN = 0.99
"""Chunks served / chunks a live member held, at least, with ``mesh_replicas: 2`` (issue 17)."""


def test_schedule_is_seeded_and_covers_every_kind() -> None:
    settings = chaos.Settings(members=4, seed=11)
    first = [f for f, _ in zip(chaos.schedule(settings), range(30), strict=False)]
    again = [f for f, _ in zip(chaos.schedule(settings), range(30), strict=False)]
    assert first == again
    assert {f.kind for f in first[:3]} == set(chaos.FAULT_KINDS)
    assert {f.member for f in first} == {0, 1, 2, 3}
    other = [f for f, _ in zip(chaos.schedule(chaos.Settings(seed=12)), range(30), strict=False)]
    assert other != first


def test_the_ground_truth_check_catches_wrong_bytes() -> None:
    ledger, tally = chaos.Ledger(), chaos.Tally()
    keys = chaos.prompt_keys(chaos.random.Random(1), "s", 3, min_chunks=3)
    chunks = [chaos.chunk_content(k, 4096) for k in keys]
    ledger.record(keys, [chaos.digest(c) for c in chunks])
    assert chaos.check_read(keys, chunks[:2], ledger, tally) == 0  # a short read is a miss
    flipped = chunks[1].copy()
    flipped[100] ^= 1
    assert chaos.check_read(keys, [chunks[0], flipped], ledger, tally) == 1
    assert tally.counts["wrong_chunks"] == 1 and tally.counts["chunks_missed"] == 2


def test_ledger_keeps_digests_only_for_prompts_it_keeps() -> None:
    ledger = chaos.Ledger(prompts_max=2)
    rng = chaos.random.Random(3)
    prompts = [chaos.prompt_keys(rng, "s", 3, min_chunks=3) for _ in range(3)]
    for keys in prompts:
        ledger.record(keys, [chaos.digest(chaos.chunk_content(k, 64)) for k in keys])
    assert all(ledger.truth(k) is None for k in prompts[0] if k not in prompts[1] + prompts[2])
    assert all(ledger.truth(k) is not None for k in prompts[1] + prompts[2])
    assert len(ledger) == len(set(prompts[1] + prompts[2])) and ledger.recorded == 3


def test_calls_past_deadline_and_slack_are_overruns() -> None:
    tally = chaos.Tally()
    tally.timed("get", 1.0 + chaos.DEADLINE_SLACK_S - 0.001, 1.0)
    tally.timed("get", 1.0 + chaos.DEADLINE_SLACK_S + 0.001, 1.0)
    tally.timed("put", 5.0, None)  # a put has no deadline
    assert [o["op"] for o in tally.overruns] == ["get"] and tally.counts["get"] == 2


def test_one_ring_needs_every_observer_to_agree_on_names_and_boots() -> None:
    names = {"a/0", "b/0"}
    same = {"a/0": 1, "b/0": 2}
    assert chaos.one_ring([same, dict(same)], names)
    assert not chaos.one_ring([same, None], names)  # an observer did not answer
    assert not chaos.one_ring([same, {"a/0": 1, "b/0": 3}], names)  # b's old boot
    assert not chaos.one_ring([same, {**same, "c/0": 4}], names)  # c is not gone for all
    assert not chaos.one_ring([{"a/0": 1}, {"a/0": 1}], names)  # b missing everywhere


def miss(**fields: object) -> dict[str, object]:
    """A miss record: 2 keys, none served, by default held by m1 alone, which the get asked."""
    record: dict[str, object] = {
        "served": 0, "held": 2, "age_s": 5.0, "fresh_s": 1.0, "local_before": [],
        "held_by": {"writer": 0, "reader": 0, "m1/0": 2, "m2/0": 0},
        "placement": {"reader": ["m1/0", "m2/0", "reader/0"]},
        "trace": ["0.1 fetch task 0: m1/0 answered 0 chunks"],
    }  # fmt: skip
    return record | fields


@pytest.mark.parametrize(
    ("record", "cause"),
    [
        (miss(local_before=[0]), "evicted_here"),
        (miss(held_by={"writer": 2, "m1/0": 0}, age_s=0.2), "producer_only"),
        (miss(held_by={"writer": 2, "m1/0": 0}), "producer_only_late"),
        (miss(trace=["0.1 m1/0 silent 0.020 s (hedge delay 0.020 s): avoided"]), "silent_holder"),
        (miss(held_by={"m3/0": 2}), "off_placement"),
        (miss(trace=["0.1 fetch task 0: m2/0 answered 0 chunks"]), "holder_not_asked"),
        (miss(), "asked_holder_lacked"),
        (miss(held_by={"writer": 0, "reader": 2}), "other"),
    ],
)
def test_each_miss_is_given_the_first_cause_its_record_matches(
    record: dict[str, object], cause: str
) -> None:
    assert cause_of(record) == cause


def test_four_members_survive_a_minute_of_faults_with_no_wrong_bytes_or_late_calls(
    tmp_path: Path,
) -> None:
    settings = chaos.Settings(
        members=4,
        duration_s=60.0,
        min_faults=10,
        seed=20261128,
        freeze_s=(0.5, 2.0),
        down_s=(0.2, 1.0),
        gap_s=(0.2, 0.6),
        # a kill or restart costs a member's start (~9 s importing NIXL on a loaded 2-core
        # machine), a freeze ~2 s: 3 freezes to a kill and a restart (each round of 5 holds
        # every kind) fit 10 faults in about a minute
        fault_kinds=("freeze", "freeze", "freeze", "kill", "restart"),
    )
    report = chaos.run(settings, progress=print)
    (tmp_path / "chaos.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("requests", "faults", "reconvergence_s")}))
    assert report["ran_s"] >= 60.0
    assert report["faults"]["total"] >= 10
    assert all(report["faults"][kind] >= 1 for kind in chaos.FAULT_KINDS)
    assert report["requests"]["get"] > 100 and report["requests"]["put"] > 50
    assert report["chunks"]["chunks_hit"] > 0, "no read ever found a chunk: nothing was tested"
    assert report["wrong_bytes"] == 0, report["wrong_examples"]
    # mesh_replicas: 2. Measured on 2 busy cores (NIXL): these settings 2185/2185 = 1.0;
    # `tools/chaos.py --members 4 --duration 60 --min-faults 10` seeds 7, 11, 23: 0.9982,
    # 1.0, 0.9972 (before issue 17's read-path fixes: 0.970-0.987, the misses then mostly
    # chunks held only by their producer or by members off the key's preference list).
    availability = report["availability"]
    assert availability["ratio"] >= AVAILABILITY_MIN, (
        availability["ratio"],
        availability["misses"]["chunks_by_cause"],
    )
    assert report["deadline_overruns"] == 0, report["overrun_examples"]
    assert report["errors"] == 0, report["error_examples"]
    assert report["reconvergence_s"]["not_reconverged"] == 0, report["fault_log"]
    assert report["crashes"] == {}, report["crashes"]
    bad = report["bad_inputs"]
    assert bad["sent"] > 100 and len(bad["by_kind"]) == len(chaos.BAD_KINDS), bad
    assert bad["dropped_counted"] > 0, "no member counted a dropped frame"
    for name, rss in report["peak_rss"].items():
        assert rss["ok"], f"{name} peaked at {rss['peak_bytes']} bytes > {rss['limit_bytes']}"
