"""LMCache's ``/lookup`` answered from the ring and the homes: who holds a prompt's prefix.

LMCache's controller keeps every chunk key of every worker in one table (and loses it on a
restart). The shim keeps none: for each member namespace among the live engines it computes
the prompt's chunk keys (``ns`` in member metadata is the namespace digest in hex, so the shim
can), builds that namespace's ring exactly as its members do (a `Membership` fed by gossip
events), and asks the homes with `meshkv.node.locate.locate_async` over the data plane: the
prompt's first home first, the others only for what it did not cover. Every namespace's lookup
and every concurrent HTTP request share one `RequestLoop` (one socket per member, one thread).

The answer keeps LMCache's shape and meaning: ``{instance_id: (location, matched_tokens)}``
where ``matched_tokens`` is the end of the last chunk of the prompt's leading run that the
instance holds (LMCache's controller records ``end`` for every chunk up to the first miss). An
instance with several TP ranks reports what every one of its ranks can load (the minimum over
its ranks' namespaces). The shim holds no chunks: its store is one empty page, never written.

This module knows nothing of HTTP or of the command line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait

import zmq

from meshkv.dataplane import messages as m
from meshkv.dataplane.client import RequestLoop
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.dataplane.directory import HolderDirectory
from meshkv.gossip.events import MemberEvent
from meshkv.gossip.member import MemberView
from meshkv.keys import KEY_BYTES, chunk_keys, root_key
from meshkv.member_meta import ROLE_ENGINE, ROLE_SEED, chunk_size_of, namespace_of
from meshkv.node.hedged_calls import HedgeState
from meshkv.node.locate import Located, locate_async
from meshkv.node.membership import Membership, Peer
from meshkv.node.readers import Readers
from meshkv.store import ChunkStore
from meshkv.store.slots import PAGE_BYTES
from meshkv.wire import AuthPolicy

log = logging.getLogger("vllm.meshkv.compat.lookup")

LOCATION = "LocalCPUBackend"
"""The location LMCache reports for chunks in CPU memory (where meshkv keeps every chunk)."""
NAMESPACES_MAX = 256
"""Namespaces tracked; past this, those with no live member are forgotten first."""
CALLBACK_SLACK_S = 0.5
"""How long past its deadline a lookup's answer is waited for (the request loop answers every
lookup by its deadline; this only bounds a wait on a loop that stopped)."""
MAX_LOOKUP_FRAME_BYTES = 4 << 20
"""Largest data-plane reply accepted (a lookup reply names at most MAX_KEYS holders)."""


def is_namespace_digest(ns: object) -> bool:
    """True for a namespace digest in hex, as engines advertise it."""
    if not isinstance(ns, str) or len(ns) != 2 * KEY_BYTES:
        return False
    try:
        bytes.fromhex(ns)
    except ValueError:
        return False
    return True


class MeshLookup:
    """Per-namespace rings kept current from gossip, and lookups against their homes."""

    def __init__(
        self,
        *,
        name: str,
        vnodes: int,
        default_chunk_size: int,
        auth: AuthPolicy,
        members: Callable[[], list[MemberView]],
    ) -> None:
        self._name = name
        self._vnodes = vnodes
        self._default_chunk_size = default_chunk_size
        self._members = members
        self._lock = threading.Lock()
        self._rings: dict[str, Membership] = {}
        self._chunk_sizes: dict[str, int] = {}
        self._store = ChunkStore.with_budget(PAGE_BYTES)
        self._directory = HolderDirectory(max_entries=1)
        self._context = zmq.Context(io_threads=1)
        self._codec = m.make_codec(MAX_LOOKUP_FRAME_BYTES, auth)
        self._loop = RequestLoop(self._context, self._codec, "meshkv-shim-lookups")
        self._hedge = HedgeState(DataPlaneConfig())  # orders candidates (the loop asks the first)
        self._warned_no_chunk_size: set[str] = set()

    # -- gossip side (runs on the gossip thread: short, no I/O) ----------------------------

    def on_event(self, event: MemberEvent) -> None:
        view = event.member
        ns = namespace_of(view.meta)
        with self._lock:
            if ns is not None and is_namespace_digest(ns) and ns not in self._rings:
                self._add_namespace(ns)
            chunk_size = chunk_size_of(view.meta)
            if ns is not None and is_namespace_digest(ns) and chunk_size is not None:
                self._chunk_sizes[ns] = chunk_size
            rings = list(self._rings.values())
        for membership in rings:
            membership.on_event(event)

    def _add_namespace(self, ns: str) -> None:
        if len(self._rings) >= NAMESPACES_MAX:
            for stale in [n for n, r in self._rings.items() if not r.peers()]:
                del self._rings[stale]
                self._chunk_sizes.pop(stale, None)
        membership = Membership(
            me=Peer(name=self._name, nonce=0, data_address="", namespace=ns, role=ROLE_SEED),
            vnodes=self._vnodes,
        )
        membership.seed_from(self._members())  # on the gossip thread: a consistent snapshot
        self._rings[ns] = membership

    # -- the lookup (any thread) ------------------------------------------------------------

    def lookup(self, tokens: Sequence[int], deadline_s: float) -> dict[str, tuple[str, int]]:
        """``{instance_id: (location, matched_tokens)}`` for the prompt ``tokens``."""
        with self._lock:
            rings = dict(self._rings)
            sizes = dict(self._chunk_sizes)
        ranks_of: dict[str, set[str]] = {}  # instance -> namespaces its engine ranks serve
        pending: dict[str, tuple[Future[Located], int]] = {}  # ns -> its lookup, chunk size
        for ns, membership in rings.items():
            for peer in membership.peers():
                if peer.role == ROLE_ENGINE and peer.namespace == ns:
                    ranks_of.setdefault(_instance_of(peer.name), set()).add(ns)
            if not membership.ring().current.members:
                continue
            chunk_size = sizes.get(ns) or self._chunk_size_fallback(ns)
            keys = chunk_keys(root_key(bytes.fromhex(ns)), tokens, chunk_size)[: m.MAX_KEYS]
            if keys:
                located: Future[Located] = Future()
                pending[ns] = (located, chunk_size)
                readers = Readers(
                    membership=membership,
                    store=self._store,
                    directory=self._directory,
                    hedge=self._hedge,
                    replicas=1,
                )
                locate_async(
                    keys, readers, loop=self._loop, deadline_s=deadline_s, done=located.set_result
                )
        left_s = max(0.0, deadline_s - time.monotonic()) + CALLBACK_SLACK_S
        wait([future for future, _ in pending.values()], timeout=left_s)  # answered by deadline_s
        per_namespace = {
            ns: matched_tokens(future.result().holders, chunk_size)
            for ns, (future, chunk_size) in pending.items()
            if future.done()
        }
        return {
            instance: (LOCATION, count)
            for instance, count in combine_namespaces(per_namespace, ranks_of).items()
            if count > 0
        }

    def _chunk_size_fallback(self, ns: str) -> int:
        if ns not in self._warned_no_chunk_size:
            self._warned_no_chunk_size.add(ns)
            log.info(
                "members of namespace %s do not advertise their chunk size; using chunk_size=%d "
                "from the controller's config",
                ns,
                self._default_chunk_size,
            )
        return self._default_chunk_size

    def namespaces(self) -> list[str]:
        with self._lock:
            return sorted(self._rings)

    def close(self) -> None:
        """Closes the data-plane sockets; call once no lookup runs (the HTTP server joined its
        request threads)."""
        self._loop.close()
        self._context.destroy(linger=0)


def _instance_of(member_name: str) -> str:
    instance, sep, _ = member_name.rpartition("/")
    return instance if sep else member_name


def matched_tokens(holders: list[str], chunk_size: int) -> dict[str, int]:
    """Per holder instance: the end (in tokens) of the last leading chunk it holds."""
    matched: dict[str, int] = {}
    for index, holder in enumerate(holders):
        matched[_instance_of(holder)] = (index + 1) * chunk_size
    return matched


def combine_namespaces(
    per_namespace: dict[str, dict[str, int]], ranks_of: dict[str, set[str]]
) -> dict[str, int]:
    """Engine instances: the minimum over their ranks' namespaces; other holders (storage
    members, which serve every namespace): the maximum over namespaces."""
    combined: dict[str, int] = {}
    for counts in per_namespace.values():
        for instance, count in counts.items():
            combined[instance] = max(combined.get(instance, 0), count)
    for instance, namespaces in ranks_of.items():
        if instance in combined:
            counts = [per_namespace.get(ns, {}).get(instance, 0) for ns in namespaces]
            combined[instance] = min(counts)
    return combined
