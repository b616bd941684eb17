"""The lookup paths measured side by side: what a path is, the pyzmq echo floor, and
LMCache's real controller (in its own venv) with simulated LMCache workers.

This module speaks to LMCache over the wire only; meshkv's path is in `meshkv_path`.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import zmq

from tools.bench.common import free_port, read_json_line, stop_process, wait_for_tcp
from tools.bench.lookup.settings import (
    BOOTS,
    CHILD_STOP_TIMEOUT_S,
    CONTROLLER_START_TIMEOUT_S,
    LMCACHE_REQUIREMENT,
    LMCACHE_SIDE,
    LMCACHE_VENV_PACKAGES,
    LOCATION,
    LOOKUP_DEADLINE_S,
    PIP_TIMEOUT_S,
    REQUESTER_INSTANCE_ID,
    SCRIPT,
    VENV_READY_MARK,
    WORKERS_READY_TIMEOUT_S,
)
from tools.bench.lookup.workload import Holdings, Prompt, key_int, lmcache_cases


def ensure_lmcache_venv(venv: Path) -> Path:
    """Makes (once) the venv holding LMCache 0.5.6 and what its controller needs; its python."""
    python = venv / "bin" / "python"
    wanted = json.dumps([LMCACHE_REQUIREMENT, *LMCACHE_VENV_PACKAGES])
    mark = venv / VENV_READY_MARK
    if python.exists() and mark.exists() and mark.read_text() == wanted:
        return python
    print(f"[bench_lookup] building the LMCache venv at {venv} (a few minutes, once)", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    system_python = os.environ.get("BENCH_SYSTEM_PYTHON", "python3")
    subprocess.run([system_python, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", LMCACHE_REQUIREMENT], check=True, timeout=PIP_TIMEOUT_S)
    subprocess.run([*pip, *LMCACHE_VENV_PACKAGES], check=True, timeout=PIP_TIMEOUT_S)
    check = "import lmcache.v1.cache_controller.controller_manager, msgspec, zmq"
    subprocess.run([str(python), "-c", check], check=True, capture_output=True)
    mark.write_text(wanted)
    return python


@dataclass(frozen=True, slots=True)
class Answer:
    """Leading chunks found and who holds each of them."""

    hits: int
    holders: tuple[str, ...] = ()
    error: str | None = None


class RequesterGroup(abc.ABC):
    """`count` independent requesters of one path, driven by one poll loop (no threads).

    A requester starts a lookup with `begin` (which may answer at once, e.g. from the asker's
    own store) and completes it when `on_readable` returns its answer; `abandon` gives up on
    the lookup in flight, as that path's own client does at its timeout.
    """

    @abc.abstractmethod
    def sockets(self) -> Sequence[zmq.Socket]: ...

    @abc.abstractmethod
    def begin(self, slot: int, prompt: Prompt) -> Answer | None: ...

    @abc.abstractmethod
    def on_readable(self, sock: zmq.Socket) -> list[tuple[int, Answer]]: ...

    @abc.abstractmethod
    def abandon(self, slot: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


def run_one(
    group: RequesterGroup, slot: int, prompt: Prompt, deadline_s: float
) -> tuple[Answer | None, int]:
    """One lookup on one requester: (answer or None at the deadline, latency in ns)."""
    poller = zmq.Poller()
    for sock in group.sockets():
        poller.register(sock, zmq.POLLIN)
    t0 = time.perf_counter_ns()
    answer = group.begin(slot, prompt)
    end_ns = t0 + int(deadline_s * 1e9)
    while answer is None:
        left_ms = (end_ns - time.perf_counter_ns()) / 1e6
        if left_ms <= 0:
            group.abandon(slot)
            return None, time.perf_counter_ns() - t0
        for sock, _ in poller.poll(left_ms):
            for done_slot, done in group.on_readable(sock):
                if done_slot == slot:
                    answer = done
    return answer, time.perf_counter_ns() - t0


class LookupPath(abc.ABC):
    """One way of answering "who holds this prompt's chunks", set up for N members."""

    name: str

    @abc.abstractmethod
    def setup(self, holdings: Holdings) -> dict:
        """Starts the path's processes for these holdings; returns facts for the report."""

    @abc.abstractmethod
    def requesters(self, count: int, background: bool = False) -> RequesterGroup:
        """`count` requesters; ``background`` asks for ones that never block the poll loop."""

    @abc.abstractmethod
    def server_pids(self) -> list[int]:
        """Processes whose CPU time counts as the path's server cost."""

    @abc.abstractmethod
    def kill_server(self) -> str:
        """SIGKILLs the part whose loss the failure timeline shows; says what it killed."""

    @abc.abstractmethod
    def teardown(self) -> None: ...

    def cases(self, holdings: Holdings, chunks: int, seed: int) -> dict[str, list[Prompt]]:
        return lmcache_cases(holdings, chunks, seed)

    def servers_asked(self, prompt: Prompt) -> int:
        """Server processes one lookup of this prompt asks (LMCache, echo: the one)."""
        return 1

    def lookup(self, prompt: Prompt, deadline_s: float = LOOKUP_DEADLINE_S) -> Answer | None:
        """One blocking lookup (requester 0); None at the deadline."""
        group = self.requesters(1)
        try:
            return run_one(group, 0, prompt, deadline_s)[0]
        finally:
            group.close()


