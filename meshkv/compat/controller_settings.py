"""The shim's settings: LMCache's controller keys, and the meshkv keys the shim also reads.

LMCache's controller config has six keys (``controller_host``, ``controller_port``,
``controller_monitor_ports``, ``health_check_interval``, ``lmcache_worker_timeout``,
``extra_config``); the shim adds one of its own, ``mesh_state_file``. Every other key given to
the shim must be a meshkv config key (``mesh_secret``, ``mesh_gossip_profile``, ``chunk_size``,
``mesh_seeds``, ...) and goes to `meshkv.config.load_config`. An unknown key in the file is an
error that names it (a typo must not pass silently); on the command line, as in LMCache, an
argument that is not a known ``key=value`` is warned about and ignored.

Sources, later ones winning: defaults < controller file (``--config`` or
``LMCACHE_CONTROLLER_CONFIG_FILE``) < ``LMCACHE_CONTROLLER_<KEY>`` environment variables <
flags that were given < ``key=value`` arguments. (LMCache lets a flag's *default* override the
file; here a flag counts only when it is on the command line.) The meshkv keys are applied on
top of meshkv's own sources (``MESHKV_CONFIG_FILE``/``LMCACHE_CONFIG_FILE``, ``MESHKV_*``).

This module knows nothing of sockets, gossip or HTTP.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from meshkv.config import MeshConfig, load_config
from meshkv.errors import ConfigError
from meshkv.lmcache_values import is_lmcache_key

log = logging.getLogger("vllm.meshkv.compat.settings")

CONFIG_FILE_ENV = "LMCACHE_CONTROLLER_CONFIG_FILE"
ENV_PREFIX = "LMCACHE_CONTROLLER_"
MONITOR_PORTS_EXAMPLE = '{"pull": 8300, "reply": 8400}'
MONITOR_PORT_NAMES = ("pull", "reply", "heartbeat")
DEFAULT_HOST = "0.0.0.0"
DEFAULT_HTTP_PORT = 9000
DEFAULT_PULL_PORT = 8300
DEFAULT_REPLY_PORT = 8400
DEFAULT_HEALTH_CHECK_INTERVAL_S = -1
DEFAULT_WORKER_TIMEOUT_S = 300
INTEGER_DIGITS_MAX = 300
"""Longest run of digits read as a number from a key=value or an environment value."""


@dataclass(frozen=True, slots=True)
class MonitorPorts:
    """The controller's ZMQ ports: workers' configs name ``pull`` and ``reply`` as the
    controller URLs; ``heartbeat`` is where LMCache workers would send heartbeats."""

    pull: int
    reply: int | None = None
    heartbeat: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerSettings:
    """What ``lmcache_controller`` was asked to do, after every source was applied."""

    host: str = DEFAULT_HOST
    """Address the HTTP API and the seed members bind (LMCache's ``controller_host``)."""
    http_port: int = DEFAULT_HTTP_PORT
    """Port of the HTTP API (``controller_port``, flag ``--port``)."""
    monitor_ports: MonitorPorts = field(
        default_factory=lambda: MonitorPorts(DEFAULT_PULL_PORT, DEFAULT_REPLY_PORT)
    )
    """The seed members' gossip ports (``controller_monitor_ports``, ``--monitor-ports``)."""
    health_check_interval_s: int = DEFAULT_HEALTH_CHECK_INTERVAL_S
    """Accepted; gossip probes every member continuously, whatever this says."""
    worker_timeout_s: int = DEFAULT_WORKER_TIMEOUT_S
    """Accepted; a worker leaves the listings when gossip declares it dead (seconds)."""
    state_file: Path | None = None
    """Where the shim remembers a few members' gossip addresses to rejoin after a restart
    (default ``$XDG_STATE_HOME/meshkv/controller-<pull port>.json``, ``XDG_STATE_HOME``
    defaulting to ``~/.local/state``); None: not remembered (``mesh_state_file: ""``)."""
    extra_config: dict[str, Any] = field(default_factory=dict)
    """LMCache's controller ``extra_config``; kept for the log, unused."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandLine:
    """The flags as given (None: not given) and the ``key=value`` arguments."""

    config_path: str | None = None
    host: str | None = None
    port: int | None = None
    monitor_ports: str | None = None
    monitor_port: int | None = None
    health_check_interval: int | None = None
    lmcache_worker_timeout: int | None = None
    extra: Sequence[str] = ()


_CONTROLLER_KEYS = (
    "controller_host",
    "controller_port",
    "controller_monitor_ports",
    "health_check_interval",
    "lmcache_worker_timeout",
    "extra_config",
    "mesh_state_file",
)
_MESH_KEYS = frozenset(f.name for f in fields(MeshConfig))


def parse_monitor_ports(value: object, key: str = "--monitor-ports") -> MonitorPorts:
    """``'{"pull": 8300, "reply": 8400[, "heartbeat": 8082]}'`` (or that mapping) checked."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                key,
                f"is not JSON ({exc.msg} at column {exc.colno}); "
                f"expected e.g. '{MONITOR_PORTS_EXAMPLE}'",
            ) from None
        except (ValueError, RecursionError):  # an over-long integer, nesting too deep
            raise ConfigError(key, f"is not JSON like '{MONITOR_PORTS_EXAMPLE}'") from None
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a JSON object like '{MONITOR_PORTS_EXAMPLE}'")
    unknown = sorted(str(k) for k in value if k not in MONITOR_PORT_NAMES)
    if unknown:
        raise ConfigError(
            key, f"unknown port name {unknown[0]!r} (known: {', '.join(MONITOR_PORT_NAMES)})"
        )
    if value.get("pull") is None:
        raise ConfigError(key, f"needs a \"pull\" port, e.g. '{MONITOR_PORTS_EXAMPLE}'")
    ports = {name: _port(key, name, value.get(name)) for name in MONITOR_PORT_NAMES}
    given = [p for p in ports.values() if p is not None]
    if len(set(given)) != len(given):
        raise ConfigError(key, f"ports must be distinct, got {json.dumps(value)}")
    return MonitorPorts(**ports)


