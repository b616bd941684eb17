"""The gossip driver: runs one member's SWIM core on a thread with real sockets and real time.

`GossipRunner` owns a `GossipTransport` and a `Swim` core and runs the member's main loop on
one daemon thread: wait for frames until the core's next deadline, feed them in (and the
transport's link changes), tick, send what the core wants sent, hand the core's events to
subscribers. Timers use `time.monotonic`;
only the incarnation start reads the wall clock (so a restarted member outranks its old boot).

Other threads reach the core only through `GossipRunner`'s methods, which run a function on the
loop thread and wait for its answer; the core and the sockets are touched by that thread alone.

`query_members` is the client side of the state query: any process (the CLI) asks one member
for its member table over a short-lived DEALER, with a deadline.

This module knows nothing of SWIM's rules, of the ring, the store or the command line.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

import zmq

from meshkv.errors import ProtocolError, TransportError, UsageError
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.events import EventKind, MemberEvent
from meshkv.gossip.member import MemberInfo, MemberView, MetaValue
from meshkv.gossip.messages import StateQuery, StateReply, decode_message, encode_message
from meshkv.gossip.messages import gossip_codec as make_gossip_codec
from meshkv.gossip.swim import Swim
from meshkv.gossip.transport import GossipTransport, TransportLimits
from meshkv.wire import AuthPolicy, FrameCodec

log = logging.getLogger("vllm.meshkv.gossip.runner")

T = TypeVar("T")
EventCallback = Callable[[MemberEvent], None]

IDLE_WAIT_MAX_S = 1.0
"""Longest single wait of the loop, even if the core's next deadline is later."""
CALL_TIMEOUT_S = 2.0
"""How long a caller waits for the loop thread to answer (members, stats, update_meta)."""
_FRESH_CONNECTION_EVENTS = (EventKind.JOINED, EventKind.DEAD, EventKind.LEFT)
"""A peer's socket is closed on these: a new boot gets a fresh connection at once (not after
ZMQ's reconnect backoff), and nothing keeps reconnecting to a dead or departed member."""
LEAVE_LINGER_S = 0.3
"""How long the Left broadcast may take to leave the sockets after a graceful stop."""
LATE_BOUNDS_S = (0.1, 0.5, 1.0, 2.0)
"""A loop turn that returns this much later than planned is counted (``loop_late_<ms>ms``)."""
HEALTH_COUNTERS = {
    "suspect_raised": "Members this member suspected after a probe got no ack",
    "dead_declared": "Members this member declared dead (their suspicion ran out unrefuted)",
    "event_suspect": "Times this member saw another suspected",
    "event_dead": "Times this member saw another declared dead",
    "refute": "Suspicions or deaths of this member that it refuted (it was alive)",
    "probe_failed": "Probes of others that got no ack, direct or indirect",
    "probe_late": "Probe rounds that ended late because this member itself stalled",
    "death_held_link_up": "Expired suspicions held because the suspect's link was up",
    "transport.link_up": "Links watched to suspects that came up (their process answers)",
    "transport.link_down": "Links watched to suspects that went down (refused, closed, frozen)",
    "transport.watch_refused": "Suspects not watched (too many at once): they get no stall grace",
    **{
        f"loop_late_{int(bound_s * 1000)}ms": f"Gossip loop turns at least {bound_s:g} s late"
        for bound_s in LATE_BOUNDS_S
    },
    "loop_late_max_ms": "The latest gossip loop turn so far, in ms (not a count)",
}
"""Keys of `stats` that tell how healthy the membership is, with what each counts (served as
``meshkv_gossip_<key>``, dots as underscores)."""


