"""The shim's Prometheus metrics: its HTTP calls, its lookups, and the mesh as gossip shows it.

Each shim has its own registry (several shims may run in one test process). Member counts are
read from the member table at scrape time, so they are never stale.

This module knows nothing of HTTP routing or sockets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import Counter as PromCounter
from prometheus_client.metrics import Histogram
from prometheus_client.registry import Collector

from meshkv.errors import TransportError
from meshkv.gossip.member import MemberView
from meshkv.member_meta import role_of

LOOKUP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _MemberCollector(Collector):
    """``meshkv_controller_members{state, role}`` from the member table at scrape time."""

    def __init__(self, members: Callable[[], list[MemberView]]) -> None:
        self._members = members

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "meshkv_controller_members",
            "Members in the shim's gossip table, by state and role.",
            labels=["state", "role"],
        )
        try:
            views = self._members()
        except TransportError:
            views = []
        counts = Counter((v.state.name.lower(), role_of(v.meta) or "-") for v in views)
        for (state, role), count in sorted(counts.items()):
            family.add_metric([state, role], count)
        yield family


class ControllerMetrics:
    """Counters and histograms of one shim, and their Prometheus text."""

    def __init__(self, members: Callable[[], list[MemberView]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = PromCounter(
            "meshkv_controller_http_requests",
            "HTTP calls answered by the shim, by route and status code.",
            ["route", "code"],
            registry=self.registry,
        )
        self.lookup_seconds = Histogram(
            "meshkv_controller_lookup_seconds",
            "Time to answer POST /lookup (ring + one round trip to the homes).",
            buckets=LOOKUP_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(_MemberCollector(members))

    def text(self) -> bytes:
        return generate_latest(self.registry)
