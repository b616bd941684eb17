"""Prometheus metrics a user watches: hits, misses, bytes moved, failures, members, store use.

One `NodeMetrics` per member, on its own registry (several members may share a process in tests
and benchmarks), served over HTTP on the member's admin port (``lmcache_worker_ports[rank]``)
when one is configured. Counters are fed by the node; gauges are read at scrape time from
callbacks, so nothing is computed unless someone looks.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class NodeMetrics:
    """The counters and gauges of one member, labelled with its name."""

    def __init__(self, member: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"member": member}
        self._labels = labels

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, list(labels), registry=self.registry).labels(**labels)

        self.lookups = counter("meshkv_lookups", "Lookups of prompt chunk chains")
        self.chunks_hit_local = counter("meshkv_chunks_hit_local", "Chunks found in this store")
        self.chunks_fetched = counter("meshkv_chunks_fetched", "Chunks fetched from other members")
        self.chunks_missed = counter(
            "meshkv_chunks_missed", "Chunks asked for and not found (leading misses only)"
        )
        self.bytes_fetched = counter("meshkv_bytes_fetched", "Chunk bytes fetched from members")
        self.chunks_put = counter("meshkv_chunks_put", "Chunks stored here by this engine")
        self._gauges: list[Gauge] = []

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read from ``read`` at every scrape."""
        gauge = Gauge(name, doc, list(self._labels), registry=self.registry)
        gauge.labels(**self._labels).set_function(read)
        self._gauges.append(gauge)

    def serve(self, host: str, port: int) -> None:
        """Serves ``/metrics`` on ``host:port`` from a daemon thread."""
        start_http_server(port, addr=host, registry=self.registry)
