"""Lifeguard local health: a member that is itself slow backs off instead of accusing others.

The score rises when this member's own probes miss the nacks its relays should have sent, or when
it must refute a suspicion about itself (both mean: my own processing or network is late), and
falls with every successful probe. Probe interval and timeout are multiplied by ``score + 1``.

This module knows nothing of messages, members or the network.
"""

from __future__ import annotations

from dataclasses import dataclass

# Score changes (memberlist's values).
PROBE_OK_DELTA = -1
MISSED_NACK_DELTA = 1
REFUTE_DELTA = 1


def scaled_s(timeout_s: float, score: int) -> float:
    """``timeout_s`` stretched by a local-health score."""
    return timeout_s * (score + 1)


def clamped_score(score: int, delta: int, max_multiplier: int) -> int:
    """``score + delta`` kept within ``0 .. max_multiplier - 1``."""
    return min(max(score + delta, 0), max_multiplier - 1)


@dataclass(slots=True)
class Awareness:
    """This member's local-health score."""

    max_multiplier: int
    score: int = 0

    def apply(self, delta: int) -> None:
        self.score = clamped_score(self.score, delta, self.max_multiplier)

    def scale(self, timeout_s: float) -> float:
        return scaled_s(timeout_s, self.score)