def encode_lmcache_lookup(hashes: Sequence[int]) -> bytes:
    """msgspec's encoding of LMCache's BatchedP2PLookupMsg (tagged struct, fields in order)."""
    return msgpack.packb(
        {
            "type": "BatchedP2PLookupMsg",
            "hashes": list(hashes),
            "instance_id": REQUESTER_INSTANCE_ID,
            "worker_id": 0,
        }
    )


def decode_lmcache_reply(payload: bytes) -> Answer:
    msg = msgpack.unpackb(payload)
    if msg.get("type") != "BatchedP2PLookupRetMsg":
        return Answer(hits=0, error=f"{msg.get('type')}: {msg.get('error', '')}"[:200])
    instance_id, _location, hits, _peer_url = msg["layout_info"][0]
    return Answer(hits=hits, holders=(instance_id,) * hits)


class DealerGroup(RequesterGroup):
    """One DEALER per requester to one ROUTER, frames ``[b"", payload]`` (LMCacheWorker's way)."""

    def __init__(self, context: zmq.Context, url: str, count: int, decode) -> None:
        self._context = context
        self._url = url
        self._decode = decode
        self._dealers = [self._connect() for _ in range(count)]
        self._slot_of = {id(d): i for i, d in enumerate(self._dealers)}

    def _connect(self) -> zmq.Socket:
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self._url)
        return dealer

    def sockets(self) -> Sequence[zmq.Socket]:
        return self._dealers

    def begin(self, slot: int, prompt: Prompt) -> Answer | None:
        self._dealers[slot].send_multipart([b"", encode_lmcache_lookup(prompt.hashes)])
        return None

    def on_readable(self, sock: zmq.Socket) -> list[tuple[int, Answer]]:
        frames = sock.recv_multipart()
        return [(self._slot_of[id(sock)], self._decode(frames[-1]))]

    def abandon(self, slot: int) -> None:
        # LMCacheWorker on zmq.Again: close the socket, make a new one, report an empty layout.
        old = self._dealers[slot]
        del self._slot_of[id(old)]
        old.close(linger=0)
        self._dealers[slot] = self._connect()
        self._slot_of[id(self._dealers[slot])] = slot

    def close(self) -> None:
        for dealer in self._dealers:
            dealer.close(linger=0)


