"""Chaos harness: real member processes, bounded-rate readers and writers, seeded faults.

N storage members (``python -m meshkv join --capacity``) run on 127.0.0.1 with real NIXL where
the ``nixl`` package imports (else the tcp channel). This process holds the clients: writer and
reader `MeshNode`s (engine members of one namespace) driven at bounded rates. For a set time a
seeded schedule kills (``-9``, then a restart under the same instance id), freezes
(``SIGSTOP``, later ``SIGCONT``) and restarts (``SIGTERM``: graceful leave, then a new boot)
one member at a time, and waits for the mesh to be one ring again before the next fault.

Every chunk's bytes are a pure function of its key, and the writers record a digest per key
(the ground truth). Every read is checked against it: a get may return fewer leading chunks (a
miss: fine) but never wrong bytes. The report (JSON) gives the requests, the faults injected
by kind, wrong bytes (must be 0), calls past their deadline + 100 ms (must be 0), each member's
peak RSS against its byte budget + a fixed overhead, and the time to reconverge after each
fault (from the fault's repair until every member and client lists the same live members).

Next to that safety, availability: of the leading chunks some live member held when a get
ended (the reader's own copies, the writer's store, and every member neither frozen nor down
before and after the get, asked with a lookup), the share the get served. With
``mesh_replicas: 2`` (``--replicas``, the default) it must be >= 99 %: a frozen or dead holder
costs a hedge, not a miss.

    python tools/chaos.py --members 4 --duration 600 --seed 7 --out bench-results/chaos.json

``python tools/chaos.py client ...`` runs one client as a JSON-lines driver on stdin/stdout (the
partition test runs it inside network namespaces, where this process cannot reach).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import queue
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshkv.config import MeshConfig
from meshkv.dataplane import messages as dm
from meshkv.dataplane.client import RequestClient
from meshkv.errors import TransportError
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.member import MemberState
from meshkv.gossip.messages import Ping, encode_message, gossip_codec
from meshkv.gossip.runner import query_members
from meshkv.keys import chunk_keys, root_key
from meshkv.node import MeshNode
from meshkv.wire import MAGIC, AuthPolicy
from tools.bench.common import free_ports
from tools.chaos_misses import GetTraces, MissLog

NAMESPACE = "c4" * 16
"""The clients' namespace label (storage members serve every namespace)."""
GIB, MIB = 1 << 30, 1 << 20
TOKENS_PER_CHUNK = 16
DEADLINE_SLACK_S = 0.1
"""A call ending later than its deadline + this counts as an overrun."""
START_TIMEOUT_S = 60.0
"""Longest a member process may take to import meshkv and bind (a busy 2-core machine)."""
STOP_TIMEOUT_S = 15.0
"""Longest a graceful leave may take (hand-off is bounded at 10 s) before -9."""
QUERY_TIMEOUT_S = 0.5
CONVERGE_POLL_S = 0.1
RSS_POLL_S = 0.25
SCRAPE_S = 1.0
PROMPTS_KEPT_MAX = 4096
"""Recent prompts the readers choose from (older ones are forgotten, not their digests)."""
WRONG_EXAMPLES_MAX = 20
FAULT_KINDS = ("kill", "freeze", "restart")
CLIENT_ROLES = ("writer", "reader")
"""The client members this process runs, in `Chaos.clients` order."""
REPLIES_DRAINED_MAX = 64
"""Replies to the intruder's replayed lookups read (and dropped) per bad frame sent."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """One chaos run. Rates are per client thread; times in seconds."""

    members: int = 4
    duration_s: float = 60.0
    seed: int = 1
    channel: str = "auto"  # "nixl", "tcp" or "auto" (nixl where it imports)
    capacity_gib: float = 0.0625  # each member's store budget (64 MiB)
    client_capacity_gib: float = 0.03125  # each client's store (32 MiB: reads must travel)
    chunk_bytes: int = 64 * 1024
    max_chunks_per_prompt: int = 4
    writers: int = 1  # threads of the writer client
    readers: int = 2  # threads of the reader client
    write_rate_hz: float = 8.0  # prompts per second per writer
    read_rate_hz: float = 15.0  # calls per second per reader
    lookup_share: float = 0.2  # of reader calls that are lookups (the rest are gets)
    call_timeout_s: float = 1.0
    freeze_s: tuple[float, float] = (0.5, 3.0)
    down_s: tuple[float, float] = (0.2, 1.5)
    gap_s: tuple[float, float] = (0.3, 1.5)  # between reconvergence and the next fault
    converge_timeout_s: float = 30.0
    min_faults: int = 0  # chaos goes on past duration_s until this many faults (up to 2x)
    fault_kinds: tuple[str, ...] = FAULT_KINDS  # one round, shuffled; repeat a kind to weight it
    overhead_mib: int = 512  # fixed RSS allowance per member beyond its byte budget
    profile: str = "local"
    secret: bool = True  # authenticate every frame (HMAC) during the run
    bad_input_rate_hz: float = 10.0  # malformed/unauthenticated/replayed frames sent per second
    replicas: int = 2  # mesh_replicas of members and clients
    availability_min: float = 0.99  # chunks served / chunks a live member held, at least


# --- ground truth ---------------------------------------------------------------------------


def chunk_content(key: bytes, nbytes: int) -> np.ndarray:
    """The bytes of the chunk named ``key``: a pure function of the key."""
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def digest(data: np.ndarray | bytes) -> bytes:
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).digest()


def prompt_keys(rng: random.Random, salt: str, max_chunks: int, min_chunks: int = 1) -> list[bytes]:
    """A prompt of min..max chunks; a third share their first chunk with other prompts."""
    chunks = rng.randint(min_chunks, max_chunks)
    head = rng.randrange(8) if rng.random() < 0.33 else rng.getrandbits(31)
    tokens = [head] * TOKENS_PER_CHUNK + [rng.getrandbits(31) for _ in range(TOKENS_PER_CHUNK)]
    tokens += [rng.getrandbits(31) for _ in range(TOKENS_PER_CHUNK * (chunks - 2))]
    return chunk_keys(root_key(bytes.fromhex(NAMESPACE), salt), tokens, TOKENS_PER_CHUNK)[:chunks]


class Ledger:
    """The ground truth: the recent prompts to read, and a digest for each of their keys.

    Bounded: a digest is kept while a kept prompt names its key (prompts share first chunks).
    """

    def __init__(self, prompts_max: int = PROMPTS_KEPT_MAX) -> None:
        self._lock = threading.Lock()
        self._digests: dict[bytes, bytes] = {}
        self._refs: Counter[bytes] = Counter()
        self._prompts: deque[tuple[list[bytes], float]] = deque()  # (keys, recorded at)
        self._prompts_max = prompts_max
        self.recorded = 0

    def record(self, keys: list[bytes], digests: list[bytes]) -> None:
        with self._lock:
            for key, d in zip(keys, digests, strict=True):
                self._digests.setdefault(key, d)
                self._refs[key] += 1
            self._prompts.append((keys, time.monotonic()))
            self.recorded += 1
            if len(self._prompts) > self._prompts_max:
                for key in self._prompts.popleft()[0]:
                    self._refs[key] -= 1
                    if self._refs[key] == 0:
                        del self._refs[key], self._digests[key]

    def pick(self, rng: random.Random) -> tuple[list[bytes], float] | None:
        """A recent prompt's keys and when it was recorded (monotonic s), or None."""
        with self._lock:
            return rng.choice(self._prompts) if self._prompts else None

    def truth(self, key: bytes) -> bytes | None:
        with self._lock:
            return self._digests.get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._digests)


