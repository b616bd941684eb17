"""Every key LMCache 0.5.6 defines loads, from each of LMCache's sources, with LMCache-style
values, and a member starts with the result (real gossip and data-plane sockets on 127.0.0.1).

The key list is LMCache's own (`meshkv.lmcache_keys`, generated from its sources by
tools/extract_lmcache_keys.py); the values are written as LMCache users write them: quoted
numbers, "True"/"1" booleans, comma-separated lists.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshkv.config import IGNORED_LMCACHE_KEYS, MeshConfig, config_from_vllm_extra, load_config
from meshkv.errors import ConfigError
from meshkv.lmcache_keys import ALIASES, DEFINITIONS, LMCACHE_VERSION
from meshkv.lmcache_values import convert, strip_quotes
from meshkv.node import MeshNode
from tests.conftest import free_port

NAMESPACE = "ef" * 16
DEADLINE_S = 5.0


def _text(value: Any) -> str:
    """A default as an LMCache user writes it in a file or a variable."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return str(value)


SAMPLE_BY_KIND = {
    "int": "7",
    "float": "0.5",
    "bool": "1",
    "str": "some-text",
    "int_list": "1,2",
    "float_list": "0.25, 0.5",
    "str_list": "a, b",
}


def lmcache_texts() -> dict[str, str]:
    """Every key LMCache defines, with a text value in LMCache's style; keys meshkv uses get
    values a member on this host can start with."""
    gossip, data, admin = free_port(), free_port(), free_port()
    texts = {
        key: _text(default) if default is not None else SAMPLE_BY_KIND.get(kind, "")
        for key, (_declared, kind, default) in DEFINITIONS.items()
    }
    texts.update(
        chunk_size="16",
        local_cpu="True",
        max_local_cpu_size="0.0625",
        save_unfull_chunk="False",
        enable_async_loading="1",
        lookup_timeout_ms="3000",
        enable_p2p="True",
        p2p_host="127.0.0.1",
        p2p_init_ports=str(gossip),
        p2p_lookup_ports=str(data),
        transfer_channel="tcp",
        nixl_backends="UCX",
        enable_controller="False",
        lmcache_instance_id="lmcache_instance_1",
        controller_pull_url="127.0.0.1:8300",
        controller_reply_url="127.0.0.1:8400",
        lmcache_worker_ports=str(admin),
        extra_config=json.dumps(
            {"lookup_backoff_time": "0.001", "p2p_socket_recv_timeout_ms": "1500"}
        ),
    )
    return texts


def check_loaded(config: MeshConfig, texts: dict[str, str]) -> None:
    assert (config.chunk_size, config.max_local_cpu_size) == (16, 0.0625)
    assert config.enable_p2p and config.enable_async_loading and config.local_cpu
    assert config.p2p_init_ports == int(texts["p2p_init_ports"])
    assert config.lmcache_worker_ports == int(texts["lmcache_worker_ports"])
    assert (config.transfer_channel, config.nixl_backends) == ("tcp", ["UCX"])
    assert config.instance_id == "lmcache_instance_1"
    assert config.extra_config["lookup_backoff_time"] == 0.001
    assert config.mesh_transfer_timeout_ms == 1500  # extra_config.p2p_socket_recv_timeout_ms


def start_member(config: MeshConfig) -> None:
    node = MeshNode(config, namespace=NAMESPACE)
    try:
        node.start()
        assert [p.name for p in node.members()] == ["lmcache_instance_1/0"]
        assert node.gossip_address.endswith(f":{config.p2p_init_ports}")
    finally:
        node.stop(leave=False)


def test_the_key_list_is_lmcache_0_5_6s():
    assert LMCACHE_VERSION == "0.5.6"
    assert len(DEFINITIONS) == 108
    assert ALIASES["controller_url"] == "controller_pull_url"
    assert ALIASES["lmcache_worker_port"] == "lmcache_worker_ports"
    for key in ("lmcache_worker_ids", "reserve_local_cpu_size", "pre_caching_hash_algorithm",
                "internal_api_server_host", "local_cpu_use_hugepages"):  # fmt: skip
        assert key in IGNORED_LMCACHE_KEYS


def _yaml_loader(tmp_path: Path) -> Callable[[dict[str, str]], MeshConfig]:
    def load(texts: dict[str, str]) -> MeshConfig:
        lines = [f"{key}: {json.dumps(text)}" for key, text in texts.items()]  # all quoted
        path = tmp_path / "lmcache.yaml"
        path.write_text("\n".join(lines) + "\n")
        assert all(isinstance(v, str) for v in yaml.safe_load(path.read_text()).values())
        return load_config(path, environ={})

    return load


