"""LMCache's controller HTTP API as a FastAPI app, the web stack LMCache's controller uses.

FastAPI validates every body against LMCache's request models (`meshkv.compat.http_models`),
so a malformed request gets what LMCache's controller answers: 422 with pydantic's ``detail``
list (a body that is not JSON included), 404 and 405 with ``{"detail": ...}``. The answers
themselves come from `ControllerApi`; its `HttpError` becomes ``{"detail": ...}`` with its
status, a `TransportError` a 503. ``/docs`` and ``/openapi.json`` list every route.

Two bounds sit in front of the app: `MAX_BODY_BYTES` per request body (413), and the request
accounting behind ``meshkv_controller_http_requests`` (by route and status).

This module knows nothing of sockets or threads (`meshkv.compat.http_server` runs it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from meshkv import __version__
from meshkv.compat import http_models as hm
from meshkv.compat.http_api import ControllerApi, HttpError
from meshkv.errors import TransportError

log = logging.getLogger("vllm.meshkv.compat.http")

MAX_BODY_BYTES = 32 << 20
"""Largest request body (a million tokens as JSON is about 7 MB)."""
OTHER_ROUTE = "other"
"""The route label of requests to paths the API does not have."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def build_app(api: ControllerApi) -> Asgi:
    """The ASGI app: LMCache's routes, wrapped in the body bound and the request accounting."""
    app = FastAPI(
        title="meshkv lmcache_controller",
        version=__version__,
        description="LMCache's controller API, answered from meshkv's gossip mesh.",
    )
    _add_routes(app, api)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HttpError, _http_error)
    app.add_exception_handler(TransportError, _transport_error)
    app.add_exception_handler(Exception, _internal_error)
    routes = frozenset(getattr(route, "path", "") for route in app.routes)
    return _Accounting(_BodyLimit(app), api, routes)


def _add_routes(app: FastAPI, api: ControllerApi) -> None:
    @app.post("/lookup")
    def lookup(request: hm.LookupRequest) -> dict[str, Any]:
        return api.lookup(request)

    @app.post("/query_instance")
    def query_instance(request: hm.QueryInstanceRequest) -> dict[str, Any]:
        return api.query_instance(request)

    @app.post("/health")
    def health(request: hm.HealthRequest) -> dict[str, Any]:
        return api.health(request)

    @app.post("/check_finish")
    def check_finish(request: hm.CheckFinishRequest) -> dict[str, Any]:
        return api.check_finish(request)

    @app.post("/query_worker_info")
    def query_worker_info(request: hm.QueryWorkerInfoRequest) -> dict[str, Any]:
        return api.query_worker_info(request)

    for path, model in hm.UNSUPPORTED_MODELS.items():
        app.post(path, status_code=501, responses={501: {"description": "not supported"}})(
            _unsupported(api, path, model)
        )

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(api.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/controller/workers")
    def workers(instance_id: str | None = None, worker_id: int | None = None) -> dict[str, Any]:
        return api.workers(instance_id, worker_id)

    @app.get("/controller/key-stats")
    def key_stats() -> dict[str, Any]:
        return api.key_stats()


def _unsupported(api: ControllerApi, path: str, model: type[hm.BaseModel]) -> Callable[..., None]:
    def refuse(request: Any) -> None:
        api.unsupported(path)

    refuse.__annotations__ = {"request": model, "return": None}
    refuse.__name__ = path.strip("/")
    return refuse


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own 422, except that what JSON cannot carry in the echoed input (a non-finite
    number, a lone surrogate) is written as text: FastAPI's answer would fail to encode, a 500."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    return value


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HttpError)
    return JSONResponse({"detail": _json_safe(exc.detail)}, status_code=exc.status)


async def _transport_error(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"the controller cannot answer now: {exc}"}, status_code=503)


async def _internal_error(request: Request, _exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path)  # the traceback follows
    return JSONResponse({"detail": "internal error in the meshkv controller shim"}, 500)


class _BodyLimit:
    """Answers 413 to a body over `MAX_BODY_BYTES` (declared, or counted as it streams in)."""

    def __init__(self, app: Asgi) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await _send_json(send, 413, {"detail": f"body over {MAX_BODY_BYTES} bytes"})
            return
        received = 0

        async def bounded() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                return {"type": "http.disconnect"}  # the app stops reading; nothing is kept
            return message

        await self._app(scope, bounded, send)


class _Accounting:
    """Counts every answer by route and status; a route the API does not have is "other"."""

    def __init__(self, app: Asgi, api: ControllerApi, routes: frozenset[str]) -> None:
        self._app = app
        self._api = api
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in self._routes else OTHER_ROUTE

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._api.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        try:
            await self._app(scope, receive, counted)
        except Exception:  # answered 500 already; logged here once, with its traceback
            log.exception("%s %s failed", scope.get("method"), path)


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    response = JSONResponse(body, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
