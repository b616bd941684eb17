"""The failure timeline: the controllers are SIGKILLed and every lookup after is recorded."""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq

from tools.bench.common import percentile
from tools.bench.lookup.meshkv_path import MeshkvPath
from tools.bench.lookup.paths import Answer, LMCachePath, LookupPath, RequesterGroup
from tools.bench.lookup.settings import (
    LMCACHE_RECV_TIMEOUT_MS,
    LOOKUP_DEADLINE_S,
    SHORT_LMCACHE_RECV_TIMEOUT_MS,
    THROUGHPUT_PROMPT_CHUNKS,
)
from tools.bench.lookup.workload import Holdings, Prompt


@dataclass
class Lane:
    """One requester of one path asking steadily through the failure."""

    label: str
    path: LookupPath
    group: RequesterGroup
    prompts: Sequence[Prompt]
    deadline_s: float
    events: list[dict] = field(default_factory=list)
    in_flight: Prompt | None = None
    started_ns: int = 0
    next_start_ns: int = 0


def failure_timeline(
    lanes: Sequence[Lane], kill_paths: Sequence[LookupPath], args: argparse.Namespace
) -> dict:
    """Lookups every interval on every lane; the servers die at the kill; runs after_s more.

    Each lane waits for its lookup's answer or its own deadline (a blocked client is part of
    what a failure looks like) before the next. No lookup starts after after_s; those in
    flight get failure_drain_s more to end, and one still waiting then is recorded as
    "waiting" with the time it had waited so far.
    """
    poller = zmq.Poller()
    owner: dict[int, Lane] = {}

    def arm(lane: Lane) -> None:
        for sock in lane.group.sockets():
            poller.register(sock, zmq.POLLIN)
            owner[id(sock)] = lane

    def disarm(lane: Lane) -> None:
        for sock in lane.group.sockets():
            poller.unregister(sock)
            owner.pop(id(sock), None)

    for lane in lanes:
        arm(lane)
    interval_ns = int(args.failure_interval_s * 1e9)
    t0 = time.perf_counter_ns()
    kill_ns = t0 + int(args.failure_before_s * 1e9)
    end_ns = kill_ns + int(args.failure_after_s * 1e9)
    killed: list[dict] = []
    rng = random.Random(7)

    def finish(lane: Lane, answer: Answer | None, now: int, outcome: str = "") -> None:
        prompt = lane.in_flight
        if outcome:
            pass
        elif answer is None:
            outcome = "timeout"
        elif answer.error:
            outcome = "error"
        elif answer.hits < 0 or answer.hits == prompt.expected_hits:  # echo: any reply
            outcome = "answer"
        elif answer.hits == 0:
            outcome = "miss"
        else:
            outcome = "partial"
        lane.events.append(
            {
                "t_s": (lane.started_ns - kill_ns) / 1e9,
                "latency_ms": (now - lane.started_ns) / 1e6,
                "outcome": outcome,
            }
        )
        lane.in_flight = None
        lane.next_start_ns = lane.started_ns + interval_ns

    drain_end_ns = end_ns + int(args.failure_drain_s * 1e9)
    while (now := time.perf_counter_ns()) < drain_end_ns:
        if now >= end_ns and all(lane.in_flight is None for lane in lanes):
            break
        if not killed and now >= kill_ns:
            for path in kill_paths:
                killed.append({"path": path.name, "what": path.kill_server()})
        for lane in lanes:
            if lane.in_flight is not None and now - lane.started_ns > lane.deadline_s * 1e9:
                disarm(lane)
                lane.group.abandon(0)
                arm(lane)
                finish(lane, None, now)
            if lane.in_flight is None and lane.next_start_ns <= now < end_ns:
                lane.in_flight = lane.prompts[rng.randrange(len(lane.prompts))]
                lane.started_ns = now
                answer = lane.group.begin(0, lane.in_flight)
                if answer is not None:
                    finish(lane, answer, time.perf_counter_ns())
        for sock, _ in poller.poll(2):
            lane = owner[id(sock)]
            for _slot, answer in lane.group.on_readable(sock):
                if lane.in_flight is not None:
                    finish(lane, answer, time.perf_counter_ns())
    for lane in lanes:
        if lane.in_flight is not None:
            finish(lane, None, time.perf_counter_ns(), outcome="waiting")
    return {
        "killed": killed,
        "before_s": args.failure_before_s,
        "after_s": args.failure_after_s,
        "interval_s": args.failure_interval_s,
        "lanes": [
            {
                "label": lane.label,
                "path": lane.path.name,
                "deadline_s": lane.deadline_s,
                "events": lane.events,
                "after_kill": summarize_events([e for e in lane.events if e["t_s"] >= 0]),
                "before_kill": summarize_events([e for e in lane.events if e["t_s"] < 0]),
            }
            for lane in lanes
        ],
    }


def summarize_events(events: Sequence[dict]) -> dict:
    outcomes: dict[str, int] = {}
    for e in events:
        outcomes[e["outcome"]] = outcomes.get(e["outcome"], 0) + 1
    answered = sorted(e["latency_ms"] for e in events if e["outcome"] == "answer")
    return {
        "lookups": len(events),
        "outcomes": outcomes,
        "answer_p50_ms": percentile(answered, 0.5),
        "answer_p99_ms": percentile(answered, 0.99),
        "longest_wait_ms": max((e["latency_ms"] for e in events), default=0.0),
    }


def run_failure(
    lmcache: LMCachePath, others: Sequence[LookupPath], holdings: Holdings, args
) -> dict:
    for path in others:
        if isinstance(path, MeshkvPath):
            path.use_shim = True  # what the issue kills: meshkv's lmcache_controller shim
    setups = {p.name: p.setup(holdings) for p in (lmcache, *others)}
    prompts = {
        p.name: p.cases(holdings, THROUGHPUT_PROMPT_CHUNKS, args.seed)["hit_first"]
        for p in (lmcache, *others)
    }
    lanes = [
        Lane(
            label=f"lmcache (LMCache's default {LMCACHE_RECV_TIMEOUT_MS} ms timeout)",
            path=lmcache,
            group=lmcache.requesters(1),
            prompts=prompts["lmcache"],
            deadline_s=LMCACHE_RECV_TIMEOUT_MS / 1e3,
        ),
        Lane(
            label=f"lmcache (tuned {SHORT_LMCACHE_RECV_TIMEOUT_MS} ms timeout)",
            path=lmcache,
            group=lmcache.requesters(1),
            prompts=prompts["lmcache"],
            deadline_s=SHORT_LMCACHE_RECV_TIMEOUT_MS / 1e3,
        ),
    ]
    lanes += [
        Lane(
            label=p.name,
            path=p,
            group=p.requesters(1, background=True),
            prompts=prompts[p.name],
            deadline_s=LOOKUP_DEADLINE_S + 1.0,  # the path's own deadline answers first
        )
        for p in others
    ]
    try:
        result = failure_timeline(lanes, [lmcache, *others], args)
    finally:
        for lane in lanes:
            lane.group.close()
    result["members"] = holdings.members
    result["setup"] = setups
    return result
