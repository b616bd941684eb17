"""The thin HTTP server around `ControllerApi`: stdlib ``ThreadingHTTPServer``, one thread per
request, a bound on requests in flight and on body size, a socket timeout per connection.

This module knows nothing of what the calls mean.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from meshkv.compat.http_api import ControllerApi, Reply, json_reply

log = logging.getLogger("vllm.meshkv.compat.http")

MAX_BODY_BYTES = 32 << 20
"""Largest request body (a million tokens as JSON is about 7 MB)."""
REQUESTS_IN_FLIGHT_MAX = 32
"""HTTP requests served at once; more are answered 503 at once."""
SOCKET_TIMEOUT_S = 10.0
"""How long a connection may take to send its request."""


class HttpServer:
    """Serves a `ControllerApi` on ``host:port`` from a background thread."""

    def __init__(self, api: ControllerApi, host: str, port: int) -> None:
        in_flight = threading.BoundedSemaphore(REQUESTS_IN_FLIGHT_MAX)

        class Handler(_Handler):
            pass

        Handler.api = api
        Handler.in_flight = in_flight
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = False  # stop() waits for requests in flight
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="meshkv-controller-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops accepting, then waits for the requests in flight (each bounded by deadlines)."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    api: ControllerApi
    in_flight: threading.BoundedSemaphore
    timeout = SOCKET_TIMEOUT_S
    server_version = "meshkv-lmcache-controller"

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        if not self.in_flight.acquire(blocking=False):
            self._send(json_reply(503, {"detail": "too many requests in flight"}))
            return
        try:
            length = self.headers.get("Content-Length", "0")
            if not (length.isascii() and length.isdigit()):  # "²" is a digit to isdigit
                self._send(json_reply(400, {"detail": "Content-Length is not a number"}))
                return
            if int(length) > MAX_BODY_BYTES:
                self._send(json_reply(413, {"detail": f"body over {MAX_BODY_BYTES} bytes"}))
                return
            body = self.rfile.read(int(length)) if int(length) else b""
            self._send(self.api.handle(method, self.path, body))
        finally:
            self.in_flight.release()

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
