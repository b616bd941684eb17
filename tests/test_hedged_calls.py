"""`call_hedged` over real ZMQ sockets on 127.0.0.1: a silent holder costs one hedge delay.

Two ROUTER sockets in this process play holders: one answers every lookup (from a thread),
the other never does (a frozen member). The hedging state is fed the real clock; nothing here
asserts a duration, only who was asked and what settled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from meshkv.dataplane import messages as m
from meshkv.dataplane.client import RequestClient
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.node.hedged_calls import HedgeState, call_hedged
from tests.conftest import free_port

KEY = bytes(16)
CODEC = m.make_codec(1 << 20)
CONFIG = DataPlaneConfig(hedge_delay_initial_s=0.05)
ANSWER_POLL_MS = 20


class Holder:
    """A ROUTER on 127.0.0.1 that answers lookups (held: all) while ``answering``."""

    def __init__(self, context: zmq.Context, *, answering: bool, reply_after_s: float = 0) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.answering = answering
        self.reply_after_s = reply_after_s  # a slow holder: it answers this late
        self.asked = 0
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(f"tcp://{self.address}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(ANSWER_POLL_MS):
                continue
            peer, frame = self._socket.recv_multipart()
            lookup = m.decode(CODEC, frame)
            self.asked += 1
            if self.answering and isinstance(lookup, m.Lookup):
                self._stop.wait(self.reply_after_s)
                reply = m.LookupReply(req=lookup.req, epoch=lookup.epoch, held=len(lookup.keys))
                self._socket.send_multipart([peer, *m.encode_frames(CODEC, reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def lookups(
    client: RequestClient, holders: dict[str, Holder], order: list[str], state: HedgeState
) -> tuple[list[bool], list[str]]:
    """One task asking ``order``; (settled, who answered)."""
    answered: list[str] = []

    def request(task: int, name: str) -> tuple[str, m.Message]:
        return holders[name].address, m.Lookup(req=client.next_id(), epoch=1, keys=[KEY])

    def on_reply(task: int, name: str, reply: m.Message) -> bool:
        answered.append(name)
        return isinstance(reply, m.LookupReply)

    deadline_s = time.monotonic() + 5.0
    settled = call_hedged(client, [order], request=request, on_reply=on_reply, state=state,
                          deadline_s=deadline_s)  # fmt: skip
    if all(settled):  # a silent holder's request still out does not keep a settled call
        assert time.monotonic() < deadline_s
    return settled, answered


def test_a_silent_holder_is_hedged_to_the_next_and_then_asked_last(context: zmq.Context) -> None:
    holders = {"frozen": Holder(context, answering=False), "alive": Holder(context, answering=True)}
    client = RequestClient(context, CODEC)
    state = HedgeState(CONFIG)
    try:
        settled, answered = lookups(client, holders, ["frozen", "alive"], state)
        assert settled == [True] and answered == ["alive"]
        assert holders["frozen"].asked == 1
        assert client.awaited() == 0, "the frozen holder's request is given up, not polled on"
        assert state.is_avoided("frozen") and not state.is_avoided("alive")
        assert state.order(["frozen", "alive"]) == ["alive", "frozen"]
        settled, answered = lookups(client, holders, state.order(["frozen", "alive"]), state)
        assert settled == [True] and answered == ["alive"]
        assert holders["frozen"].asked == 1, "an avoided holder is not asked while others answer"
    finally:
        client.close()
        for holder in holders.values():
            holder.close()


def test_a_reply_clears_an_avoided_holder(context: zmq.Context) -> None:
    holders = {"slow": Holder(context, answering=True)}
    client = RequestClient(context, CODEC)
    state = HedgeState(CONFIG)
    state.avoid("slow")
    try:
        settled, answered = lookups(client, holders, ["slow"], state)
        assert settled == [True] and answered == ["slow"]
        assert not state.is_avoided("slow")
        assert len(client.stats) and client.stats["timeout"] == 0
    finally:
        client.close()
        for holder in holders.values():
            holder.close()


def test_a_late_answer_from_the_last_holder_ends_the_call(context: zmq.Context) -> None:
    slow_s = 4 * CONFIG.hedge_delay_initial_s  # silent past the hedge delay, then answers
    holders = {
        "frozen": Holder(context, answering=False),
        "slow": Holder(context, answering=True, reply_after_s=slow_s),
    }
    client = RequestClient(context, CODEC)
    try:  # both silent for a while: the slow one's answer must end the call at once
        settled, answered = lookups(client, holders, ["frozen", "slow"], HedgeState(CONFIG))
        assert settled == [True] and answered == ["slow"]
    finally:
        client.close()
        for holder in holders.values():
            holder.close()


def test_with_no_one_left_to_ask_the_call_ends_at_its_deadline_unsettled(
    context: zmq.Context,
) -> None:
    holders = {"frozen": Holder(context, answering=False)}
    client = RequestClient(context, CODEC)
    state = HedgeState(CONFIG)
    answered: list[str] = []

    def request(task: int, name: str) -> tuple[str, m.Message]:
        return holders[name].address, m.Lookup(req=client.next_id(), epoch=1, keys=[KEY])

    def on_reply(task: int, name: str, reply: m.Message) -> bool:
        answered.append(name)
        return True

    try:
        deadline_s = time.monotonic() + 0.3
        settled = call_hedged(client, [["frozen"]], request=request, on_reply=on_reply,
                              state=state, deadline_s=deadline_s)  # fmt: skip
        assert settled == [False] and answered == []
        assert time.monotonic() >= deadline_s, "it waited for the only holder until the deadline"
        assert client.stats["timeout"] == 1
    finally:
        client.close()
        for holder in holders.values():
            holder.close()


def test_a_first_holder_silent_past_the_hedge_delay_still_settles_when_it_answers_late(
    context: zmq.Context,
) -> None:
    """A one-task call asks its first holder alone; silent for the hedge delay, that request
    stays awaited while the next holder is asked, so its late answer settles the call."""
    slow_s = 4 * CONFIG.hedge_delay_initial_s
    holders = {
        "slow": Holder(context, answering=True, reply_after_s=slow_s),
        "frozen": Holder(context, answering=False),
    }
    client = RequestClient(context, CODEC)
    state = HedgeState(CONFIG)
    try:
        settled, answered = lookups(client, holders, ["slow", "frozen"], state)
        assert settled == [True] and answered == ["slow"]
        assert holders["slow"].asked == 1, "the slow holder was asked again, not awaited"
        assert holders["frozen"].asked == 1, "the next holder was not asked after the delay"
        assert not state.is_avoided("slow"), "a late answer clears the avoided holder"
    finally:
        client.close()
        for holder in holders.values():
            holder.close()


def test_a_first_answer_that_does_not_settle_goes_to_the_next_holder(
    context: zmq.Context,
) -> None:
    holders = {"a": Holder(context, answering=True), "b": Holder(context, answering=True)}
    client = RequestClient(context, CODEC)
    answered: list[str] = []

    def request(task: int, name: str) -> tuple[str, m.Message]:
        return holders[name].address, m.Lookup(req=client.next_id(), epoch=1, keys=[KEY])

    def on_reply(task: int, name: str, reply: m.Message) -> bool:
        answered.append(name)
        return name == "b"  # "a" answers short

    try:
        deadline_s = time.monotonic() + 5.0
        settled = call_hedged(client, [["a", "b"]], request=request, on_reply=on_reply,
                              state=HedgeState(CONFIG), deadline_s=deadline_s)  # fmt: skip
        assert settled == [True] and answered == ["a", "b"]
        assert client.awaited() == 0 and client.stats["timeout"] == 0
    finally:
        client.close()
        for holder in holders.values():
            holder.close()