def _env_loader(_tmp_path: Path) -> Callable[[dict[str, str]], MeshConfig]:
    return lambda texts: load_config(environ={f"LMCACHE_{k.upper()}": v for k, v in texts.items()})


def _vllm_extra_loader(_tmp_path: Path) -> Callable[[dict[str, str]], MeshConfig]:
    def load(texts: dict[str, str]) -> MeshConfig:
        extra: dict[str, Any] = {f"lmcache.{k}": v for k, v in texts.items()}
        extra["lmcache.max_tokens_per_load"] = "2048"  # read by LMCache's own vLLM adapter
        return config_from_vllm_extra(extra, path=None)

    return load


@pytest.mark.parametrize("loader", [_yaml_loader, _env_loader, _vllm_extra_loader])
def test_every_lmcache_key_loads_and_a_member_starts_with_it(loader, tmp_path, caplog, monkeypatch):
    for var in ("MESHKV_CONFIG_FILE", "LMCACHE_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    caplog.set_level(logging.INFO, logger="vllm.meshkv.config")
    texts = lmcache_texts()
    config = loader(tmp_path)(texts)
    check_loaded(config, texts)
    said = [r.getMessage() for r in caplog.records if "ignored by meshkv: " in r.getMessage()]
    ignored_keys = {m.split()[2] for m in said}
    assert not (IGNORED_LMCACHE_KEYS & DEFINITIONS.keys()) - ignored_keys  # every one, with why
    assert len(said) == len(ignored_keys)  # once each
    assert "extra_config.p2p_socket_send_timeout_ms" not in ignored_keys  # not given
    start_member(config)


def test_an_ignored_key_is_logged_once_with_why(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vllm.meshkv.config")
    path = tmp_path / "c.yaml"
    path.write_text('hidden_states_retrieve_mode: "legacy"\n')
    load_config(path, environ={"LMCACHE_HIDDEN_STATES_RETRIEVE_MODE": "legacy"})
    said = [r.getMessage() for r in caplog.records if "ignored by meshkv" in r.getMessage()]
    assert said == [
        "config key hidden_states_retrieve_mode ignored by meshkv: "
        "LMCache's multi-process and Omni modes"
    ]


def test_aliases_map_to_their_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('controller_url: "localhost:8300"\nlmcache_worker_port: "8500"\n')
    config = load_config(path, environ={})
    assert (config.controller_pull_url, config.lmcache_worker_ports) == ("localhost:8300", 8500)


@pytest.mark.parametrize(
    ("kind", "raw", "expected"),
    [
        ("bool", "True", True),
        ("bool", " 1 ", True),
        ("bool", "'False'", False),
        ("bool", 0, False),
        ("int", '"256"', 256),
        ("int", 256.0, 256),
        ("float", "5", 5.0),
        ("float", "1e-3", 0.001),
        ("int_list", "8200, 8201", [8200, 8201]),
        ("int_list", 8200, [8200]),
        ("str_list", "UCX,POSIX", ["UCX", "POSIX"]),
        ("str", "'localhost'", "localhost"),
        ("str", 7, "7"),
        ("json_dict", '{"a": 1}', {"a": 1}),
    ],
)
def test_values_convert_as_lmcache_converts_them(kind, raw, expected):
    assert convert("k", kind, raw) == expected


@pytest.mark.parametrize(
    ("kind", "raw"),
    [("bool", "maybe"), ("int", "2.5"), ("int", "٣"), ("int", True), ("float", "x"),
     ("int_list", "8200,x"), ("json_dict", "[1]"), ("str", ["a"])],
)  # fmt: skip
def test_a_value_lmcache_would_silently_drop_names_the_key(kind, raw):
    with pytest.raises(ConfigError, match=r"^k: "):
        convert("k", kind, raw)


def test_quotes_are_stripped_like_lmcache_strips_them():
    assert strip_quotes(' "a\\tb" ') == "a\tb"
    assert strip_quotes("'unclosed") == "'unclosed"
    assert strip_quotes('"bad \\x"') == "bad \\x"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('local_cpu: "False"\n', "local_cpu: meshkv keeps chunks in CPU memory"),
        ('chunk_size: "0"\n', "chunk_size: must be positive"),
        ('transfer_channel: "mooncake"\n', "transfer_channel: must be"),
    ],
)
def test_a_value_meshkv_cannot_honour_is_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_an_unknown_meshkv_key_in_vllm_extra_config_is_still_an_error():
    with pytest.raises(ConfigError, match="mesh_seedz: unknown key"):
        config_from_vllm_extra({"meshkv.mesh_seedz": "h:1"})
