"""Lifeguard suspicion: a timeout that starts long and shrinks as independent confirmations arrive.

A member suspected by one observer may just have a slow observer; when several members suspect it
independently, it is probably gone. So a suspicion starts at ``max_s`` and shrinks
logarithmically toward ``min_s`` as up to ``k`` distinct confirmers report it:

    timeout(n) = max(min_s, max_s - (max_s - min_s) * log(n + 1) / log(k + 1))

When the timeout runs out, the holder pings the suspect directly once more (carrying the
suspicion, so that a live suspect answers with its refutation) and declares it dead only if
nothing refutes it by ``verify_by_s``: a holder that missed a refutation (every gossip send
can miss a member, more so under loss) does not turn a false suspicion into a false death.

The timing math is pure functions; `Suspicion` holds one member's suspicion (start time,
confirmers, verification deadline). This module knows nothing of messages, the network or
member tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def suspicion_min_timeout_s(
    suspicion_mult: float, n_members: int, probe_interval_s: float
) -> float:
    """Shortest suspicion timeout: ``mult * max(1, log10(N)) * probe_interval`` (memberlist)."""
    node_scale = max(1.0, math.log10(max(1, n_members)))
    return suspicion_mult * node_scale * probe_interval_s


def expected_confirmations(wanted: int, n_members: int) -> int:
    """Confirmations that shrink a suspicion to its minimum: ``wanted``, unless fewer than
    ``wanted`` members besides the suspect and the first suspector exist; then 0."""
    return 0 if n_members - 2 < wanted else wanted


def suspicion_timeout_s(confirmations: int, k: int, min_s: float, max_s: float) -> float:
    """The timeout after ``confirmations`` of ``k`` expected confirmations (Lifeguard)."""
    if k <= 0 or confirmations >= k:
        return min_s
    fraction = math.log(confirmations + 1) / math.log(k + 1)
    return max(min_s, max_s - fraction * (max_s - min_s))


@dataclass(slots=True)
class Suspicion:
    """One member's suspicion at one incarnation: who confirmed it and when it expires."""

    start_s: float
    min_s: float
    max_s: float
    k: int
    first_source: str
    confirmers: set[str] = field(default_factory=set)
    verify_by_s: float | None = None  # set when the timeout ran out and a last ping went out

    @property
    def deadline_s(self) -> float:
        if self.verify_by_s is not None:
            return self.verify_by_s
        return self.start_s + suspicion_timeout_s(
            len(self.confirmers), self.k, self.min_s, self.max_s
        )

    def confirm(self, source: str) -> bool:
        """Counts ``source`` as a confirmer; False if it is the first suspector, already
        counted, or no more confirmations are needed."""
        if (
            source == self.first_source
            or source in self.confirmers
            or len(self.confirmers) >= self.k
        ):
            return False
        self.confirmers.add(source)
        return True
