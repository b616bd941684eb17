"""Fuzzing the shim's settings decoders (hypothesis): key=value arguments, LMCACHE_CONTROLLER_*
environment values, --monitor-ports JSON and controller config files.

Whatever the input, `load_settings` returns settings, or raises `ConfigError` whose message is
one line starting with the key (or flag) it names; nothing else may escape to the user as a
traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshkv.compat.controller_settings import CommandLine, load_settings, parse_monitor_ports
from meshkv.errors import ConfigError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file rewritten by every example (a directory per example is slow)."""
    return tmp_path_factory.mktemp("fuzz") / "controller.yaml"


CONTROLLER_KEYS = ["controller_host", "controller_port", "controller_monitor_ports",
                   "health_check_interval", "lmcache_worker_timeout", "extra_config",
                   "mesh_state_file"]  # fmt: skip
MESH_KEYS = ["chunk_size", "mesh_secret", "mesh_gossip_profile", "p2p_init_ports", "mesh_seeds"]
HOSTILE = ["²", "٣", "-²", "1.²", "1e400", "7" * 5000, "[" * 3000, "{", '{"pull": "²"}',
           '{"pull": 8300, "pull2": 1}', '{"pull": 0}', "true", "-1", "", "=", "a=b"]  # fmt: skip
raw_values = st.sampled_from(HOSTILE) | st.text(max_size=30).filter(lambda s: "\0" not in s)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def check(load: Any) -> None:
    try:
        load()
    except ConfigError as exc:
        assert "\n" not in str(exc), str(exc)
        assert str(exc).startswith(f"{exc.key}: "), str(exc)


@FUZZ
@given(st.lists(st.sampled_from([*CONTROLLER_KEYS, *MESH_KEYS]) | st.text(max_size=8), max_size=3)
       .flatmap(lambda ks: st.tuples(*[raw_values.map(lambda v, k=k: f"{k}={v}") for k in ks]))
       | st.lists(st.text(max_size=20), max_size=3).map(tuple))  # fmt: skip
@example(("controller_port=²",))
@example(("health_check_interval=-²",))
@example(("chunk_size=" + "7" * 5000,))
@example(("extra_config=" + "[" * 3000,))
def test_key_value_arguments_load_or_name_the_key(args: tuple[str, ...]) -> None:
    check(lambda: load_settings(CommandLine(extra=args), environ={}))


@FUZZ
@given(st.sampled_from(CONTROLLER_KEYS), raw_values)
@example("controller_port", "²")
@example("lmcache_worker_timeout", "٣")
@example("mesh_state_file", "~0")  # no user "0": expanduser raised instead of naming the key
def test_environment_values_load_or_name_the_variable(key: str, raw: str) -> None:
    check(lambda: load_settings(CommandLine(), environ={f"LMCACHE_CONTROLLER_{key.upper()}": raw}))


@FUZZ
@given(raw_values | json_values.map(str))
@example('{"pull": "²"}')
@example('{"pull": ' + "7" * 5000 + "}")
def test_monitor_ports_parse_or_name_the_flag(text: str) -> None:
    try:
        parse_monitor_ports(text)
    except ConfigError as exc:
        assert exc.key == "--monitor-ports" and "\n" not in str(exc)


@FUZZ
@given(st.dictionaries(st.sampled_from(CONTROLLER_KEYS) | st.text(max_size=6), json_values,
                       max_size=3).map(lambda d: yaml.safe_dump(d).encode())
       | st.binary(max_size=200))  # fmt: skip
@example(b"\xff\xfe")
@example(b"[" * 5000)
@example(b"controller_port: " + b"7" * 5000)
def test_controller_files_load_or_name_the_key(scratch_file: Path, data: bytes) -> None:
    path = scratch_file
    path.write_bytes(data)
    check(lambda: load_settings(CommandLine(config_path=str(path)), environ={}))
