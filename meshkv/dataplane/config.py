"""Data-plane tuning: one frozen dataclass that reads as the tuning manual.

Every bound and deadline of the data plane and of the layers built on it (the service, the
requester's get, the pusher, the member's API, the connector's worker side) is a field here,
with its meaning, unit, default, trade-off and what 0 means where 0 is allowed. The defaults are
the values the data plane was measured with (``tools/bench_transfer.py``, ``bench_lookup.py``).
Per-call deadlines come from the user's config (``mesh_transfer_timeout_ms``,
``lookup_timeout_ms``); what is here are the limits around them.

Wire facts are not tuning: ``dataplane.messages`` keeps the protocol's own limits (``MAX_KEYS``,
``LATE_WRITE_MS``) and the NIXL channel its driver facts (post sizes, warm-up).

This module knows nothing of sockets, clocks, NIXL or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshkv.errors import ConfigError

MIB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class DataPlaneConfig:
    """Bounds and deadlines of one member's data plane (defaults: what runs in production)."""

    # --- the service (the holder's side) ----------------------------------------------------

    idle_wait_ms: int = 1000
    """Longest the service loop waits with no transfer in flight (ms), default 1000. Requests,
    stop and peer-loss wake it at once; the wait bounds only how late an expiry sweep runs.
    Longer costs nothing but later expiries (each idle turn costs ~0.15 ms of CPU: 200 ms was
    ~10 % of an idle member's CPU). Must be >= 1."""

    transfer_poll_min_s: float = 50e-6
    """First wait between two completion checks of in-flight NIXL writes (s), default 50 µs.
    NIXL tells the writer of a WRITE's completion only when asked (no notification, no fd), so
    while writes are in flight the loop checks them with a wait that starts here and doubles
    while nothing completes; a request arriving wakes it at once. Shorter answers a small write
    sooner at more CPU while writes are pending. Must be > 0."""

    transfer_poll_max_s: float = 1e-3
    """Longest wait between two completion checks of in-flight writes (s), default 1 ms: a long
    write costs at most one wake-up per millisecond and is answered within 1 ms of its end.
    Must be >= transfer_poll_min_s."""

    inbound_queue_max: int = 4096
    """Requests (and replies) ZMQ queues at the service socket, default 4096. Past it senders'
    requests wait in their own queues, replies are dropped (the requester times out: a miss).
    Must be >= 1."""

    put_reservation_s: float = 10.0
    """How long a home keeps slots reserved between a put's reply and its commit (s), default
    10. A producer slower than this loses the reservation (its commit finds nothing: the chunk
    stays only at the producer). Shorter frees space held by dead producers sooner. Must be > 0."""

    reservations_max: int = 65536
    """Reserved slots awaiting a commit at one home, default 65536; past it puts are refused
    ("busy") until some commit or expire. Bounds what dead producers can hold. Must be >= 1."""

    expire_interval_s: float = 0.1
    """Time between two sweeps of expired pins and reservations (s), default 0.1. A pin or a
    reservation outlives its deadline by at most this. 0 sweeps on every loop turn."""

    # --- the requester's get ----------------------------------------------------------------

    fetch_request_bytes: int = 4 * MIB
    """Bytes one get request asks for, at least, default 4 MiB. A run of chunks goes as several
    requests sent at once, each checked here as its reply lands while later ones are written,
    so only the last request's check adds to a get's time. Smaller shortens that tail but costs
    a round of request handling at the holder each. Must be >= 1."""

    fetch_requests_max: int = 16
    """Get requests per run of chunks at one holder, at most, default 16 (larger requests past
    that). Must stay well inside the client's send queue (``client.SEND_HWM``), whose overflow
    drops requests. Must be >= 1."""

    piece_align_bytes: int = 4096
    """Pieces of a chunk too large for one request start on this boundary (bytes), default
    4096 (a page: NIXL and memcpy are slower on unaligned pieces). Must be >= 1."""

    max_frame_bytes: int = 256 * MIB
    """Largest data-plane message, attachments included (bytes), default 256 MiB. On the tcp
    channel a get reply and a put carry chunk bytes, so this bounds them; larger frames are
    dropped as oversized. Must exceed inline_reply_headroom_bytes."""

    inline_reply_headroom_bytes: int = 1 * MIB
    """Room a get reply on the tcp channel keeps for its own fields (bytes), default 1 MiB: a
    get asks for at most max_frame_bytes minus this of chunk bytes. Must be >= 0."""

    lease_hold_s: float = 60.0
    """How long past a get's deadline the chunks it leases stay pinned if the lease is never
    released (s), default 60. A lease is released after vLLM copies the chunks out; this only
    bounds what a caller that forgets costs. Shorter frees leaked pins sooner but could expire
    a pin of a slow load. Must be > 0."""

    local_put_reservation_s: float = 5.0
    """Deadline of the reservation a local put holds while it copies a chunk into the store
    (s), default 5. The copy is a memcpy; this bounds only a caller that dies mid-copy.
    Must be > 0."""

    # --- hedged reads (the requester's side; `meshkv.node.hedging`) ------------------------

    hedge_quantile: float = 0.99
    """Quantile of the observed round trips that a holder may stay silent before the next
    replica is asked as well, default 0.99 (p99: about one request in a hundred is hedged
    needlessly, each costing one duplicate request). Lower hedges sooner at more duplicates.
    Must be in (0, 1]."""

    hedge_delay_min_s: float = 0.02
    """Lower bound of the hedge delay (s), default 20 ms: on a quiet mesh round trips are tens
    of µs, and thread scheduling on a busy host alone can stall a healthy holder for ms.
    0 lets the observed quantile alone decide."""

    hedge_delay_max_s: float = 0.25
    """Upper bound of the hedge delay (s), default 0.25: one slow episode must not stretch the
    hedges that follow it. Must be >= hedge_delay_min_s."""

    hedge_delay_initial_s: float = 0.05
    """The hedge delay before hedge_samples_min round trips are known (s), default 50 ms
    (a fresh member). Must be >= 0."""

    hedge_samples_min: int = 20
    """Round trips observed before their quantile replaces hedge_delay_initial_s, default 20.
    Must be >= 1."""

    round_trip_samples_max: int = 512
    """Recent round trips kept to compute the quantile, default 512 (older ones are
    forgotten, so the delay follows the host's load). Must be >= hedge_samples_min."""

    avoid_hold_s: float = 10.0
    """Longest a holder that stayed silent past the hedge delay is asked last (s), default 10;
    a reply from it or gossip saying it is back ends this sooner. Longer spares readers a
    sick member for longer; shorter notices a recovered one without gossip sooner. 0 never
    avoids."""

    avoid_members_max: int = 64
    """Members avoided at once, at most, default 64; past it the one avoided longest ago is
    forgotten first. Must be >= 1."""

    # --- the pusher (the producer's side of a put) ------------------------------------------

    push_queue_max: int = 64
    """Push jobs (one per put call) waiting for the pusher thread, default 64. Past it chunks
    are announced to their homes instead (HELD_AT: "ask me"), so lookups still find them and
    no put waits. Larger absorbs longer bursts at more memory and staler pushes. Must be >= 1."""

    notice_queue_max: int = 1024
    """Announcements (HELD_AT jobs and newcomer notices) waiting, default 1024; past it they
    are dropped and counted (lookups then miss those chunks: a recompute). Must be >= 1."""

    push_deadline_s: float = 5.0
    """Budget of one push batch to one home: reserve, transfer, commit (s), default 5. A home
    that misses it keeps no copy; ours stays. Must be > 0."""

    push_batch_bytes: int = 16 * MIB
    """Chunk bytes per push request, default 16 MiB: bounded frames on the tcp channel, bounded
    posts on NIXL. Larger means fewer round trips but longer head-of-line waits at the home.
    Must be >= 1."""

    hand_off_timeout_s: float = 10.0
    """Longest a graceful leave spends pushing this member's chunks to their next homes (s),
    default 10. Chunks not handed off by then are lost to readers (a recompute). 0 leaves at
    once."""

    # --- the connector's worker side --------------------------------------------------------

    fetch_queue_max: int = 256
    """Fetch and async-load jobs waiting for a worker's fetch thread, default 256; past it a
    fetch finds nothing and an async load fails (vLLM recomputes). Must be >= 1."""

    staged_requests_max: int = 64
    """Requests whose fetched chunks stay pinned awaiting their load, default 64; past it a
    fetch finds nothing. Bounds store space pinned by requests vLLM has not scheduled yet.
    Must be >= 1."""

    local_get_timeout_s: float = 0.5
    """Deadline of re-pinning staged chunks at load time (s), default 0.5: they are local, so
    no network is involved unless they were evicted (only an expired pin allows that).
    Must be > 0."""

    fetch_share_of_lookup_timeout: float = 0.9
    """Share of ``lookup_timeout_ms`` a worker's fetch gets, default 0.9: the scheduler's clock
    started earlier, when it queued the fetch, so the answer usually lands before the
    scheduler gives up. Must be in (0, 1]."""

    close_join_s: float = 5.0
    """How long closing a worker waits for its fetch thread (s), default 5. Must be >= 0."""

    def __post_init__(self) -> None:
        for key in (
            "transfer_poll_min_s",
            "put_reservation_s",
            "lease_hold_s",
            "local_put_reservation_s",
            "push_deadline_s",
            "local_get_timeout_s",
            "hedge_delay_max_s",
        ):
            if not getattr(self, key) > 0:
                raise ConfigError(f"dataplane.{key}", "must be > 0")
        for key in ("expire_interval_s", "inline_reply_headroom_bytes", "hand_off_timeout_s",
                    "close_join_s", "hedge_delay_min_s", "hedge_delay_initial_s",
                    "avoid_hold_s"):  # fmt: skip
            if not getattr(self, key) >= 0:
                raise ConfigError(f"dataplane.{key}", "must be >= 0")
        for key in (
            "idle_wait_ms",
            "inbound_queue_max",
            "reservations_max",
            "fetch_request_bytes",
            "fetch_requests_max",
            "piece_align_bytes",
            "push_queue_max",
            "notice_queue_max",
            "push_batch_bytes",
            "fetch_queue_max",
            "staged_requests_max",
            "hedge_samples_min",
            "avoid_members_max",
        ):
            if not getattr(self, key) >= 1:
                raise ConfigError(f"dataplane.{key}", "must be >= 1")
        if not self.transfer_poll_max_s >= self.transfer_poll_min_s:
            raise ConfigError("dataplane.transfer_poll_max_s", "must be >= transfer_poll_min_s")
        if not self.max_frame_bytes > self.inline_reply_headroom_bytes:
            raise ConfigError("dataplane.max_frame_bytes", "must be > inline_reply_headroom_bytes")
        if not 0 < self.hedge_quantile <= 1:
            raise ConfigError("dataplane.hedge_quantile", "must be in (0, 1]")
        if not self.hedge_delay_max_s >= self.hedge_delay_min_s:
            raise ConfigError("dataplane.hedge_delay_max_s", "must be >= hedge_delay_min_s")
        if not self.round_trip_samples_max >= self.hedge_samples_min:
            raise ConfigError("dataplane.round_trip_samples_max", "must be >= hedge_samples_min")
        if not 0 < self.fetch_share_of_lookup_timeout <= 1:
            raise ConfigError("dataplane.fetch_share_of_lookup_timeout", "must be in (0, 1]")

    @property
    def inline_reply_max_bytes(self) -> int:
        """Chunk bytes one get asks for on the tcp channel (the rest of a frame is headroom)."""
        return self.max_frame_bytes - self.inline_reply_headroom_bytes
