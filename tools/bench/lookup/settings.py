"""The lookup benchmark's sizes, timeouts, targets and where things live."""

from __future__ import annotations

import itertools
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
LMCACHE_SIDE = REPO_ROOT / "tools" / "lmcache_side"
SCRIPT = REPO_ROOT / "tools" / "bench_lookup.py"
"""What the benchmark's children run (``echo-server``, ``mesh-member``)."""
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

AGGREGATE_IN_FLIGHT = 4
"""Lookups every asker keeps in flight under aggregate load (LMCache worker or meshkv member)."""
AGGREGATE_START_DELAY_S = 0.5
"""Time from the order to the common start, so every asker starts at once."""

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
    "aggregate_throughput_ratio": 2.0,
}
