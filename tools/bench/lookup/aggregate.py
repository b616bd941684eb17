"""Aggregate load: what the users of a busy cluster see when every engine asks at once.

LMCache: N worker processes (one per simulated instance), each a DEALER to the one controller,
as LMCacheWorker asks it. meshkv: all N members (N-1 member processes and the asker in this
process) asking each other through `MeshNode.lookup_async`. Every asker keeps
``in_flight`` lookups of the same 32-chunk prompt mix in flight (closed loop) for the same
seconds, all starting at one wall-clock instant. Measured: total lookups/s, and CPU per lookup
of every process on the path (askers and servers: client and server together, schedstat).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import zmq

from tools.bench.common import cpu_ns, read_json_line, stop_process
from tools.bench.lookup.settings import (
    AGGREGATE_START_DELAY_S,
    BOOTS,
    LOOKUP_DEADLINE_S,
    SCRIPT,
    WORKERS_READY_TIMEOUT_S,
)
from tools.bench.lookup.workload import Prompt


def order(
    prompts: Sequence[Prompt], seconds: float, in_flight: int, start_at: float, *, hashes: bool
) -> dict:
    """One asker's order: the prompts (LMCache hashes or meshkv keys in hex) and when/how long."""
    return {
        "prompts": [list(p.hashes) if hashes else [k.hex() for k in p.keys] for p in prompts],
        "expected": [p.expected_hits for p in prompts],
        "start_at": start_at,
        "seconds": seconds,
        "in_flight": in_flight,
    }


def collect(processes: Sequence[subprocess.Popen], seconds: float) -> dict:
    """Sums the counts every asker process reports after its order."""
    total = {"completed": 0, "wrong": 0, "unfinished": 0}
    for process in processes:
        done = read_json_line(process, seconds + AGGREGATE_START_DELAY_S + 4 * LOOKUP_DEADLINE_S)
        for key in total:
            total[key] += done.get(key, 0)
    return total


def summarize(counts: dict, cpu: int, seconds: float) -> dict:
    return {
        **counts,
        "seconds": seconds,
        "lookups_per_s": counts["completed"] / seconds,
        "cpu_us_per_lookup_client_plus_server": cpu / max(1, counts["completed"]) / 1e3,
    }


class LMCacheAskers:
    """N processes, each one LMCache worker asking the controller (``lmcache-asker``)."""

    def __init__(self, reply_url: str, count: int, log_dir: Path) -> None:
        self._processes: list[subprocess.Popen] = []
        with open(log_dir / f"lmcache-askers-n{count}-{next(BOOTS)}.log", "wb") as log:
            for _ in range(count):
                self._processes.append(
                    subprocess.Popen(
                        [sys.executable, str(SCRIPT), "lmcache-asker", "--url", reply_url],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=log,
                    )
                )
        for process in self._processes:
            read_json_line(process, WORKERS_READY_TIMEOUT_S)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def run(self, prompts: Sequence[Prompt], seconds: float, in_flight: int, server_pids) -> dict:
        start_at = time.time() + AGGREGATE_START_DELAY_S
        line = json.dumps(order(prompts, seconds, in_flight, start_at, hashes=True)) + "\n"
        pids = [*server_pids, *self.pids]
        cpu0 = cpu_ns(pids)[0]
        for process in self._processes:
            process.stdin.write(line.encode())
            process.stdin.flush()
        counts = collect(self._processes, seconds)
        return summarize(counts, cpu_ns(pids)[0] - cpu0, seconds)

    def close(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.stdin.close()
        for process in self._processes:
            stop_process(process)
        self._processes = []


def lmcache_asker(url: str) -> None:
    """(Subprocess) one LMCache worker under aggregate load: a DEALER to the controller; an
    order per stdin line, its counts on stdout."""
    from tools.bench.lookup.paths import decode_lmcache_reply, encode_lmcache_lookup

    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(url)
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        spec = json.loads(line)
        payloads = [encode_lmcache_lookup(h) for h in spec["prompts"]]
        expected = spec["expected"]
        counts = {"completed": 0, "wrong": 0, "unfinished": 0}
        sent: list[int] = []  # the controller answers one DEALER's requests in order
        time.sleep(max(0.0, spec["start_at"] - time.time()))
        end_s = time.monotonic() + spec["seconds"]
        turn = os.getpid()
        for _ in range(spec["in_flight"]):
            turn = (turn * 1103515245 + 12345) % (1 << 31)
            sent.append(turn % len(payloads))
            dealer.send_multipart([b"", payloads[sent[-1]]])
        give_up_s = end_s + 2 * LOOKUP_DEADLINE_S
        while sent and time.monotonic() < give_up_s:
            if not dealer.poll(int(LOOKUP_DEADLINE_S * 1000)):
                break
            answer = decode_lmcache_reply(dealer.recv_multipart()[-1])
            index = sent.pop(0)
            counts["completed"] += 1
            counts["wrong"] += answer.hits != expected[index]
            if time.monotonic() < end_s:
                turn = (turn * 1103515245 + 12345) % (1 << 31)
                sent.append(turn % len(payloads))
                dealer.send_multipart([b"", payloads[sent[-1]]])
        counts["unfinished"] = len(sent)
        sys.stdout.write(json.dumps(counts) + "\n")
        sys.stdout.flush()
    dealer.close(linger=0)
    context.term()
