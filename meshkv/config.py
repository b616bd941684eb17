"""Configuration: LMCache's keys and meanings, plus meshkv's own ``mesh_*`` keys.

Sources, later ones winning: defaults < YAML file (``MESHKV_CONFIG_FILE`` or
``LMCACHE_CONFIG_FILE``) < environment (``LMCACHE_<KEY>``, then ``MESHKV_<KEY>``; lists
comma-separated, ``extra_config`` as JSON) < explicit overrides (vLLM's
``kv_connector_extra_config`` keys prefixed ``lmcache.`` or ``meshkv.``, or CLI flags).

Values convert as LMCache converts them (`meshkv.lmcache_values`: quotes stripped, "True"/"1"
booleans, quoted numbers, comma lists), then every value is checked; the first bad one raises
`ConfigError` naming the key, so a bad config fails at start with one clear line. Every key
LMCache 0.5.6 defines (`meshkv.lmcache_keys`) is accepted: mapped where meshkv has the meaning,
otherwise reported once in the log as ignored, with why. Any other unknown key is an error (a
typo must not pass silently), except ``lmcache.`` keys of vLLM's ``kv_connector_extra_config``,
which LMCache's own vLLM adapter reads (``lmcache.max_tokens_per_load``...).

This module knows nothing of sockets, rings or vLLM.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from meshkv.errors import ConfigError
from meshkv.lmcache_keys import ALIASES, DEFINITIONS, DEPRECATED
from meshkv.lmcache_values import (
    OLDER_LMCACHE_KEYS,
    convert,
    ignored_reason,
    is_lmcache_key,
    resolve_alias,
)

logger = logging.getLogger("vllm.meshkv.config")

PortSpec = int | list[int] | None

TIMEOUT_MS_MAX = 86_400_000
"""Longest timeout accepted (a day): larger values are typos, and huge ones overflow a float."""
STORE_BYTES_MIN = 4096
"""Smallest store budget: one page (a member's store cannot be smaller)."""

EXTRA_CONFIG_DEFAULTS: dict[str, Any] = {
    "lookup_backoff_time": 0.01,
    "p2p_socket_recv_timeout_ms": 30000,
    "p2p_socket_send_timeout_ms": 10000,
    "p2p_max_retry_count": 3,
}


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"doc": text}, **kw)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    """One member's configuration. Field docs are the reference (the README's table is made
    from them by ``meshkv config-reference``)."""

    # --- LMCache keys -------------------------------------------------------------------------
    chunk_size: int = _doc(
        "Tokens per chunk, the unit of sharing; a multiple of vLLM's block size.", default=256
    )
    local_cpu: bool = _doc(
        "Keep chunks in this member's CPU memory (meshkv always does; False is refused).",
        default=True,
    )
    max_local_cpu_size: float = _doc(
        "Store budget in GiB for chunks held by this member.", default=5.0
    )
    save_unfull_chunk: bool = _doc(
        "Accepted for compatibility; meshkv stores full chunks only "
        "(a partial chunk is recomputed).",
        default=False,
    )
    enable_async_loading: bool = _doc(
        "Load chunks in the background; vLLM schedules the request when they arrive.", default=False
    )
    lookup_timeout_ms: int = _doc(
        "How long the scheduler waits for a mesh lookup before treating it as a miss.", default=3000
    )
    enable_p2p: bool = _doc(
        "Share chunks with other members. False: this member caches locally only.", default=False
    )
    p2p_host: str = _doc(
        "Address this member binds and advertises (use 127.0.0.1 on one host).", default="127.0.0.1"
    )
    p2p_init_ports: PortSpec = _doc(
        "Gossip port per TP rank (int: base + rank; list: one per rank; unset: any free port).",
        default=None,
    )
    p2p_lookup_ports: PortSpec = _doc(
        "Data-plane port per TP rank (int: base + rank; list: one per rank; unset: any free port).",
        default=None,
    )
    transfer_channel: str = _doc(
        'How chunk bytes move: "nixl" (NIXL WRITE) or "tcp" '
        "(inline over ZMQ, for hosts without NIXL/UCX).",
        default="nixl",
    )
    nixl_backends: list[str] = _doc(
        "NIXL backends to create; meshkv uses UCX for DRAM to DRAM.",
        default_factory=lambda: ["UCX"],
    )
    enable_controller: bool = _doc(
        "Find the mesh through an lmcache_controller shim at "
        "controller_pull_url/controller_reply_url.",
        default=False,
    )
    lmcache_instance_id: str = _doc(
        "This engine's name in the mesh (member id = instance/rank). Unset: vllm-<8 hex> from "
        "vLLM's engine id, the same for all the engine's ranks (hostname-pid outside vLLM).",
        default="",
    )
    controller_pull_url: str | None = _doc(
        'Shim address "host:port" used as a gossip seed when enable_controller is true.',
        default=None,
    )
    controller_reply_url: str | None = _doc(
        'Second shim address "host:port", also used as a seed.', default=None
    )
    lmcache_worker_ports: PortSpec = _doc(
        "Admin/metrics HTTP port per TP rank (Prometheus /metrics); unset: none.", default=None
    )
    extra_config: dict[str, Any] = _doc(
        "LMCache's extra_config map. p2p_socket_recv_timeout_ms sets mesh_transfer_timeout_ms "
        "(unless that is given); lookup_backoff_time, p2p_socket_send_timeout_ms and "
        "p2p_max_retry_count are accepted and logged as unused (meshkv never sleeps on the "
        "scheduler thread, never blocks a send, never retries: a failed chunk is a miss).",
        default_factory=lambda: dict(EXTRA_CONFIG_DEFAULTS),
    )

    # --- meshkv keys --------------------------------------------------------------------------
    mesh_seeds: list[str] = _doc(
        'Gossip addresses "host:port" of any members to join through.', default_factory=list
    )
    mesh_vnodes: int = _doc(
        "Ring points per member; more spreads load evenly at the cost of ring memory.", default=256
    )
    mesh_replicas: int = _doc(
        "Copies of each chunk on the ring's preference list (the producer also keeps one). "
        "With 2 (the default, right for 2-8 engines) a frozen or dead holder costs a reader "
        "one hedge delay, not a miss, and a death is repaired from the surviving copy; 1 "
        "halves the memory but then only the producer's own copy covers a sick home.",
        default=2,
    )
    mesh_secret: str | None = _doc(
        "Shared secret (>= 16 chars); when set every frame is authenticated with HMAC-SHA256.",
        default=None,
    )
    mesh_previous_secret: str | None = _doc(
        "A second accepted secret during a key rotation (never used to sign).", default=None
    )
    mesh_model_id: str | None = _doc(
        "Overrides the model identity in the namespace, to share between differently "
        "named copies of the same weights.",
        default=None,
    )
    mesh_gossip_profile: str = _doc(
        'Gossip timing profile: "lan", "local" (one host) or "test" (fast, for tests).',
        default="lan",
    )
    mesh_transfer_timeout_ms: int = _doc(
        "Deadline of one get or put between members; past it the chunk is a miss.", default=2000
    )
    mesh_lookup_stream: bool = _doc(
        "Serve lookups on a plain-TCP lookup port too (one more port per rank): a lookup "
        "there costs about half the CPU of one over the ZMQ data port. False: lookups to this "
        "member use the data port (p2p_lookup_ports) only.",
        default=True,
    )
    mesh_lookup_stream_ports: PortSpec = _doc(
        "Lookup port per TP rank, with mesh_lookup_stream (int: base + rank; list: one per "
        "rank; unset: any free port).",
        default=None,
    )

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        _validate(self)

    @property
    def instance_id(self) -> str:
        return self.lmcache_instance_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def seeds(self) -> list[str]:
        """Gossip seeds: ``mesh_seeds`` plus the shim's URLs when the controller is enabled."""
        seeds = list(self.mesh_seeds)
        if self.enable_controller:
            seeds += [u for u in (self.controller_pull_url, self.controller_reply_url) if u]
        return list(dict.fromkeys(seeds))

    def ports_for_rank(self, rank: int, world_size: int) -> RankPorts:
        """Per-rank ports; a scalar port with world size > 1 becomes base + rank."""
        if not 0 <= rank < world_size:
            raise ConfigError("tp_rank", f"rank {rank} outside world size {world_size}")
        spans = {name: _rank_ports(name, getattr(self, name), world_size) for name in PORT_KEYS}
        seen: dict[int, str] = {}
        for name, ports in spans.items():
            for port in ports:
                if port is not None and port != 0:
                    if port in seen:
                        raise ConfigError(
                            name,
                            f"port {port} for TP world size {world_size} collides with "
                            f"{seen[port]}; give a list with one distinct port per rank",
                        )
                    seen[port] = name
        return RankPorts(
            gossip=spans["p2p_init_ports"][rank] or 0,
            data=spans["p2p_lookup_ports"][rank] or 0,
            admin=spans["lmcache_worker_ports"][rank],
            lookup_stream=spans["mesh_lookup_stream_ports"][rank] or 0,
        )


