"""The command line's own behaviour: help, config errors (one line, exit 2), unreachable seeds."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from meshkv.cli import app
from meshkv.cli.ring import rings_of
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.member import MemberState, MemberView
from meshkv.gossip.runner import GossipRunner
from tests.conftest import free_port

PROCESS_TIMEOUT_S = 30
DEADLINE_S = 5.0


def _meshkv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshkv", *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
        env=env,
        check=False,
    )


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
    done = CliRunner().invoke(app, ["join", "--config", str(path)])
    assert done.exit_code == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and lines[0].startswith("meshkv: config error")
    assert done.stdout == ""


def test_a_bad_config_from_the_environment_stops_the_real_process_with_exit_code_2(tmp_path):
    path = tmp_path / "lmcache.yaml"
    path.write_text("chunk_size: 256\nmesh_replicas: 99\n")
    done = _meshkv("join", env={**os.environ, "LMCACHE_CONFIG_FILE": str(path)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "meshkv: config error: mesh_replicas: must be in 1..8, got 99"
    ]
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
    seed = f"127.0.0.1:{free_port()}"
    done = CliRunner().invoke(app, [command, "--seed", seed, "--timeout", "0.3"])
    assert done.exit_code == 1
    assert f"no answer from {seed}" in done.output


def test_join_with_an_invalid_member_id_is_a_usage_error():
    done = CliRunner().invoke(app, ["join", "--id", "tab\there", "--port", "0"])
    assert done.exit_code == 2
    assert "unprintable" in done.stderr


def test_join_on_a_taken_port_fails_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = _meshkv("join", "--port", str(taken.getsockname()[1]), "--id", "x")
    assert done.returncode == 1
    assert "cannot bind gossip port" in done.stderr


@pytest.fixture
def three_members() -> Iterator[list[GossipRunner]]:
    """An engine of namespace "llama", a storage-only member and a seed, in one mesh."""
    config = GossipConfig.test()
    metas = {
        "a/0": {"ns": "llama", "role": "engine"},
        "b/0": {"ns": "*", "role": "storage"},
        "seed/pull": {"role": "seed"},
    }
    runners = [
        GossipRunner(config=config, name=name, host="127.0.0.1", meta=meta)
        for name, meta in metas.items()
    ]
    runners[0].start()
    for runner in runners[1:]:
        runner.start([runners[0].address])
    try:
        end = time.monotonic() + DEADLINE_S
        while any(len(r.members()) < 3 for r in runners) and time.monotonic() < end:
            time.sleep(0.02)
        yield runners
    finally:
        for runner in runners:
            runner.stop(leave=False)


def test_members_prints_a_table_and_json(three_members):
    a, b, _ = three_members
    table = CliRunner().invoke(app, ["members", "--seed", b.address])
    assert table.exit_code == 0, table.output
    for text in ("a/0", "b/0", "seed/pull", a.address, "alive", "llama", "storage"):
        assert text in table.output
    rows = json.loads(CliRunner().invoke(app, ["members", "--seed", b.address, "--json"]).output)
    assert [(r["id"], r["status"], r["namespace"], r["role"]) for r in rows] == [
        ("a/0", "alive", "llama", "engine"),
        ("b/0", "alive", "*", "storage"),
        ("seed/pull", "alive", "-", "seed"),
    ]


def test_ring_prints_each_namespace_ring_with_storage_members_and_without_seeds(three_members):
    a, _, _ = three_members
    done = CliRunner().invoke(app, ["ring", "--seed", a.address, "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    assert summary["vnodes"] == 256
    (llama,) = summary["rings"]
    assert llama["namespace"] == "llama"
    assert [r["id"] for r in llama["members"]] == ["a/0", "b/0"]
    assert sum(r["share"] for r in llama["members"]) == pytest.approx(1.0)
    table = CliRunner().invoke(app, ["ring", "--seed", a.address])
    assert "namespace llama" in table.output and "%" in table.output


def _view(name: str, state: MemberState = MemberState.ALIVE, **meta: str) -> MemberView:
    return MemberView(name=name, nonce=1, address="127.0.0.1:1", state=state, incarnation=1,
                      meta=meta)  # fmt: skip


def test_rings_follow_namespaces_storage_members_join_all_and_the_dead_none():
    views = [
        _view("e1", ns="llama"),
        _view("e2", MemberState.SUSPECT, ns="llama"),
        _view("e3", MemberState.DEAD, ns="llama"),
        _view("q1", ns="qwen"),
        _view("s1", ns="*", role="storage"),
        _view("shim", role="seed"),
    ]
    rings = {ns: [v.name for v in members] for ns, members in rings_of(views).items()}
    assert rings == {"llama": ["e1", "e2", "s1"], "qwen": ["q1", "s1"]}
    storage_only = {ns: [v.name for v in m] for ns, m in rings_of(views[4:]).items()}
    assert storage_only == {"*": ["s1"]}
    assert rings_of([_view("g1"), _view("g2")]).keys() == {"-"}


@pytest.mark.processes
def test_join_on_a_terminal_shows_the_live_table_and_ctrl_c_leaves_with_exit_0():
    controller, terminal = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshkv", "join", "--port", "0", "--id", "tty", "--profile", "test"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env={**os.environ, "COLUMNS": "160"},
    )
    os.close(terminal)
    screen = b""
    try:
        end = time.monotonic() + PROCESS_TIMEOUT_S
        while b"alive" not in screen and time.monotonic() < end:  # the title names tty/0 first
            screen += _read_terminal(controller)
        assert b"tty/0" in screen and b"alive" in screen, screen
        proc.send_signal(signal.SIGINT)
        end = time.monotonic() + DEADLINE_S
        while proc.poll() is None and time.monotonic() < end:  # keep reading: never block it
            screen += _read_terminal(controller)
        assert proc.poll() == 0
        assert b"stats {" in screen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE_S)
        os.close(controller)


def _read_terminal(fd: int) -> bytes:
    """What the process wrote to its terminal within 0.1 s (EIO once it has exited)."""
    if not select.select([fd], [], [], 0.1)[0]:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""
