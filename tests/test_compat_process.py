"""``lmcache_controller`` as a real process: it serves, members outlive its SIGKILL, a restart
lists them again within 5 s of the launch, and SIGTERM leaves the mesh gracefully."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshkv.gossip.config import GossipConfig
from meshkv.gossip.member import MemberState
from meshkv.gossip.runner import GossipRunner
from meshkv.member_meta import ROLE_ENGINE, member_meta
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.processes

RESTART_DEADLINE_S = 5.0
STOP_TIMEOUT_S = 10.0


class ShimProcess:
    """``python -m meshkv.compat.controller_cli`` with LMCache's documented flags."""

    def __init__(self, state_home: Path, ports: tuple[int, int, int]) -> None:
        self.http_port, self.pull_port, self.reply_port = ports
        self.state_home = state_home
        self.log_path = state_home / "controller.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        monitor = json.dumps({"pull": self.pull_port, "reply": self.reply_port})
        command = [
            sys.executable, "-m", "meshkv.compat.controller_cli",
            "--host", "127.0.0.1", "--port", str(self.http_port), "--monitor-ports", monitor,
            "mesh_gossip_profile=test",
        ]  # fmt: skip
        env = {**os.environ, "XDG_STATE_HOME": str(self.state_home)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        return time.monotonic()

    def workers(self) -> list[str]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/query_worker_info",
            data=json.dumps({"instance_id": "all"}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=1.0) as reply:
                infos = json.loads(reply.read())["worker_infos"]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return []
        return sorted(f"{w['instance_id']}/{w['worker_id']}" for w in infos)

    def signal(self, signum: int) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)


@pytest.fixture
def shim(tmp_path) -> Iterator[ShimProcess]:
    process = ShimProcess(tmp_path, (free_port(), free_port(), free_port()))
    yield process
    process.stop()


@pytest.fixture
def engines() -> Iterator[list[GossipRunner]]:
    runners: list[GossipRunner] = []
    yield runners
    for runner in runners:
        runner.stop(leave=False)


def _engine(runners: list[GossipRunner], name: str, seeds: list[str]) -> GossipRunner:
    meta = member_meta(
        namespace="ab" * 16,
        role=ROLE_ENGINE,
        data_address="127.0.0.1:1",
        channel="tcp",
        capacity_bytes=1,
        chunk_size=256,
        chunk_count=0,
        admin_port=None,
        version="test",
    )
    runner = GossipRunner(config=GossipConfig.test(), name=name, host="127.0.0.1", meta=meta)
    runner.start(seeds)
    runners.append(runner)
    return runner


def _state(runner: GossipRunner, name_part: str) -> set[MemberState]:
    return {m.state for m in runner.members() if name_part in m.name}


def test_killed_and_restarted_shim(shim, engines, tmp_path):
    shim.start()
    seeds = [f"127.0.0.1:{shim.pull_port}", f"127.0.0.1:{shim.reply_port}"]
    e1 = _engine(engines, "inst1/0", seeds)
    _engine(engines, "inst2/0", seeds[1:])  # the reply URL alone is enough
    wait_until("both listed", lambda: shim.workers() == ["inst1/0", "inst2/0"], 20.0)
    state_file = tmp_path / "meshkv" / f"controller-{shim.pull_port}.json"
    wait_until("members remembered", state_file.exists)

    assert shim.signal(signal.SIGKILL) == -signal.SIGKILL
    wait_until("the shim seen dead", lambda: MemberState.ALIVE not in _state(e1, "controller"))
    assert _state(e1, "inst2/0") == {MemberState.ALIVE}

    launched = time.monotonic()
    shim.start()
    wait_until("restarted shim lists both", lambda: len(shim.workers()) == 2, 20.0)
    took_s = time.monotonic() - launched
    assert took_s < RESTART_DEADLINE_S, f"relearned the mesh in {took_s:.1f} s"

    assert shim.signal(signal.SIGTERM) == 0
    wait_until("the shim seen leaving", lambda: _state(e1, "controller") == {MemberState.LEFT})


def test_a_port_in_use_is_one_line_and_exit_1(shim, engines):
    blocker = _engine(engines, "blocker/0", [])
    shim.pull_port = int(blocker.address.rpartition(":")[2])
    for _ in range(10):  # the blocker took any free port: maybe one the fixture picked (exit 2)
        if shim.pull_port not in (shim.http_port, shim.reply_port):
            break
        shim.http_port, shim.reply_port = free_port(), free_port()
    shim.start()
    assert shim.process is not None
    assert shim.process.wait(STOP_TIMEOUT_S) == 1
    lines = shim.log_path.read_text().strip().splitlines()
    assert len(lines) == 1 and "cannot bind gossip port" in lines[0], lines