@dataclass(frozen=True, slots=True)
class RankPorts:
    """The ports one TP rank binds; 0 means any free port, None means not served."""

    gossip: int
    data: int
    admin: int | None
    lookup_stream: int = 0


PORT_KEYS = (
    "p2p_init_ports",
    "p2p_lookup_ports",
    "lmcache_worker_ports",
    "mesh_lookup_stream_ports",
)


def _rank_ports(key: str, spec: PortSpec, world_size: int) -> list[int | None]:
    if spec is None:
        return [None] * world_size
    if isinstance(spec, int):
        return [spec + r if spec else 0 for r in range(world_size)]
    if len(spec) < world_size:
        raise ConfigError(key, f"has {len(spec)} ports but TP world size is {world_size}")
    return list(spec[:world_size])


# --- validation ------------------------------------------------------------------------------


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def _validate(c: MeshConfig) -> None:
    _check(c.chunk_size > 0, "chunk_size", f"must be positive, got {c.chunk_size}")
    _check(c.local_cpu, "local_cpu", "meshkv keeps chunks in CPU memory; False is not supported")
    _check(
        math.isfinite(c.max_local_cpu_size) and c.max_local_cpu_size * 2**30 >= STORE_BYTES_MIN,
        "max_local_cpu_size",
        f"must be a finite number of GiB, at least one 4 KiB page, got {c.max_local_cpu_size}",
    )
    for key in ("lookup_timeout_ms", "mesh_transfer_timeout_ms"):
        value = getattr(c, key)
        _check(0 < value <= TIMEOUT_MS_MAX, key, f"must be in 1..{TIMEOUT_MS_MAX}, got {value}")
    _check(
        c.transfer_channel in ("nixl", "tcp"),
        "transfer_channel",
        f'must be "nixl" or "tcp", got {c.transfer_channel!r}',
    )
    _check(bool(c.p2p_host), "p2p_host", "must not be empty")
    for key in PORT_KEYS:
        spec = getattr(c, key)
        ports = [] if spec is None else [spec] if isinstance(spec, int) else spec
        _check(all(0 <= p < 65536 for p in ports), key, f"ports must be in 0..65535, got {spec}")
    for key in ("controller_pull_url", "controller_reply_url"):
        if getattr(c, key) is not None:
            _check_address(key, getattr(c, key))
    if c.enable_controller:
        _check(
            bool(c.controller_pull_url or c.controller_reply_url),
            "controller_pull_url",
            "enable_controller is true but no controller URL is set",
        )
    for seed in c.mesh_seeds:
        _check_address("mesh_seeds", seed)
    _check(
        128 <= c.mesh_vnodes <= 4096, "mesh_vnodes", f"must be in 128..4096, got {c.mesh_vnodes}"
    )
    _check(1 <= c.mesh_replicas <= 8, "mesh_replicas", f"must be in 1..8, got {c.mesh_replicas}")
    for key in ("mesh_secret", "mesh_previous_secret"):
        secret = getattr(c, key)
        _check(secret is None or len(secret) >= 16, key, "must be at least 16 characters")
    _check(
        c.mesh_previous_secret is None or c.mesh_secret is not None,
        "mesh_previous_secret",
        "set mesh_secret too (the previous secret is only accepted, never used to sign)",
    )
    _check(
        c.mesh_gossip_profile in ("lan", "local", "test"),
        "mesh_gossip_profile",
        f'must be "lan", "local" or "test", got {c.mesh_gossip_profile!r}',
    )
    backoff = c.extra_config.get("lookup_backoff_time", 0.01)
    _check(
        isinstance(backoff, int | float) and not isinstance(backoff, bool) and backoff >= 0,
        "extra_config.lookup_backoff_time",
        "must be a number >= 0",
    )