class GossipRunner:
    """One gossip member: binds its port at construction, runs once `start` is called.

    ``name`` is ``"instance_id/rank"``; ``port`` 0 binds any free port (see `address`);
    ``nonce`` identifies this boot (random if None; a member whose data plane is built first
    draws it itself, since its NIXL agent name carries it).
    """

    def __init__(
        self,
        *,
        config: GossipConfig,
        name: str,
        host: str,
        port: int = 0,
        nonce: int | None = None,
        meta: Mapping[str, MetaValue] | None = None,
        auth: AuthPolicy | None = None,
        limits: TransportLimits | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._transport = GossipTransport(
            host, port, limits=limits or TransportLimits(max_frame_bytes=config.max_packet_bytes)
        )
        try:
            self.me = MemberInfo(
                name=name,
                nonce=int.from_bytes(os.urandom(8), "big") if nonce is None else nonce,
                address=self._transport.address,
                meta=dict(meta or {}),
            )
            self._swim = Swim(
                config=config,
                me=self.me,
                incarnation_start=int(time.time() * 1000),  # ms: a restart always outranks
                rng=rng or random.Random(),
                now_s=time.monotonic(),
                codec=make_gossip_codec(config, auth),
            )
        except BaseException:  # a bad name or meta: free the port we just bound
            self._transport.close()
            raise
        # Calls from other threads; each caller waits for its answer, so at most one per thread.
        self._calls: SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = SimpleQueue()
        self._calls_lock = threading.Lock()
        self._calls_closed = False
        self._subscribers: list[EventCallback] = []
        self._subscribers_lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._leave_on_stop = True
        self._thread = threading.Thread(target=self._run, name=f"gossip-{name}", daemon=True)
        self._final_members: list[MemberView] = []
        self._final_stats: collections.Counter[str] = collections.Counter()
        self._seeds: tuple[str, ...] = ()
        self.failure: BaseException | None = None
        """What ended the loop thread if it crashed (a bug); None otherwise."""

    @property
    def address(self) -> str:
        """This member's gossip address ``host:port`` (the bound port)."""
        return self.me.address

    # -- lifetime ---------------------------------------------------------------------------

    def start(self, seeds: Sequence[str] = ()) -> None:
        """Starts the loop thread and joins the mesh through ``seeds`` (none: a new mesh)."""
        if self._thread.is_alive() or self._stop_requested.is_set():
            raise UsageError("a GossipRunner starts once")
        self._seeds = tuple(s for s in seeds if s != self.address)
        self._thread.start()

    def stop(self, *, leave: bool = True, timeout_s: float = 2.0) -> bool:
        """Stops the loop; ``leave`` announces a graceful leave first. True if it ended in time.

        Safe to call more than once and from any thread but the loop thread (not from a
        subscriber callback). A runner that was never started just closes its port.
        """
        if threading.current_thread() is self._thread:
            raise UsageError("stop() from the gossip thread would wait on itself")
        self._leave_on_stop = leave
        self._stop_requested.set()
        if self._thread.ident is None:  # never started: nobody else will close the port
            self._transport.close()
            return True
        self._transport.wake()
        if not self._thread.is_alive():
            return True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("gossip thread of %s did not stop within %.1fs", self.me.name, timeout_s)
            return False
        return True

    # -- thread-safe API --------------------------------------------------------------------

    def members(self) -> list[MemberView]:
        """A snapshot of the member table, this member included."""
        return self._call(self._swim.members, lambda: self._final_members)

    def stats(self) -> collections.Counter[str]:
        """Counters of the core (drops by reason, messages) and of the transport."""
        return self._call(self._merged_stats, lambda: self._final_stats)

    def update_meta(self, meta: Mapping[str, MetaValue]) -> None:
        """Replaces this member's metadata and gossips it."""
        if not self._thread.is_alive():
            raise UsageError("the gossip runner is not running")
        meta = dict(meta)
        self._call(lambda: self._swim.update_meta(meta, time.monotonic()), lambda: None)

    def subscribe(self, callback: EventCallback) -> None:
        """Calls ``callback(event)`` for every MemberEvent, in order, **on the gossip thread**.

        Keep it short and non-blocking (copy the event into your own queue if the work is
        slow): the loop does not probe while it runs. An exception is logged and counted
        (``runner.callback_errors``), never propagated. Do not call `stop` from it.
        """
        with self._subscribers_lock:
            self._subscribers.append(callback)

    def unsubscribe(self, callback: EventCallback) -> None:
        with self._subscribers_lock:
            self._subscribers.remove(callback)

    @property
    def running(self) -> bool:
        """True while the loop thread runs (False before start, after stop or a crash)."""
        return self._thread.is_alive()

    def _call(self, fn: Callable[[], T], fallback: Callable[[], T]) -> T:
        """Runs ``fn`` on the loop thread and returns its result; ``fallback()`` once stopped."""
        if threading.current_thread() is self._thread:
            return fn()
        if not self._thread.is_alive():
            return fallback()
        future: Future[T] = Future()
        with self._calls_lock:
            if self._calls_closed:
                return fallback()
            self._calls.put((fn, future))
        self._transport.wake()
        try:
            return future.result(CALL_TIMEOUT_S)
        except FutureTimeout:
            if not self._thread.is_alive():
                return fallback()
            raise TransportError(f"gossip thread did not answer in {CALL_TIMEOUT_S}s") from None

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
            self._shut_down()
        except BaseException as exc:  # a bug in the core or here: this member is gone
            self.failure = exc
            log.exception("gossip loop of %s crashed", self.me.name)
            self._final_stats = self._merged_stats()
            self._transport.close()
        finally:
            with self._calls_lock:
                self._calls_closed = True
            self._run_calls()  # answers calls queued before the close; later ones get fallbacks

    def _loop(self) -> None:
        swim, transport = self._swim, self._transport
        swim.join(self._seeds, time.monotonic())
        self._flush()
        while not self._stop_requested.is_set():
            waited_from_s = time.monotonic()
            wait_s = max(min(swim.next_deadline_s() - waited_from_s, IDLE_WAIT_MAX_S), 0.0)
            inbound_frames = transport.wait(wait_s)
            self._count_lateness(time.monotonic() - waited_from_s - wait_s)
            for address, up in transport.take_link_changes().items():
                swim.link_changed(address, up)
            for inbound in inbound_frames:
                swim.receive(inbound.frame, time.monotonic(), reply_to=inbound.reply_to)
            swim.tick(time.monotonic())
            transport.watch(swim.watched_addresses())
            self._run_calls()
            self._flush()

    def _count_lateness(self, late_s: float) -> None:
        """Counts loop turns that came back later than planned: this thread got no CPU or no
        GIL (``loop_late_<bound>`` for each bound passed, and the worst, in ms)."""
        if late_s < LATE_BOUNDS_S[0]:
            return
        stats = self._swim.stats
        for bound_s in LATE_BOUNDS_S:
            if late_s >= bound_s:
                stats[f"loop_late_{int(bound_s * 1000)}ms"] += 1
        stats["loop_late_max_ms"] = max(stats["loop_late_max_ms"], int(late_s * 1000))

    def _flush(self) -> None:
        """Publishes events, then sends: a restarted peer's stale socket is closed first."""
        self._publish_events()
        self._send_outgoing()

    def _send_outgoing(self) -> None:
        for out in self._swim.take_outgoing():
            if out.address is not None:
                self._transport.send(out.address, out.frame)
            elif isinstance(out.reply_to, bytes):
                self._transport.reply(out.reply_to, out.frame)

    def _publish_events(self) -> None:
        events = self._swim.take_events()
        if not events:
            return
        for event in events:
            if event.kind in _FRESH_CONNECTION_EVENTS:
                self._transport.forget(event.member.address)
        with self._subscribers_lock:
            subscribers = list(self._subscribers)
        for event in events:
            for callback in subscribers:
                try:
                    callback(event)
                except Exception:
                    self._swim.stats["runner.callback_errors"] += 1
                    log.exception("member event callback %r failed", callback)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)

    def _merged_stats(self) -> collections.Counter[str]:
        return self._swim.stats + self._transport.stats

    def _shut_down(self) -> None:
        """Leaves (if asked), publishes the last events, answers pending calls, closes."""
        linger_s = 0.0
        if self._leave_on_stop:
            self._swim.leave(time.monotonic())
            linger_s = LEAVE_LINGER_S
        self._flush()
        self._final_members = self._swim.members()
        self._transport.close(linger_s=linger_s)
        self._final_stats = self._merged_stats()