# --- what happened --------------------------------------------------------------------------


class Tally:
    """Counters and latencies from every client thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.latencies: dict[str, list[float]] = {"put": [], "get": [], "lookup": []}
        self.overruns: list[dict[str, Any]] = []
        self.wrong: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def add(self, **counts: int) -> None:
        with self._lock:
            self.counts.update(counts)

    def timed(self, op: str, elapsed_s: float, timeout_s: float | None) -> None:
        with self._lock:
            self.counts[op] += 1
            self.latencies[op].append(elapsed_s)
            if timeout_s is not None and elapsed_s > timeout_s + DEADLINE_SLACK_S:
                self.overruns.append({"op": op, "elapsed_s": round(elapsed_s, 4)})

    def wrong_bytes(self, key: bytes, index: int) -> None:
        with self._lock:
            self.counts["wrong_chunks"] += 1
            if len(self.wrong) < WRONG_EXAMPLES_MAX:
                self.wrong.append({"key": key.hex(), "index": index})

    def error(self, what: str) -> None:
        with self._lock:
            self.counts["errors"] += 1
            if len(self.errors) < WRONG_EXAMPLES_MAX:
                self.errors.append(what)


def check_read(
    keys: Sequence[bytes], views: Sequence[np.ndarray | bytes], ledger: Ledger, tally: Tally
) -> int:
    """Compares the chunks a get returned with the ground truth; returns how many were wrong."""
    wrong = 0
    for i, (key, view) in enumerate(zip(keys, views, strict=False)):
        truth = ledger.truth(key)
        if truth is None or digest(view) != truth:
            tally.wrong_bytes(key, i)
            wrong += 1
    tally.add(chunks_hit=len(views) - wrong, chunks_missed=len(keys) - len(views))
    return wrong


# --- member processes -----------------------------------------------------------------------


@dataclass
class Member:
    """One ``meshkv join --capacity`` process on fixed ports, so a restart comes back the same.

    ``prefix`` runs it elsewhere (e.g. ``ip netns exec NAME``: exec keeps the PID)."""

    index: int
    host: str
    gossip_port: int
    data_port: int
    config_path: Path
    log_path: Path
    capacity_gib: float
    seeds: list[str]
    prefix: list[str] = field(default_factory=list)
    name_prefix: str = "m"
    admin_port: int | None = None  # Prometheus /metrics (set in its config), for drop counts
    proc: subprocess.Popen[bytes] | None = None
    boots: int = 0
    peak_rss_bytes: int = 0
    started_rss_bytes: int = 0  # resident set of the first boot once listening (imports, no data)
    frozen: bool = False
    stopped_on_purpose: bool = False
    crashes: list[str] = field(default_factory=list)
    dropped_by_boot: dict[int, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.name_prefix}{self.index}/0"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.gossip_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        seeds = [a for s in self.seeds if s != self.address for a in ("--seed", s)]
        with self.log_path.open("ab") as out:
            proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "meshkv", "join",
                 "--config", str(self.config_path), "--id", f"{self.name_prefix}{self.index}",
                 "--host", self.host, "--port", str(self.gossip_port),
                 "--data-port", str(self.data_port), "--capacity", str(self.capacity_gib),
                 *seeds],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "UCX_NET_DEVICES": "lo", "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        # In this order: the monitor thread's `check_alive` must never see the new boot's
        # flag beside the old, killed process (it recorded "boot N exited with -9" as a crash).
        self.boots += 1
        self.proc = proc
        self.stopped_on_purpose = False

    def listening(self) -> bool:
        """True once this boot has bound its ports (its log line for this boot is out)."""
        line = f"member {self.name} listening on {self.address}"
        return self.log_path.read_text(errors="replace").count(line) >= self.boots

    def wait_listening(self, timeout_s: float = START_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.running:
            if self.listening():
                return True
            time.sleep(0.05)
        return False

    def send(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, sig)
            if sig == signal.SIGSTOP:
                self.frozen = True
            elif sig == signal.SIGCONT:
                self.frozen = False

    def kill(self) -> None:
        """-9 and reap (bounded); safe to call at any time."""
        self.stopped_on_purpose = True
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT_S)
        self.frozen = False

    def leave(self) -> None:
        """SIGTERM (graceful leave with hand-off), -9 if it takes longer than allowed."""
        self.stopped_on_purpose = True
        if self.running:
            assert self.proc is not None
            if self.frozen:
                self.send(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()

    def check_alive(self) -> None:
        """Records a crash: the process ended though nobody stopped it."""
        if self.proc is not None and not self.stopped_on_purpose and self.proc.poll() is not None:
            self.crashes.append(f"boot {self.boots} exited with {self.proc.returncode}")
            self.stopped_on_purpose = True  # recorded once

    def scrape_dropped(self) -> None:
        """Keeps this boot's count of dropped frames (``meshkv_frames_dropped`` on /metrics)."""
        if self.admin_port is None or not self.running or self.frozen:
            return
        url = f"http://{self.host}:{self.admin_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=QUERY_TIMEOUT_S) as response:
                text = response.read().decode()
        except (OSError, ValueError):
            return
        for line in text.splitlines():
            if line.startswith("meshkv_frames_dropped{"):
                value = int(float(line.rsplit(" ", 1)[1]))
                seen = self.dropped_by_boot.get(self.boots, 0)
                self.dropped_by_boot[self.boots] = max(seen, value)

    def sample_rss(self) -> None:
        """Keeps the highest VmHWM (peak resident set) any boot reached."""
        if self.proc is None:
            return
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss_bytes = max(self.peak_rss_bytes, int(line.split()[1]) * 1024)
            elif line.startswith("VmRSS:") and not self.started_rss_bytes:
                self.started_rss_bytes = int(line.split()[1]) * 1024


