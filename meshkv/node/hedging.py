"""When to ask the next replica, and whom to ask last: the hedging rule, pure.

A reader asks a chunk's first candidate holder; if that holder has said nothing for
`hedge_delay_s` (its silence: time since the request went out, or since its last reply to this
call), the reader asks the next replica as well and takes the first correct answer. The delay
comes from the round trips this member observed:

    hedge delay = clamp(quantile(recent round trips, hedge_quantile),
                        hedge_delay_min_s, hedge_delay_max_s)

and `hedge_delay_initial_s` while fewer than `hedge_samples_min` round trips are known. It is
recomputed once per `REFRESH_FRACTION` of the window's new samples (every 16 of 512), not on
every call: sorting the window on every lookup cost 16 % of an asker's lookup, and a quantile of
512 samples barely moves with one more. The lower bound keeps a quiet, fast mesh from hedging on
scheduling noise; the upper bound keeps one slow episode from stretching every later hedge.

A member that stayed silent that long is *avoided*: for the next requests it is asked last
(after every other candidate), until a reply from it or gossip (it is alive again, or came back
with a new boot) clears it, or `avoid_hold_s` passes (then it is tried first again, so a member
that was only slow once is not shunned for good). At most `avoid_members_max` members are
avoided; past that the one avoided longest ago is forgotten first.

`RoundTrips` and `AvoidList` take the time as an argument and hold no lock: the caller
(`meshkv.node.hedged_calls.HedgeState`) serialises them. This module knows no sockets, no
clock, no messages and no membership.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable

from meshkv.dataplane.config import DataPlaneConfig

REFRESH_FRACTION = 32
"""The hedge delay is recomputed after every window / REFRESH_FRACTION new samples (at least 1)."""


class RoundTrips:
    """The last ``round_trip_samples_max`` round trips (s), and the hedge delay they give."""

    def __init__(self, config: DataPlaneConfig) -> None:
        self._config = config
        self._samples: deque[float] = deque(maxlen=config.round_trip_samples_max)
        self._refresh_every = max(1, config.round_trip_samples_max // REFRESH_FRACTION)
        self._new_samples = 0
        self._delay_s: float | None = None  # none computed yet

    def __len__(self) -> int:
        return len(self._samples)

    def record(self, round_trip_s: float) -> None:
        self._samples.append(max(0.0, round_trip_s))
        self._new_samples += 1

    def hedge_delay_s(self) -> float:
        """How long a holder may stay silent before the next replica is asked too."""
        config = self._config
        if len(self._samples) < config.hedge_samples_min:
            return config.hedge_delay_initial_s
        if self._delay_s is None or self._new_samples >= self._refresh_every:
            observed = quantile(self._samples, config.hedge_quantile)
            self._delay_s = min(config.hedge_delay_max_s, max(config.hedge_delay_min_s, observed))
            self._new_samples = 0
        return self._delay_s


def quantile(samples: Iterable[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of non-empty ``samples``."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(round(q * len(ordered), 9)))  # round: 0.99 * 100 is 99.00000000000001
    return ordered[min(rank, len(ordered)) - 1]


class AvoidList:
    """Members that just stayed silent past the hedge delay (see the module docstring)."""

    def __init__(self, config: DataPlaneConfig) -> None:
        self._hold_s = config.avoid_hold_s
        self._max = config.avoid_members_max
        self._since: OrderedDict[str, float] = OrderedDict()  # name -> when avoided, oldest first

    def __len__(self) -> int:
        return len(self._since)

    def avoid(self, name: str, now_s: float) -> None:
        """``name`` stayed silent past the hedge delay at ``now_s``."""
        self._since.pop(name, None)
        self._since[name] = now_s
        while len(self._since) > self._max:
            self._since.popitem(last=False)

    def clear(self, name: str) -> None:
        """A reply from ``name``, or gossip, says it is back."""
        self._since.pop(name, None)

    def is_avoided(self, name: str, now_s: float) -> bool:
        since = self._since.get(name)
        if since is None:
            return False
        if now_s - since >= self._hold_s:
            del self._since[name]
            return False
        return True

    def order(self, candidates: Iterable[str], now_s: float) -> list[str]:
        """``candidates`` with the avoided ones moved last, each part in its given order."""
        names = list(candidates)
        avoided = [name for name in names if self.is_avoided(name, now_s)]
        if not avoided:
            return names
        return [name for name in names if name not in avoided] + avoided