class LMCachePath(LookupPath):
    """LMCache 0.5.6's controller with simulated workers, all in LMCache's venv."""

    name = "lmcache"

    def __init__(self, venv_python: Path, context: zmq.Context, log_dir: Path) -> None:
        self._python = venv_python
        self._context = context
        self._log_dir = log_dir
        self._controller: subprocess.Popen | None = None
        self._workers: subprocess.Popen | None = None
        self._reply_url = ""
        self._members = 0
        self._askers = None  # LMCacheAskers, made at the first aggregate run

    def setup(self, holdings: Holdings) -> dict:
        n = self._members = holdings.members
        http_port, pull_port, reply_port = free_port(), free_port(), free_port()
        self._reply_url = f"tcp://127.0.0.1:{reply_port}"
        controller_bin = self._python.parent / "lmcache_controller"
        env = {**os.environ, "PYTHONHASHSEED": "123"}
        t0 = time.monotonic()
        with open(self._log_dir / f"lmcache-controller-n{n}-{next(BOOTS)}.log", "wb") as log:
            self._controller = subprocess.Popen(
                [
                    str(controller_bin),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(http_port),
                    "--monitor-ports",
                    json.dumps({"pull": pull_port, "reply": reply_port}),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        wait_for_tcp(http_port, self._controller, CONTROLLER_START_TIMEOUT_S)
        started_s = time.monotonic() - t0
        spec = {
            "reply_url": f"127.0.0.1:{reply_port}",
            "pull_url": f"127.0.0.1:{pull_port}",
            "location": LOCATION,
            "instances": [
                {"instance_id": f"bench-inst-{i:03d}", "keys": [key_int(k) for k in keys]}
                for i, keys in enumerate(holdings.member_keys)
            ],
        }
        with open(self._log_dir / f"lmcache-workers-n{n}-{next(BOOTS)}.log", "wb") as log:
            self._workers = subprocess.Popen(
                [str(self._python), str(LMCACHE_SIDE / "sim_workers.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self._workers.stdin.write((json.dumps(spec) + "\n").encode())
        self._workers.stdin.flush()
        ready = read_json_line(self._workers, WORKERS_READY_TIMEOUT_S)
        check_lmcache_encoding(ready)
        return {
            "controller_start_s": started_s,
            "register_s": ready["register_s"],
            "admit_and_verify_s": ready["admit_and_verify_s"],
            "admit_messages": ready["admit_messages"],
            "encoder_checked_against_msgspec": True,
        }

    def requesters(self, count: int, background: bool = False) -> RequesterGroup:
        return DealerGroup(self._context, self._reply_url, count, decode_lmcache_reply)

    def server_pids(self) -> list[int]:
        return [p.pid for p in (self._controller, self._workers) if p and p.poll() is None]

    def aggregate(self, prompts: Sequence[Prompt], seconds: float, in_flight: int) -> dict:
        """N LMCache workers (one process each) asking the controller at once; CPU of the
        controller, the registered workers' process and every asker counted."""
        from tools.bench.lookup.aggregate import LMCacheAskers

        if self._askers is None:
            self._askers = LMCacheAskers(self._reply_url, self._members, self._log_dir)
        return self._askers.run(prompts, seconds, in_flight, self.server_pids())

    def controller_pid(self) -> list[int]:
        return (
            [self._controller.pid] if self._controller and self._controller.poll() is None else []
        )

    def kill_server(self) -> str:
        self._controller.send_signal(signal.SIGKILL)
        self._controller.wait(CHILD_STOP_TIMEOUT_S)
        return f"lmcache_controller (pid {self._controller.pid}), SIGKILL"

    def teardown(self) -> None:
        if self._askers is not None:
            self._askers.close()
            self._askers = None
        if self._workers is not None and self._workers.poll() is None:
            with contextlib.suppress(OSError):
                self._workers.stdin.close()
        stop_process(self._workers)
        stop_process(self._controller)
        self._workers = self._controller = None


def check_lmcache_encoding(ready: dict) -> None:
    """Our request bytes must be msgspec's, and we must read msgspec's reply bytes right."""
    ours = encode_lmcache_lookup(ready["lookup_request_hashes"])
    if ours.hex() != ready["lookup_request_hex"]:
        raise RuntimeError("BatchedP2PLookupMsg encoding differs from LMCache's msgspec bytes")
    answer = decode_lmcache_reply(bytes.fromhex(ready["lookup_reply_hex"]))
    if answer.hits != 3 or answer.holders[0] != ready["instances"][-1]["instance_id"]:
        raise RuntimeError(f"misread LMCache's BatchedP2PLookupRetMsg: {answer}")


class EchoPath(LookupPath):
    """The floor: a ROUTER that sends every request straight back; same bytes as LMCache's."""

    name = "echo"

    def __init__(self, context: zmq.Context, log_dir: Path) -> None:
        self._context = context
        self._log_dir = log_dir
        self._server: subprocess.Popen | None = None
        self._url = ""

    def setup(self, holdings: Holdings) -> dict:
        if self._server is None or self._server.poll() is not None:
            port = free_port()
            self._url = f"tcp://127.0.0.1:{port}"
            with open(self._log_dir / "echo.log", "wb") as log:
                self._server = subprocess.Popen(
                    [sys.executable, str(SCRIPT), "echo-server", "--port", str(port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            wait_for_tcp(port, self._server, 30)
        return {}

    def requesters(self, count: int, background: bool = False) -> RequesterGroup:
        return DealerGroup(self._context, self._url, count, lambda payload: Answer(hits=-1))

    def server_pids(self) -> list[int]:
        return [self._server.pid] if self._server and self._server.poll() is None else []

    def kill_server(self) -> str:
        self._server.send_signal(signal.SIGKILL)
        self._server.wait(CHILD_STOP_TIMEOUT_S)
        return f"echo server (pid {self._server.pid}), SIGKILL"

    def teardown(self) -> None:
        stop_process(self._server)
        self._server = None


def echo_server(port: int) -> None:
    """The floor's server: recv, send back, nothing else; exits when its parent is gone."""
    parent = os.getppid()
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"tcp://127.0.0.1:{port}")
    while os.getppid() == parent:
        if router.poll(1000):
            router.send_multipart(router.recv_multipart())
    router.close()
    context.term()
