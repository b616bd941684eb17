"""The chain index: at the home of a prompt's first chunk group, who holds the whole chain.

A prompt's chunk keys form a prefix chain (`meshkv.keys`); its first key names it (the *head*),
and the head's home is the one member a lookup asks first. When a producer stores a prompt
(every slice of a chunked prefill included), it tells that home which keys of the chain it
holds, from which position (``CHAIN_AT``); the home keeps them here, so it can answer for every
chunk of the prompt, not only for its own group of 16.

Entry: head -> the chain's keys from position 0, in order, and the member named for each.
- **Recording** a slice (head, start, keys, holder): it must attach to what is known, i.e.
  ``start`` <= the entry's length (position 0 must be the head itself); a slice that would
  leave a gap is dropped (counted by the caller), since a chain is only useful from its start.
  Where the slice overlaps the entry and the keys agree, the newest holder replaces the old one
  (it stored them last, so it is the likeliest to still have them); at the first key that
  differs the entry is cut and follows the new slice (two prompts that share their first
  chunks but diverge later: the newest wins the entry, the other keeps its group homes).
- **Bound**: an entry holds at most ``messages.MAX_KEYS`` keys (more are not recorded); all
  entries together hold at most ``chunks_max`` keys; past it the least recently used entries
  (recorded or asked) go first, whole.
- **Staleness**: nothing here is ever checked against the holders. A holder may have evicted
  a chunk, died or left; the reader skips holders gossip says are not alive, and a chunk that is
  no longer where the entry says fails to load, which is a miss and a recompute. Bytes are
  always checked against their checksum on arrival, so a stale entry never yields wrong KV.

`ChainIndex` is thread-safe (one lock); `answer_lookup` is the pure answer a member gives to a
lookup from its store's leading run, this index and its held-at directory.

This module knows keys and member names; not sockets, rings, gossip or the store's insides.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meshkv.errors import UsageError

CHAIN_KEYS_MAX = 4096
"""Keys one entry holds (`messages.MAX_KEYS`: the longest chain a lookup can name)."""
CHAIN_INDEX_CHUNKS_MAX = 1 << 19
"""Keys kept over all entries, default (about 40 MB: ~80 bytes a key with its holder)."""


@dataclass(slots=True)
class _Chain:
    keys: list[bytes] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)


class ChainIndex:
    """Bounded LRU map from a chain's head key to its keys and their holders (see module)."""

    def __init__(self, chunks_max: int = CHAIN_INDEX_CHUNKS_MAX) -> None:
        if chunks_max < 1:
            raise UsageError(f"chunks_max must be >= 1, got {chunks_max}")
        self._chains: OrderedDict[bytes, _Chain] = OrderedDict()
        self._chunks = 0
        self._chunks_max = chunks_max
        self._lock = threading.Lock()

    def record(self, head: bytes, start: int, keys: Sequence[bytes], holder: str) -> int:
        """``holder`` holds ``keys``, positions ``start``.. of the chain named ``head``;
        returns how many keys were recorded (0: the slice would leave a gap, or starts at 0
        with another key than ``head``)."""
        if not keys or start < 0 or (start == 0 and keys[0] != head):
            return 0
        with self._lock:
            chain = self._chains.get(head)
            if chain is None:
                if start:
                    return 0
                chain = self._chains[head] = _Chain()
            elif start > len(chain.keys):
                return 0
            self._chains.move_to_end(head)
            keys = list(keys[: max(0, CHAIN_KEYS_MAX - start)])
            overlap = min(len(chain.keys) - start, len(keys))
            agree = _common_prefix(chain.keys[start : start + overlap], keys[:overlap])
            cut = start + agree
            self._chunks -= len(chain.keys) - cut
            del chain.keys[cut:], chain.holders[cut:]
            chain.holders[start:cut] = [holder] * agree
            chain.keys += keys[agree:]
            chain.holders += [holder] * (len(keys) - agree)
            self._chunks += len(keys) - agree
            self._evict()
            return len(keys)

    def holders(self, keys: Sequence[bytes]) -> list[str]:
        """The recorded holder of each leading key of ``keys`` (a chain from its head), as far
        as the entry of ``keys[0]`` agrees with them; counts as use."""
        if not keys:
            return []
        with self._lock:
            chain = self._chains.get(keys[0])
            if chain is None:
                return []
            self._chains.move_to_end(keys[0])
            n = min(len(keys), len(chain.keys))
            agree = _common_prefix(chain.keys[:n], keys[:n])
            return chain.holders[:agree]

    def forget(self, head: bytes) -> None:
        with self._lock:
            chain = self._chains.pop(head, None)
            if chain is not None:
                self._chunks -= len(chain.keys)

    @property
    def chunks(self) -> int:
        """Keys recorded over all entries."""
        with self._lock:
            return self._chunks

    def __len__(self) -> int:
        with self._lock:
            return len(self._chains)

    def _evict(self) -> None:
        while self._chunks > self._chunks_max:
            _, oldest = self._chains.popitem(last=False)
            self._chunks -= len(oldest.keys)


def _common_prefix(a: Sequence[bytes], b: Sequence[bytes]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    if a == b:
        return len(a)
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def answer_lookup(
    me: str,
    keys: Sequence[bytes],
    held: int,
    chained: Sequence[str],
    directory_holders: Callable[[Sequence[bytes]], list[str]],
    alive: Callable[[str], bool],
    held_among: Callable[[Sequence[bytes]], set[bytes]],
) -> tuple[list[str], list[int]]:
    """The runs a member answers a lookup of ``keys`` with, after the ``held`` leading keys it
    holds itself: (holder of each run, keys in each run), stopping at the first key with no live
    holder known.

    ``chained`` names holders of the chain's leading keys (`ChainIndex.holders`); past it,
    ``directory_holders`` is asked (once) for the keys that are left. Work is per run of one
    holder, not per key: ``alive`` once a run; a run naming this member (``me``) is checked in
    its store (``held_among``), and the answer ends at a key no longer held here (evicted).
    """
    holders = list(chained[held:])
    if held + len(holders) < len(keys):
        holders += directory_holders(keys[held + len(holders) :])
    names: list[str] = []
    counts: list[int] = []
    at = held  # the position in ``keys`` of the run looked at
    for holder, run in itertools.groupby(holders):
        length = len(list(run))
        count = length
        if holder == me:  # only as far as the chunks are still here
            here = held_among(keys[at : at + length])
            count = next((i for i in range(length) if keys[at + i] not in here), length)
        elif not alive(holder):
            count = 0
        if count:
            names.append(holder)
            counts.append(count)
        if count < length:
            break
        at += length
    return names, counts