# -- client side of the state query ---------------------------------------------------------


def query_members(
    seed: str, *, timeout_s: float, codec: FrameCodec, query_id: int | None = None
) -> list[MemberView]:
    """Asks the member at ``seed`` for its member table; TransportError past ``timeout_s``.

    Frames that are not the answer to this query (another query's parts, garbage) are ignored.
    """
    query_id = random.getrandbits(32) if query_id is None else query_id
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, codec.max_frame_bytes)
    try:
        sock.connect(f"tcp://{seed}")
        sock.send(encode_message(codec, StateQuery(query_id=query_id)), zmq.NOBLOCK)
        parts = _collect_state_parts(sock, codec, query_id, time.monotonic() + timeout_s)
    except zmq.ZMQError as exc:
        raise TransportError(f"cannot query {seed}: {exc}") from None
    finally:
        sock.close()
        ctx.term()
    if parts is None:
        raise TransportError(f"no answer from {seed} within {timeout_s:.1f}s")
    views = [
        MemberView(
            name=r.name,
            nonce=r.nonce,
            address=r.address,
            state=r.state,
            incarnation=r.incarnation,
            meta=r.meta,
        )
        for reply in parts
        for r in reply.records
    ]
    return sorted(views, key=lambda v: v.name)


def _collect_state_parts(
    sock: zmq.Socket, codec: FrameCodec, query_id: int, deadline_s: float
) -> list[StateReply] | None:
    """Receives the parts of one state reply until all arrived (or None at the deadline)."""
    parts: dict[int, StateReply] = {}
    expected: int | None = None
    while expected is None or len(parts) < expected:
        left_ms = (deadline_s - time.monotonic()) * 1000
        if left_ms <= 0 or not sock.poll(max(1, int(left_ms)), zmq.POLLIN):
            return None
        try:
            reply = decode_message(codec, sock.recv(zmq.NOBLOCK))
        except ProtocolError as exc:
            log.debug("ignored a bad frame while waiting for state: %s", exc)
            continue
        if isinstance(reply, StateReply) and reply.query_id == query_id:
            expected = reply.parts
            parts[reply.part] = reply
    return [parts[i] for i in range(len(parts))]
