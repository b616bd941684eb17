"""Fuzzing the shim's HTTP API (hypothesis): every malformed request gets a 4xx error.

A real `ControllerShim` (real gossip sockets and HTTP server on 127.0.0.1) is fuzzed two ways:
many generated requests straight into its ASGI app (Starlette's in-process client, the same app
uvicorn serves), and fewer, plus hand-made malformed requests (bad Content-Length, bad targets,
bytes that are not HTTP), over real sockets. A malformed body must never get a 500 (an
unhandled error); an error the app answers has FastAPI's shape (``{"detail": str}``, or
pydantic's list for a 422); a request uvicorn's HTTP parser refuses gets its plain 4xx; and the
server keeps answering.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from meshkv.compat.http_api import UNSUPPORTED
from meshkv.compat.http_app import build_app
from tests.test_compat_http_api import Shim

POSTS = ["/lookup", "/query_instance", "/health", "/check_finish", "/query_worker_info"]
GETS = ["/metrics", "/controller/workers", "/controller/key-stats"]
FIELDS = ["tokens", "ip", "instance_id", "event_id", "worker_ids"]
TIMEOUT_S = 15.0

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-1, 2**33)
    | st.floats()
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=4)
bodies = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | objects.map(lambda v: json.dumps(v).encode())
    | objects.map(lambda v: json.dumps(v)[:-1].encode())  # cut short
)
targets = (
    st.sampled_from(POSTS + GETS + sorted(UNSUPPORTED))
    | st.sampled_from(GETS).map(lambda p: p + "?instance_id=a&worker_id=²")
    | st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), max_size=20).map(
        lambda t: "/" + t
    )
)
MALFORMED = [
    b"[" * 100_000,  # nested too deep for the JSON decoder
    b'{"tokens": [' + b"7" * 5000 + b"]}",  # an integer over Python's 4300-digit limit
    b'{"tokens": [1e400]}',
    b'{"tokens": "\xff\xfe"}',
    b'{"instance_id": "\\ud800"}',
    b"\xef\xbb\xbf{}",
    b"",
]


@pytest.fixture(scope="module")
def shim() -> Iterator[Shim]:
    shim = Shim()
    try:
        yield shim
    finally:
        shim.shim.stop()


def check_reply(status: int, content_type: str, body: bytes) -> None:
    assert status != 500, f"an unhandled error: {body[:200]!r}"
    assert 200 <= status < 600
    if content_type == "application/json":
        parsed = json.loads(body)
        if status >= 400:
            check_detail(parsed.get("detail"))
    else:
        assert status == 200, "errors are JSON"


def check_detail(detail: Any) -> None:
    """FastAPI's error body: a message, or pydantic's list of problems (type, loc, msg)."""
    if isinstance(detail, list):
        assert detail and all({"type", "loc", "msg"} <= set(problem) for problem in detail)
    else:
        assert isinstance(detail, str) and detail


@pytest.fixture(scope="module")
def client(shim: Shim) -> Iterator[TestClient]:
    with TestClient(build_app(shim.shim.api), raise_server_exceptions=False) as in_process:
        yield in_process


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]), target=targets, body=bodies)
@example(method="POST", target="/lookup", body=MALFORMED[0])
@example(method="POST", target="/lookup", body=MALFORMED[1])
@example(method="POST", target="/health", body=MALFORMED[4])
@example(method="GET", target="//[", body=b"")
@example(method="GET", target="/controller/workers?instance_id=a&worker_id=²", body=b"")
def test_every_request_gets_a_reply_never_a_500(
    client: TestClient, method: str, target: str, body: bytes
) -> None:
    target = quote(target, safe="/?&=")  # what an HTTP client puts on the wire
    reply = client.request(
        method, target, content=body, headers={"Content-Type": "application/json"}
    )
    check_reply(reply.status_code, reply.headers.get("content-type", ""), reply.content)
    if method == "POST" and target in POSTS and reply.status_code != 200:
        assert 400 <= reply.status_code < 500, reply.content


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
@pytest.mark.parametrize("path", POSTS)
def test_malformed_bodies_get_4xx_over_http(shim: Shim, path: str, body: bytes) -> None:
    status, parsed, _ = shim.call("POST", path, body)
    if status != 200:
        assert 400 <= status < 500, (status, parsed)
        check_detail(parsed["detail"])


def raw_request(port: int, data: bytes) -> tuple[int, dict[str, Any] | None]:
    """Sends ``data`` as is; returns the status and JSON body of the reply (0 if none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.startswith(b"HTTP/"):  # nothing, or an HTTP/0.9 answer to an HTTP/0.9 request
        return 0, None
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.startswith(b"{") else None


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /health HTTP/1.1\r\nContent-Length: \xc2\xb2\r\n\r\n{}",  # "²": isdigit, not int
        b"POST /health HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}",
        b"POST /health HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n{}",
        b"POST /health HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
        b"GET //[ HTTP/1.1\r\n\r\n",  # urlsplit: "Invalid IPv6 URL"
        b"GET /controller/workers?instance_id=a&worker_id=%C2%B2 HTTP/1.1\r\n\r\n",
        b"POST /lookup HTTP/1.1\r\nContent-Length: 5\r\n\r\n[[[[[",
    ],
)
def test_malformed_http_gets_a_4xx_reply_and_the_server_stays(
    shim: Shim, request_bytes: bytes
) -> None:
    status, body = raw_request(shim.http_port, request_bytes)
    assert 400 <= status < 500, status
    if body is not None:  # the app answered (not uvicorn's HTTP parser): FastAPI's shape
        check_detail(body["detail"])
    assert shim.post("/health", {"instance_id": "x"})[0] == 200


def test_bytes_that_are_not_http_leave_the_server_running(shim: Shim) -> None:
    for junk in (b"\x00\xff" * 100, b"GARBAGE\r\n\r\n", b"GET\r\n\r\n", b"\r\n" * 50):
        raw_request(shim.http_port, junk)  # uvicorn answers 400 or closes: either is fine
    assert shim.post("/health", {"instance_id": "x"})[0] == 200


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(POSTS + sorted(UNSUPPORTED)), body=bodies)
def test_generated_bodies_over_http(shim: Shim, path: str, body: bytes) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", shim.http_port, timeout=TIMEOUT_S)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        check_reply(response.status, response.getheader("Content-Type", ""), response.read())
        assert response.status == 200 or 400 <= response.status < 500 or response.status == 501
    finally:
        connection.close()
