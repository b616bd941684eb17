"""The command line's own behaviour: help, config errors (one line, exit 2), unreachable seeds."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from meshkv.cli import app

PROCESS_TIMEOUT_S = 30


def _meshkv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshkv", *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
        env=env,
        check=False,
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_python_dash_m_meshkv_lists_the_commands():
    done = _meshkv("--help")
    assert done.returncode == 0
    for command in ("join", "members", "ring"):
        assert command in done.stdout


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("mesh_vnodes: 3\n", "mesh_vnodes"),
        ("p2p_init_ports: [not, ports]\n", "p2p_init_ports"),
        ("mesh_gossip_profile: fast\n", "mesh_gossip_profile"),
        ("no_such_key: 1\n", "no_such_key"),
        ("chunk_size: [\n", "config file"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_key_and_exit_code_2(tmp_path, yaml_text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    done = _meshkv("join", "--config", str(path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and lines[0].startswith("meshkv: config error")
    assert done.stdout == ""


def test_a_bad_flag_value_is_a_config_error(tmp_path):
    done = CliRunner().invoke(app, ["members", "--seed", "no-port-here"])
    assert done.exit_code == 2
    assert "mesh_seeds" in done.output


def test_a_missing_config_file_is_a_config_error(tmp_path):
    done = CliRunner().invoke(app, ["join", "--config", str(tmp_path / "absent.yaml")])
    assert done.exit_code == 2
    assert "cannot read" in done.output


def test_members_without_a_seed_says_so(monkeypatch):
    for var in ("MESHKV_CONFIG_FILE", "LMCACHE_CONFIG_FILE", "MESHKV_MESH_SEEDS"):
        monkeypatch.delenv(var, raising=False)
    done = CliRunner().invoke(app, ["members"])
    assert done.exit_code == 2
    assert "no seed" in done.output


@pytest.mark.parametrize("command", ["members", "ring"])
def test_an_unreachable_seed_fails_within_the_timeout(command):
    seed = f"127.0.0.1:{_closed_port()}"
    done = CliRunner().invoke(app, [command, "--seed", seed, "--timeout", "0.3"])
    assert done.exit_code == 1
    assert f"no answer from {seed}" in done.output


def test_join_on_a_taken_port_fails_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = _meshkv("join", "--port", str(taken.getsockname()[1]), "--id", "x")
    assert done.returncode == 1
    assert "cannot bind gossip port" in done.stderr