def write_member_config(path: Path, *, channel: str, host: str | None, profile: str,
                        secret: str | None, timeout_ms: int,
                        admin_port: int | None = None, replicas: int = 1) -> None:  # fmt: skip
    """The members' YAML file (``host`` None: each member's ``--host`` gives it)."""
    lines = [f"transfer_channel: {channel}", f"mesh_gossip_profile: {profile}",
             f"mesh_transfer_timeout_ms: {timeout_ms}", "enable_p2p: true",
             f"mesh_replicas: {replicas}"]  # fmt: skip
    if host:
        lines.append(f"p2p_host: {host}")
    if admin_port:
        lines.append(f"lmcache_worker_ports: {admin_port}")
    if secret:
        lines.append(f"mesh_secret: {secret}")
    path.write_text("\n".join(lines) + "\n")


def pick_channel(channel: str) -> str:
    if channel != "auto":
        return channel
    return "nixl" if importlib.util.find_spec("nixl") is not None else "tcp"


# --- bad input ------------------------------------------------------------------------------

BAD_KINDS = ("random", "magic_garbage", "unsigned", "wrong_secret", "tampered", "replayed",
             "truncated", "overlong")  # fmt: skip


class Intruder:
    """Sends bad frames to the members' gossip and data ports: garbage, frames unsigned or
    signed with another secret, tampered, truncated, oversized, and replays of a frame signed
    with the mesh's own secret. A member must drop and count them all and keep running."""

    def __init__(self, secret: str | None, profile: GossipConfig) -> None:
        self.context = zmq.Context()
        self.sockets: dict[str, zmq.Socket] = {}
        self.secret = secret
        self.auth = AuthPolicy.from_strings(secret, None)
        self.gossip_codecs = {
            "unsigned": gossip_codec(profile, AuthPolicy()),
            "wrong_secret": gossip_codec(profile, AuthPolicy.from_strings("x" * 32, None)),
            "signed": gossip_codec(profile, self.auth),
        }
        self.data_codecs = {
            "unsigned": dm.make_codec(1 << 20, AuthPolicy()),
            "wrong_secret": dm.make_codec(1 << 20, AuthPolicy.from_strings("x" * 32, None)),
            "signed": dm.make_codec(1 << 20, self.auth),
        }
        self.sent: Counter[str] = Counter()

    def _socket(self, address: str) -> zmq.Socket:
        sock = self.sockets.get(address)
        if sock is None:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 64)
            sock.connect(f"tcp://{address}")
            self.sockets[address] = sock
        for _ in range(REPLIES_DRAINED_MAX):  # answers to replayed frames' first copies: drop
            if not sock.poll(0):
                break
            sock.recv(zmq.NOBLOCK)
        return sock

    def frames(self, rng: random.Random, kind: str, plane: str) -> list[bytes]:
        if plane == "gossip":
            codecs = self.gossip_codecs
            message = Ping(seq=rng.getrandbits(31), target="m0/0", source="intruder/0",
                           source_address="127.0.0.1:9")  # fmt: skip

            def encode(codec: Any) -> bytes:
                return encode_message(codec, message)
        else:
            codecs = self.data_codecs
            lookup = dm.Lookup(req=rng.getrandbits(31), epoch=0, keys=[os.urandom(16)])

            def encode(codec: Any) -> bytes:
                return dm.encode(codec, lookup)

        if kind == "random":
            return [rng.randbytes(rng.randrange(1, 512))]
        if kind == "magic_garbage":
            return [MAGIC + rng.randbytes(rng.randrange(0, 256))]
        if kind in ("unsigned", "wrong_secret"):
            return [encode(codecs[kind])]
        signed = encode(codecs["signed"])
        if kind == "tampered":
            flipped = bytearray(signed)
            flipped[rng.randrange(len(MAGIC), len(flipped))] ^= 1 << rng.randrange(8)
            return [bytes(flipped)]
        if kind == "truncated":
            return [signed[: rng.randrange(1, len(signed))]]
        if kind == "overlong":  # 2 MiB: past the gossip frame bound; lying lengths on data
            return [signed[: len(MAGIC) + 3] + b"\xc6" + b"x" * (2 << 20)]
        if plane == "gossip" or self.secret is None:  # a valid gossip frame would be obeyed
            return []
        return [signed, signed]  # replayed: the first copy is a legitimate lookup

    def send(self, rng: random.Random, members: Sequence[Member]) -> None:
        member = rng.choice(members)
        plane = rng.choice(("gossip", "data"))
        port = member.gossip_port if plane == "gossip" else member.data_port
        kind = rng.choice(BAD_KINDS)
        frames = self.frames(rng, kind, plane)
        sock = self._socket(f"{member.host}:{port}")
        for frame in frames:
            try:
                sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:  # the member is frozen or down and the queue is full
                return
        if frames:
            self.sent[kind] += 1

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.context.term()


