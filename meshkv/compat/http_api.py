"""LMCache's controller HTTP API, answered from the gossip member table and the homes.

`ControllerApi` answers each call from a validated request (`meshkv.compat.http_models`) with
a JSON-ready dict, or raises `HttpError` (404 for what does not exist, 409 for an ambiguous
question, 501 for a call meshkv cannot honour, with the reason) or `TransportError` (the shim
cannot answer now: 503). `meshkv.compat.http_app` serves it with FastAPI, as LMCache does.

This module knows nothing of HTTP routing, of how the member table is kept or of how lookups
reach the homes.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from meshkv.compat import http_models as hm
from meshkv.compat.controller_metrics import ControllerMetrics
from meshkv.compat.mesh_lookup import MeshLookup
from meshkv.compat.worker_table import Worker, WorkerTable, health_codes
from meshkv.gossip.member import MemberView

EVENTS_KEPT_MAX = 4096
"""Event ids remembered for ``/check_finish``."""

UNSUPPORTED = {
    "/clear": "meshkv cannot clear a member's chunks from the controller: there is no "
    "data-plane message for it; chunks leave a store by LRU eviction",
    "/pin": "meshkv pins a chunk only while it is read or written (every pin has an owner and "
    "a deadline); the controller cannot pin chunks",
    "/compress": "meshkv keeps chunks uncompressed; there is no compression to run",
    "/decompress": "meshkv keeps chunks uncompressed; there is nothing to decompress",
    "/move": "meshkv places each chunk at its home on the ring; chunks are not moved on request",
}


class HttpError(Exception):
    """An answer other than 200, with FastAPI's ``{"detail": ...}`` body."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ControllerApi:
    """Answers LMCache's calls; thread-safe (each call reads fresh snapshots)."""

    def __init__(
        self,
        *,
        members: Callable[[], list[MemberView]],
        workers: WorkerTable,
        lookup: MeshLookup,
        lookup_timeout_s: float,
        message_counts: Callable[[], dict[str, int]],
    ) -> None:
        self._members = members
        self._workers = workers
        self._lookup = lookup
        self._lookup_timeout_s = lookup_timeout_s
        self.metrics = ControllerMetrics(members, self._all_workers, message_counts)
        self._events: OrderedDict[str, None] = OrderedDict()
        self._events_lock = threading.Lock()

    def _event(self, prefix: str) -> str:
        event_id = f"{prefix}{uuid.uuid4()}"
        with self._events_lock:
            self._events[event_id] = None
            while len(self._events) > EVENTS_KEPT_MAX:
                self._events.popitem(last=False)
        return event_id

    # -- POST calls --------------------------------------------------------------------------

    def lookup(self, request: hm.LookupRequest) -> dict[str, Any]:
        started = time.monotonic()
        layout = self._lookup.lookup(request.tokens, started + self._lookup_timeout_s)
        self.metrics.lookup_seconds.observe(time.monotonic() - started)
        return {
            "event_id": self._event("Lookup"),
            "layout_info": {inst: list(place) for inst, place in sorted(layout.items())},
        }

    def query_instance(self, request: hm.QueryInstanceRequest) -> dict[str, Any]:
        ip = request.ip
        instances = sorted({w.instance_id for w in self._all_workers() if w.ip == ip})
        if not instances:
            raise HttpError(404, f"no live instance has a worker at {ip}")
        if len(instances) > 1:
            raise HttpError(409, f"several instances have workers at {ip}: {instances}")
        return {"event_id": self._event("QueryInst"), "res": instances[0]}

    def health(self, request: hm.HealthRequest) -> dict[str, Any]:
        codes = health_codes(self._members(), request.instance_id)
        return {"event_id": self._event("health"), "error_codes": codes}

    def check_finish(self, request: hm.CheckFinishRequest) -> dict[str, Any]:
        event_id = request.event_id
        with self._events_lock:
            known = event_id in self._events
        if not known:
            raise HttpError(404, f"unknown event {event_id!r}")
        return {"status": "finished"}  # every call the shim honours finishes before it answers

    def query_worker_info(self, request: hm.QueryWorkerInfoRequest) -> dict[str, Any]:
        instance_id, worker_ids = request.instance_id, request.worker_ids
        workers = [
            w
            for w in self._all_workers()
            if instance_id in ("all", w.instance_id)
            and (not worker_ids or w.worker_id in worker_ids)
        ]
        return {
            "event_id": self._event("QueryWorkerInfo"),
            "worker_infos": [w.worker_info() for w in workers],
        }

    def unsupported(self, path: str) -> None:
        raise HttpError(501, f"{path} is not supported by meshkv: {UNSUPPORTED[path]}")

    # -- GET views ---------------------------------------------------------------------------

    def workers(self, instance_id: str | None, worker_id: int | None) -> dict[str, Any]:
        workers = self._all_workers()
        if instance_id is not None and worker_id is not None:
            match = [w for w in workers if (w.instance_id, w.worker_id) == (instance_id, worker_id)]
            if not match:
                raise HttpError(404, f"Worker ({instance_id}, {worker_id}) not found")
            return _worker_view(match[0])
        if instance_id is not None:
            workers = [w for w in workers if w.instance_id == instance_id]
            if not workers:
                raise HttpError(404, f"No workers found for instance {instance_id}")
        views = [_worker_view(w) for w in workers]
        return {"workers": views, "total_count": len(views)}

    def key_stats(self) -> dict[str, Any]:
        by_instance: dict[str, list[Worker]] = {}
        for worker in self._all_workers():
            by_instance.setdefault(worker.instance_id, []).append(worker)
        instances = [
            {
                "instance_id": instance_id,
                "key_count": _sum_known(w.key_count for w in workers),
                "worker_count": len(workers),
            }
            for instance_id, workers in by_instance.items()
        ]
        return {
            "total_key_count": _sum_known(i["key_count"] for i in instances),
            "total_instance_count": len(instances),
            "total_worker_count": sum(i["worker_count"] for i in instances),
            "instances": instances,
            "note": "key counts are those members advertise in gossip metadata "
            "(null where a member advertises none); meshkv keeps no key table",
        }

    def _all_workers(self) -> list[Worker]:
        return self._workers.workers(self._members())


def _worker_view(worker: Worker) -> dict[str, Any]:
    return {**worker.worker_info(), "key_count": worker.key_count}


def _sum_known(counts: Any) -> int | None:
    total = 0
    for count in counts:
        if count is None:
            return None
        total += count
    return total
