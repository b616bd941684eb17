"""The NIXL channel: one NIXL agent per member (UCX backend, DRAM), batched WRITEs with deadlines.

Facts this driver is built on (nixl 1.5.1, measured on the CPU-only hosts; platform.md):

- ``nixl_agent`` hard-codes the progress thread's poll timeout to 0, so the thread busy-polls
  a core. We drive NIXL's bindings directly with ``pthrDelay`` = `PROGRESS_DELAY_US`: the UCX
  progress thread then sleeps in ``poll()`` on the workers' event fds and wakes on traffic, with
  a 1 ms cap (idle CPU: ~2 % instead of a whole core). The receiving side of a WRITE needs that
  thread: over TCP the target's UCX worker must progress for bytes to land.
- Registration is done once, at start, for every store segment plus a 4 KiB scratch buffer.
  The scratch is advertised as segment `SCRATCH_SEGMENT`; `add_peer` sends a tiny warm-up
  WRITE into the peer's scratch (the first transfer to a new peer pays 20-140 ms of wire-up).
- Same host, UCX picks cma: a WRITE is one synchronous ``process_vm_writev`` inside the post
  (even into a SIGSTOPped process). Over TCP a post returns at once and completes later; a
  killed peer fails it within ~40 ms (``nixlRemoteDisconnectError``), a frozen peer leaves it
  pending forever. So a batch is cut into posts of at most `MAX_POST_BYTES`, posted one per
  `poll` call with at most `MAX_POSTS_IN_FLIGHT` outstanding: a poll never blocks the service
  loop for more than one post, and a deadline is checked between posts.
- A transfer that failed or is abandoned in flight is ended by ``invalidateRemoteMD`` (every
  handle to that agent then fails at once) before its handles are released; the peer's metadata
  is loaded again right away, so the next write reconnects without a new handshake.
- Agent names must be unique per boot (e.g. member name + boot nonce): NIXL refuses metadata
  under an agent name it still knows.
- ``import nixl`` imports torch to pick a CUDA build (~3 s on a CPU host; free inside vLLM,
  where torch is loaded already).

This module knows the store's segments and regions; nothing of messages, rings or vLLM.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshkv.errors import ProtocolError, TransportError, UsageError
from meshkv.store import Region, SegmentPool
from meshkv.transfer.channel import (
    SegmentInfo,
    SlotAddress,
    TransferHandle,
    TransferState,
)

log = logging.getLogger("vllm.meshkv.transfer.nixl")

PROGRESS_DELAY_US = 1000
"""UCX progress thread: longest sleep between event checks (it wakes early on traffic)."""
MAX_POST_BYTES = 32 << 20
"""Bytes per NIXL post; a larger batch is split (one descriptor is never split)."""
MAX_POSTS_IN_FLIGHT = 2
"""Posts of one batch outstanding at once (2 keeps a TCP link busy while the next is posted)."""
SCRATCH_SEGMENT = (1 << 32) - 1
"""Segment id under which each member advertises its scratch buffer (warm-up target)."""
SCRATCH_BYTES = 4096
WARMUP_BYTES = 64
MAX_PEER_SEGMENTS = 1 << 16
"""Segments accepted from one peer's handshake."""
POLL_SLEEP_MIN_S = 50e-6
POLL_SLEEP_MAX_S = 1e-3
"""`NixlChannel.write` polls with a sleep doubling from MIN to MAX while nothing moves."""


def _bindings() -> Any:
    """NIXL's pybind11 module (importing ``nixl`` selects the installed wheel's build).

    We use the bindings, not ``nixl_agent``, because only they let us set ``pthrDelay``.
    """
    import nixl._bindings

    return nixl._bindings


@dataclass(slots=True)
class _Peer:
    name: str  # member name
    agent: str  # its NIXL agent name
    metadata: bytes
    segments: dict[int, tuple[int, int]]  # segment id -> (address, nbytes)
    generation: int = 0  # bumped on every connection reset
    warmup: int | None = None  # NIXL handle of the warm-up write still in flight


class _NixlTransfer(TransferHandle):
    __slots__ = ("agent", "generation", "in_flight", "posted", "released", "state", "unposted")

    def __init__(
        self, *, peer: _Peer, nbytes: int, groups: list[tuple[np.ndarray, np.ndarray]]
    ) -> None:
        super().__init__(peer=peer.name, nbytes=nbytes)
        self.agent = peer.agent
        self.generation = peer.generation
        self.unposted = groups  # (local rows, remote rows) per post, in order
        self.in_flight: list[int] = []  # NIXL request handles
        self.posted = 0
        self.state: TransferState = "pending"
        self.released = False


