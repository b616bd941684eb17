"""LMCache's config keys and value rules, so that an LMCache user's files load unchanged.

- `convert` turns a raw value (from YAML, an ``LMCACHE_*`` variable or vLLM's
  ``kv_connector_extra_config``) into the kind a key holds, by LMCache's rules: surrounding
  quotes stripped, booleans from "True"/"1" (and "False"/"0"), numbers from quoted text, lists
  from comma-separated text, ``extra_config`` from a mapping or JSON text. Where LMCache would
  quietly fall back to a default (a value it cannot convert), meshkv raises `ConfigError` naming
  the key: a wrong value must not pass silently.
- `resolve_alias` maps LMCache's older names (``controller_url``, ``lmcache_worker_port``...).
- `ignored_reason` says why meshkv accepts and does not use a key of LMCache's.

The key list is LMCache's own (`meshkv.lmcache_keys`, generated from its sources). This module
knows nothing of meshkv's config fields beyond the names it is asked about.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from meshkv.errors import ConfigError
from meshkv.lmcache_keys import ALIASES, DEFINITIONS, DEPRECATED

KINDS = ("int", "float", "bool", "str", "int_list", "float_list", "str_list", "json_dict")
TRUE_TEXTS = ("true", "1", "yes", "on")
FALSE_TEXTS = ("false", "0", "no", "off")
NUMBER_TEXT_MAX = 300
"""Longest text read as a number (``int`` refuses more than 4300 digits with a ValueError)."""

OLDER_LMCACHE_KEYS = frozenset(
    {
        "lookup_url",
        "distributed_url",
        "error_handling",
        "enable_nixl",
        "nixl_receiver_host",
        "nixl_receiver_port",
        "nixl_enable_gc",
        "audit_actual_remove",
        "weka_path",
        "cufile_buffer_size",
    }
)
"""Keys of LMCache versions before 0.5.6 that users' files still hold; accepted, not used."""

_REASONS_BY_PREFIX = (
    (
        ("local_disk", "max_local_disk", "remote_", "gds_", "use_gds", "maru_", "weka_", "cufile"),
        "meshkv keeps chunks in CPU memory only (no disk, GDS, CXL or remote backends)",
    ),
    (("storage_plugins", "runtime_plugin", "plugin_locations", "external_backends"), None),
    (("blend", "enable_blending"), "meshkv has no CacheBlend; chunks are reused by prefix only"),
    (
        ("pd_", "enable_pd", "enable_xpyd", "nixl_peer", "nixl_proxy", "nixl_role", "nixl_buf"),
        "meshkv has no disaggregated-prefill mode; every engine is a kv_both mesh member",
    ),
    (("nixl_receiver", "enable_nixl", "nixl_enable_gc"), "LMCache's older PD-over-NIXL mode"),
    (
        ("internal_api_server", "run_script_api", "script_allowed_imports"),
        "meshkv has no internal API server; its metrics are on lmcache_worker_ports",
    ),
    (
        ("lmcache_worker_heartbeat", "lmcache_worker_ids", "lookup_server_worker_ids"),
        "every TP rank is a gossip member; gossip probes replace worker heartbeats",
    ),
    (
        ("local_cpu_use_hugepages", "reserve_local_cpu", "lazy_memory", "enable_lazy_memory"),
        "meshkv's store carves its own segments from max_local_cpu_size",
    ),
    (("pin_", "blocking_timeout"), "every pin and wait in meshkv has its own deadline"),
    (("cache_policy",), "meshkv's store evicts least recently used chunks"),
    (
        ("pre_caching_hash_algorithm",),
        "meshkv names chunks by its own prefix hash, seeded with the engine's namespace",
    ),
    (("mp_", "hidden_state", "enable_hidden_state"), "LMCache's multi-process and Omni modes"),
    (("chunk_statistics", "enable_chunk_statistics"), "meshkv has no chunk statistics"),
    (("remote_config_url", "app_id"), "meshkv fetches no configuration from a remote service"),
)
_PLUGIN_REASON = "meshkv loads no LMCache plugins"
_DEFAULT_REASON = "an LMCache engine setting meshkv's mesh has no counterpart for"


def is_lmcache_key(key: str) -> bool:
    """True for every key LMCache 0.5.6 defines, its aliases and deprecated names, and the
    keys of older LMCache versions."""
    return key in DEFINITIONS or key in ALIASES or key in DEPRECATED or key in OLDER_LMCACHE_KEYS


def resolve_alias(key: str) -> str:
    """The key an older name stands for (a name LMCache still defines stays itself, as
    ``nixl_buffer_size`` does)."""
    return key if key in DEFINITIONS else ALIASES.get(key, key)


def ignored_reason(key: str) -> str:
    """Why meshkv accepts ``key`` and does not use it (one short clause)."""
    for prefixes, reason in _REASONS_BY_PREFIX:
        if key.startswith(prefixes):
            return reason or _PLUGIN_REASON
    return _DEFAULT_REASON


def lmcache_kind(key: str) -> str | None:
    """The kind of value LMCache converts ``key`` to, or None for a key it does not define."""
    definition = DEFINITIONS.get(key)
    return None if definition is None else definition[1]


def strip_quotes(text: str) -> str:
    """LMCache's rule for text values: surrounding whitespace, then one pair of matching quotes
    (with Python escapes inside) removed."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text[1:-1]
        return value if isinstance(value, str) else text[1:-1]
    return text


def convert(key: str, kind: str, value: Any) -> Any:
    """``value`` as LMCache converts it for a key of ``kind``; ConfigError naming ``key``."""
    if isinstance(value, str):
        value = strip_quotes(value)
    if kind == "bool":
        return _bool(key, value)
    if kind in ("int", "float"):
        return _number(key, kind, value)
    if kind.endswith("_list"):
        item_kind = kind.removesuffix("_list")
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        elif not isinstance(value, list):
            value = [value]
        return [convert(key, item_kind, item) for item in value]
    if kind == "json_dict":
        return _mapping(key, value)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(key, f"must be text, got {value!r}")
    return str(value)


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str | int) else None
    if text in TRUE_TEXTS:
        return True
    if text in FALSE_TEXTS:
        return False
    raise ConfigError(key, f'must be true or false ("True", "1", "False", "0"), got {value!r}')


def _number(key: str, kind: str, value: Any) -> int | float:
    what = "an integer" if kind == "int" else "a number"
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(key, f"must be {what}, got {value!r}")
    if isinstance(value, str) and len(value) > NUMBER_TEXT_MAX:
        raise ConfigError(key, f"must be {what}, got text of {len(value)} characters")
    try:
        number = float(value) if kind == "float" else _integer(value)
    except (ValueError, OverflowError):
        raise ConfigError(key, f"must be {what}, got {value!r}") from None
    return number


def _integer(value: str | int | float) -> int:
    """``int`` as LMCache applies it, but whole numbers only and ASCII digits only (``int``
    also reads "٣" and "1_000"; a float's fraction would be dropped silently)."""
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(value, str):
        digits = value.strip().removeprefix("-").removeprefix("+")
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(value)
    return int(value)


def _mapping(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value else {}
        except (ValueError, RecursionError):  # not JSON, an over-long integer, too deep
            raise ConfigError(key, "must be a mapping or a JSON object") from None
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, got {value!r}")
    return value
