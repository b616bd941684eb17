"""Configuration: LMCache's keys and meanings, plus meshkv's own ``mesh_*`` keys.

Sources, later ones winning: defaults < YAML file (``MESHKV_CONFIG_FILE`` or
``LMCACHE_CONFIG_FILE``) < environment (``LMCACHE_<KEY>``, then ``MESHKV_<KEY>``; lists
comma-separated, ``extra_config`` as JSON) < explicit overrides (vLLM's
``kv_connector_extra_config`` keys prefixed ``lmcache.`` or ``meshkv.``, or CLI flags).

Every value is checked when loaded; the first bad one raises `ConfigError` naming the key, so a
bad config fails at start with one clear line. LMCache keys that meshkv has no use for are
accepted and reported once in the log, so existing files keep working; any other unknown key is
an error (a typo must not pass silently).

This module knows nothing of sockets, rings or vLLM.
"""

from __future__ import annotations

import json
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

logger = logging.getLogger("vllm.meshkv.config")

PortSpec = int | list[int] | None

# Keys of LMCache 0.5.x that meshkv accepts and ignores (they configure machinery meshkv
# replaces or does not have: disks, remote backends, blending, disaggregated prefill).
IGNORED_LMCACHE_KEYS = frozenset(
    {
        "local_disk",
        "max_local_disk_size",
        "remote_url",
        "remote_serde",
        "use_layerwise",
        "save_decode_cache",
        "enable_blending",
        "blend_recompute_ratios",
        "blend_thresholds",
        "blend_check_layers",
        "blend_min_tokens",
        "blend_special_str",
        "lookup_url",
        "distributed_url",
        "controller_url",
        "lmcache_worker_port",
        "error_handling",
        "enable_nixl",
        "nixl_role",
        "nixl_receiver_host",
        "nixl_receiver_port",
        "nixl_buffer_size",
        "nixl_buffer_device",
        "nixl_enable_gc",
        "enable_xpyd",
        "enable_pd",
        "pd_role",
        "pd_buffer_size",
        "pd_buffer_device",
        "pd_peer_host",
        "pd_peer_init_port",
        "pd_peer_alloc_port",
        "pd_proxy_host",
        "pd_proxy_port",
        "cache_policy",
        "numa_mode",
        "external_lookup_client",
        "priority_limit",
        "py_enable_gc",
        "gds_path",
        "cufile_buffer_size",
        "weka_path",
        "external_backends",
        "audit_actual_remove",
        "blocking_timeout_secs",
        "internal_api_server_enabled",
        "internal_api_server_port_start",
        "internal_api_server_include_index_list",
        "hit_miss_ratio",
        "lookup_server_worker_ids",
        "enable_scheduler_bypass_lookup",
        "script_allowed_imports",
        "plugin_locations",
        "lmcache_worker_heartbeat_delay_time",
        "lmcache_worker_heartbeat_time",
        "enable_kv_events",
        "min_retrieve_tokens",
    }
)

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
        "LMCache's extra_config map; lookup_backoff_time is accepted and never slept on.",
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
        "Copies of each chunk on the ring's preference list (the producer also keeps one).",
        default=1,
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
        spans = {
            name: _rank_ports(name, getattr(self, name), world_size)
            for name in ("p2p_init_ports", "p2p_lookup_ports", "lmcache_worker_ports")
        }
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
        )


@dataclass(frozen=True, slots=True)
class RankPorts:
    """The ports one TP rank binds; 0 means any free port, None means not served."""

    gossip: int
    data: int
    admin: int | None


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
    for key in ("p2p_init_ports", "p2p_lookup_ports", "lmcache_worker_ports"):
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
    if path:
        values.update(_read_file(Path(path)))
    for prefix in ("LMCACHE_", "MESHKV_"):
        for name in _FIELDS:
            raw = env.get(prefix + name.upper())
            if raw is not None:
                values[name] = _parse_env(prefix + name.upper(), name, raw)
    for key, value in (overrides or {}).items():
        values[key.removeprefix("lmcache.").removeprefix("meshkv.")] = value
    return _build(values)


def config_from_vllm_extra(extra: Mapping[str, Any], path: str | None = None) -> MeshConfig:
    """The connector's entry: file + env, then ``kv_connector_extra_config`` keys
    prefixed ``lmcache.`` or ``meshkv.`` (other keys there belong to vLLM or other tools)."""
    mine = {k: v for k, v in extra.items() if k.startswith(("lmcache.", "meshkv."))}
    return load_config(path, overrides=mine)


def _read_file(path: Path) -> dict[str, Any]:
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


def _parse_env(var: str, name: str, raw: str) -> Any:
    kind = _HINTS[name]
    if name == "extra_config":
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, an over-long integer, too deep
            raise ConfigError(var, "must be a JSON object") from None
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(var, f"{raw!r} is not a boolean")
    if raw.strip() == "" and _allows_none(kind):
        return None
    if kind is int or kind is float:
        try:
            return kind(raw)
        except ValueError:
            raise ConfigError(
                var, f"{raw!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
    if kind == PortSpec:
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        if not all(_is_number(p) and len(p) < 20 for p in parts) or not parts:  # int() caps digits
            raise ConfigError(var, f"{raw!r} is not a port or a comma-separated list of ports")
        ports = [int(p) for p in parts]
        return ports[0] if len(ports) == 1 else ports
    if kind == list[str]:
        return [p.strip() for p in raw.split(",") if p.strip()]
    return raw


def _build(values: dict[str, Any]) -> MeshConfig:
    accepted: dict[str, Any] = {}
    for key, value in values.items():
        if key in IGNORED_LMCACHE_KEYS:
            logger.info("config key %s is an LMCache setting meshkv does not use; ignored", key)
            continue
        if key not in _FIELDS:
            shown = key if isinstance(key, str) and key.isprintable() else repr(key)
            raise ConfigError(shown, "unknown key")
        accepted[key] = _coerce(key, value)
    if "extra_config" in accepted:
        accepted["extra_config"] = {**EXTRA_CONFIG_DEFAULTS, **accepted["extra_config"]}
    return MeshConfig(**accepted)


def _coerce(key: str, value: Any) -> Any:
    """Checks a value against the field's type (YAML gives native types)."""
    kind = _HINTS[key]
    if value is None:
        _check(_allows_none(kind), key, "must not be empty")
        return None
    if kind is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
    elif kind is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"must be an integer, got {value!r}",
        )
    elif kind is float:
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            key,
            f"must be a number, got {value!r}",
        )
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(key, "must be a number, got an integer too large for one") from None
    elif kind == PortSpec:
        if isinstance(value, str):
            value = _parse_env(key, key, value)
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, list)
            and value
            and all(isinstance(p, int) and not isinstance(p, bool) for p in value)
        )
        _check(bool(ok), key, f"must be a port or a list of ports, got {value!r}")
    elif kind == list[str]:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        _check(
            isinstance(value, list) and all(isinstance(v, str) for v in value),
            key,
            f"must be a list of strings, got {value!r}",
        )
        _check(all(_is_text(v) for v in value), key, "must be UTF-8 text")
    elif kind == dict[str, Any]:
        _check(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
    else:  # str or str | None
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        _check(_is_text(value), key, "must be UTF-8 text")  # e.g. undecodable bytes in the env
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