class NixlChannel:
    """One NIXL agent with every store segment registered once; peers by member name."""

    kind = "nixl"

    def __init__(
        self,
        agent_name: str,
        pool: SegmentPool,
        *,
        progress_delay_us: int = PROGRESS_DELAY_US,
        max_post_bytes: int = MAX_POST_BYTES,
    ) -> None:
        self._nixl = _bindings()
        self._errors = tuple(
            getattr(self._nixl, n)
            for n in dir(self._nixl)
            if n.startswith("nixl") and n.endswith("Error")
        )
        self.agent_name = agent_name
        self._pool = pool
        self._max_post_bytes = max_post_bytes
        config = self._nixl.nixlAgentConfig()
        config.useProgThread = True
        config.useListenThread = False
        config.pthrDelay = progress_delay_us
        config.syncMode = self._nixl.NIXL_THREAD_SYNC_STRICT
        self._scratch = np.frombuffer(
            mmap.mmap(-1, SCRATCH_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8
        )
        rows = [(s.address, s.nbytes, 0, "") for s in pool.segments]
        rows.append((self._scratch.ctypes.data, SCRATCH_BYTES, 0, ""))
        try:
            self._agent = self._nixl.nixlAgent(agent_name, config)
            self._backend = self._agent.createBackend("UCX", {})
            self._registered = self._nixl.nixlRegDList(self._nixl.DRAM_SEG, rows)
            self._agent.registerMem(self._registered, [self._backend])
            self._metadata = self._agent.getLocalMD()
        except self._errors as exc:
            raise TransportError(f"NIXL agent {agent_name!r} with UCX failed: {exc!r}") from exc
        self._lock = threading.Lock()  # guards _peers, _closed and each peer's warmup
        self._handshake_lock = threading.Lock()  # serialises add_peer and remove_peer
        self._peers: dict[str, _Peer] = {}
        self._closed = False

    # -- handshake -----------------------------------------------------------------------------

    def metadata(self) -> bytes:
        return self._metadata

    def segments(self) -> list[SegmentInfo]:
        table = [
            SegmentInfo(segment=s.segment_id, address=s.address, nbytes=s.nbytes)
            for s in self._pool.segments
        ]
        table.append(
            SegmentInfo(
                segment=SCRATCH_SEGMENT, address=self._scratch.ctypes.data, nbytes=SCRATCH_BYTES
            )
        )
        return table

    def add_peer(self, name: str, metadata: bytes, segments: Sequence[SegmentInfo]) -> bool:
        """Loads a peer's agent and segment table and starts a warm-up write.

        The same metadata again (the same boot) is a no-op; new metadata under a known name (a
        restart) replaces the old agent. Returns False if NIXL refuses the metadata.
        """
        if len(segments) > MAX_PEER_SEGMENTS:
            log.info("%s sent %d segments (more than %d)", name, len(segments), MAX_PEER_SEGMENTS)
            return False
        with self._handshake_lock:  # the service and the requesters may greet the same peer
            with self._lock:
                known = self._peers.get(name)
                if self._closed or (known is not None and known.metadata == metadata):
                    return not self._closed
            if known is not None:
                self._drop(name)
            try:
                agent = self._agent.loadRemoteMD(metadata).decode()
            except (*self._errors, UnicodeDecodeError) as exc:
                log.info("NIXL refused the metadata of %s: %r", name, exc)
                return False
            peer = _Peer(
                name=name,
                agent=agent,
                metadata=metadata,
                segments={s.segment: (s.address, s.nbytes) for s in segments},
            )
            peer.warmup = self._post_warmup(peer)
            with self._lock:
                self._peers[name] = peer
        return True

    def remove_peer(self, name: str) -> None:
        with self._handshake_lock:
            self._drop(name)

    # -- writes --------------------------------------------------------------------------------

    def post_write(
        self, peer: str, local: Sequence[Region], remote: Sequence[SlotAddress]
    ) -> TransferHandle:
        """Starts one batched WRITE; raises TransportError if it cannot start.

        Raises ProtocolError("bad_region") if a remote slot lies outside the segments the peer
        advertised, UsageError if a local region lies outside our pool.
        """
        if len(local) != len(remote) or not local:
            raise UsageError(
                f"post_write needs equal, non-empty lists ({len(local)}, {len(remote)})"
            )
        with self._lock:
            target = self._peers.get(peer)
        if target is None:
            raise TransportError(f"no NIXL handshake with {peer}")
        self._reap_warmup(target)
        groups = self._groups(target, local, remote)
        transfer = _NixlTransfer(peer=target, nbytes=sum(r.nbytes for r in local), groups=groups)
        self._advance(transfer)
        if transfer.state == "failed":
            self.release(transfer, failed=True)
            raise TransportError(f"NIXL write to {peer} failed to start")
        return transfer

    def poll(self, handle: TransferHandle) -> TransferState:
        """Checks the posts in flight and posts the next one; never waits."""
        transfer = self._own(handle)
        if transfer.state != "pending":
            return transfer.state
        for request in list(transfer.in_flight):
            status = self._status(request)
            if status == self._nixl.NIXL_SUCCESS:
                transfer.in_flight.remove(request)
                self._release_request(request)
            elif status != self._nixl.NIXL_IN_PROG:
                transfer.state = "failed"
                return "failed"
        self._advance(transfer)
        return transfer.state

    def release(self, handle: TransferHandle, *, failed: bool) -> None:
        """Frees the transfer's NIXL requests; resets the peer's connection if it broke.

        Call exactly once per handle. A transfer released while still in flight (its deadline
        passed) counts as failed: the connection is reset first, so nothing can still write.
        """
        transfer = self._own(handle)
        if transfer.released:
            return
        transfer.released = True
        broke = (
            transfer.state == "failed"
            or bool(transfer.in_flight)
            or (failed and transfer.state == "pending")
        )
        if broke:
            self._reset(transfer.peer, transfer.generation)
        for request in transfer.in_flight:
            self._release_request(request)
        transfer.in_flight.clear()
        transfer.unposted.clear()
        if transfer.state == "pending":
            transfer.state = "failed"

    def write(
        self,
        peer: str,
        local: Sequence[Region],
        remote: Sequence[SlotAddress],
        deadline_s: float,
    ) -> bool:
        """Posts, polls until done or ``deadline_s`` (time.monotonic), releases; True if done."""
        try:
            transfer = self.post_write(peer, local, remote)
        except TransportError as exc:
            log.info("write to %s not started: %s", peer, exc)
            return False
        assert isinstance(transfer, _NixlTransfer)
        sleep_s = POLL_SLEEP_MIN_S
        state: TransferState = "pending"
        try:
            while time.monotonic() < deadline_s:
                posted = transfer.posted
                state = self.poll(transfer)
                if state != "pending":
                    break
                sleep_s = (
                    POLL_SLEEP_MIN_S
                    if transfer.posted != posted
                    else min(2 * sleep_s, POLL_SLEEP_MAX_S)
                )
                time.sleep(min(sleep_s, max(0.0, deadline_s - time.monotonic())))
        finally:
            self.release(transfer, failed=state != "done")
        if state != "done":
            log.info(
                "write of %d bytes to %s %s",
                transfer.nbytes,
                peer,
                state if state == "failed" else "missed its deadline",
            )
        return state == "done"

    def close(self) -> None:
        """Drops every peer and the agent. Stop every thread that uses the channel first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            self._disconnect(peer)
        try:
            self._agent.deregisterMem(self._registered, [self._backend])
        except self._errors as exc:
            log.warning("deregistering NIXL memory failed: %r", exc)
        self._agent = None  # destroying the agent joins its progress thread

    # -- internals -----------------------------------------------------------------------------

    def _own(self, handle: TransferHandle) -> _NixlTransfer:
        if not isinstance(handle, _NixlTransfer):
            raise UsageError("this handle was not made by a NixlChannel")
        return handle

    def _groups(
        self, peer: _Peer, local: Sequence[Region], remote: Sequence[SlotAddress]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Descriptor rows (address, length, device) cut into posts of <= max_post_bytes."""
        local_rows: list[tuple[int, int, int]] = []
        remote_rows: list[tuple[int, int, int]] = []
        cuts = [0]
        group_bytes = 0
        for region, dest in zip(local, remote, strict=True):
            seg = peer.segments.get(dest.segment)
            nbytes = region.nbytes
            if seg is None or dest.offset < 0 or dest.offset + nbytes > seg[1]:
                raise ProtocolError("bad_region", f"{dest.segment}:{dest.offset} at {peer.name}")
            local_rows.append((self._pool.address(region), nbytes, 0))
            remote_rows.append((seg[0] + dest.offset, nbytes, 0))
            if group_bytes and group_bytes + nbytes > self._max_post_bytes:
                cuts.append(len(local_rows) - 1)
                group_bytes = 0
            group_bytes += nbytes
        cuts.append(len(local_rows))
        local_array = np.array(local_rows, np.uint64)
        remote_array = np.array(remote_rows, np.uint64)
        return [(local_array[a:b], remote_array[a:b]) for a, b in itertools.pairwise(cuts)]

    def _advance(self, transfer: _NixlTransfer) -> None:
        """Posts the next group if there is room; marks the transfer done when all completed."""
        if transfer.unposted and len(transfer.in_flight) < MAX_POSTS_IN_FLIGHT:
            local_rows, remote_rows = transfer.unposted.pop(0)
            request, status = self._post(transfer.agent, local_rows, remote_rows)
            transfer.posted += 1
            if status == self._nixl.NIXL_IN_PROG:
                transfer.in_flight.append(request)
            elif status != self._nixl.NIXL_SUCCESS:
                transfer.state = "failed"
                return
        if not transfer.unposted and not transfer.in_flight:
            transfer.state = "done"

    def _post(
        self, agent: str, local_rows: np.ndarray, remote_rows: np.ndarray
    ) -> tuple[int | None, Any]:
        """Creates and posts one WRITE; returns (request, status). A finished request is freed."""
        nixl = self._nixl
        try:
            request = self._agent.createXferReq(
                nixl.NIXL_WRITE,
                nixl.nixlXferDList(nixl.DRAM_SEG, local_rows),
                nixl.nixlXferDList(nixl.DRAM_SEG, remote_rows),
                agent,
                "",
                [self._backend],
            )
        except self._errors as exc:
            log.info("NIXL refused a write to %s: %r", agent, exc)
            return None, None
        try:
            status = self._agent.postXferReq(request, "")
        except self._errors as exc:
            log.info("NIXL write to %s failed: %r", agent, exc)
            status = None
        if status != nixl.NIXL_IN_PROG:
            self._release_request(request)
        return request, status

    def _status(self, request: int) -> Any:
        try:
            return self._agent.getXferStatus(request)
        except self._errors:
            return None

    def _release_request(self, request: int) -> None:
        try:
            self._agent.releaseXferReq(request)
        except self._errors as exc:
            log.warning("releasing a NIXL request failed: %r", exc)

    def _post_warmup(self, peer: _Peer) -> int | None:
        """Starts a tiny WRITE into the peer's scratch so the connection is up before real
        traffic; returns the request if it is still in flight."""
        scratch = peer.segments.get(SCRATCH_SEGMENT)
        if scratch is None or scratch[1] < WARMUP_BYTES:
            return None
        local_rows = np.array([(self._scratch.ctypes.data, WARMUP_BYTES, 0)], np.uint64)
        remote_rows = np.array([(scratch[0], WARMUP_BYTES, 0)], np.uint64)
        request, status = self._post(peer.agent, local_rows, remote_rows)
        return request if status == self._nixl.NIXL_IN_PROG else None

    def _reap_warmup(self, peer: _Peer) -> None:
        with self._lock:
            request = peer.warmup
            if request is None or self._status(request) == self._nixl.NIXL_IN_PROG:
                return
            peer.warmup = None
        self._release_request(request)

    def _drop(self, name: str) -> None:
        with self._lock:
            peer = self._peers.pop(name, None)
        if peer is not None:
            self._disconnect(peer)

    def _disconnect(self, peer: _Peer) -> None:
        """Ends every transfer to the peer's agent and forgets it (handles fail at once)."""
        try:
            self._agent.invalidateRemoteMD(peer.agent)
        except self._errors as exc:
            log.debug("invalidating NIXL agent %s: %r", peer.agent, exc)
        with self._lock:  # exactly one of _disconnect and _reap_warmup frees the warm-up
            warmup, peer.warmup = peer.warmup, None
        if warmup is not None:
            self._release_request(warmup)

    def _reset(self, name: str, generation: int) -> None:
        """After a failed or abandoned transfer: disconnect, then load the metadata again so
        the next write reconnects. Only the first failure of a generation resets."""
        with self._handshake_lock:
            with self._lock:
                peer = self._peers.get(name)
                if peer is None or peer.generation != generation:
                    return
                peer.generation += 1
            self._disconnect(peer)
            try:
                self._agent.loadRemoteMD(peer.metadata)
            except self._errors as exc:
                log.warning("reloading NIXL metadata of %s failed, dropping it: %r", name, exc)
                with self._lock:
                    del self._peers[name]
                return
        log.info("connection to %s reset after a failed transfer", name)
