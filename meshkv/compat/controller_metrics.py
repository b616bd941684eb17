"""The shim's Prometheus metrics: its HTTP calls, its lookups, and the mesh as gossip shows it.

meshkv's own names (``meshkv_controller_*``) and, beside them, LMCache 0.5.6's controller gauges
that have a meaning here, under LMCache's names and ``role="controller"`` label, so existing
dashboards keep working: ``lmcache:cache_controller_registered_workers_count`` (workers
listed), ``..._kv_pool_keys_count`` (chunks the workers advertise), and
``..._pull_socket_message_count`` / ``..._reply_socket_message_count`` (gossip messages the
seed member on that port received). LMCache's other controller gauges (socket backlogs, KV-op
sequence gaps, full sync) describe machinery meshkv does not have and are not exported.

Each shim has its own registry (several shims may run in one test process). Every gauge is
read at scrape time, so it is never stale.

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

from meshkv.compat.worker_table import Worker
from meshkv.errors import TransportError
from meshkv.gossip.member import MemberView
from meshkv.member_meta import role_of

LMCACHE_PREFIX = "lmcache:cache_controller_"
LMCACHE_LABELS = {"role": "controller"}
"""The label LMCache's controller puts on its gauges."""
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


class _LMCacheCollector(Collector):
    """LMCache's controller gauges (the ones with a meaning here) at scrape time."""

    def __init__(
        self,
        workers: Callable[[], list[Worker]],
        message_counts: Callable[[], dict[str, int]],
    ) -> None:
        self._workers = workers
        self._message_counts = message_counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            workers = self._workers()
            received = self._message_counts()
        except TransportError:  # the gossip thread is stopping: export nothing rather than 0
            return
        yield _lmcache_gauge(
            "registered_workers_count",
            "The total number of registered workers (engine members gossip holds alive or suspect)",
            len(workers),
        )
        yield _lmcache_gauge(
            "kv_pool_keys_count",
            "The number of keys in the KV pool (chunks the workers advertise holding)",
            sum(w.key_count or 0 for w in workers),
        )
        for socket_name, count in sorted(received.items()):
            yield _lmcache_gauge(
                f"{socket_name}_socket_message_count",
                f"The total number of messages received on the {socket_name.upper()} port "
                "(gossip messages of the seed member there)",
                count,
            )


def _lmcache_gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        f"{LMCACHE_PREFIX}{name}", documentation, labels=list(LMCACHE_LABELS)
    )
    family.add_metric(list(LMCACHE_LABELS.values()), value)
    return family


class ControllerMetrics:
    """Counters and histograms of one shim, and their Prometheus text."""

    def __init__(
        self,
        members: Callable[[], list[MemberView]],
        workers: Callable[[], list[Worker]],
        message_counts: Callable[[], dict[str, int]],
    ) -> None:
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
        self.registry.register(_LMCacheCollector(workers, message_counts))

    def text(self) -> bytes:
        return generate_latest(self.registry)
