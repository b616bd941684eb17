"""Config loading: LMCache's documented files, env overrides, per-rank ports, clear errors."""

from pathlib import Path

import pytest

from meshkv.config import MeshConfig, config_from_vllm_extra, load_config, reference_markdown
from meshkv.errors import ConfigError

LMCACHE_EXAMPLE1 = """\
chunk_size: 256
local_cpu: True
max_local_cpu_size: 5
enable_async_loading: True
enable_p2p: True
p2p_host: "localhost"
p2p_init_ports: 8200
p2p_lookup_ports: 8201
transfer_channel: "nixl"
enable_controller: True
lmcache_instance_id: "lmcache_instance_1"
controller_pull_url: "localhost:8300"
controller_reply_url: "localhost:8400"
lmcache_worker_ports: 8500
extra_config:
  lookup_backoff_time: 0.001
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_lmcache_documented_file_loads(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, LMCACHE_EXAMPLE1), environ={})
    assert c.max_local_cpu_size == 5.0 and c.enable_async_loading and c.enable_p2p
    assert c.instance_id == "lmcache_instance_1"
    assert c.seeds == ["localhost:8300", "localhost:8400"]
    assert c.extra_config["lookup_backoff_time"] == 0.001
    assert c.extra_config["p2p_max_retry_count"] == 3  # defaults kept beside the file's keys
    assert c.ports_for_rank(0, 1).gossip == 8200
    assert c.ports_for_rank(0, 1).data == 8201
    assert c.ports_for_rank(0, 1).admin == 8500


def test_file_from_lmcache_env_var_and_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, LMCACHE_EXAMPLE1)
    env = {
        "LMCACHE_CONFIG_FILE": str(path),
        "LMCACHE_CHUNK_SIZE": "512",
        "MESHKV_CHUNK_SIZE": "1024",  # meshkv's prefix wins over LMCache's
        "LMCACHE_P2P_INIT_PORTS": "9000,9001",
        "LMCACHE_ENABLE_P2P": "false",
        "MESHKV_MESH_SEEDS": "127.0.0.1:7000, 127.0.0.1:7001",
        "LMCACHE_EXTRA_CONFIG": '{"lookup_backoff_time": 0.5}',
    }
    c = load_config(environ=env)
    assert c.chunk_size == 1024
    assert c.p2p_init_ports == [9000, 9001]
    assert not c.enable_p2p
    assert c.mesh_seeds == ["127.0.0.1:7000", "127.0.0.1:7001"]
    assert c.extra_config["lookup_backoff_time"] == 0.5


def test_vllm_extra_config_overrides_only_prefixed_keys(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(write(tmp_path, LMCACHE_EXAMPLE1)))
    c = config_from_vllm_extra({"lmcache.chunk_size": 128, "meshkv.mesh_replicas": 2, "other": 1})
    assert c.chunk_size == 128 and c.mesh_replicas == 2


def test_scalar_ports_with_tp_become_base_plus_rank() -> None:
    c = MeshConfig(p2p_init_ports=8200, p2p_lookup_ports=8300, lmcache_worker_ports=8500)
    ranks = [c.ports_for_rank(r, 2) for r in range(2)]
    assert [(p.gossip, p.data, p.admin) for p in ranks] == [(8200, 8300, 8500), (8201, 8301, 8501)]


def test_scalar_ports_that_collide_under_tp_name_the_key() -> None:
    c = MeshConfig(p2p_init_ports=8200, p2p_lookup_ports=8201)  # LMCache's example, TP = 2
    with pytest.raises(ConfigError, match="p2p_lookup_ports: port 8201"):
        c.ports_for_rank(1, 2)


def test_port_list_shorter_than_world_size_names_the_key() -> None:
    with pytest.raises(ConfigError, match="p2p_init_ports: has 1 ports but TP world size is 2"):
        MeshConfig(p2p_init_ports=[8200]).ports_for_rank(0, 2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("chunk_size: -1\n", "chunk_size: must be positive"),
        ("chunk_size: big\n", "chunk_size: must be an integer"),
        ("enable_p2p: maybe\n", "enable_p2p: must be true or false"),
        ("transfer_channel: rdma\n", "transfer_channel: must be"),
        ("chunk_sise: 256\n", "chunk_sise: unknown key"),
        ("p2p_init_ports: [8200, x]\n", "p2p_init_ports: must be a port"),
        ("p2p_init_ports: 70000\n", "p2p_init_ports: ports must be in"),
        ("mesh_seeds: [nohost]\n", "mesh_seeds: 'nohost' is not"),
        ("mesh_secret: short\n", "mesh_secret: must be at least 16"),
        ("enable_controller: true\n", "controller_pull_url: enable_controller is true"),
        ("extra_config: {lookup_backoff_time: x}\n", "extra_config.lookup_backoff_time"),
        ("- a list\n", "config file: .* must hold a mapping"),
        ("a: [unclosed\n", "config file: .* is not valid YAML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), environ={})


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="LMCACHE_CHUNK_SIZE: must be an integer, got 'abc'"):
        load_config(environ={"LMCACHE_CHUNK_SIZE": "abc"})


def test_ignored_lmcache_keys_are_accepted(tmp_path: Path) -> None:
    c = load_config(
        write(tmp_path, "local_disk: null\nremote_url: null\nchunk_size: 256\n"), environ={}
    )
    assert c.chunk_size == 256


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file: cannot read"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_reference_lists_every_key() -> None:
    table = reference_markdown()
    for key in ("chunk_size", "p2p_init_ports", "mesh_seeds", "mesh_secret", "extra_config"):
        assert f"`{key}`" in table
