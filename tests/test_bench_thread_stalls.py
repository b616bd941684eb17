"""tools/bench/thread_stalls.py: a stall is a run of samples with no CPU and a growing run-queue
wait; a sleeping thread (no CPU, no wait) is never stalled. Also samples a real busy thread."""

from __future__ import annotations

import os
import threading

from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import wait_until
from tools.bench.thread_stalls import StallSampler, ThreadStalls


def feed(samples: list[tuple[float, float, float]]) -> ThreadStalls:
    stalls = ThreadStalls(pid=1, tid=1, process="p", comm="c")
    for now_s, on_cpu_s, waiting_s in samples:
        stalls.add(now_s, on_cpu_s, waiting_s)
    return stalls


def test_the_longest_run_of_starved_samples_is_the_stall():
    stalls = feed([
        (0.0, 1.0, 0.0),
        (0.2, 1.1, 0.0),   # ran
        (0.4, 1.1, 0.2),   # starved
        (0.6, 1.1, 0.4),   # starved
        (0.8, 1.1, 0.6),   # starved: 0.2 .. 0.8
        (1.0, 1.2, 0.6),   # ran
        (1.2, 1.2, 0.7),   # starved again, shorter
    ])  # fmt: skip
    assert abs(stalls.longest_stall_s - 0.6) < 1e-9
    assert stalls.longest_stall_at_s == 0.2
    assert stalls.starved_samples == 4
    assert stalls.samples == 6


def test_a_sleeping_thread_is_not_stalled():
    stalls = feed([(t / 5, 1.0, 0.5) for t in range(20)])
    assert stalls.longest_stall_s == 0 and stalls.starved_samples == 0


@given(st.lists(st.tuples(st.integers(0, 10**8), st.integers(0, 10**8)), min_size=1, max_size=50))
def test_a_stall_never_outlasts_the_window_and_counts_add_up(steps_ns):
    # schedstat counts nanoseconds: whole numbers, read as seconds the way the sampler does
    cpu_ns = wait_ns = 0
    samples = [(0.0, 0.0, 0.0)]
    for index, (got_ns, waited_ns) in enumerate(steps_ns, start=1):
        cpu_ns, wait_ns = cpu_ns + got_ns, wait_ns + waited_ns
        samples.append((index * 0.2, cpu_ns / 1e9, wait_ns / 1e9))
    stalls = feed(samples)
    assert 0 <= stalls.longest_stall_s <= samples[-1][0] + 1e-9
    assert stalls.starved_samples == sum(g == 0 and w > 0 for g, w in steps_ns)
    assert abs(stalls.on_cpu_s - cpu_ns / 1e9) < 1e-6
    assert abs(stalls.waiting_s - wait_ns / 1e9) < 1e-6


def test_samples_the_threads_of_a_real_process():
    sampler = StallSampler({os.getpid(): "me"}, period_s=0.01)
    sampler.start()
    done = threading.Event()
    busy = threading.Thread(target=lambda: done.wait(5) or None)
    busy.start()
    try:
        wait_until("a few samples", lambda: any(t.samples >= 3 for t in sampler.threads.values()),
                   10)  # fmt: skip
    finally:
        done.set()
        busy.join()
        found = sampler.stop()
    assert {t.tid for t in found} >= {threading.get_native_id(), busy.native_id}
    assert all(t.process == "me" for t in found)
