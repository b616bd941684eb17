"""Fuzzing the config decoders (hypothesis): YAML files, environment values, vLLM overrides.

Whatever the input, `load_config` either returns a config a member can be built from, or raises
`ConfigError` whose message is one line starting with the key it names (the YAML key, the
environment variable, or ``config file``). Any other exception is a crash a user would see as a
traceback, and fails the test. "Can be built from" means every value `MeshNode` derives before
it binds a socket works: the store's segments, the rank's ports, the frame authentication.
"""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshkv.config import IGNORED_LMCACHE_KEYS, MeshConfig, load_config
from meshkv.errors import ConfigError
from meshkv.gossip.config import GossipConfig
from meshkv.node.mesh_node import GIB, member_auth
from meshkv.store import segment_sizes

FIELDS = sorted(MeshConfig.__dataclass_fields__)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file rewritten by every example (a directory per example is slow)."""
    return tmp_path_factory.mktemp("fuzz") / "config.yaml"


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.integers(-2, 70000)
    | st.floats()
    | st.text(max_size=24)
    | st.sampled_from(["127.0.0.1:7000", "host:", ":1", "h:²", "8200", "nixl", "tcp", "test"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
keys = (
    st.sampled_from(FIELDS)
    | st.sampled_from(sorted(IGNORED_LMCACHE_KEYS)[:5])
    | st.text(max_size=12)
)
env_text = st.text(max_size=40).filter(lambda s: "\0" not in s) | st.sampled_from(
    ["", " ", "²", "٣", "1e400", "inf", "-inf", "nan", "-1", "0x10", "1_000", "[" * 3000,
     "8200,²", "8200, 8201", "true", "{}", "[]", '{"lookup_backoff_time": -1}', "a" * 16]
)  # fmt: skip


def usable(config: MeshConfig) -> None:
    """What `MeshNode` computes from a config before binding anything; must not raise."""
    segment_sizes(int(config.max_local_cpu_size * GIB))
    config.ports_for_rank(0, 1)
    member_auth(config)
    GossipConfig.profile(config.mesh_gossip_profile)
    assert isinstance(config.seeds, list) and isinstance(config.instance_id, str)
    assert math.isfinite(config.mesh_transfer_timeout_ms) and config.chunk_size > 0


def check_outcome(load: Any, named: set[str]) -> None:
    """``load()`` gives a usable config, or a one-line ConfigError naming one of ``named``
    (or, for a cross-key rule, a field) and starting with that name."""
    try:
        config = load()
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message, f"not one line: {message!r}"
        assert message.startswith(f"{exc.key}: "), message
        root = str(exc.key).split(".")[0]
        shown = {k if k.isprintable() else repr(k) for k in named}
        assert str(exc.key) in shown or root in shown or root in FIELDS, message
        return
    try:
        usable(config)
    except ConfigError as exc:  # a per-rank port clash is a ConfigError too: fine
        assert "\n" not in str(exc)


@FUZZ
@given(st.dictionaries(keys, values, max_size=4))
@example({"max_local_cpu_size": 10**400})
@example({"max_local_cpu_size": math.inf})
@example({"max_local_cpu_size": 0})
@example({"max_local_cpu_size": 1e-12})
@example({"mesh_seeds": ["h:²"]})
@example({"controller_pull_url": "h:²"})
@example({"p2p_init_ports": "²"})
@example({"extra_config": {"lookup_backoff_time": math.nan}})
def test_yaml_mappings_load_or_name_the_key(scratch_file: Path, mapping: dict[Any, Any]) -> None:
    path = scratch_file
    path.write_text(yaml.safe_dump(mapping))
    check_outcome(
        lambda: load_config(path, environ={}), {str(k) for k in mapping} | {"config file"}
    )


@FUZZ
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
@example(b"\xff\xfe\x00garbage")
@example(b"[" * 5000)
@example(b"chunk_size: " + b"7" * 5000)
@example(b"p2p_init_ports: [" + b"7" * 5000 + b"]")
@example(b"a: &x [*x]\n")
@example(b"? [1, 2]\n: 3\n")
@example(b"chunk_size: !!python/object:os.system ls\n")
def test_any_file_content_loads_or_is_one_clear_line(scratch_file: Path, data: bytes) -> None:
    path = scratch_file
    path.write_bytes(data)

    def load() -> MeshConfig:
        return load_config(path, environ={})

    try:
        config = load()
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(f"{exc.key}: ")
        return
    usable(config)


@FUZZ
@given(st.sampled_from(["LMCACHE_", "MESHKV_"]), st.sampled_from(FIELDS), env_text)
@example("MESHKV_", "p2p_init_ports", "²")
@example("MESHKV_", "p2p_lookup_ports", "7" * 5000)  # over int()'s 4300-digit limit
@example("MESHKV_", "max_local_cpu_size", "1e400")
@example("MESHKV_", "extra_config", "[" * 3000)
@example("MESHKV_", "mesh_seeds", "h:²")
@example("MESHKV_", "mesh_secret", "\udcff" * 16)  # undecodable bytes in the environment
@example("LMCACHE_", "max_local_cpu_size", "0")
def test_environment_values_load_or_name_the_variable(prefix: str, name: str, raw: str) -> None:
    var = prefix + name.upper()
    check_outcome(lambda: load_config(environ={var: raw}), {var, name})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["lmcache.", "meshkv."]).flatmap(
            lambda p: (
                st.sampled_from(FIELDS).map(lambda f: p + f)
                | st.text(string.ascii_lowercase, max_size=8).map(lambda f: p + f)
            )
        ),
        json_values,
        max_size=3,
    )
)
@example({"meshkv.mesh_secret": "\ud800" * 16})
def test_vllm_extra_config_loads_or_names_the_key(extra: dict[str, Any]) -> None:
    named = {k.removeprefix("lmcache.").removeprefix("meshkv.") for k in extra}
    check_outcome(lambda: load_config(overrides=extra, environ={}), named)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_local_cpu_size: .inf\n", "max_local_cpu_size: must be"),
        ("max_local_cpu_size: 0\n", "max_local_cpu_size: must be"),
        (f"max_local_cpu_size: {10**400}\n", "max_local_cpu_size: must be"),
        ("mesh_seeds: ['h:²']\n", "mesh_seeds: 'h:²' is not"),
        ("[" * 5000 + "\n", "config file: .* is not valid YAML"),
    ],
)
def test_inputs_the_fuzzer_found_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_a_file_that_is_not_utf8_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"chunk_size: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"config file: .* is not UTF-8"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("var", "raw"),
    [("MESHKV_P2P_INIT_PORTS", "²"), ("MESHKV_MAX_LOCAL_CPU_SIZE", "1e400"),
     ("MESHKV_EXTRA_CONFIG", "[" * 3000)],
)  # fmt: skip
def test_env_values_the_fuzzer_found_name_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={var: raw})
    assert caught.value.key in (var, var.removeprefix("MESHKV_").lower())