# --- convergence ----------------------------------------------------------------------------

LiveSet = dict[str, int]
"""Member name -> boot nonce of the members an observer holds alive."""


def live_set_of(address: str, codec: Any) -> LiveSet | None:
    """The members a member process lists ALIVE, or None if it does not answer in time."""
    try:
        views = query_members(address, timeout_s=QUERY_TIMEOUT_S, codec=codec)
    except TransportError:
        return None
    return {v.name: v.nonce for v in views if v.state is MemberState.ALIVE}


def client_live_set(node: MeshNode) -> LiveSet:
    return {p.name: p.nonce for p in node.members()}


def one_ring(views: Sequence[LiveSet | None], names: set[str]) -> bool:
    """True when every observer answered and all list exactly ``names``, with the same boots."""
    if not views or any(v is None for v in views):
        return False
    first = views[0]
    return set(first) == names and all(v == first for v in views)


# --- the run --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    member: int
    kind: str
    hold_s: float  # freeze length, or time down before a killed member restarts
    gap_s: float  # pause after reconvergence before this fault


def schedule(settings: Settings) -> Iterator[Fault]:
    """The seeded fault sequence: rounds of `Settings.fault_kinds`, each round shuffled."""
    rng = random.Random(settings.seed)
    while True:
        kinds = list(settings.fault_kinds)
        rng.shuffle(kinds)
        for kind in kinds:
            span = settings.freeze_s if kind == "freeze" else settings.down_s
            yield Fault(
                member=rng.randrange(settings.members),
                kind=kind,
                hold_s=round(rng.uniform(*span), 3),
                gap_s=round(rng.uniform(*settings.gap_s), 3),
            )


