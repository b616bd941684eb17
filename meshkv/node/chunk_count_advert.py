"""`ChunkCountAdvert`: keeps the chunk count in a member's gossip metadata current.

The shim's ``/controller/key-stats`` reports how many chunks each worker holds; meshkv keeps no
key table, so each member advertises its own count (`meshkv.member_meta.CHUNK_COUNT`). A
thread compares the store's count with the last one advertised every
`CHUNK_COUNT_REFRESH_INTERVAL_S` and re-advertises only on a change: a member whose store is
steady costs gossip nothing, and a busy one at most one metadata update per interval.

This module knows nothing of the store or of gossip beyond the two callables it is given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from meshkv.errors import TransportError, UsageError
from meshkv.member_meta import chunk_count_of, with_chunk_count

log = logging.getLogger("vllm.meshkv.node.advert")

CHUNK_COUNT_REFRESH_INTERVAL_S = 2.0
"""How often the count is compared (an update is gossiped only when it changed): key counts
are a dashboard figure, and every update is one more record for gossip to spread."""
STOP_TIMEOUT_S = 2.0


class ChunkCountAdvert:
    """Re-advertises ``meta`` with the current chunk count while running."""

    def __init__(
        self,
        *,
        meta: Mapping[str, str | int],
        count: Callable[[], int],
        publish: Callable[[dict[str, str | int]], None],
        interval_s: float = CHUNK_COUNT_REFRESH_INTERVAL_S,
    ) -> None:
        self._meta = dict(meta)
        self._count = count
        self._publish = publish
        self._interval_s = interval_s
        self._advertised = chunk_count_of(meta)  # what the member started with
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meshkv-advert", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)

    def refresh(self) -> bool:
        """Advertises the count if it changed since the last time; True if it did."""
        count = self._count()
        if count == self._advertised:
            return False
        self._publish(with_chunk_count(self._meta, count))
        self._advertised = count
        return True

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self.refresh()
            except (TransportError, UsageError) as exc:  # gossip stopping or busy: try later
                log.debug("chunk count not advertised: %s", exc)
