"""LMCache's controller HTTP API, answered from the gossip member table and the homes.

`ControllerApi.handle` turns one request (method, target, body) into a `Reply`;
`meshkv.compat.http_server` is the thin stdlib server around it.
Bodies are JSON; errors have FastAPI's shape ``{"detail": "..."}`` as LMCache's do: 400 for a
body that is not JSON, 422 for a field of the wrong type, 404 for what does not exist, 501 for
a call meshkv cannot honour (with the reason), 503 when the shim cannot answer now.

This module knows nothing of how the member table is kept or how lookups reach the homes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from meshkv.compat.controller_metrics import ControllerMetrics
from meshkv.compat.mesh_lookup import MeshLookup
from meshkv.compat.worker_table import Worker, WorkerTable, health_codes
from meshkv.errors import TransportError
from meshkv.gossip.member import MemberView

log = logging.getLogger("vllm.meshkv.compat.http")

EVENTS_KEPT_MAX = 4096
"""Event ids remembered for ``/check_finish``."""
MAX_TOKEN_ID = 0xFFFFFFFF

UNSUPPORTED = {
    "/clear": "meshkv cannot clear a member's chunks from the controller: there is no "
    "data-plane message for it; chunks leave a store by LRU eviction",
    "/pin": "meshkv pins a chunk only while it is read or written (every pin has an owner and "
    "a deadline); the controller cannot pin chunks",
    "/compress": "meshkv keeps chunks uncompressed; there is no compression to run",
    "/decompress": "meshkv keeps chunks uncompressed; there is nothing to decompress",
    "/move": "meshkv places each chunk at its home on the ring; chunks are not moved on request",
}


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"


class HttpError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def json_reply(status: int, value: Any) -> Reply:
    return Reply(status, json.dumps(value).encode())


class ControllerApi:
    """Routes LMCache's calls; thread-safe (each call reads fresh snapshots)."""

    def __init__(
        self,
        *,
        members: Callable[[], list[MemberView]],
        workers: WorkerTable,
        lookup: MeshLookup,
        lookup_timeout_s: float,
    ) -> None:
        self._members = members
        self._workers = workers
        self._lookup = lookup
        self._lookup_timeout_s = lookup_timeout_s
        self.metrics = ControllerMetrics(members)
        self._events: OrderedDict[str, None] = OrderedDict()
        self._events_lock = threading.Lock()
        self._posts: dict[str, Callable[[dict[str, Any]], Any]] = {
            "/lookup": self._post_lookup,
            "/query_instance": self._post_query_instance,
            "/health": self._post_health,
            "/check_finish": self._post_check_finish,
            "/query_worker_info": self._post_query_worker_info,
        }
        self._gets: dict[str, Callable[[dict[str, list[str]]], Reply]] = {
            "/metrics": lambda _query: Reply(200, self.metrics.text(), CONTENT_TYPE_LATEST),
            "/controller/workers": self._get_workers,
            "/controller/key-stats": self._get_key_stats,
        }

    def handle(self, method: str, target: str, body: bytes) -> Reply:
        """One request to one reply; never raises."""
        path = "other"
        try:
            try:
                parts = urlsplit(target)
            except ValueError:  # e.g. "//[": an invalid IPv6 host
                raise HttpError(400, "the request target is not a valid URL") from None
            path = parts.path.rstrip("/") or "/"
            reply = self._route(method, path, parse_qs(parts.query), body)
        except HttpError as exc:
            reply = json_reply(exc.status, {"detail": exc.detail})
        except TransportError as exc:
            reply = json_reply(503, {"detail": f"the controller cannot answer now: {exc}"})
        except Exception:  # a bug here must not kill the server thread silently
            log.exception("%s %s failed", method, path)
            reply = json_reply(500, {"detail": "internal error in the meshkv controller shim"})
        known = path in self._posts or path in self._gets or path in UNSUPPORTED
        self.metrics.requests.labels(path if known else "other", str(reply.status)).inc()
        return reply

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Reply:
        post = self._posts.get(path)
        if post is not None or path in UNSUPPORTED:
            if method != "POST":
                raise HttpError(405, f"{path} takes POST")
            request = _parse_body(body)
            if post is None:
                raise HttpError(501, f"{path} is not supported by meshkv: {UNSUPPORTED[path]}")
            return json_reply(200, post(request))
        get = self._gets.get(path)
        if get is not None:
            if method != "GET":
                raise HttpError(405, f"{path} takes GET")
            return get(query)
        raise HttpError(404, "Not Found")

    def _event(self, prefix: str) -> str:
        event_id = f"{prefix}{uuid.uuid4()}"
        with self._events_lock:
            self._events[event_id] = None
            while len(self._events) > EVENTS_KEPT_MAX:
                self._events.popitem(last=False)
        return event_id

    # -- POST calls --------------------------------------------------------------------------

    def _post_lookup(self, request: dict[str, Any]) -> dict[str, Any]:
        tokens = _field(request, "tokens", list)
        if not all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in tokens):
            raise HttpError(422, "tokens: every token id must be an integer in 0..2**32-1")
        started = time.monotonic()
        layout = self._lookup.lookup(tokens, started + self._lookup_timeout_s)
        self.metrics.lookup_seconds.observe(time.monotonic() - started)
        return {
            "event_id": self._event("Lookup"),
            "layout_info": {inst: list(place) for inst, place in sorted(layout.items())},
        }

    def _post_query_instance(self, request: dict[str, Any]) -> dict[str, Any]:
        ip = _field(request, "ip", str)
        instances = sorted({w.instance_id for w in self._all_workers() if w.ip == ip})
        if not instances:
            raise HttpError(404, f"no live instance has a worker at {ip}")
        if len(instances) > 1:
            raise HttpError(409, f"several instances have workers at {ip}: {instances}")
        return {"event_id": self._event("QueryInst"), "res": instances[0]}

    def _post_health(self, request: dict[str, Any]) -> dict[str, Any]:
        instance_id = _field(request, "instance_id", str)
        codes = health_codes(self._members(), instance_id)
        return {"event_id": self._event("health"), "error_codes": codes}

    def _post_check_finish(self, request: dict[str, Any]) -> dict[str, Any]:
        event_id = _field(request, "event_id", str)
        with self._events_lock:
            known = event_id in self._events
        if not known:
            raise HttpError(404, f"unknown event {event_id!r}")
        return {"status": "finished"}  # every call the shim honours finishes before it answers

    def _post_query_worker_info(self, request: dict[str, Any]) -> dict[str, Any]:
        instance_id = _field(request, "instance_id", str)
        worker_ids = request.get("worker_ids")
        if worker_ids is not None and not (
            isinstance(worker_ids, list) and all(type(w) is int for w in worker_ids)
        ):
            raise HttpError(422, "worker_ids: must be a list of integers or null")
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

    # -- GET views ---------------------------------------------------------------------------

    def _get_workers(self, query: dict[str, list[str]]) -> Reply:
        instance_id = query.get("instance_id", [None])[0]
        raw_worker = query.get("worker_id", [None])[0]
        workers = self._all_workers()
        if instance_id is not None and raw_worker is not None:
            if not (raw_worker.isascii() and raw_worker.isdigit()):  # "²" is a digit to isdigit
                raise HttpError(422, "worker_id: must be an integer")
            worker_id = int(raw_worker)
            match = [w for w in workers if (w.instance_id, w.worker_id) == (instance_id, worker_id)]
            if not match:
                raise HttpError(404, f"Worker ({instance_id}, {raw_worker}) not found")
            return json_reply(200, _worker_view(match[0]))
        if instance_id is not None:
            workers = [w for w in workers if w.instance_id == instance_id]
            if not workers:
                raise HttpError(404, f"No workers found for instance {instance_id}")
        views = [_worker_view(w) for w in workers]
        return json_reply(200, {"workers": views, "total_count": len(views)})

    def _get_key_stats(self, _query: dict[str, list[str]]) -> Reply:
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
        return json_reply(
            200,
            {
                "total_key_count": _sum_known(i["key_count"] for i in instances),
                "total_instance_count": len(instances),
                "total_worker_count": sum(i["worker_count"] for i in instances),
                "instances": instances,
                "note": "key counts are those members advertise in gossip metadata "
                "(null where a member advertises none); meshkv keeps no key table",
            },
        )

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


def _parse_body(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at column {exc.colno}"
        raise HttpError(400, f"the request body is not valid JSON ({where})") from None
    except UnicodeDecodeError:
        raise HttpError(400, "the request body is not valid JSON (not UTF-8)") from None
    except ValueError:  # an integer longer than Python's int_max_str_digits
        raise HttpError(400, "the request body is not valid JSON (a number too long)") from None
    except RecursionError:
        raise HttpError(400, "the request body is not valid JSON (nested too deeply)") from None
    if not isinstance(request, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return request


def _field(request: dict[str, Any], name: str, kind: type) -> Any:
    if name not in request:
        raise HttpError(422, f"{name}: field required")
    value = request[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise HttpError(422, f"{name}: must be a {kind.__name__}, got {type(value).__name__}")
    return value