class Chaos:
    """One run: members, clients, workload threads, the fault loop, the report."""

    def __init__(self, settings: Settings, workdir: Path, progress: Callable[[str], None]) -> None:
        self.s = settings
        self.workdir = workdir
        self.progress = progress
        self.channel = pick_channel(settings.channel)
        self.secret = secrets.token_hex(16) if settings.secret else None
        self.ledger = Ledger()
        self.tally = Tally()
        self.stop = threading.Event()
        self.members: list[Member] = []
        self.clients: list[MeshNode] = []
        self.faults: list[dict[str, Any]] = []
        self.threads: list[threading.Thread] = []
        profile = GossipConfig.profile(settings.profile)
        self.codec = gossip_codec(profile, AuthPolicy.from_strings(self.secret, None))
        self.intruder = Intruder(self.secret, profile)
        self.lateness: list[float] = []  # how late this process's sampler woke: host load
        self.held_clients: list[RequestClient] = []  # the readers' availability lookups
        self.traces = GetTraces()  # the read path's debug lines of each reader's get
        self.misses = MissLog(fresh_s=settings.call_timeout_s)
        self.began_s = time.monotonic()  # the workload's start (set again when it starts)
        self.current_fault: str | None = None  # "kind member" while a fault is applied

    # -- set up and tear down --

    def start_members(self) -> None:
        ports = free_ports(3 * self.s.members)
        seeds = [f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[3]}"][: self.s.members]
        for i in range(self.s.members):
            gossip_port, data_port, admin_port = ports[3 * i : 3 * i + 3]
            config = self.workdir / f"m{i}.yaml"
            write_member_config(config, channel=self.channel, host="127.0.0.1",
                                profile=self.s.profile, secret=self.secret,
                                timeout_ms=int(self.s.call_timeout_s * 1000),
                                admin_port=admin_port, replicas=self.s.replicas)  # fmt: skip
            member = Member(index=i, host="127.0.0.1", gossip_port=gossip_port,
                            data_port=data_port, config_path=config,
                            log_path=self.workdir / f"m{i}.log", capacity_gib=self.s.capacity_gib,
                            seeds=seeds, admin_port=admin_port)  # fmt: skip
            self.members.append(member)
            member.start()
        for member in self.members:
            if not member.wait_listening():
                raise RuntimeError(f"{member.name} did not start: see {member.log_path}")
            member.sample_rss()

    def start_clients(self) -> None:
        """Two client members: a writer and a reader (each of their threads has its own
        sockets; fewer nodes in this process leave more of its GIL to the timed calls)."""
        seeds = [m.address for m in self.members]
        for role in CLIENT_ROLES:
            config = MeshConfig(
                enable_p2p=True, transfer_channel=self.channel, p2p_host="127.0.0.1",
                mesh_seeds=seeds, mesh_gossip_profile=self.s.profile,
                max_local_cpu_size=self.s.client_capacity_gib,
                mesh_transfer_timeout_ms=int(self.s.call_timeout_s * 1000),
                lmcache_instance_id=role, mesh_secret=self.secret,
                mesh_replicas=self.s.replicas,
            )  # fmt: skip
            node = MeshNode(config, namespace=NAMESPACE)
            node.start()
            self.clients.append(node)

    def names(self) -> set[str]:
        return {m.name for m in self.members} | {c.name for c in self.clients}

    def converged(self) -> bool:
        views = [live_set_of(m.address, self.codec) for m in self.members]
        views += [client_live_set(c) for c in self.clients]
        return one_ring(views, self.names())

    def wait_converged(self, timeout_s: float) -> float | None:
        """Seconds until one ring, or None past ``timeout_s``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s and not self.stop.is_set():
            if self.converged():
                return time.monotonic() - started
            time.sleep(CONVERGE_POLL_S)
        return None

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(self.s.call_timeout_s + 10)
        self.traces.uninstall()
        for held_client in self.held_clients:
            held_client.close()
        self.intruder.close()
        for member in self.members:
            member.check_alive()
            member.send(signal.SIGCONT)
        time.sleep(SCRAPE_S)  # the last bad frames are counted before the last scrape
        for member in self.members:
            member.scrape_dropped()
        for client in self.clients:
            try:
                client.stop(leave=False)
            except Exception as exc:  # keep stopping the rest; report it
                self.tally.error(f"stopping {client.name}: {exc!r}")
        for member in self.members:
            member.send(signal.SIGCONT)
            member.kill()

    # -- workload --

    def paced(self, rate_hz: float, body: Callable[[], None]) -> None:
        period = 1.0 / rate_hz
        next_at = time.monotonic()
        while not self.stop.is_set():
            try:
                body()
            except Exception as exc:  # the API promises misses, never exceptions: count it
                self.tally.error(repr(exc))
            next_at = max(next_at + period, time.monotonic())
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def writer(self, node: MeshNode, rng: random.Random) -> Callable[[], None]:
        salt = f"w{rng.getrandbits(32)}"

        def write_one() -> None:
            keys = prompt_keys(rng, salt, self.s.max_chunks_per_prompt)
            chunks = [chunk_content(k, self.s.chunk_bytes) for k in keys]
            started = time.monotonic()
            stored = node.put(keys, chunks)
            self.tally.timed("put", time.monotonic() - started, None)
            self.tally.add(chunks_written=stored)
            if stored == len(keys):
                self.ledger.record(keys, [digest(c) for c in chunks])

        return write_one

    def held_live(
        self, keys: list[bytes], client: RequestClient, before: set[str]
    ) -> dict[str, int]:
        """Leading ``keys`` each live holder holds now: the clients (``writer``, ``reader``),
        and each member that was live (``before``) and still is, asked with a lookup (held
        here, not pointers)."""
        clients = zip(CLIENT_ROLES, self.clients, strict=True)
        held = {role: node.store.lookup_prefix(keys) for role, node in clients}
        live = [m for m in self.members if m.name in before and m.name in self.live_members()]
        requests = [(f"{m.host}:{m.data_port}", dm.Lookup(req=client.next_id(), epoch=0,
                                                          keys=keys)) for m in live]  # fmt: skip
        deadline_s = time.monotonic() + QUERY_TIMEOUT_S
        for member, reply in zip(live, client.call_many(requests, deadline_s), strict=True):
            if isinstance(reply, dm.LookupReply):
                held[member.name] = reply.held
        return held

    def placement(self, node: MeshNode, key: bytes) -> dict[str, list[str]]:
        """``key``'s preference list (replicas, then pointer host) on the reader's ring now and
        on the ring of every member and client (no fault)."""
        ring = node.membership.ring().current
        whole = ring
        for name in self.names() - set(ring.members):
            whole = whole.with_member(name)
        copies = self.s.replicas + 1
        return {"reader": ring.preference_list(key, copies) if ring.members else [],
                "whole": whole.preference_list(key, copies)}  # fmt: skip

    def member_states(self) -> dict[str, str]:
        """Each member's state as the harness made it: up, frozen or down (and its boot)."""
        return {
            m.name: f"{'frozen' if m.frozen else 'up' if m.running else 'down'}#{m.boots}"
            for m in self.members
        }

    def live_members(self) -> set[str]:
        return {m.name for m in self.members if m.running and not m.frozen}

    def reader(self, node: MeshNode, rng: random.Random) -> Callable[[], None]:
        timeout_s = self.s.call_timeout_s
        auth = AuthPolicy.from_strings(self.secret, None)
        client = RequestClient(zmq.Context.instance(), dm.make_codec(1 << 20, auth))
        self.held_clients.append(client)

        def read_one() -> None:
            picked = self.ledger.pick(rng)
            if picked is None:
                return
            keys, recorded_s = picked
            started = time.monotonic()
            if rng.random() < self.s.lookup_share:
                held = node.lookup(keys, timeout_s=timeout_s)
                self.tally.timed("lookup", time.monotonic() - started, timeout_s)
                if not 0 <= held <= len(keys):
                    self.tally.error(f"lookup said {held} of {len(keys)}")
                return
            live, states = self.live_members(), self.member_states()
            here = node.store.held_among(keys)
            self.traces.begin()
            with node.get(keys, self.s.chunk_bytes, timeout_s=timeout_s) as lease:
                elapsed = time.monotonic() - started
                check_read(keys, lease.views, self.ledger, self.tally)
                served = lease.count
            trace = self.traces.end()
            self.tally.timed("get", elapsed, timeout_s)
            held_by = self.held_live(keys, client, live)
            held = max(served, *held_by.values())  # a local copy counts too
            self.tally.add(chunks_held_live=held, chunks_served_of_held=min(served, held))
            if served < held:
                self.misses.add({
                    "at_s": round(started - self.began_s, 3),
                    "age_s": round(started - recorded_s, 3), "elapsed_s": round(elapsed, 4),
                    "keys": len(keys), "served": served,
                    "local_before": [i for i, key in enumerate(keys) if key in here],
                    "held": held, "held_by": held_by, "states_before": states,
                    "states_after": self.member_states(), "fault": self.current_fault,
                    "reader_ring": list(node.membership.ring().current.members),
                    "placement": self.placement(node, keys[served]),
                    "avoided": [n for n in self.names() if node.gets.hedge.is_avoided(n)],
                    "hedge_delay_s": round(node.gets.hedge.delay_s(), 4), "trace": trace,
                })  # fmt: skip

        return read_one

    def start_workload(self) -> None:
        self.began_s = time.monotonic()
        self.traces.install()
        rng = random.Random(self.s.seed ^ 0x5EED)
        writer, reader = self.clients
        bodies = [(self.writer(writer, random.Random(rng.getrandbits(64))), self.s.write_rate_hz)
                  for _ in range(self.s.writers)]  # fmt: skip
        bodies += [(self.reader(reader, random.Random(rng.getrandbits(64))), self.s.read_rate_hz)
                   for _ in range(self.s.readers)]  # fmt: skip
        for i, (body, rate) in enumerate(bodies):
            thread = threading.Thread(target=self.paced, args=(rate, body), name=f"client{i}",
                                      daemon=True)  # fmt: skip
            thread.start()
            self.threads.append(thread)
        sampler = threading.Thread(target=self.sample, name="sampler", daemon=True)
        sampler.start()
        self.threads.append(sampler)
        if self.s.bad_input_rate_hz > 0:
            bad_rng = random.Random(rng.getrandbits(64))
            intruder = threading.Thread(
                target=self.paced,
                args=(self.s.bad_input_rate_hz, lambda: self.intruder.send(bad_rng, self.members)),
                name="intruder",
                daemon=True,
            )
            intruder.start()
            self.threads.append(intruder)

    def sample(self) -> None:
        """Peak RSS and crashes every `RSS_POLL_S`, drop counters every `SCRAPE_S`."""
        scraped_at = 0.0
        while True:
            asleep_at = time.monotonic()
            if self.stop.wait(RSS_POLL_S):
                return
            self.lateness.append(time.monotonic() - asleep_at - RSS_POLL_S)
            for member in self.members:
                member.sample_rss()
                member.check_alive()
            if time.monotonic() - scraped_at >= SCRAPE_S:
                scraped_at = time.monotonic()
                for member in self.members:
                    member.scrape_dropped()

    # -- faults --

    def inject(self, fault: Fault) -> float | None:
        """Applies one fault and repairs it; returns seconds from repair to one ring."""
        member = self.members[fault.member]
        self.current_fault = f"{fault.kind} {member.name}"
        try:
            return self._apply(fault, member)
        finally:
            self.current_fault = None

    def _apply(self, fault: Fault, member: Member) -> float | None:
        phase = f"{fault.kind} {member.name}"
        if fault.kind == "freeze":
            member.send(signal.SIGSTOP)
            self.stop.wait(fault.hold_s)
            member.send(signal.SIGCONT)
        else:
            member.sample_rss()
            if fault.kind == "kill":
                member.kill()
                self.stop.wait(fault.hold_s)
            else:
                self.current_fault = f"{phase}: leaving"
                member.leave()
            self.current_fault = f"{phase}: starting"
            member.start()
            if not member.wait_listening():
                self.tally.error(f"{member.name} did not restart")
                return None
        self.current_fault = f"{phase}: converging"
        return self.wait_converged(self.s.converge_timeout_s)

    def run_faults(self, until_s: float, hard_until_s: float) -> None:
        """Injects faults until ``until_s`` and `Settings.min_faults`, never past the hard end."""
        started = time.monotonic()
        for fault in schedule(self.s):
            if self.stop.wait(fault.gap_s):
                return
            now = time.monotonic()
            if now >= hard_until_s or (now >= until_s and len(self.faults) >= self.s.min_faults):
                return
            at_s = time.monotonic() - started
            self.progress(f"{at_s:6.1f}s {fault.kind:7s} {self.members[fault.member].name}")
            reconverge_s = self.inject(fault)
            rounded = None if reconverge_s is None else round(reconverge_s, 3)
            self.faults.append({**asdict(fault), "at_s": round(at_s, 3), "reconverge_s": rounded})
            if reconverge_s is None:
                self.progress(f"        not one ring within {self.s.converge_timeout_s}s")

    # -- report --

    def report(self, ran_s: float, setup_s: float) -> dict[str, Any]:
        counts = self.tally.counts
        budget = int(self.s.capacity_gib * GIB)
        limit = budget + self.s.overhead_mib * MIB
        rss = {
            m.name: {"peak_bytes": m.peak_rss_bytes, "budget_bytes": budget,
                     "limit_bytes": limit, "ok": m.peak_rss_bytes <= limit, "boots": m.boots,
                     "started_bytes": m.started_rss_bytes,
                     "growth_bytes": m.peak_rss_bytes - m.started_rss_bytes}
            for m in self.members
        }  # fmt: skip
        times = [f["reconverge_s"] for f in self.faults if f["reconverge_s"] is not None]
        held, served = counts["chunks_held_live"], counts["chunks_served_of_held"]
        kinds = Counter(f["kind"] for f in self.faults)
        report = {
            "settings": {**asdict(self.s), "channel": self.channel},
            "setup_s": round(setup_s, 2),
            "ran_s": round(ran_s, 2),
            "requests": {op: counts[op] for op in ("put", "get", "lookup")}
            | {"total": counts["put"] + counts["get"] + counts["lookup"]},
            "chunks": {k: counts[k] for k in ("chunks_written", "chunks_hit", "chunks_missed")},
            "prompts_recorded": self.ledger.recorded,
            "faults": {k: kinds[k] for k in FAULT_KINDS} | {"total": len(self.faults)},
            "availability": {
                "chunks_served": served,
                "chunks_held_live": held,
                "ratio": round(served / held, 5) if held else None,
                "min": self.s.availability_min,
                "misses": self.misses.report(),
            },
            "wrong_bytes": counts["wrong_chunks"],
            "wrong_examples": self.tally.wrong,
            "deadline_overruns": len(self.tally.overruns),
            "overrun_examples": self.tally.overruns[:WRONG_EXAMPLES_MAX],
            "errors": counts["errors"],
            "error_examples": self.tally.errors,
            "latency_s": {op: percentiles(v) for op, v in self.tally.latencies.items()},
            "wakeup_lateness_s": percentiles(self.lateness),
            "peak_rss": rss,
            "reconvergence_s": percentiles(times)
            | {"not_reconverged": len(self.faults) - len(times)},
            "bad_inputs": {
                "sent": sum(self.intruder.sent.values()),
                "by_kind": dict(sorted(self.intruder.sent.items())),
                "dropped_counted": sum(sum(m.dropped_by_boot.values()) for m in self.members),
                "note": "dropped_counted: members' meshkv_frames_dropped, scraped each second; "
                "frames sent to a member just before it was killed are lost uncounted",
            },
            "crashes": {m.name: m.crashes for m in self.members if m.crashes},
            "fault_log": self.faults,
        }
        report["ok"] = (
            report["wrong_bytes"] == 0
            and report["deadline_overruns"] == 0
            and report["errors"] == 0
            and all(r["ok"] for r in rss.values())
            and report["reconvergence_s"]["not_reconverged"] == 0
            and not report["crashes"]
            and (not held or served / held >= self.s.availability_min)
        )
        return report