def _port(key: str, name: str, raw: object) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, str) and _is_number(raw) and len(raw) < 20:
        raw = int(raw)
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 < raw < 65536:
        raise ConfigError(key, f'"{name}" must be a port number in 1..65535, got {raw!r}')
    return raw


def parse_key_values(args: Sequence[str]) -> dict[str, Any]:
    """LMCache's extra arguments: ``key=value`` (leading dashes dropped); true/false, integers
    and decimals become bool/int/float, ``{...}``/``[...]`` is JSON, anything else a string.
    Anything else is warned about and ignored, as LMCache ignores it."""
    params: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.lstrip("-")
        if not sep or not key:
            log.warning("argument %s is neither a flag nor a key=value; ignored", _shown(arg))
            continue
        params[key] = _scalar(_shown(key), raw)
    return params


def _scalar(key: str, raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if _is_number(raw) and len(raw) <= INTEGER_DIGITS_MAX:
        return int(raw)
    if _is_number(raw.replace(".", "", 1)) and len(raw) <= INTEGER_DIGITS_MAX:
        return float(raw)
    if raw.startswith(("{", "[")):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(key, f"value is not valid JSON ({exc.msg})") from None
        except (ValueError, RecursionError):  # an over-long integer, nesting too deep
            raise ConfigError(key, "value is not valid JSON") from None
    return raw


def _shown(key: str) -> str:
    """A key as an error names it: as is, or quoted if it holds a newline or the like."""
    return key if key.isprintable() else repr(key)


def _is_number(text: str) -> bool:
    """Plain ASCII digits (``str.isdigit`` also accepts "²", which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def load_settings(
    command_line: CommandLine, environ: Mapping[str, str] | None = None
) -> tuple[ControllerSettings, MeshConfig]:
    """The shim's settings and the meshkv config of its seed members; ConfigError on a bad key."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = command_line.config_path or env.get(CONFIG_FILE_ENV)
    if path:
        values.update(_read_file(Path(path)))
    for key in _CONTROLLER_KEYS:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None:
            values[key] = _scalar(ENV_PREFIX + key.upper(), raw)
    flags = {
        "controller_host": command_line.host,
        "controller_port": command_line.port,
        "controller_monitor_ports": command_line.monitor_ports,
        "health_check_interval": command_line.health_check_interval,
        "lmcache_worker_timeout": command_line.lmcache_worker_timeout,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    for key, value in parse_key_values(command_line.extra).items():
        if key in _CONTROLLER_KEYS or key in _MESH_KEYS or is_lmcache_key(key):
            values[key] = value
        else:
            log.warning("argument %s=... is neither a controller key nor a config key; ignored",
                        _shown(key))  # fmt: skip
    mine = {k: values.pop(k) for k in _CONTROLLER_KEYS if k in values}
    unknown = sorted(str(k) for k in values if k not in _MESH_KEYS and not is_lmcache_key(k))
    if unknown:
        raise ConfigError(_shown(unknown[0]), "is neither a controller key nor a meshkv config key")
    settings = _settings(mine, command_line.monitor_port, env)
    return settings, load_config(None, overrides=values, environ=env)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{path} is not UTF-8 text") from None
    except (yaml.YAMLError, ValueError, RecursionError):  # also: over-long integers, deep nesting
        raise ConfigError("--config", f"{path} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of key: value")
    return data


def _settings(
    values: dict[str, Any], legacy_monitor_port: int | None, env: Mapping[str, str]
) -> ControllerSettings:
    host = values.get("controller_host", DEFAULT_HOST)
    if not isinstance(host, str) or not host:
        raise ConfigError("controller_host", f"must be a host name or address, got {host!r}")
    http_port = _port(
        "controller_port", "controller_port", values.get("controller_port", DEFAULT_HTTP_PORT)
    )
    if "controller_monitor_ports" in values:
        monitor = parse_monitor_ports(values["controller_monitor_ports"])
    elif legacy_monitor_port is not None:
        monitor = MonitorPorts(_port("--monitor-port", "pull", legacy_monitor_port) or 0)
    else:
        monitor = MonitorPorts(DEFAULT_PULL_PORT, DEFAULT_REPLY_PORT)
    if http_port in (monitor.pull, monitor.reply, monitor.heartbeat):
        raise ConfigError("controller_port", f"{http_port} is also a monitor port")
    interval = _integer(
        "health_check_interval",
        values.get("health_check_interval", DEFAULT_HEALTH_CHECK_INTERVAL_S),
    )
    if interval != -1 and interval < 1:
        raise ConfigError("health_check_interval", f"must be -1 (off) or >= 1, got {interval}")
    timeout = _integer(
        "lmcache_worker_timeout", values.get("lmcache_worker_timeout", DEFAULT_WORKER_TIMEOUT_S)
    )
    extra = values.get("extra_config") or {}
    if not isinstance(extra, dict):
        raise ConfigError("extra_config", f"must be a mapping, got {extra!r}")
    return ControllerSettings(
        host=host,
        http_port=http_port or 0,
        monitor_ports=monitor,
        health_check_interval_s=interval,
        worker_timeout_s=timeout,
        state_file=_state_file(values.get("mesh_state_file"), monitor.pull, env),
        extra_config=extra,
    )


def _integer(key: str, value: object) -> int:
    if isinstance(value, str) and _is_number(value.lstrip("-")) and len(value) < 20:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    return value


def _state_file(value: object, pull_port: int, env: Mapping[str, str]) -> Path | None:
    if value is None:
        state_home = env.get("XDG_STATE_HOME") or str(Path("~/.local/state").expanduser())
        return Path(state_home) / "meshkv" / f"controller-{pull_port}.json"
    if not isinstance(value, str):
        raise ConfigError("mesh_state_file", f"must be a path or empty, got {value!r}")
    try:
        return Path(value).expanduser() if value else None
    except RuntimeError as exc:  # "~user" for a user this system does not know
        raise ConfigError("mesh_state_file", f"cannot expand {value!r}: {exc}") from None
