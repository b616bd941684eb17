"""Gossip tuning: one frozen dataclass that reads as the tuning manual, and named profiles.

Each field says what it means, its unit and default (the ``lan`` profile), the trade-off, and
what 0 means where 0 is allowed. The defaults were chosen by measurement on the simulated network
(``tools/bench_gossip.py``) against the targets of DESIGN.md §5: at 64 members a crash is seen by
every member in <= 2 s p50 / <= 3 s p99, a change reaches every member in <= 1 s, no healthy
member is declared dead under 5 % loss or a 1 s stall, and a member sends <= 10 messages/s at
steady state.

This module knows nothing of sockets, clocks or the SWIM state machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from meshkv.errors import ConfigError
from meshkv.gossip.member import MAX_META_BYTES_CEILING


@dataclass(frozen=True, slots=True, kw_only=True)
class GossipConfig:
    """Timing, fan-out and size bounds of the SWIM + Lifeguard membership protocol."""

    probe_interval_s: float = 0.25
    """Time between two probes sent by one member (s), default 0.25. Each member probes one
    other per interval and answers about one probe, so steady-state traffic is ~2/interval
    messages per member (8/s at 0.25). Shorter finds crashes sooner at a higher message rate.
    Scaled up by the local-health multiplier. Must be > probe_timeout_s."""

    probe_timeout_s: float = 0.1
    """How long a direct ping waits for its ack before asking others to probe indirectly (s),
    default 0.1. Must cover a round trip under load; the indirect probes then have the rest of
    the probe interval. Too short causes needless indirect probes, too long delays detection."""

    indirect_checks: int = 3
    """k, how many members are asked to ping a target that missed its direct ack, default 3.
    More makes false suspicion under loss rarer, at k*4 extra messages per failed probe.
    0 disables indirect probes (a single lost packet then starts a suspicion)."""

    suspicion_mult: float = 2.5
    """Scales the shortest suspicion timeout: ``min = suspicion_mult * max(1, log10(N)) *
    probe_interval_s``, default 2.5 (1.1 s at 64 members); when it runs out, the suspect gets
    one more direct ping (``probe_timeout_s``) before it is declared dead. The suspicion must
    outlast a stall and the refutation's spread; shorter declares crashes dead sooner but risks
    false deaths."""

    suspicion_max_timeout_mult: float = 3.0
    """The longest suspicion timeout as a multiple of the shortest, default 3. A suspicion starts
    at this maximum and shrinks toward the minimum as independent confirmations arrive
    (Lifeguard), so a lone slow prober cannot kill a healthy member quickly. 1 disables the
    shrinking (fixed timeout)."""

    suspicion_confirmations: int = 2
    """How many independent confirmations shrink a suspicion to its minimum, default 2 (capped
    at N-2). More is safer against one bad observer but slower. 0 means the minimum at once."""

    stall_grace_s: float = 30.0
    """How long a suspect whose process still answers at the transport level is held before it
    is declared dead (s), default 30. Its ZMQ I/O thread answers the link each member keeps to
    its suspects (`meshkv.gossip.links`) without the GIL, so the process runs but its gossip
    loop does not: an engine whose model runner, compiler or collective holds the GIL. A crash
    drops the link at once, a SIGSTOP after the link's timeout (2.5 s); the suspect is then
    declared dead on the normal timeout. Longer
    tolerates longer stalls; a process wedged with its GIL held is declared dead this much
    later. 0 disables holding."""

    retransmit_mult: float = 3.0
    """lambda: each member sends each update it learns ``ceil(lambda * ln(N + 1))`` times,
    default 3 (13 sends at 64 members, 21 at 1000). A member is missed by every send with
    probability about e^-limit, so higher spreads more reliably (and under loss) at more bytes
    per packet and longer gossip bursts. 0 disables piggybacked dissemination."""

    gossip_interval_s: float = 0.1
    """Time between two gossip fan-outs while updates are queued (s), default 0.1. Idle when the
    queue is empty, so it costs nothing at steady state. Shorter spreads changes faster at a
    higher burst of messages. 0 disables the fan-out (updates ride only on probes)."""

    gossip_fanout: int = 3
    """Members sent a gossip packet per gossip interval, default 3. 0 disables the fan-out."""

    push_pull_interval_s: float = 15.0
    """Time between full-state exchanges with a random member (s), default 15, scaled up above 32
    members. Heals anything gossip missed and reconnects to members we hold dead (how partitions
    heal); shorter heals sooner but costs O(N) records per exchange. 0 disables anti-entropy."""

    dead_retention_s: float = 120.0
    """How long dead and left members stay listed before they are forgotten (s), default 120.
    While listed they are reconnect candidates, so a partition shorter than this heals by itself;
    longer keeps more records. 0 forgets them at once (then only seeds can heal a partition)."""

    awareness_max_multiplier: int = 8
    """Upper bound of the local-health multiplier on probe interval and timeout, default 8
    (Lifeguard). A member that misses nacks or must refute suspicions slows its own probing
    rather than accusing others. 1 disables local-health backoff."""

    max_packet_bytes: int = 4096
    """Size bound of every gossip frame, auth trailer included (bytes), default 4096. Larger
    frames piggyback more updates; full-state exchanges are split into frames of this size."""

    max_piggyback: int = 64
    """Most updates carried by one packet, default 64 (the byte bound usually binds first).
    0 disables piggybacking."""

    max_meta_bytes: int = 512
    """Size bound of a member's encoded metadata (bytes), default 512; must leave room in a
    packet for at least one full member record."""

    max_members: int = 16384
    """Most members one member tracks, dead ones included; updates about more are dropped."""

    max_broadcast_queue: int = 4096
    """Most queued updates; when full, the most-sent update is dropped first."""

    max_pending_relays: int = 256
    """Most indirect pings this member relays at once for others; further requests are dropped."""

    max_seeds: int = 32
    """Most seed addresses kept by ``join``."""

    join_retry_interval_s: float = 1.0
    """Time between join attempts while no seed has answered (s), default 1."""

    join_max_attempts: int = 10
    """Join attempts before giving up (afterwards seeds are retried at the push-pull interval
    while this member knows no other), default 10."""

    @classmethod
    def profile(cls, name: str) -> GossipConfig:
        """The named profile (``mesh_gossip_profile``): "lan", "local" or "test"."""
        profiles = {"lan": cls.lan, "local": cls.local, "test": cls.test}
        if name not in profiles:
            raise ConfigError(
                "mesh_gossip_profile", f'must be "lan", "local" or "test", got {name!r}'
            )
        return profiles[name]()

    @classmethod
    def lan(cls) -> GossipConfig:
        """Members on a data-center network: the defaults."""
        return cls()

    @classmethod
    def local(cls) -> GossipConfig:
        """Members on one host (127.0.0.1): same detection timing, quicker anti-entropy."""
        return cls(push_pull_interval_s=5.0, dead_retention_s=60.0, join_retry_interval_s=0.5)

    @classmethod
    def test(cls) -> GossipConfig:
        """Fast timing for tests: probing 2.5x quicker than ``lan``; suspicions last a little
        longer relative to it (0.4 s at least), so that a busy test machine is tolerated."""
        return cls(
            probe_interval_s=0.1,
            probe_timeout_s=0.04,
            suspicion_mult=4.0,
            gossip_interval_s=0.04,
            push_pull_interval_s=2.0,
            dead_retention_s=20.0,
            join_retry_interval_s=0.2,
        )

    def replace(self, **changes: object) -> GossipConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        positive = ("probe_interval_s", "probe_timeout_s", "join_retry_interval_s")
        for key in positive:
            if not getattr(self, key) > 0:
                raise ConfigError(f"gossip.{key}", "must be > 0")
        non_negative = (
            "indirect_checks",
            "suspicion_confirmations",
            "retransmit_mult",
            "gossip_interval_s",
            "gossip_fanout",
            "push_pull_interval_s",
            "dead_retention_s",
            "stall_grace_s",
            "max_piggyback",
            "join_max_attempts",
        )
        for key in non_negative:
            if not getattr(self, key) >= 0:
                raise ConfigError(f"gossip.{key}", "must be >= 0")
        at_least_one = ("max_members", "max_broadcast_queue", "max_pending_relays", "max_seeds")
        for key in at_least_one:
            if not getattr(self, key) >= 1:
                raise ConfigError(f"gossip.{key}", "must be >= 1")
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ConfigError("gossip.probe_timeout_s", "must be < probe_interval_s")
        if not self.suspicion_mult > 0:
            raise ConfigError("gossip.suspicion_mult", "must be > 0")
        if not self.suspicion_max_timeout_mult >= 1:
            raise ConfigError("gossip.suspicion_max_timeout_mult", "must be >= 1")
        if not self.awareness_max_multiplier >= 1:
            raise ConfigError("gossip.awareness_max_multiplier", "must be >= 1")
        if not 1 <= self.max_meta_bytes <= MAX_META_BYTES_CEILING:
            raise ConfigError("gossip.max_meta_bytes", f"must be in 1..{MAX_META_BYTES_CEILING}")
        if not 1024 <= self.max_packet_bytes <= 65536:
            raise ConfigError("gossip.max_packet_bytes", "must be in 1024..65536")
        if self.max_packet_bytes < self.max_meta_bytes + _RECORD_OVERHEAD_BYTES:
            raise ConfigError(
                "gossip.max_packet_bytes",
                f"must hold one member record: >= max_meta_bytes + {_RECORD_OVERHEAD_BYTES}",
            )


# Room for one member record besides its metadata: frame header, auth trailer, message fields,
# name, address, nonce, incarnation (generous).
_RECORD_OVERHEAD_BYTES = 768