def percentiles(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"count": len(ordered), "p50": round(statistics.median(ordered), 4),
            "p99": round(p99, 4), "max": round(ordered[-1], 4)}  # fmt: skip


def run(settings: Settings, progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Runs one chaos run and returns its report; every process it starts is stopped."""
    with tempfile.TemporaryDirectory(prefix="meshkv-chaos-") as tmp:
        chaos = Chaos(settings, Path(tmp), progress)
        started = time.monotonic()
        try:
            chaos.start_members()
            chaos.start_clients()
            if chaos.wait_converged(settings.converge_timeout_s) is None:
                raise RuntimeError("the mesh never formed one ring: see the member logs")
            setup_s = time.monotonic() - started
            progress(
                f"one ring of {len(chaos.names())} after {setup_s:.1f}s "
                f"({chaos.channel} channel); chaos for {settings.duration_s:.0f}s"
            )
            chaos.start_workload()
            began = time.monotonic()
            chaos.run_faults(began + settings.duration_s, began + 2 * settings.duration_s)
            chaos.stop.wait(max(0.0, began + settings.duration_s - time.monotonic()))
            ran_s = time.monotonic() - began
        finally:
            chaos.close()
        return chaos.report(ran_s, setup_s)


# --- a client as a JSON-lines driver (for members this process cannot reach) ------------------


def client_main(args: argparse.Namespace) -> int:
    """Reads one JSON command per line on stdin, answers one JSON line on stdout.

    Commands: ``put {salt, prompts, chunks}`` -> ``{prompts: [[key hex...]], digests}``;
    ``get {keys, timeout_s}`` -> ``{count, digests, elapsed_s}``; ``views {addresses}`` ->
    ``{self, queried}`` (live sets); ``settle {timeout_s}``; ``quit``.
    """
    config = MeshConfig(
        enable_p2p=True, transfer_channel=args.channel, p2p_host=args.host,
        p2p_init_ports=args.port, p2p_lookup_ports=args.port + 1, mesh_seeds=args.seed,
        mesh_gossip_profile=args.profile, max_local_cpu_size=args.capacity,
        mesh_transfer_timeout_ms=int(args.timeout * 1000), lmcache_instance_id=args.name,
        mesh_secret=args.secret,
    )  # fmt: skip
    node = MeshNode(config, namespace=NAMESPACE)
    node.start()
    codec = gossip_codec(
        GossipConfig.profile(args.profile),
        AuthPolicy.from_strings(args.secret, None),
    )
    print(json.dumps({"ready": node.name, "nonce": node.nonce}), flush=True)
    try:
        for line in sys.stdin:
            request = json.loads(line)
            op = request["op"]
            if op == "quit":
                break
            if op == "put":
                rng = random.Random(request["seed"])
                prompts, digests = [], []
                for _ in range(request["prompts"]):
                    keys = prompt_keys(rng, request["salt"], request["chunks"])
                    chunks = [chunk_content(k, args.chunk_bytes) for k in keys]
                    node.put(keys, chunks)
                    prompts.append([k.hex() for k in keys])
                    digests.append([digest(c).hex() for c in chunks])
                answer: dict[str, Any] = {"prompts": prompts, "digests": digests}
            elif op == "get":
                keys = [bytes.fromhex(k) for k in request["keys"]]
                started = time.monotonic()
                with node.get(keys, args.chunk_bytes, timeout_s=request["timeout_s"]) as lease:
                    elapsed = time.monotonic() - started
                    found = [digest(v).hex() for v in lease.views]
                answer = {"count": len(found), "digests": found, "elapsed_s": elapsed}
            elif op == "views":
                queried = {a: live_set_of(a, codec) for a in request["addresses"]}
                answer = {"self": client_live_set(node), "queried": queried}
            elif op == "settle":
                deadline = time.monotonic() + request["timeout_s"]
                while not node.pusher.idle() and time.monotonic() < deadline:
                    time.sleep(0.05)
                answer = {"idle": node.pusher.idle()}
            else:
                answer = {"error": f"unknown op {op!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        node.stop(leave=False)
    return 0


class ClientProcess:
    """The driving side of `client_main`: starts ``chaos.py client`` (under ``prefix``, e.g.
    ``ip netns exec NS``) and sends it one command at a time, each answer bounded in time."""

    def __init__(self, args: Sequence[str], *, prefix: Sequence[str], log_path: Path) -> None:
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(Path(__file__).resolve()), "client", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, name="client-stdout", daemon=True).start()
        self.ready: dict[str, Any] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(b"")  # end of output: the process exited

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"client gave no answer within {timeout_s}s") from None
        if not line:
            raise RuntimeError(f"client exited with {self.proc.poll()}")
        return json.loads(line)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> dict[str, Any]:
        self.ready = self._answer(timeout_s)
        return self.ready

    def call(self, answer_within_s: float, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        return self._answer(answer_within_s)

    def stop(self) -> None:
        """Asks it to quit, then -9 if it has not within a few seconds; always reaps it."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        self._log.close()


# --- command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        parser = argparse.ArgumentParser(prog="chaos.py client")
        parser.add_argument("--name", required=True)
        parser.add_argument("--host", required=True)
        parser.add_argument("--port", type=int, required=True, help="gossip; data is port + 1")
        parser.add_argument("--seed", action="append", default=[])
        parser.add_argument("--channel", default="tcp")
        parser.add_argument("--profile", default="local")
        parser.add_argument("--capacity", type=float, default=0.03125)
        parser.add_argument("--chunk-bytes", type=int, default=64 * 1024)
        parser.add_argument("--timeout", type=float, default=1.0)
        parser.add_argument("--secret", default=None)
        return client_main(parser.parse_args(argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=4, help="member processes")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos")
    parser.add_argument("--seed", type=int, default=1, help="drives the faults and the load")
    parser.add_argument("--channel", default="auto", choices=["auto", "nixl", "tcp"],
                        help="transfer channel (auto: nixl where it imports)")  # fmt: skip
    parser.add_argument("--min-faults", type=int, default=0,
                        help="go on past --duration to this many faults (at most 2x)")  # fmt: skip
    parser.add_argument("--bad-input-rate", type=float, default=10.0,
                        help="bad frames sent per second (0: none)")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=2, help="mesh_replicas of everyone")
    parser.add_argument("--availability-min", type=float, default=0.99,
                        help="fail below this share of held chunks served")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    settings = Settings(members=args.members, duration_s=args.duration, seed=args.seed,
                        channel=args.channel, min_faults=args.min_faults,
                        bad_input_rate_hz=args.bad_input_rate, replicas=args.replicas,
                        availability_min=args.availability_min)  # fmt: skip
    with _progress(settings.duration_s) as progress:
        report = run(settings, progress=progress)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    summary = {k: report[k] for k in ("requests", "faults", "availability", "wrong_bytes",
                                      "deadline_overruns", "errors", "crashes",
                                      "reconvergence_s", "ok")}  # fmt: skip
    availability = summary["availability"] = dict(report["availability"])
    availability["misses_by_cause"] = availability.pop("misses")["chunks_by_cause"]
    summary["bad_inputs"] = {k: report["bad_inputs"][k] for k in ("sent", "dropped_counted")}
    summary["peak_rss_mib"] = {n: r["peak_bytes"] >> 20 for n, r in report["peak_rss"].items()}
    print(json.dumps(summary, indent=2))
    return 0 if report["ok"] else 1


@contextlib.contextmanager
def _progress(duration_s: float) -> Iterator[Callable[[str], None]]:
    """Fault lines above a rich progress bar on a terminal; plain lines otherwise."""
    if not sys.stdout.isatty():
        yield lambda line: print(line, flush=True)
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("chaos"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[faults]} faults"),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("chaos", total=duration_s, faults=0)
        started: list[float] = []
        faults = 0

        def show(line: str) -> None:
            nonlocal faults
            bar.console.print(line)
            if line.startswith("one ring"):
                started.append(time.monotonic())
            elif started and not line.startswith(" " * 8):
                faults += 1
            if started:
                bar.update(task, completed=min(duration_s, time.monotonic() - started[0]),
                           faults=faults)  # fmt: skip

        yield show


if __name__ == "__main__":
    sys.exit(main())
