"""Side by side: "who holds this prompt's chunks" through LMCache's controller and through meshkv.

One run, all lookup paths measured in the same interleaved rounds (this machine drifts):

- ``lmcache``: LMCache 0.5.6's real ``lmcache_controller`` (in its own venv, made here under
  ``.bench/lmcache-venv``), with N simulated LMCache workers that register and admit K chunk
  hashes each using LMCache's own messages (tools/lmcache_side/sim_workers.py). A lookup is the
  ``BatchedP2PLookupMsg`` round trip an LMCache engine makes before every prefill, over a
  DEALER, as LMCacheWorker sends it (this driver's encoder is checked byte for byte against
  msgspec's at every setup).
- ``meshkv``: N meshkv members holding the same chunks, each chunk at its ring home only; the
  asker is a real `MeshNode` in this process (one of the N) and a lookup is its
  `MeshNode.lookup`: ring homes computed locally, one `lookup` to every home at once, chunks
  homed at the asker answered from its own store. The members join through meshkv's own
  ``lmcache_controller`` shim, named in their configs as LMCache configs name the controller.
- ``echo``: a plain pyzmq DEALER/ROUTER echo of the LMCache request bytes: the floor.

Measured for N in {2, 8, 32, 64} members and prompts of {4, 32, 128} chunks: lookup latency
(p50, p99) for prompts held by the first-registered instance, by the last-registered one, a
miss, and (meshkv) prompts homed at the asker; server CPU per lookup (all server processes,
from /proc schedstat, with /proc stat utime+stime as a coarse cross-check, also net of the
idle rate); the client's CPU per lookup; throughput with 1, 8 and 32 concurrent requesters
(closed loop, the same prompt mix for every path). LMCache's requesters are DEALERs driven by
one poll loop; meshkv's concurrent requesters are threads of the asker calling
`MeshNode.lookup`, each with its own client, as concurrent callers of one member are. Then the
failure timeline at one N: LMCache's controller and meshkv's shim are SIGKILLed together and
every lookup of the next 30 s is recorded (answer, miss, timeout, error, time to answer);
LMCache is shown with its default 30 s request timeout and with a tuned 500 ms one.

Writes DIR/lookup.json and DIR/lookup.png and prints the table, the meshkv/LMCache ratios and
the issue's targets, all from this one run.

    python tools/bench_lookup.py --out bench-results/lookup
    python tools/bench_lookup.py --quick --out bench-results/quick   # ~2 minute smoke run

meshkv code never imports LMCache: everything LMCache runs in its venv's processes, and this
driver speaks to it over the wire only.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import hashlib
import itertools
import json
import os
import platform
import queue
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zmq

REPO_ROOT = Path(__file__).resolve().parent.parent
LMCACHE_SIDE = Path(__file__).resolve().parent / "lmcache_side"
DEFAULT_VENV = REPO_ROOT / ".bench" / "lmcache-venv"

LMCACHE_REQUIREMENT = "lmcache==0.5.6"
# What LMCache 0.5.6's controller imports at start, found by trying (torch is imported by
# lmcache.v1.metadata and must be the CPU wheel: PyPI's default build pulls ~5 GB of CUDA).
LMCACHE_VENV_PACKAGES = (
    "torch==2.13.0+cpu",
    "transformers>=5.4",
    "sortedcontainers",
    "aiofile",
    "aiofiles",
    "redis",
    "msgspec",
    "pyzmq",
    "fastapi",
    "uvicorn",
    "pyyaml",
    "requests",
    "prometheus_client",
    "cachetools",
    "py-cpuinfo",
    "psutil",
    "aiohttp",
)
VENV_READY_MARK = ".meshkv-bench-ready"
PIP_TIMEOUT_S = 1800

MEMBER_COUNTS = (2, 8, 32, 64)
PROMPT_CHUNKS = (4, 32, 128)
CONCURRENCIES = (1, 8, 32)
KEYS_PER_MEMBER = 2000
LOCATION = "LocalCPUBackend"  # what LMCache's LocalCPUBackend reports as its location
REQUESTER_INSTANCE_ID = "bench-requester"
PROMPTS_PER_CELL = 32  # distinct prompts cycled through per (case, prompt size)
THROUGHPUT_PROMPT_CHUNKS = 32

CONTROLLER_START_TIMEOUT_S = 120.0
WORKERS_READY_TIMEOUT_S = 300.0
CHILD_STOP_TIMEOUT_S = 5.0
LOOKUP_DEADLINE_S = 2.0  # a measured lookup slower than this counts as a timeout
LMCACHE_RECV_TIMEOUT_MS = 30_000  # LMCache's DEFAULT_SOCKET_RECV_TIMEOUT_MS for worker requests
SHORT_LMCACHE_RECV_TIMEOUT_MS = 500  # a tuned LMCache client, for the failure timeline

BOOTS = itertools.count()  # numbers log files, so a second setup of the same N keeps the first's

TARGETS = {
    "p50_ratio_at_8": 0.75,
    "p50_ratio_at_64": 0.5,
    "p50_over_echo": 1.3,
    "cpu_ratio": 0.5,
    "throughput_ratio_32_at_64": 2.0,
}


# ---------------------------------------------------------------- small process utilities


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_tcp(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    """Returns once 127.0.0.1:port accepts a connection; raises if the process dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listened on port {port} within {timeout_s} s")


def read_json_line(process: subprocess.Popen, timeout_s: float) -> dict:
    """One JSON line from a child's stdout, bounded in time."""
    deadline = time.monotonic() + timeout_s
    buffer = b""
    fd = process.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"{process.args!r} closed stdout (rc={process.poll()})")
            buffer += chunk
            if b"\n" in buffer:
                return json.loads(buffer.split(b"\n", 1)[0])
        elif process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
    raise TimeoutError(f"{process.args!r} gave no ready line within {timeout_s} s")


