"""The consistent-hash ring: every chunk's home member, computed locally from the member set.

`HashRing` is the immutable ring of one member set; `RingView` is a member's current ring plus
the previous one, for epoch checks and the one-step fallback after a membership change.
This package knows nothing of gossip, sockets, threads or clocks.
"""

from meshkv.ring.hashring import DEFAULT_PROBES, DEFAULT_VNODES, HashRing, positions_of
from meshkv.ring.points import member_points
from meshkv.ring.view import RingView

__all__ = [
    "DEFAULT_PROBES",
    "DEFAULT_VNODES",
    "HashRing",
    "RingView",
    "member_points",
    "positions_of",
]
