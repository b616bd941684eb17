"""GossipRunner and query_members in one process: real ZMQ on 127.0.0.1, real threads and time."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import zmq

from meshkv.errors import TransportError, UsageError
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.events import EventKind, MemberEvent
from meshkv.gossip.member import MemberState
from meshkv.gossip.messages import (
    MemberRecord,
    StateQuery,
    StateReply,
    decode_message,
    encode_message,
    gossip_codec,
)
from meshkv.gossip.runner import GossipRunner, query_members
from meshkv.wire import AuthPolicy
from tests.conftest import wait_until

CONFIG = GossipConfig.test()
DEADLINE_S = 5.0
POLL_S = 0.02


@pytest.fixture
def started() -> Iterator[Callable[..., GossipRunner]]:
    runners: list[GossipRunner] = []

    def start(name: str, seeds: tuple[str, ...] = (), **kwargs: object) -> GossipRunner:
        runner = GossipRunner(config=CONFIG, name=name, host="127.0.0.1", **kwargs)  # type: ignore[arg-type]
        runners.append(runner)
        runner.start(seeds)
        return runner

    yield start
    for runner in runners:
        assert runner.stop(leave=False, timeout_s=DEADLINE_S)


def _states(runner: GossipRunner) -> dict[str, MemberState]:
    return {m.name: m.state for m in runner.members()}


def test_runners_join_through_a_seed_and_report_joins_to_subscribers(started):
    seed = started("a/0")
    events: list[MemberEvent] = []
    seed.subscribe(events.append)
    others = [started(f"{n}/0", (seed.address,)) for n in "bc"]
    everyone = {"a/0", "b/0", "c/0"}
    for runner in (seed, *others):
        wait_until(
            f"{runner.me.name} sees all", lambda r=runner: set(_states(r)) == everyone, DEADLINE_S
        )
    wait_until("joins published", lambda: len(events) >= 2, DEADLINE_S)
    assert {(e.kind, e.member.name) for e in events} >= {
        (EventKind.JOINED, "b/0"),
        (EventKind.JOINED, "c/0"),
    }


def test_graceful_stop_is_seen_as_left_and_a_silent_stop_as_dead(started):
    a = started("a/0")
    b, c = started("b/0", (a.address,)), started("c/0", (a.address,))
    wait_until("mesh of three", lambda: len(_states(a)) == 3 and len(_states(c)) == 3, DEADLINE_S)
    assert b.stop(leave=True)
    wait_until("b left", lambda: _states(a)["b/0"] is MemberState.LEFT, DEADLINE_S)
    assert c.stop(leave=False)
    wait_until("c dead", lambda: _states(a)["c/0"] is MemberState.DEAD, DEADLINE_S)


def test_update_meta_reaches_other_members(started):
    a = started("a/0")
    b = started("b/0", (a.address,), meta={"namespace": "x"})
    wait_until("b known", lambda: "b/0" in _states(a), DEADLINE_S)
    b.update_meta({"namespace": "y", "free_bytes": 7})
    wait_until(
        "new meta at a",
        lambda: (
            {m.name: dict(m.meta) for m in a.members()}["b/0"]
            == {"namespace": "y", "free_bytes": 7}
        ),
        DEADLINE_S,
    )


def test_a_failing_subscriber_is_counted_and_the_loop_goes_on(started):
    a = started("a/0")
    seen: list[MemberEvent] = []

    def broken(_event: MemberEvent) -> None:
        raise RuntimeError("subscriber bug")

    a.subscribe(broken)
    a.subscribe(seen.append)
    started("b/0", (a.address,))
    wait_until("event delivered past the broken subscriber", lambda: bool(seen), DEADLINE_S)
    assert a.stats()["runner.callback_errors"] >= 1
    assert a.running


def test_callbacks_run_on_the_gossip_thread_and_may_read_members(started):
    a = started("a/0")
    seen: list[tuple[str, int]] = []
    a.subscribe(lambda _e: seen.append((threading.current_thread().name, len(a.members()))))
    started("b/0", (a.address,))
    wait_until("event", lambda: bool(seen), DEADLINE_S)
    assert seen[0] == ("gossip-a/0", 2)


def test_query_members_returns_the_table_of_any_member(started):
    a = started("a/0")
    b = started("b/0", (a.address,))
    wait_until("b sees a", lambda: len(_states(b)) == 2, DEADLINE_S)
    views = query_members(b.address, timeout_s=DEADLINE_S, codec=gossip_codec(CONFIG))
    assert [(v.name, v.state) for v in views] == [
        ("a/0", MemberState.ALIVE),
        ("b/0", MemberState.ALIVE),
    ]
    assert b.stats()["transport.replied"] == 1


def test_query_members_with_the_wrong_secret_gets_no_answer(started):
    auth = AuthPolicy.from_strings("a-mesh-secret-of-16+")
    a = started("a/0", auth=auth)
    wrong = gossip_codec(CONFIG, AuthPolicy.from_strings("another-secret-16+chars"))
    with pytest.raises(TransportError, match="no answer"):
        query_members(a.address, timeout_s=0.3, codec=wrong)
    right = query_members(a.address, timeout_s=DEADLINE_S, codec=gossip_codec(CONFIG, auth))
    assert [v.name for v in right] == ["a/0"]
    assert a.stats()["drop_bad_auth"] == 1


def test_after_stop_members_and_stats_are_the_final_snapshot(started):
    a = started("a/0")
    started("b/0", (a.address,))
    wait_until("b known", lambda: "b/0" in _states(a), DEADLINE_S)
    assert a.stop(leave=True)
    assert not a.running
    assert _states(a)["a/0"] is MemberState.LEFT
    assert a.stats()["transport.sent"] > 0
    with pytest.raises(UsageError):
        a.update_meta({"k": 1})
    with pytest.raises(UsageError):
        a.start()


def test_query_members_assembles_parts_in_any_order_and_ignores_strangers():
    codec = gossip_codec(CONFIG)
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    found: list[list[str]] = []
    client = threading.Thread(
        target=lambda: found.append(
            [v.name for v in query_members(f"127.0.0.1:{port}", timeout_s=DEADLINE_S, codec=codec)]
        )
    )
    client.start()
    try:
        assert server.poll(int(DEADLINE_S * 1000))
        identity, frame = server.recv_multipart()
        query = decode_message(codec, frame)
        assert isinstance(query, StateQuery)
        names = [[f"m{part}{i}/0" for i in range(2)] for part in range(3)]

        def reply(query_id: int, part: int) -> bytes:
            records = tuple(
                MemberRecord(
                    name=n,
                    nonce=1,
                    address="127.0.0.1:1",
                    incarnation=1,
                    state=MemberState.ALIVE,
                    meta={},
                )
                for n in names[part]
            )
            message = StateReply(query_id=query_id, part=part, parts=3, records=records)
            return encode_message(codec, message)

        other_query = (query.query_id + 1) % 2**32
        for frame in (reply(query.query_id, 2), b"garbage", reply(other_query, 0),
                      reply(query.query_id, 0), reply(query.query_id, 2),
                      reply(query.query_id, 1)):  # fmt: skip
            server.send_multipart([identity, frame])
        client.join(DEADLINE_S)
    finally:
        server.close()
        ctx.term()
    assert found == [sorted(n for part in names for n in part)]


def test_stopping_a_runner_that_never_started_frees_its_port():
    runner = GossipRunner(config=CONFIG, name="a/0", host="127.0.0.1")
    port = int(runner.address.rsplit(":", 1)[1])
    assert runner.stop()
    again = GossipRunner(config=CONFIG, name="a/0", host="127.0.0.1", port=port)
    assert again.stop()
    with pytest.raises(UsageError):
        runner.start()


def test_a_bad_member_name_raises_and_frees_the_port():
    probe = GossipRunner(config=CONFIG, name="a/0", host="127.0.0.1")
    port = int(probe.address.rsplit(":", 1)[1])
    probe.stop()
    with pytest.raises(UsageError, match="unprintable"):
        GossipRunner(config=CONFIG, name="tab\there", host="127.0.0.1", port=port)
    assert GossipRunner(config=CONFIG, name="a/0", host="127.0.0.1", port=port).stop()
