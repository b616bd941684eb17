"""Which threads were starved of a CPU, for how long: /proc schedstat sampled on a period.

`StallSampler` reads ``/proc/<pid>/task/<tid>/schedstat`` (time on a CPU, time runnable but
waiting for one) of every thread of the given processes every ``period_s`` on its own thread.
A *starved* sample is one in which a thread got no CPU time while its run-queue wait grew: it
wanted to run and could not. Per thread it keeps the longest run of consecutive starved samples
(the longest stall, in seconds, and when it started), the largest run-queue wait in one sample,
and how many samples were starved at all. A thread that sleeps (a ZMQ I/O thread between
heartbeats) is not starved: its wait does not grow.

It measures only; it knows nothing of gossip, vLLM or what the threads do.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_PERIOD_S = 0.2
MAX_THREADS = 4096
"""Threads tracked at most (a fork bomb in the measured processes cannot grow this)."""


@dataclass(slots=True)
class ThreadStalls:
    """What one thread went through while sampled."""

    pid: int
    tid: int
    process: str
    comm: str
    on_cpu_s: float = 0.0
    waiting_s: float = 0.0
    longest_stall_s: float = 0.0
    longest_stall_at_s: float = 0.0
    """When the longest stall began, seconds after sampling started."""
    largest_wait_in_sample_s: float = 0.0
    starved_samples: int = 0
    samples: int = 0
    _run_s: float = 0.0
    _run_started_s: float = 0.0
    _last: tuple[float, float, float] | None = None
    """(time read, on-CPU seconds, run-queue seconds) of the previous sample."""

    def add(self, now_s: float, on_cpu_s: float, waiting_s: float) -> None:
        if self._last is not None:
            then_s, cpu_before_s, wait_before_s = self._last
            got_s, waited_s = on_cpu_s - cpu_before_s, waiting_s - wait_before_s
            self.on_cpu_s += got_s
            self.waiting_s += waited_s
            self.samples += 1
            self.largest_wait_in_sample_s = max(self.largest_wait_in_sample_s, waited_s)
            if got_s == 0 and waited_s > 0:
                self.starved_samples += 1
                if self._run_s == 0:
                    self._run_started_s = then_s
                self._run_s = now_s - self._run_started_s
                if self._run_s > self.longest_stall_s:
                    self.longest_stall_s = self._run_s
                    self.longest_stall_at_s = self._run_started_s
            else:
                self._run_s = 0.0
        self._last = (now_s, on_cpu_s, waiting_s)

    def summary(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "tid": self.tid,
            "process": self.process,
            "comm": self.comm,
            "cpu_s": round(self.on_cpu_s, 2),
            "runqueue_wait_s": round(self.waiting_s, 2),
            "longest_stall_s": round(self.longest_stall_s, 2),
            "longest_stall_at_s": round(self.longest_stall_at_s, 1),
            "largest_wait_in_sample_s": round(self.largest_wait_in_sample_s, 3),
            "starved_samples": self.starved_samples,
            "samples": self.samples,
        }


class StallSampler:
    """Samples the threads of ``pids`` (and threads they start later) until `stop`."""

    def __init__(self, pids: dict[int, str], period_s: float = SAMPLE_PERIOD_S) -> None:
        self.pids = pids
        """pid -> a label for the process (e.g. "one/rank0")."""
        self.period_s = period_s
        self.threads: dict[tuple[int, int], ThreadStalls] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-sampler", daemon=True)
        self._started_s = 0.0

    def start(self) -> None:
        self._started_s = time.monotonic()
        self._thread.start()

    def stop(self) -> list[ThreadStalls]:
        self._stop.set()
        self._thread.join(10 * self.period_s + 5.0)
        return sorted(self.threads.values(), key=lambda t: -t.longest_stall_s)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def sample(self) -> None:
        now_s = time.monotonic() - self._started_s
        for pid, label in self.pids.items():
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                continue
            for task in tasks:
                key = (pid, int(task.name))
                try:
                    on_cpu_ns, waiting_ns, _ = (task / "schedstat").read_text().split()
                except (OSError, ValueError):
                    continue
                stalls = self.threads.get(key)
                if stalls is None:
                    if len(self.threads) >= MAX_THREADS:
                        continue
                    comm = _read(task / "comm")
                    stalls = self.threads[key] = ThreadStalls(
                        pid=pid, tid=key[1], process=label, comm=comm
                    )
                stalls.add(now_s, int(on_cpu_ns) / 1e9, int(waiting_ns) / 1e9)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