def _check_address(key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    _check(
        bool(sep and host and _is_number(port) and 0 < int(port) < 65536),
        key,
        f'{value!r} is not "host:port"',
    )


def _is_number(text: str) -> bool:
    """Plain ASCII digits (``str.isdigit`` also accepts "²", which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


# --- loading ---------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in fields(MeshConfig)}
_HINTS = typing.get_type_hints(MeshConfig)
IGNORED_LMCACHE_KEYS = frozenset(
    key for key in (*DEFINITIONS, *ALIASES, *DEPRECATED) if resolve_alias(key) not in _FIELDS
) | (OLDER_LMCACHE_KEYS - _FIELDS.keys())
"""LMCache keys meshkv accepts and does not use (each logged once, with why)."""
EXTRA_CONFIG_MAPPED = {"p2p_socket_recv_timeout_ms": "mesh_transfer_timeout_ms"}
"""extra_config keys whose meaning a meshkv key has: how long to wait for a peer's answer.
Applied when the file sets them and does not set the meshkv key."""
EXTRA_CONFIG_KINDS = {
    "lookup_backoff_time": "float",
    "p2p_socket_recv_timeout_ms": "int",
    "p2p_socket_send_timeout_ms": "int",
    "p2p_max_retry_count": "int",
}
EXTRA_CONFIG_IGNORED = {
    "lookup_backoff_time": "meshkv never sleeps on the scheduler thread; a lookup is polled",
    "p2p_socket_send_timeout_ms": "meshkv's sends never block (queued DEALER sockets); "
    "every call has its own deadline (mesh_transfer_timeout_ms)",
    "p2p_max_retry_count": "meshkv does not retry a failed transfer: the chunk is a miss "
    "that vLLM recomputes",
}
_LMCACHE_ENV_NAMES = tuple(dict.fromkeys((*_FIELDS, *DEFINITIONS, *ALIASES)))
"""Keys read from ``LMCACHE_<KEY>`` variables: meshkv's and every one LMCache reads."""
_VLLM_ADAPTER_REASON = "read by LMCache's own vLLM adapter; meshkv's connector has no such knob"


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> MeshConfig:
    """Builds a MeshConfig from file, environment and overrides; raises ConfigError on any bad key.

    ``path`` defaults to ``MESHKV_CONFIG_FILE`` or ``LMCACHE_CONFIG_FILE``; no file is fine.
    """
    env = os.environ if environ is None else environ
    path = path or env.get("MESHKV_CONFIG_FILE") or env.get("LMCACHE_CONFIG_FILE")
    values: dict[str, Any] = {}
    ignored: dict[str, str] = {}  # key -> why; logged once each, after loading
    if path:
        for key, raw in _read_file(Path(path)).items():
            _take(values, ignored, key, raw, key)
    for prefix, names in (("LMCACHE_", _LMCACHE_ENV_NAMES), ("MESHKV_", tuple(_FIELDS))):
        for name in names:
            raw = env.get(prefix + name.upper())
            if raw is not None:
                _take(values, ignored, name, _from_env(name, raw), prefix + name.upper())
    for key, raw in (overrides or {}).items():
        if isinstance(key, str) and key.startswith("lmcache."):
            name = key.removeprefix("lmcache.")
            if not is_lmcache_key(name) and name not in _FIELDS:
                ignored[key] = _VLLM_ADAPTER_REASON
                continue
            _take(values, ignored, name, raw, name)
        else:
            name = key.removeprefix("meshkv.") if isinstance(key, str) else key
            _take(values, ignored, name, raw, name)
    config = _build(values, ignored)
    for key, reason in ignored.items():
        logger.info("config key %s ignored by meshkv: %s", key, reason)
    return config


def config_from_vllm_extra(extra: Mapping[str, Any], path: str | None = None) -> MeshConfig:
    """The connector's entry: file + env, then ``kv_connector_extra_config`` keys
    prefixed ``lmcache.`` or ``meshkv.`` (other keys there belong to vLLM or other tools)."""
    mine = {k: v for k, v in extra.items() if k.startswith(("lmcache.", "meshkv."))}
    return load_config(path, overrides=mine)


def _take(values: dict[str, Any], ignored: dict[str, str], key: Any, raw: Any, source: str) -> None:
    """Converts and records one value for ``key`` (an LMCache alias resolved); an LMCache key
    meshkv does not use goes to ``ignored`` with why; an unknown key is an error naming it."""
    shown = key if isinstance(key, str) and key.isprintable() else repr(key)
    if not isinstance(key, str):
        raise ConfigError(shown, "unknown key")
    key = resolve_alias(key)
    if key in IGNORED_LMCACHE_KEYS:
        ignored[key] = ignored_reason(key)
        return
    if key not in _FIELDS:
        raise ConfigError(shown, "unknown key")
    values[key] = _coerce(key, raw, source)


def _read_file(path: Path) -> dict[Any, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config file", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("config file", f"{path} is not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError("config file", f"{path} is not valid YAML{line}") from None
    except (RecursionError, ValueError) as exc:  # nested too deep, an over-long integer, a bad date
        problem = "nested too deeply" if isinstance(exc, RecursionError) else "a value out of range"
        raise ConfigError("config file", f"{path} is not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config file", f"{path} must hold a mapping of key: value")
    return data


def _from_env(name: str, raw: str) -> Any:
    """An environment value: empty text is "unset" for a key that may be None."""
    kind = _HINTS.get(resolve_alias(name))
    if raw.strip() == "" and kind is not None and _allows_none(kind):
        return None
    return raw


def _build(values: dict[str, Any], ignored: dict[str, str]) -> MeshConfig:
    if "extra_config" in values:
        given = values["extra_config"]
        for key, meshkv_key in EXTRA_CONFIG_MAPPED.items():
            if key in given and meshkv_key not in values:
                values[meshkv_key] = _coerce(meshkv_key, given[key], f"extra_config.{key}")
        for key, reason in EXTRA_CONFIG_IGNORED.items():
            if key in given:
                ignored[f"extra_config.{key}"] = reason
        values["extra_config"] = {**EXTRA_CONFIG_DEFAULTS, **given}
    return MeshConfig(**values)


def _kind(key: str) -> str:
    """How a field's values convert (LMCache's rules; ports keep a scalar scalar)."""
    hint = _HINTS[key]
    if hint == PortSpec:
        return "ports"
    if hint == list[str]:
        return "str_list"
    if hint == dict[str, Any]:
        return "json_dict"
    for kind in (bool, int, float):
        if hint is kind:
            return kind.__name__
    return "str"


def _coerce(key: str, value: Any, source: str | None = None) -> Any:
    """``value`` converted for the field ``key``; errors name ``source`` (the key, or the
    environment variable it came from)."""
    source = source or key
    kind = _kind(key)
    if value is None:
        _check(_allows_none(_HINTS[key]), source, "must not be empty")
        return None
    if kind == "ports":
        try:
            ports = convert(source, "int_list", value)
        except ConfigError:
            ports = []
        _check(bool(ports), source, f"must be a port or a list of ports, got {value!r}")
        value = ports if isinstance(value, list) or len(ports) > 1 else ports[0]
    elif kind == "json_dict":
        value = dict(convert(source, kind, value))
        for name, extra_kind in EXTRA_CONFIG_KINDS.items():
            if name in value:
                value[name] = convert(f"{key}.{name}", extra_kind, value[name])
    else:
        value = convert(source, kind, value)
    if kind == "float":
        return float(value)
    texts = value if kind == "str_list" else [value] if kind == "str" else []
    _check(all(_is_text(v) for v in texts), source, "must be UTF-8 text")
    return value


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:  # lone surrogates: from "\ud800" in JSON or bad bytes in env
        return False
    return True


def _allows_none(kind: Any) -> bool:
    return isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)


def with_overrides(config: MeshConfig, **changes: Any) -> MeshConfig:
    """A copy of ``config`` with checked changes (used by CLI flags)."""
    for key, value in changes.items():
        changes[key] = _coerce(key, value)
    return replace(config, **changes)


def reference_markdown() -> str:
    """The config reference as a Markdown table, made from the field docs above."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in fields(MeshConfig):
        default = f.default if f.default_factory is MISSING else f.default_factory()
        kind = _HINTS[f.name]
        type_name = (
            kind.__name__ if isinstance(kind, type) else str(kind).replace("NoneType", "None")
        )
        rows.append(f"| `{f.name}` | `{type_name}` | `{default!r}` | {f.metadata['doc']} |")
    return "\n".join(rows)
