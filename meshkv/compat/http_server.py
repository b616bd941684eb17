"""The controller API served by uvicorn (HTTP/1.1 with keep-alive) from a background thread.

The listening socket is bound when the server is built, so a port in use fails the shim's
start at once (an `OSError`), before anything runs. Bounds: `REQUESTS_IN_FLIGHT_MAX`
connections and requests at once (uvicorn answers 503 past it), an idle keep-alive connection
closes after `KEEP_ALIVE_S`, and `stop` waits at most `STOP_TIMEOUT_S` for requests in flight
(each is bounded by its own deadline).

This module knows nothing of what the calls mean.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn

from meshkv.compat.http_app import Asgi

log = logging.getLogger("vllm.meshkv.compat.http")

REQUESTS_IN_FLIGHT_MAX = 32
"""Connections and requests served at once; more are answered 503 at once."""
KEEP_ALIVE_S = 5.0
"""How long an idle HTTP/1.1 connection is kept open for the next request (uvicorn's default)."""
LISTEN_BACKLOG = 128
STOP_TIMEOUT_S = 5.0
"""How long `stop` waits for requests in flight before closing their connections."""


class HttpServer:
    """Serves an ASGI app on ``host:port`` from a background thread."""

    def __init__(self, app: Asgi, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
            self._socket.listen(LISTEN_BACKLOG)
        except OSError:
            self._socket.close()
            raise
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,  # uvicorn's records go through logging as configured by the host
            access_log=False,
            timeout_keep_alive=int(KEEP_ALIVE_S),
            limit_concurrency=REQUESTS_IN_FLIGHT_MAX,
            timeout_graceful_shutdown=int(STOP_TIMEOUT_S),
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="meshkv-controller-http",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops accepting, then waits for the requests in flight. Safe to call twice."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S + 1.0)
            if self._thread.is_alive():
                log.warning("the HTTP server did not stop within %.0f s", STOP_TIMEOUT_S)
        self._socket.close()
