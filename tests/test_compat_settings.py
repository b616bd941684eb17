"""lmcache_controller's command line and settings: LMCache's flags, clear one-line errors, and
the engine-side config rules the shim relies on (seeds, per-rank ports, lookup_backoff_time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshkv.compat.controller_settings import (
    CommandLine,
    MonitorPorts,
    load_settings,
    parse_key_values,
    parse_monitor_ports,
)
from meshkv.config import MeshConfig, load_config
from meshkv.errors import ConfigError

PROCESS_TIMEOUT_S = 60
DOCUMENTED_MONITOR_PORTS = '{"pull": 8300, "reply": 8400}'


def _settings(**flags: object) -> tuple:
    return load_settings(CommandLine(**flags), environ={})  # type: ignore[arg-type]


def test_documented_flags_give_the_documented_ports():
    settings, config = _settings(
        host="localhost", port=9000, monitor_ports=DOCUMENTED_MONITOR_PORTS
    )
    assert (settings.host, settings.http_port) == ("localhost", 9000)
    assert settings.monitor_ports == MonitorPorts(pull=8300, reply=8400, heartbeat=None)
    assert config.chunk_size == 256  # meshkv defaults for the shim's own members


def test_defaults_are_lmcache_defaults():
    settings, _ = _settings()
    assert (settings.host, settings.http_port) == ("0.0.0.0", 9000)
    assert settings.monitor_ports == MonitorPorts(8300, 8400)
    assert (settings.health_check_interval_s, settings.worker_timeout_s) == (-1, 300)


def test_heartbeat_port_and_legacy_monitor_port_are_accepted():
    with_heartbeat, _ = _settings(monitor_ports='{"pull": 8300, "reply": 8400, "heartbeat": 8082}')
    assert with_heartbeat.monitor_ports.heartbeat == 8082
    legacy, _ = _settings(monitor_port=9001)
    assert legacy.monitor_ports == MonitorPorts(pull=9001)
    both, _ = _settings(monitor_ports=DOCUMENTED_MONITOR_PORTS, monitor_port=9001)
    assert both.monitor_ports.pull == 8300  # --monitor-ports wins, as in LMCache


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"pull": 8300, "reply": 8400', "is not JSON"),
        ("{pull: 8300}", "is not JSON"),
        ("[8300, 8400]", "must be a JSON object"),
        ('{"reply": 8400}', 'needs a "pull" port'),
        ('{"pull": 8300, "replay": 8400}', "unknown port name 'replay'"),
        ('{"pull": 70000}', '"pull" must be a port number'),
        ('{"pull": "x"}', '"pull" must be a port number'),
        ('{"pull": 8300, "reply": 8300}', "must be distinct"),
    ],
)
def test_malformed_monitor_ports_name_the_flag_and_the_problem(text, problem):
    with pytest.raises(ConfigError) as caught:
        parse_monitor_ports(text)
    assert caught.value.key == "--monitor-ports"
    assert problem in caught.value.problem
    assert "\n" not in str(caught.value)


def test_key_values_are_typed_like_lmcache_and_reach_both_configs():
    assert parse_key_values(["a=true", "--b=3", "c=0.5", "d=x", 'e={"k": 1}']) == {
        "a": True,
        "b": 3,
        "c": 0.5,
        "d": "x",
        "e": {"k": 1},
    }
    settings, config = _settings(
        extra=("controller_port=9100", "mesh_gossip_profile=local", "chunk_size=128")
    )
    assert settings.http_port == 9100
    assert (config.mesh_gossip_profile, config.chunk_size) == ("local", 128)


@pytest.mark.parametrize("extra", [("no_such_key=1",), ("--verbose",), ("a=1", "b")])
def test_unknown_extra_arguments_are_warned_about_and_ignored_as_lmcache_does(extra, caplog):
    settings, config = _settings(extra=extra)
    assert settings == _settings()[0] and config == _settings()[1]
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "ignored" in r.message]
    assert len(warned) == len(extra)


def test_a_known_key_with_a_bad_value_is_still_an_error_naming_it():
    with pytest.raises(ConfigError) as caught:
        _settings(extra=("mesh_vnodes=3",))
    assert caught.value.key == "mesh_vnodes"


def test_an_lmcache_engine_key_given_to_the_controller_is_accepted():
    _, config = _settings(extra=("local_cpu_use_hugepages=True", "chunk_size=128"))
    assert config.chunk_size == 128


def test_file_then_env_then_flags_then_key_values(tmp_path: Path):
    path = tmp_path / "controller.yaml"
    path.write_text(
        "controller_host: 127.0.0.1\ncontroller_port: 9100\n"
        'controller_monitor_ports: {"pull": 8310, "reply": 8410}\n'
        "health_check_interval: 10\nmesh_secret: a-secret-of-16-chars\n"
    )
    env = {
        "LMCACHE_CONTROLLER_CONFIG_FILE": str(path),
        "LMCACHE_CONTROLLER_CONTROLLER_PORT": "9200",
    }
    settings, config = load_settings(CommandLine(), environ=env)
    assert (settings.host, settings.http_port) == ("127.0.0.1", 9200)
    assert settings.monitor_ports == MonitorPorts(8310, 8410)
    assert settings.health_check_interval_s == 10
    assert config.mesh_secret == "a-secret-of-16-chars"
    settings, _ = load_settings(
        CommandLine(port=9300, extra=("controller_port=9400",)), environ=env
    )
    assert settings.http_port == 9400
    flagged, _ = load_settings(CommandLine(config_path=str(path), port=9300), environ={})
    assert (flagged.http_port, flagged.host) == (9300, "127.0.0.1")  # flag wins; file kept


def test_state_file_default_and_off(tmp_path: Path):
    env = {"XDG_STATE_HOME": str(tmp_path)}
    settings, _ = load_settings(CommandLine(monitor_ports=DOCUMENTED_MONITOR_PORTS), environ=env)
    assert settings.state_file == tmp_path / "meshkv" / "controller-8300.json"
    off, _ = _settings(extra=("mesh_state_file=",))
    assert off.state_file is None


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S
    )


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "meshkv.compat.controller_cli"],
        ["-m", "meshkv", "controller"],
    ],
)
def test_malformed_monitor_ports_is_one_clear_line_and_exit_2(command):
    done = _run(*command, "--host", "localhost", "--monitor-ports", '{"pull": 8300, "reply": }')
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--monitor-ports" in lines[0] and "is not JSON" in lines[0]
    assert '{"pull": 8300, "reply": 8400}' in lines[0]  # says what is expected


def test_bad_flag_value_is_one_line_and_help_lists_lmcache_flags():
    done = _run("-m", "meshkv.compat.controller_cli", "--port", "ninety")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    helped = _run("-m", "meshkv", "controller", "--help")
    assert helped.returncode == 0
    for flag in (
        "--config",
        "--host",
        "--port",
        "--monitor-ports",
        "--monitor-port",
        "--health-check-interval",
        "--lmcache-worker-timeout",
    ):
        assert flag in helped.stdout


# -- the engine side of the compatibility contract ---------------------------------------------


def test_seeds_come_from_the_controller_urls_or_mesh_seeds_or_nothing():
    through_shim = MeshConfig(
        enable_controller=True,
        controller_pull_url="localhost:8300",
        controller_reply_url="localhost:8400",
        mesh_seeds=["h:1"],
    )
    assert through_shim.seeds == ["h:1", "localhost:8300", "localhost:8400"]
    shim_off = MeshConfig(
        enable_controller=False, controller_pull_url="localhost:8300", mesh_seeds=["h:1"]
    )
    assert shim_off.seeds == ["h:1"]
    assert MeshConfig().seeds == []


def test_lookup_backoff_time_is_accepted(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("extra_config:\n  lookup_backoff_time: 0.001\n")
    assert load_config(path, environ={}).extra_config["lookup_backoff_time"] == 0.001


def test_scalar_ports_with_world_size_2_give_distinct_per_rank_ports():
    config = MeshConfig(p2p_init_ports=8200, p2p_lookup_ports=8210, lmcache_worker_ports=8500)
    ranks = [config.ports_for_rank(rank, 2) for rank in range(2)]
    assert [(p.gossip, p.data, p.admin) for p in ranks] == [(8200, 8210, 8500), (8201, 8211, 8501)]
    ports = [port for p in ranks for port in (p.gossip, p.data, p.admin)]
    assert len(set(ports)) == len(ports)


def test_documented_adjacent_scalar_ports_with_tp_2_name_the_colliding_key():
    config = MeshConfig(p2p_init_ports=8200, p2p_lookup_ports=8201, lmcache_worker_ports=8500)
    with pytest.raises(ConfigError, match="p2p_lookup_ports: port 8201 for TP world size 2"):
        config.ports_for_rank(0, 2)