def stop_process(process: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after a bound; always reaps."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(CHILD_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(CHILD_STOP_TIMEOUT_S)


def _task_dirs(pid: int) -> Iterator[Path]:
    with contextlib.suppress(OSError):
        yield from Path(f"/proc/{pid}/task").iterdir()


def cpu_ns(pids: Sequence[int]) -> tuple[int, int]:
    """CPU time of the processes: (schedstat ns over all threads, stat utime+stime in ns)."""
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    sched = 0
    ticks = 0
    for pid in pids:
        for task in _task_dirs(pid):
            with contextlib.suppress(OSError, ValueError, IndexError):
                sched += int((task / "schedstat").read_text().split()[0])
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return sched, ticks * tick_ns


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


# ---------------------------------------------------------------- the LMCache venv


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


# ---------------------------------------------------------------- workload


def key_int(key: bytes) -> int:
    """LMCache's chunk hash for a meshkv key: the same 64 bits the ring positions by."""
    return int.from_bytes(key[:8], "big")


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt's chunk keys, with the number of leading chunks some member holds."""

    keys: tuple[bytes, ...]
    hashes: tuple[int, ...]
    expected_hits: int


@dataclass(frozen=True, slots=True)
class Holdings:
    """Which member holds which keys: member i (registration order) holds keys[i]."""

    member_keys: tuple[tuple[bytes, ...], ...]

    @property
    def members(self) -> int:
        return len(self.member_keys)


CHAIN_CHUNKS = 128
"""Chunks per generated prompt chain (the largest prompt measured); a prompt of n chunks is the
head of one chain, as an engine's prefix is."""
CHAIN_TOKENS = 16  # tokens per chunk of the generated chains (only the keys matter here)


def prompt_chains(count: int, rng: random.Random) -> list[list[bytes]]:
    """Chunk keys of ``count`` random prompts of CHAIN_CHUNKS chunks, derived as the connector
    derives them (`meshkv.keys.chunk_keys`: prefix-chained, 16 chunks a ring position)."""
    from meshkv.keys import chunk_keys, root_key

    root = root_key(bytes(16))
    return [
        chunk_keys(root, [rng.randrange(1 << 32) for _ in range(CHAIN_CHUNKS * CHAIN_TOKENS)],
                   CHAIN_TOKENS)
        for _ in range(count)
    ]  # fmt: skip


def make_holdings(members: int, keys_per_member: int, seed: int) -> Holdings:
    """Each member holds whole prompt chains (the last one cut to keys_per_member)."""
    rng = random.Random(seed)
    chains = -(-keys_per_member // CHAIN_CHUNKS)
    return Holdings(
        member_keys=tuple(
            tuple(key for chain in prompt_chains(chains, rng) for key in chain)[:keys_per_member]
            for _ in range(members)
        )
    )


def make_prompt(keys: Sequence[bytes], expected_hits: int) -> Prompt:
    return Prompt(keys=tuple(keys), hashes=tuple(map(key_int, keys)), expected_hits=expected_hits)


def lmcache_cases(holdings: Holdings, chunks: int, seed: int) -> dict[str, list[Prompt]]:
    """Prompts for the controller's three cases: held by the first or last instance, a miss.
    A prompt is the head of one of the member's chains."""
    if chunks > CHAIN_CHUNKS:
        raise ValueError(f"prompts of {chunks} chunks exceed the {CHAIN_CHUNKS}-chunk chains")
    rng = random.Random(seed * 1000 + chunks)
    out: dict[str, list[Prompt]] = {}
    for case, member in (("hit_first", 0), ("hit_last", holdings.members - 1)):
        keys = holdings.member_keys[member]
        heads = range(0, len(keys) - chunks + 1, CHAIN_CHUNKS)
        out[case] = [
            make_prompt(keys[start : start + chunks], chunks)
            for start in (rng.choice(heads) for _ in range(PROMPTS_PER_CELL))
        ]
    out["miss"] = [make_prompt(chain[:chunks], 0) for chain in prompt_chains(PROMPTS_PER_CELL, rng)]
    return out


# ---------------------------------------------------------------- lookup paths


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

    def setup(self, holdings: Holdings) -> dict:
        n = holdings.members
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

    def controller_pid(self) -> list[int]:
        return (
            [self._controller.pid] if self._controller and self._controller.poll() is None else []
        )

    def kill_server(self) -> str:
        self._controller.send_signal(signal.SIGKILL)
        self._controller.wait(CHILD_STOP_TIMEOUT_S)
        return f"lmcache_controller (pid {self._controller.pid}), SIGKILL"

    def teardown(self) -> None:
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
                    [sys.executable, __file__, "echo-server", "--port", str(port)],
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


# ---------------------------------------------------------------- meshkv


MESH_CHUNK_BYTES = 64  # chunk payload size in the members' stores (lookups never read it)
MESH_STORE_GIB = 0.05
MESH_READY_TIMEOUT_S = 300.0
MESH_START_WAVE = 8
"""Members started at once. 64 processes importing together on 2 cores starve the gossip of
those already running for a minute; suspicions, refutations and ring changes then feed on the
CPU they cost, and the mesh took longer than MESH_READY_TIMEOUT_S to settle."""
MESH_CONVERGE_POLL_S = 0.05
MESH_STOP_TIMEOUT_S = 15.0  # all members together, then SIGKILL
MESH_NAMESPACE = "bench-lookup"
MESH_SEED_ID = "bench-seed"
MESH_ASKER_ID = "bench-asker"


def mesh_config(instance_id: str, seeds: Sequence[str], controller: Sequence[str] = ()):
    """A member on 127.0.0.1 with any free ports, tcp channel, one-host gossip timing.

    ``controller``: the shim's pull and reply addresses, given the way an LMCache config gives
    them (enable_controller, controller_pull_url, controller_reply_url).
    """
    from meshkv.config import MeshConfig

    return MeshConfig(
        lmcache_instance_id=instance_id,
        p2p_host="127.0.0.1",
        p2p_init_ports=0,
        p2p_lookup_ports=0,
        transfer_channel="tcp",
        max_local_cpu_size=MESH_STORE_GIB,
        mesh_seeds=list(seeds),
        mesh_gossip_profile="local",
        enable_p2p=False,  # each member stores only its own home keys: nothing to push
        enable_controller=bool(controller),
        controller_pull_url=controller[0] if controller else None,
        controller_reply_url=controller[1] if controller else None,
    )


def chunk_payload(key: bytes) -> bytes:
    return (key * (MESH_CHUNK_BYTES // len(key) + 1))[:MESH_CHUNK_BYTES]


def wait_for_ring(node, members: int, timeout_s: float) -> int:
    """Polls until the node's ring has `members` members; returns the count it saw."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = len(node.membership.ring().current.members)
        if seen >= members or time.monotonic() >= deadline:
            return seen
        time.sleep(MESH_CONVERGE_POLL_S)


def start_mesh_node(spec: dict):
    """A real MeshNode holding spec's keys (its ring home keys), started and joined."""
    from meshkv.node import MeshNode

    node = MeshNode(
        mesh_config(spec["instance_id"], spec["seeds"], spec.get("controller", ())),
        namespace=MESH_NAMESPACE,
        role=spec["role"],
    )
    node.start()
    keys = [bytes.fromhex(k) for k in spec["keys"]]
    stored = node.put(keys, [chunk_payload(k) for k in keys]) if keys else 0
    if stored != len(keys):
        raise RuntimeError(f"{node.name} stored {stored} of its {len(keys)} home keys")
    return node


def mesh_member(spec_path: Path) -> None:
    """(Subprocess) one meshkv member: spec from a file, ready line on stdout, stop at EOF."""
    spec = json.loads(spec_path.read_text())
    node = start_mesh_node(spec)
    ready = {"gossip": node.gossip_address, "data": node.data_address}
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    sys.stdin.read()
    node.stop(leave=False)


class NodeLookupGroup(RequesterGroup):
    """Requesters calling the asker's `MeshNode.lookup` (ring, local store, homes' `lookup`).

    In the poll loop's own thread (``background`` False: the answer is there when `begin`
    returns, no thread hop in the latency) or one thread per requester, each with its own
    RequestClient as MeshNode gives every calling thread; answers come back through an
    inproc socket the poll loop watches.
    """

    def __init__(self, node, context: zmq.Context, count: int, background: bool) -> None:
        self._node = node
        self._background = background
        self._pull: zmq.Socket | None = None
        if background:
            self._address = f"inproc://bench-node-lookups-{id(self)}"
            self._pull = context.socket(zmq.PULL)
            self._pull.bind(self._address)
            self._context = context
            self._done: queue.SimpleQueue[tuple[int, Answer]] = queue.SimpleQueue()
            self._pool = ThreadPoolExecutor(count, thread_name_prefix="bench-requester")
            self._thread_sockets = threading.local()
            self._pushes: list[zmq.Socket] = []
            self._pushes_lock = threading.Lock()

    def _ask(self, prompt: Prompt) -> Answer:
        try:
            return Answer(hits=self._node.lookup(prompt.keys, timeout_s=LOOKUP_DEADLINE_S))
        except Exception as exc:  # an escaped error is a result to count, not a crash
            return Answer(hits=0, error=f"{type(exc).__name__}: {exc}"[:200])

    def sockets(self) -> Sequence[zmq.Socket]:
        return [self._pull] if self._pull is not None else []

    def begin(self, slot: int, prompt: Prompt) -> Answer | None:
        if not self._background:
            return self._ask(prompt)
        self._pool.submit(self._run, slot, prompt)
        return None

    def _run(self, slot: int, prompt: Prompt) -> None:
        answer = self._ask(prompt)
        push = getattr(self._thread_sockets, "push", None)
        if push is None:
            push = self._thread_sockets.push = self._context.socket(zmq.PUSH)
            push.connect(self._address)
            with self._pushes_lock:
                self._pushes.append(push)
        self._done.put((slot, answer))
        push.send(b"")

    def on_readable(self, sock: zmq.Socket) -> list[tuple[int, Answer]]:
        with contextlib.suppress(zmq.Again):
            while True:
                sock.recv(zmq.NOBLOCK)
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self._done.get_nowait())
        return out

    def abandon(self, slot: int) -> None:
        """Nothing to do: MeshNode.lookup keeps its own deadline and always returns."""

    def close(self) -> None:
        if self._background:
            self._pool.shutdown(wait=True)
            for push in self._pushes:
                push.close(linger=0)
            self._pull.close(linger=0)


def meshkv_shim_missing() -> str | None:
    """Why meshkv's lmcache_controller shim cannot run here, or None."""
    try:
        import meshkv.compat.controller_cli  # noqa: F401
    except Exception as exc:
        return f"import meshkv.compat.controller_cli failed: {type(exc).__name__}: {exc}"
    return None


class MeshkvPath(LookupPath):
    """N meshkv members (the asker, in this process, and N-1 member processes) plus a seed.

    Every chunk is stored at its ring home only (names are fixed, so the driver computes the
    ring the members will form). The seed is meshkv's own ``lmcache_controller`` shim, which
    the members name as LMCache configs do (enable_controller, controller_pull_url,
    controller_reply_url); where the shim is not importable, a member of role "seed" (on no
    ring, as the shim's members are) stands in. The failure timeline kills it.
    """

    name = "meshkv"

    def __init__(self, context: zmq.Context, log_dir: Path, use_shim: bool = True) -> None:
        self._context = context
        self._log_dir = log_dir
        self.use_shim = use_shim
        self._seed: subprocess.Popen | None = None
        self._members: list[subprocess.Popen] = []
        self._asker = None
        self._asker_name = f"{MESH_ASKER_ID}/0"
        self._homes: dict[bytes, str] = {}
        self._ring = None
        self.seed_kind = ""

    def _spawn(self, spec: dict, log_name: str) -> subprocess.Popen:
        """A member process; its spec goes by file (a pipe would block on a slow start)."""
        spec_path = self._log_dir / f"{log_name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        with open(self._log_dir / log_name, "wb") as log:
            return subprocess.Popen(
                [sys.executable, __file__, "mesh-member", "--spec", str(spec_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )

    def setup(self, holdings: Holdings) -> dict:
        from meshkv.config import MeshConfig
        from meshkv.node.membership import ROLE_ENGINE, ROLE_SEED
        from meshkv.ring import HashRing

        n = holdings.members
        t0 = time.monotonic()
        ids = [MESH_ASKER_ID] + [f"bench-mesh-{i:03d}" for i in range(1, n)]
        ring = self._ring = HashRing([f"{i}/0" for i in ids], MeshConfig().mesh_vnodes)
        every_key = [k for keys in holdings.member_keys for k in keys]
        by_home: dict[str, list[str]] = {f"{i}/0": [] for i in ids}
        self._homes = {}
        for key in every_key:
            home = ring.home(key)
            self._homes[key] = home
            by_home[home].append(key.hex())
        join = self._start_seed(n, ROLE_SEED)
        self._members = []
        for wave in range(1, n, MESH_START_WAVE):  # a wave starts once the last is running
            started = [
                self._spawn(
                    {"instance_id": i, "role": ROLE_ENGINE, **join, "keys": by_home[f"{i}/0"]},
                    f"meshkv-{i}-n{n}-{next(BOOTS)}.log",
                )
                for i in ids[wave : wave + MESH_START_WAVE]
            ]
            self._members += started
            for member in started:  # each has started and stored its home keys
                read_json_line(member, MESH_READY_TIMEOUT_S)
        self._asker = start_mesh_node(
            {
                "instance_id": MESH_ASKER_ID,
                "role": ROLE_ENGINE,
                **join,
                "keys": by_home[self._asker_name],
            }
        )
        started_s = time.monotonic() - t0
        seen = wait_for_ring(self._asker, n, MESH_READY_TIMEOUT_S)
        if tuple(sorted(self._asker.membership.ring().current.members)) != tuple(
            sorted(ring.members)
        ):
            raise RuntimeError(
                f"the asker's ring has {seen} of {n} members after {MESH_READY_TIMEOUT_S} s"
            )
        return {
            "members": n,
            "start_s": started_s,
            "start_and_converge_s": time.monotonic() - t0,
            "asker_home_keys": len(by_home[self._asker_name]),
            "keys_per_home_max": max(len(v) for v in by_home.values()),
            "keys_per_home_min": min(len(v) for v in by_home.values()),
            "transfer_channel": "tcp",
            "seed": self.seed_kind,
        }

    def _start_seed(self, n: int, seed_role: str) -> dict:
        """Starts the shim (or a seed member); returns how members are told to join."""
        shim_ok = self.use_shim and meshkv_shim_missing() is None
        self.seed_kind = "shim" if shim_ok else "seed member"
        if self.seed_kind == "seed member":
            self._seed = self._spawn(
                {
                    "instance_id": MESH_SEED_ID,
                    "role": seed_role,
                    "seeds": [],
                    "keys": [],
                },
                f"meshkv-seed-n{n}-{next(BOOTS)}.log",
            )
            return {"seeds": [read_json_line(self._seed, MESH_READY_TIMEOUT_S)["gossip"]]}
        http_port, pull_port, reply_port = free_port(), free_port(), free_port()
        with open(self._log_dir / f"meshkv-shim-n{n}-{next(BOOTS)}.log", "wb") as log:
            self._seed = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meshkv.compat.controller_cli",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(http_port),
                    "--monitor-ports",
                    json.dumps({"pull": pull_port, "reply": reply_port}),
                    "mesh_gossip_profile=local",
                    "mesh_state_file=",
                ],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_tcp(http_port, self._seed, CONTROLLER_START_TIMEOUT_S)
        return {"seeds": [], "controller": [f"127.0.0.1:{pull_port}", f"127.0.0.1:{reply_port}"]}

    def cases(self, holdings: Holdings, chunks: int, seed: int) -> dict[str, list[Prompt]]:
        """LMCache's three cases (same prompts) plus "local": every chunk homed at the asker."""
        out = lmcache_cases(holdings, chunks, seed)
        mine = [k for k, home in self._homes.items() if home == self._asker_name]
        rng = random.Random(seed * 1000 + chunks + 1)
        if len(mine) >= chunks:
            out["local"] = [
                make_prompt(rng.sample(mine, chunks), chunks) for _ in range(PROMPTS_PER_CELL)
            ]
        return out

    def requesters(self, count: int, background: bool = False) -> RequesterGroup:
        return NodeLookupGroup(self._asker, self._context, count, background or count > 1)

    def servers_asked(self, prompt: Prompt) -> int:
        """Distinct homes other than the asker among the prompt's keys: MeshNode.lookup asks
        them all at once (past the asker's leading local chunks)."""
        return len({self._ring.home(k) for k in prompt.keys} - {self._asker_name})

    def server_pids(self) -> list[int]:
        return [p.pid for p in (self._seed, *self._members) if p and p.poll() is None]

    def kill_server(self) -> str:
        self._seed.send_signal(signal.SIGKILL)
        self._seed.wait(CHILD_STOP_TIMEOUT_S)
        if self.seed_kind == "shim":
            return f"meshkv's lmcache_controller shim (pid {self._seed.pid}), SIGKILL"
        return (
            f"meshkv seed member (pid {self._seed.pid}, role seed, on no ring, as the "
            "lmcache_controller shim's members are), SIGKILL"
        )

    def teardown(self) -> None:
        members = [p for p in (*self._members, self._seed) if p is not None]
        for process in members:  # stdin EOF: members stop; SIGTERM: the shim leaves
            if process.poll() is None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
        if self._seed is not None and self._seed.poll() is None:
            self._seed.terminate()
        deadline = time.monotonic() + MESH_STOP_TIMEOUT_S
        for process in members:  # all stop at once; what outlives the bound is killed
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
        for process in members:
            if process.poll() is None:
                process.kill()
                process.wait(CHILD_STOP_TIMEOUT_S)
        if self._asker is not None:
            self._asker.stop(leave=False)
        self._members, self._seed, self._asker = [], None, None


# ---------------------------------------------------------------- measurement loops


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


@dataclass
class Cell:
    """Accumulates one (path, N, case, prompt size) cell over rounds."""

    latencies_ns: list[int] = field(default_factory=list)
    lookups: int = 0
    wrong: int = 0
    timeouts: int = 0
    errors: int = 0
    server_cpu_ns: int = 0
    server_cpu_stat_ns: int = 0
    client_cpu_ns: int = 0
    block_wall_ns: int = 0
    servers_asked: float = 1.0

    def summary(self, idle_cpu_ns_per_s: float) -> dict:
        lat = sorted(self.latencies_ns)
        net_cpu = self.server_cpu_ns - idle_cpu_ns_per_s * self.block_wall_ns / 1e9
        return {
            "lookups": self.lookups,
            "servers_asked_mean": self.servers_asked,
            "p50_us": percentile(lat, 0.5) / 1e3,
            "p99_us": percentile(lat, 0.99) / 1e3,
            "mean_us": statistics.fmean(lat) / 1e3 if lat else float("nan"),
            "wrong": self.wrong,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "server_cpu_us_per_lookup": self.server_cpu_ns / max(1, self.lookups) / 1e3,
            "server_cpu_us_per_lookup_net_of_idle": net_cpu / max(1, self.lookups) / 1e3,
            "server_cpu_stat_us_per_lookup": self.server_cpu_stat_ns / max(1, self.lookups) / 1e3,
            "client_cpu_us_per_lookup": self.client_cpu_ns / max(1, self.lookups) / 1e3,
        }


def latency_block(
    path: LookupPath, group: RequesterGroup, prompts: Sequence[Prompt], count: int, cell: Cell
) -> None:
    pids = path.server_pids()
    cpu0 = cpu_ns(pids)
    client0 = cpu_ns([os.getpid()])[0]
    t0 = time.perf_counter_ns()
    for i in range(count):
        prompt = prompts[i % len(prompts)]
        answer, latency = run_one(group, 0, prompt, LOOKUP_DEADLINE_S)
        cell.lookups += 1
        if answer is None:
            cell.timeouts += 1
            continue
        cell.latencies_ns.append(latency)
        if answer.error:
            cell.errors += 1
        elif answer.hits >= 0 and answer.hits != prompt.expected_hits:
            cell.wrong += 1
    cell.block_wall_ns += time.perf_counter_ns() - t0
    cell.client_cpu_ns += cpu_ns([os.getpid()])[0] - client0
    cpu1 = cpu_ns(pids)
    cell.server_cpu_ns += cpu1[0] - cpu0[0]
    cell.server_cpu_stat_ns += cpu1[1] - cpu0[1]


@dataclass
class ThroughputCell:
    completed: int = 0
    wall_ns: int = 0
    server_cpu_ns: int = 0
    wrong: int = 0
    errors: int = 0

    def summary(self, idle_cpu_ns_per_s: float) -> dict:
        net_cpu = self.server_cpu_ns - idle_cpu_ns_per_s * self.wall_ns / 1e9
        return {
            "lookups": self.completed,
            "lookups_per_s": self.completed / (self.wall_ns / 1e9) if self.wall_ns else 0.0,
            "server_cpu_us_per_lookup": self.server_cpu_ns / max(1, self.completed) / 1e3,
            "server_cpu_us_per_lookup_net_of_idle": net_cpu / max(1, self.completed) / 1e3,
            "wrong": self.wrong,
            "errors": self.errors,
        }


def throughput_block(
    path: LookupPath,
    group: RequesterGroup,
    concurrency: int,
    prompts: Sequence[Prompt],
    duration_s: float,
    cell: ThroughputCell,
) -> None:
    """Closed loop: `concurrency` requesters each keep one lookup in flight for duration_s."""
    poller = zmq.Poller()
    for sock in group.sockets():
        poller.register(sock, zmq.POLLIN)
    pids = path.server_pids()
    rng = random.Random(concurrency)
    in_flight: dict[int, Prompt] = {}

    def start(slot: int) -> None:
        while time.perf_counter_ns() < end_ns:  # answers given at once count and go on
            prompt = prompts[rng.randrange(len(prompts))]
            done = group.begin(slot, prompt)
            if done is None:
                in_flight[slot] = prompt
                return
            record(prompt, done)

    def record(prompt: Prompt, answer: Answer) -> None:
        cell.completed += 1
        if answer.error:
            cell.errors += 1
        elif answer.hits >= 0 and answer.hits != prompt.expected_hits:
            cell.wrong += 1

    cpu0 = cpu_ns(pids)[0]
    t0 = time.perf_counter_ns()
    end_ns = t0 + int(duration_s * 1e9)
    for slot in range(concurrency):
        start(slot)
    while time.perf_counter_ns() < end_ns:
        for sock, _ in poller.poll(max(1.0, (end_ns - time.perf_counter_ns()) / 1e6)):
            for slot, answer in group.on_readable(sock):
                record(in_flight.pop(slot), answer)
                if time.perf_counter_ns() < end_ns:
                    start(slot)
    cell.wall_ns += time.perf_counter_ns() - t0
    cell.server_cpu_ns += cpu_ns(pids)[0] - cpu0
    drain_deadline = time.monotonic() + LOOKUP_DEADLINE_S
    while in_flight and time.monotonic() < drain_deadline:  # let stragglers land, not counted
        for sock, _ in poller.poll(100):
            for slot, _answer in group.on_readable(sock):
                in_flight.pop(slot, None)
    for slot in list(in_flight):
        group.abandon(slot)


def idle_cpu_rate(path: LookupPath, seconds: float) -> float:
    """Server CPU ns per second while nobody asks anything (gossip, timers)."""
    pids = path.server_pids()
    c0 = cpu_ns(pids)[0]
    time.sleep(seconds)
    return (cpu_ns(pids)[0] - c0) / seconds


SHARED_CASES = ("hit_first", "hit_last", "miss")
"""The cases every path answers with the same prompts: the throughput mix uses only these."""


def measure_member_count(
    paths: Sequence[LookupPath], holdings: Holdings, args: argparse.Namespace, seed: int
) -> dict:
    """All paths, all cases, all prompt sizes and concurrencies, interleaved in rounds.

    A path that cannot be set up at this N is recorded with its error and left out of it.
    """
    setup: dict[str, dict] = {}
    setup_errors: dict[str, str] = {}
    live: list[LookupPath] = []
    for p in paths:
        try:
            setup[p.name] = p.setup(holdings)
            live.append(p)
        except Exception as exc:
            setup_errors[p.name] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"[bench_lookup] N={holdings.members}: {p.name} not measured: {exc}")
            p.teardown()
    paths = live
    idle = {p.name: idle_cpu_rate(p, args.idle_s) for p in paths}
    cases = {
        (p.name, chunks): p.cases(holdings, chunks, seed) for p in paths for chunks in args.chunks
    }
    mixes = {
        p.name: [
            prompt
            for case in SHARED_CASES
            for prompt in cases[(p.name, THROUGHPUT_PROMPT_CHUNKS)][case]
        ]
        for p in paths
    }
    latency_groups = {p.name: p.requesters(1) for p in paths}
    load_groups = {
        (p.name, c): p.requesters(c, background=c > 1) for p in paths for c in args.concurrency
    }
    cells: dict[tuple[str, str, int], Cell] = {}
    tput: dict[tuple[str, int], ThroughputCell] = {}
    rng = random.Random(seed)
    try:
        for p in paths:  # open and warm every connection once
            warm = cases[(p.name, THROUGHPUT_PROMPT_CHUNKS)]["hit_first"][0]
            run_one(latency_groups[p.name], 0, warm, LOOKUP_DEADLINE_S)
            for c in args.concurrency:
                throughput_block(p, load_groups[(p.name, c)], c, [warm], 0.05, ThroughputCell())
        for round_index in range(args.rounds):
            items: list[tuple] = [
                ("latency", p, case, chunks)
                for p in paths
                for chunks in args.chunks
                for case in cases[(p.name, chunks)]
            ]
            items += [("throughput", p, c) for p in paths for c in args.concurrency]
            rng.shuffle(items)
            for item in items:
                if item[0] == "latency":
                    _, p, case, chunks = item
                    cell = cells.setdefault((p.name, case, chunks), Cell())
                    prompts = cases[(p.name, chunks)][case]
                    cell.servers_asked = statistics.fmean(map(p.servers_asked, prompts))
                    latency_block(p, latency_groups[p.name], prompts, args.block, cell)
                else:
                    _, p, c = item
                    tcell = tput.setdefault((p.name, c), ThroughputCell())
                    group = load_groups[(p.name, c)]
                    throughput_block(p, group, c, mixes[p.name], args.throughput_s, tcell)
            print(f"[bench_lookup] N={holdings.members} round {round_index + 1}/{args.rounds}")
    finally:
        for group in [*latency_groups.values(), *load_groups.values()]:
            group.close()
    return {
        "members": holdings.members,
        "setup": setup,
        "setup_errors": setup_errors,
        "idle_server_cpu_ms_per_s": {k: v / 1e6 for k, v in idle.items()},
        "latency": [
            {"path": name, "case": case, "chunks": chunks, **cell.summary(idle[name])}
            for (name, case, chunks), cell in sorted(cells.items())
        ],
        "throughput": [
            {"path": name, "concurrency": c, **cell.summary(idle[name])}
            for (name, c), cell in sorted(tput.items())
        ],
    }


# ---------------------------------------------------------------- failure timeline


@dataclass
class Lane:
    """One requester of one path asking steadily through the failure."""

    label: str
    path: LookupPath
    group: RequesterGroup
    prompts: Sequence[Prompt]
    deadline_s: float
    events: list[dict] = field(default_factory=list)
    in_flight: Prompt | None = None
    started_ns: int = 0
    next_start_ns: int = 0


def failure_timeline(
    lanes: Sequence[Lane], kill_paths: Sequence[LookupPath], args: argparse.Namespace
) -> dict:
    """Lookups every interval on every lane; the servers die at the kill; runs after_s more.

    Each lane waits for its lookup's answer or its own deadline (a blocked client is part of
    what a failure looks like) before the next. No lookup starts after after_s; those in
    flight get failure_drain_s more to end, and one still waiting then is recorded as
    "waiting" with the time it had waited so far.
    """
    poller = zmq.Poller()
    owner: dict[int, Lane] = {}

    def arm(lane: Lane) -> None:
        for sock in lane.group.sockets():
            poller.register(sock, zmq.POLLIN)
            owner[id(sock)] = lane

    def disarm(lane: Lane) -> None:
        for sock in lane.group.sockets():
            poller.unregister(sock)
            owner.pop(id(sock), None)

    for lane in lanes:
        arm(lane)
    interval_ns = int(args.failure_interval_s * 1e9)
    t0 = time.perf_counter_ns()
    kill_ns = t0 + int(args.failure_before_s * 1e9)
    end_ns = kill_ns + int(args.failure_after_s * 1e9)
    killed: list[dict] = []
    rng = random.Random(7)

    def finish(lane: Lane, answer: Answer | None, now: int, outcome: str = "") -> None:
        prompt = lane.in_flight
        if outcome:
            pass
        elif answer is None:
            outcome = "timeout"
        elif answer.error:
            outcome = "error"
        elif answer.hits < 0 or answer.hits == prompt.expected_hits:  # echo: any reply
            outcome = "answer"
        elif answer.hits == 0:
            outcome = "miss"
        else:
            outcome = "partial"
        lane.events.append(
            {
                "t_s": (lane.started_ns - kill_ns) / 1e9,
                "latency_ms": (now - lane.started_ns) / 1e6,
                "outcome": outcome,
            }
        )
        lane.in_flight = None
        lane.next_start_ns = lane.started_ns + interval_ns

    drain_end_ns = end_ns + int(args.failure_drain_s * 1e9)
    while (now := time.perf_counter_ns()) < drain_end_ns:
        if now >= end_ns and all(lane.in_flight is None for lane in lanes):
            break
        if not killed and now >= kill_ns:
            for path in kill_paths:
                killed.append({"path": path.name, "what": path.kill_server()})
        for lane in lanes:
            if lane.in_flight is not None and now - lane.started_ns > lane.deadline_s * 1e9:
                disarm(lane)
                lane.group.abandon(0)
                arm(lane)
                finish(lane, None, now)
            if lane.in_flight is None and lane.next_start_ns <= now < end_ns:
                lane.in_flight = lane.prompts[rng.randrange(len(lane.prompts))]
                lane.started_ns = now
                answer = lane.group.begin(0, lane.in_flight)
                if answer is not None:
                    finish(lane, answer, time.perf_counter_ns())
        for sock, _ in poller.poll(2):
            lane = owner[id(sock)]
            for _slot, answer in lane.group.on_readable(sock):
                if lane.in_flight is not None:
                    finish(lane, answer, time.perf_counter_ns())
    for lane in lanes:
        if lane.in_flight is not None:
            finish(lane, None, time.perf_counter_ns(), outcome="waiting")
    return {
        "killed": killed,
        "before_s": args.failure_before_s,
        "after_s": args.failure_after_s,
        "interval_s": args.failure_interval_s,
        "lanes": [
            {
                "label": lane.label,
                "path": lane.path.name,
                "deadline_s": lane.deadline_s,
                "events": lane.events,
                "after_kill": summarize_events([e for e in lane.events if e["t_s"] >= 0]),
                "before_kill": summarize_events([e for e in lane.events if e["t_s"] < 0]),
            }
            for lane in lanes
        ],
    }


def summarize_events(events: Sequence[dict]) -> dict:
    outcomes: dict[str, int] = {}
    for e in events:
        outcomes[e["outcome"]] = outcomes.get(e["outcome"], 0) + 1
    answered = sorted(e["latency_ms"] for e in events if e["outcome"] == "answer")
    return {
        "lookups": len(events),
        "outcomes": outcomes,
        "answer_p50_ms": percentile(answered, 0.5),
        "answer_p99_ms": percentile(answered, 0.99),
        "longest_wait_ms": max((e["latency_ms"] for e in events), default=0.0),
    }


def run_failure(
    lmcache: LMCachePath, others: Sequence[LookupPath], holdings: Holdings, args
) -> dict:
    for path in others:
        if isinstance(path, MeshkvPath):
            path.use_shim = True  # what the issue kills: meshkv's lmcache_controller shim
    setups = {p.name: p.setup(holdings) for p in (lmcache, *others)}
    prompts = {
        p.name: p.cases(holdings, THROUGHPUT_PROMPT_CHUNKS, args.seed)["hit_first"]
        for p in (lmcache, *others)
    }
    lanes = [
        Lane(
            label=f"lmcache (LMCache's default {LMCACHE_RECV_TIMEOUT_MS} ms timeout)",
            path=lmcache,
            group=lmcache.requesters(1),
            prompts=prompts["lmcache"],
            deadline_s=LMCACHE_RECV_TIMEOUT_MS / 1e3,
        ),
        Lane(
            label=f"lmcache (tuned {SHORT_LMCACHE_RECV_TIMEOUT_MS} ms timeout)",
            path=lmcache,
            group=lmcache.requesters(1),
            prompts=prompts["lmcache"],
            deadline_s=SHORT_LMCACHE_RECV_TIMEOUT_MS / 1e3,
        ),
    ]
    lanes += [
        Lane(
            label=p.name,
            path=p,
            group=p.requesters(1, background=True),
            prompts=prompts[p.name],
            deadline_s=LOOKUP_DEADLINE_S + 1.0,  # the path's own deadline answers first
        )
        for p in others
    ]
    try:
        result = failure_timeline(lanes, [lmcache, *others], args)
    finally:
        for lane in lanes:
            lane.group.close()
    result["members"] = holdings.members
    result["setup"] = setups
    return result


# ---------------------------------------------------------------- report


def cell_lookup(results: dict, path: str, case: str, chunks: int, members: int) -> dict | None:
    for run in results["runs"]:
        if run["members"] == members:
            for row in run["latency"]:
                if (row["path"], row["case"], row["chunks"]) == (path, case, chunks):
                    return row
    return None


def ratios(results: dict) -> list[dict]:
    """meshkv (when measured) and echo over LMCache, per N, case and prompt size."""
    rows = []
    for run in results["runs"]:
        n = run["members"]
        for row in run["latency"]:
            if row["path"] != "lmcache":
                continue
            echo = cell_lookup(results, "echo", row["case"], row["chunks"], n)
            mesh = cell_lookup(results, "meshkv", row["case"], row["chunks"], n)
            rows.append(
                {
                    "members": n,
                    "case": row["case"],
                    "chunks": row["chunks"],
                    "lmcache_p50_us": row["p50_us"],
                    "lmcache_p99_us": row["p99_us"],
                    "echo_p50_us": echo["p50_us"] if echo else None,
                    "lmcache_over_echo_p50": row["p50_us"] / echo["p50_us"] if echo else None,
                    "meshkv_p50_us": mesh["p50_us"] if mesh else None,
                    "meshkv_over_lmcache_p50": mesh["p50_us"] / row["p50_us"] if mesh else None,
                    "meshkv_over_echo_p50": (
                        mesh["p50_us"] / echo["p50_us"] if mesh and echo else None
                    ),
                }
            )
    return rows


def _cells(results: dict, path: str, members: int) -> dict[tuple[str, int], dict]:
    run = next((r for r in results["runs"] if r["members"] == members), None)
    if run is None:
        return {}
    return {(r["case"], r["chunks"]): r for r in run["latency"] if r["path"] == path}


def _worst_and_median(values: Sequence[float]) -> dict:
    values = sorted(v for v in values if v == v)  # drop NaN
    if not values:
        return {"worst": None, "median": None, "cells": 0}
    return {"worst": values[-1], "median": statistics.median(values), "cells": len(values)}


def evaluate_targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured value (worst and median over the cells)."""
    if "meshkv" not in results["paths"]:
        return []
    members = [r["members"] for r in results["runs"]]
    out = []

    def add(name: str, target: float, stat: dict, below: bool = True) -> None:
        value = stat["worst"]
        ok = None if value is None else (value <= target if below else value >= target)
        out.append({"target": name, "limit": target, **stat, "met_in_every_cell": ok})

    def ratio_stat(n: int, field: str, num: str, den: str) -> dict:
        a, b = _cells(results, num, n), _cells(results, den, n)
        return _worst_and_median(
            [a[k][field] / b[k][field] for k in a.keys() & b.keys() if b[k][field] > 0]
        )

    for n, limit in ((8, TARGETS["p50_ratio_at_8"]), (64, TARGETS["p50_ratio_at_64"])):
        if n in members:
            add(
                f"meshkv p50 / lmcache p50 at N={n}",
                limit,
                ratio_stat(n, "p50_us", "meshkv", "lmcache"),
            )
    for n in members:
        add(
            f"meshkv p50 / echo p50 at N={n}",
            TARGETS["p50_over_echo"],
            ratio_stat(n, "p50_us", "meshkv", "echo"),
        )
        add(
            f"meshkv server CPU / lmcache server CPU per lookup at N={n}",
            TARGETS["cpu_ratio"],
            ratio_stat(n, "server_cpu_us_per_lookup", "meshkv", "lmcache"),
        )
        add(
            f"same, each net of its idle rate (gossip, timers; unreliable when idle dominates)"
            f" at N={n}",
            TARGETS["cpu_ratio"],
            ratio_stat(n, "server_cpu_us_per_lookup_net_of_idle", "meshkv", "lmcache"),
        )
    if len(members) > 1:
        lo, hi = min(members), max(members)
        a, b = _cells(results, "meshkv", hi), _cells(results, "meshkv", lo)
        flat = _worst_and_median([a[k]["p50_us"] / b[k]["p50_us"] for k in a.keys() & b.keys()])
        out.append({"target": f"meshkv p50 at N={hi} / at N={lo} (flat in N: ~1)", **flat})
    for n in members:
        local = [r for k, r in _cells(results, "meshkv", n).items() if k[0] == "local"]
        echo = _cells(results, "echo", n)
        ratios_local = [
            r["p50_us"] / echo[("hit_first", r["chunks"])]["p50_us"]
            for r in local
            if ("hit_first", r["chunks"]) in echo
        ]
        if ratios_local:
            out.append(
                {
                    "target": f"meshkv local-home p50 / echo p50 at N={n} (<1: no round trip)",
                    **_worst_and_median(ratios_local),
                }
            )
    for run in results["runs"]:
        tp = {(r["path"], r["concurrency"]): r["lookups_per_s"] for r in run["throughput"]}
        for c in sorted({c for _, c in tp}):
            if ("meshkv", c) in tp and tp.get(("lmcache", c)):
                value = tp[("meshkv", c)] / tp[("lmcache", c)]
                name = f"meshkv / lmcache throughput, {c} requesters, N={run['members']}"
                add(name, TARGETS["throughput_ratio_32_at_64"], _worst_and_median([value]), False)
    failure = results.get("failure")
    if failure:
        for lane in failure["lanes"]:
            out.append(
                {
                    "target": f"after the kill: {lane['label']}",
                    **lane["after_kill"],
                    "before_kill_answer_p50_ms": lane["before_kill"]["answer_p50_ms"],
                }
            )
    return out


def print_table(results: dict) -> None:
    print("\nlatency (us): p50 / p99, server CPU us per lookup")
    header = f"{'N':>3} {'case':<10} {'chunks':>6}  " + "  ".join(
        f"{p:>30}" for p in results["paths"]
    )
    print(header)
    for run in results["runs"]:
        keys = sorted(
            {(row["case"], row["chunks"]) for row in run["latency"]}, key=lambda k: (k[1], k[0])
        )
        for case, chunks in keys:
            line = f"{run['members']:>3} {case:<10} {chunks:>6}  "
            parts = []
            for path in results["paths"]:
                row = cell_lookup(results, path, case, chunks, run["members"])
                if row is None:
                    parts.append(f"{'-':>30}")
                else:
                    cpu = row["server_cpu_us_per_lookup"]
                    parts.append(f"{row['p50_us']:>8.1f} /{row['p99_us']:>8.1f}  cpu {cpu:>7.1f}")
            print(line + "  ".join(parts))
    print("\nthroughput (lookups/s, 32-chunk prompts, closed loop)")
    for run in results["runs"]:
        cells = {(r["path"], r["concurrency"]): r for r in run["throughput"]}
        for c in sorted({r["concurrency"] for r in run["throughput"]}):
            line = f"N={run['members']:>3} c={c:>2}  " + "  ".join(
                f"{p}: {cells[(p, c)]['lookups_per_s']:>8.0f}"
                for p in results["paths"]
                if (p, c) in cells
            )
            print(line)
    for target in results.get("targets", []):
        print(f"  {target}")
    if results.get("failure"):
        print("\nfailure timeline (after the kill)")
        for lane in results["failure"]["lanes"]:
            print(f"  {lane['label']:<45} {lane['after_kill']}")


def plot(results: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    ax = axes[0]
    colors = {"lmcache": "tab:red", "meshkv": "tab:blue", "echo": "tab:gray"}
    styles = {"hit_first": "-", "hit_last": "--", "miss": ":", "local": "-."}
    chunks = THROUGHPUT_PROMPT_CHUNKS
    for path in results["paths"]:
        for case in styles:
            xs, ys = [], []
            for run in results["runs"]:
                row = cell_lookup(results, path, case, chunks, run["members"])
                if row:
                    xs.append(run["members"])
                    ys.append(row["p50_us"])
            if xs:
                ax.plot(
                    xs, ys, styles[case], marker="o", color=colors.get(path), label=f"{path} {case}"
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("members N")
    ax.set_ylabel(f"lookup p50 (us), {chunks}-chunk prompt")
    ax.set_title("lookup latency vs N")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[1]
    run = results["runs"][-1]
    for path in results["paths"]:
        rows = sorted(
            (r for r in run["throughput"] if r["path"] == path), key=lambda r: r["concurrency"]
        )
        ax.plot(
            [r["concurrency"] for r in rows],
            [r["lookups_per_s"] for r in rows],
            marker="o",
            color=colors.get(path),
            label=path,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requesters")
    ax.set_ylabel("lookups/s")
    ax.set_title(f"throughput at N={run['members']}")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[2]
    failure = results.get("failure")
    if failure:
        markers = {
            "answer": "o",
            "miss": "x",
            "timeout": "s",
            "error": "^",
            "partial": "d",
            "waiting": "v",
        }
        lane_colors = ["tab:red", "tab:orange", "tab:blue", "tab:green"]
        sizes = [40, 14, 14, 14]  # the first lane drawn large, so the second cannot hide it
        for lane, color, size in zip(failure["lanes"], lane_colors, sizes, strict=False):
            for outcome, marker in markers.items():
                events = [e for e in lane["events"] if e["outcome"] == outcome]
                if events:
                    ax.scatter(
                        [e["t_s"] for e in events],
                        [max(e["latency_ms"], 1e-3) for e in events],
                        marker=marker,
                        color=color,
                        s=size,
                        alpha=0.6,
                        label=f"{lane['label']}: {outcome}",
                    )
        ax.axvline(0, color="black", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("seconds since the kill")
        ax.set_ylabel("time to answer (ms)")
        ax.set_title(f"failure timeline, N={failure['members']}")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


# ---------------------------------------------------------------- main


def build_paths(args, context: zmq.Context, log_dir: Path) -> tuple[LMCachePath, list[LookupPath]]:
    python = ensure_lmcache_venv(args.venv)
    lmcache = LMCachePath(python, context, log_dir)
    others: list[LookupPath] = [EchoPath(context, log_dir)]
    if not args.no_meshkv:
        missing = meshkv_missing()
        if missing:
            print(f"[bench_lookup] meshkv path skipped: {missing}", flush=True)
        else:
            others.insert(0, MeshkvPath(context, log_dir, use_shim=args.mesh_seed == "shim"))
    return lmcache, others


def meshkv_missing() -> str | None:
    """Why the meshkv path cannot run here (its data plane not importable), or None."""
    try:
        import meshkv.node  # noqa: F401
    except Exception as exc:  # ImportError, or any error of a module being rewritten
        return f"import meshkv.node failed: {type(exc).__name__}: {exc}"
    return None


def bench(args: argparse.Namespace) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    context = zmq.Context()
    context.setsockopt(zmq.MAX_SOCKETS, 8192)
    lmcache, others = build_paths(args, context, log_dir)
    paths: list[LookupPath] = [lmcache, *others]
    results: dict = {
        "tool": "tools/bench_lookup.py",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)),
            "loadavg_start": os.getloadavg(),
        },
        "config": {
            "members": args.members,
            "chunks": args.chunks,
            "concurrency": args.concurrency,
            "keys_per_member": args.keys,
            "rounds": args.rounds,
            "block": args.block,
            "throughput_s": args.throughput_s,
            "seed": args.seed,
        },
        "paths": [p.name for p in paths],
        "runs": [],
    }
    try:
        for n in args.members:
            holdings = make_holdings(n, args.keys, args.seed + n)
            try:
                results["runs"].append(measure_member_count(paths, holdings, args, args.seed + n))
                (args.out / "lookup.partial.json").write_text(json.dumps(results, indent=1))
            finally:
                for p in paths:
                    if p.name != "echo":
                        p.teardown()
        if args.failure_members:
            holdings = make_holdings(args.failure_members, args.keys, args.seed)
            killable = [p for p in others if p.name != "echo"]
            try:
                results["failure"] = run_failure(lmcache, killable, holdings, args)
            finally:
                for p in (lmcache, *killable):
                    p.teardown()
    finally:
        for p in paths:
            p.teardown()
        context.destroy(linger=0)
    results["ratios"] = ratios(results)
    results["targets"] = evaluate_targets(results)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["lmcache_venv_digest"] = hashlib.sha256(
        (args.venv / VENV_READY_MARK).read_bytes()
    ).hexdigest()[:16]
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    echo = sub.add_parser("echo-server", help="(internal) the echo floor's server")
    echo.add_argument("--port", type=int, required=True)
    member = sub.add_parser("mesh-member", help="(internal) one meshkv member process")
    member.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--no-meshkv", action="store_true", help="LMCache and echo only")
    parser.add_argument(
        "--mesh-seed",
        choices=("member", "shim"),
        default="member",
        help="what meshkv members join through in the measured rounds (the shim is on no "
        "data path and optional; it idles at a few hundred ms of CPU per s here, which "
        "slows every path on 2 cores); the failure timeline always uses the shim",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="LMCache venv (made once)")
    parser.add_argument("--members", type=int, nargs="+", default=list(MEMBER_COUNTS))
    parser.add_argument("--chunks", type=int, nargs="+", default=list(PROMPT_CHUNKS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES))
    parser.add_argument("--keys", type=int, default=KEYS_PER_MEMBER, help="chunks per member")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per N")
    parser.add_argument("--block", type=int, default=60, help="lookups per latency block")
    parser.add_argument("--throughput-s", type=float, default=0.4, help="seconds per block")
    parser.add_argument("--idle-s", type=float, default=1.0, help="idle CPU window per path")
    parser.add_argument("--failure-members", type=int, default=8, help="N for the kill; 0: skip")
    parser.add_argument("--failure-before-s", type=float, default=3.0)
    parser.add_argument("--failure-after-s", type=float, default=30.0)
    parser.add_argument("--failure-interval-s", type=float, default=0.05)
    parser.add_argument(
        "--failure-drain-s", type=float, default=5.0, help="extra wait for lookups in flight"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small smoke run (~1 min)")
    args = parser.parse_args(argv)
    if args.quick:
        args.members = [2, 8]
        args.chunks = [4, 32]
        args.concurrency = [1, 8]
        args.keys = 200
        args.rounds = 2
        args.block = 20
        args.throughput_s = 0.2
        args.idle_s = 0.2
        args.failure_members = 2
        args.failure_before_s = 1.0
        args.failure_after_s = 3.0
        args.failure_drain_s = 0.0
    if THROUGHPUT_PROMPT_CHUNKS not in args.chunks:
        args.chunks = sorted({*args.chunks, THROUGHPUT_PROMPT_CHUNKS})
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "echo-server":
        echo_server(args.port)
        return
    if args.command == "mesh-member":
        mesh_member(args.spec)
        return
    # SIGTERM unwinds like Ctrl-C, so every child is stopped by the finally blocks
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results = bench(args)
    out_json = args.out / "lookup.json"
    out_json.write_text(json.dumps(results, indent=1))
    plot(results, args.out / "lookup.png")
    print_table(results)
    print(f"\nwrote {out_json} and {args.out / 'lookup.png'}")


if __name__ == "__main__":
    main()
