"""`RequestLoop`: many callers' requests in flight on one client and one thread, against real
ROUTER sockets on 127.0.0.1; a peer that never answers costs its batch the deadline, no more."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from meshkv.dataplane import messages as m
from meshkv.dataplane.client import RequestLoop
from tests.conftest import wait_until

CODEC = m.make_codec(1 << 20)
KEY = bytes(range(16))


class Responder:
    """A ROUTER on its own thread that answers every lookup with ``held`` = its key count."""

    def __init__(self, context: zmq.Context) -> None:
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.address = f"127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.answered = 0
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            if not self.router.poll(50):
                continue
            identity, frame = self.router.recv_multipart()
            request = m.decode(CODEC, frame)
            assert isinstance(request, m.Lookup)
            reply = m.LookupReply(req=request.req, epoch=1, held=len(request.keys))
            self.router.send_multipart([identity, m.encode(CODEC, reply)])
            self.answered += 1

    def close(self) -> None:
        self._running = False
        self._thread.join(2)
        self.router.close(linger=0)


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def lookup(loop: RequestLoop, count: int) -> m.Lookup:
    return m.Lookup(req=loop.next_id(), epoch=1, keys=[KEY] * count)


def test_many_callers_batches_are_in_flight_at_once_and_each_gets_its_own_replies(
    context: zmq.Context,
) -> None:
    peers = [Responder(context), Responder(context)]
    loop = RequestLoop(context, CODEC)
    results: dict[int, list[int]] = {}
    lock = threading.Lock()

    def ask(caller: int) -> None:
        """A closed loop: each caller keeps one batch in flight (eight callers: eight batches,
        within the per-peer send bound, SEND_HWM)."""
        answered = threading.Event()
        for i in range(20):
            sizes = [1 + (caller + i) % 5, 1 + (caller * i) % 7]
            requests = [(p.address, lookup(loop, n)) for p, n in zip(peers, sizes, strict=True)]

            def done(replies: list[m.Message | None], want: list[int] = sizes) -> None:
                held = [r.held if isinstance(r, m.LookupReply) else -1 for r in replies]
                with lock:
                    results.setdefault(caller, []).append(held == want)
                answered.set()

            answered.clear()
            loop.submit(requests, time.monotonic() + 10, done)
            assert answered.wait(15)

    callers = [threading.Thread(target=ask, args=(c,)) for c in range(8)]
    try:
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(10)
        wait_until("every batch answered", lambda: sum(map(len, results.values())) == 160)
        assert all(all(r) for r in results.values())  # every reply matched to its request
        assert loop.stats["send_dropped"] == 0
    finally:
        loop.close()
        for peer in peers:
            peer.close()


def test_a_silent_peer_costs_its_batch_the_deadline_and_a_callback_may_ask_again(
    context: zmq.Context,
) -> None:
    live = Responder(context)
    silent = context.socket(zmq.ROUTER)  # bound, never answers
    silent.setsockopt(zmq.LINGER, 0)
    silent_address = f"127.0.0.1:{silent.bind_to_random_port('tcp://127.0.0.1')}"
    loop = RequestLoop(context, CODEC)
    answers: list[list[int | None]] = []
    finished = threading.Event()
    started = time.monotonic()

    def second(replies: list[m.Message | None]) -> None:
        answers.append([r.held if isinstance(r, m.LookupReply) else None for r in replies])
        finished.set()

    def first(replies: list[m.Message | None]) -> None:
        answers.append([r.held if isinstance(r, m.LookupReply) else None for r in replies])
        loop.submit([(live.address, lookup(loop, 3))], time.monotonic() + 5, second)

    try:
        requests = [(live.address, lookup(loop, 2)), (silent_address, lookup(loop, 4))]
        loop.submit(requests, started + 0.3, first)
        assert finished.wait(10), "the second batch was never answered"
        assert answers == [[2, None], [3]]
        assert time.monotonic() - started >= 0.3  # the first batch waited for its deadline
        assert loop.stats["timeout"] == 1
    finally:
        loop.close()
        live.close()
        silent.close(linger=0)


def test_closing_answers_every_batch_in_flight_and_every_later_submit(
    context: zmq.Context,
) -> None:
    silent = context.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    address = f"127.0.0.1:{silent.bind_to_random_port('tcp://127.0.0.1')}"
    loop = RequestLoop(context, CODEC)
    answers: list[list[m.Message | None]] = []
    try:
        loop.submit([(address, lookup(loop, 1))], time.monotonic() + 60, answers.append)
        wait_until("the request is out", lambda: loop.stats["sent"] == 1)
        loop.close()
        assert answers == [[None]]  # answered at close, not 60 s later
        loop.submit([(address, lookup(loop, 1))], time.monotonic() + 60, answers.append)
        assert answers == [[None], [None]]
    finally:
        silent.close(linger=0)
