"""A member whose process holds its GIL for seconds (a busy engine) is not declared dead.

A child process runs one gossip member and then holds its GIL in one C call for several seconds,
so its gossip thread cannot answer a single ping; its ZMQ I/O thread, which needs no GIL, still
answers heartbeats. The member in this process suspects it, sees its link up and holds it until
it runs again and refutes. With ``stall_grace_s`` 0, the same stall is a death: the test shows
what the link is for, not just that nothing happened.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from meshkv.gossip.config import GossipConfig
from meshkv.gossip.member import MemberState
from meshkv.gossip.runner import GossipRunner

pytestmark = pytest.mark.processes

HOLD_ITEMS = 400_000_000
"""``sum(range(HOLD_ITEMS))``: one C call that never releases the GIL (about 6 s here)."""
STALL_MIN_S = 2.0
"""The hold must outlast the "local" profile's suspicion (at most 1.9 s at 2 members)."""
RUN_LIMIT_S = 120.0
POLL_S = 0.05

_STALLED_MEMBER = """
import sys, time
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.runner import GossipRunner
runner = GossipRunner(config=GossipConfig.local(), name="busy/0", host="127.0.0.1")
runner.start([sys.argv[1]])
deadline = time.monotonic() + 30
while len(runner.members()) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(1.0)  # a few probe rounds answered first
started = time.monotonic()
sum(range(int(sys.argv[2])))
print(time.monotonic() - started, flush=True)
time.sleep(3.0)  # runs again: reads the suspicion and refutes it
runner.stop()
"""


@pytest.mark.parametrize("grace_s", [GossipConfig.local().stall_grace_s, 0.0])
def test_a_member_holding_its_gil_is_held_while_its_link_is_up(grace_s: float) -> None:
    observer = GossipRunner(
        config=GossipConfig.local().replace(stall_grace_s=grace_s), name="obs/0", host="127.0.0.1"
    )
    observer.start()
    child = subprocess.Popen(
        [sys.executable, "-c", _STALLED_MEMBER, observer.address, str(HOLD_ITEMS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        states = set()
        deadline = time.monotonic() + RUN_LIMIT_S
        while child.poll() is None and time.monotonic() < deadline:
            views = {view.name: view.state for view in observer.members()}
            states.add(views.get("busy/0"))
            time.sleep(POLL_S)
        assert child.poll() == 0, "the stalled member did not finish in time"
        assert child.stdout is not None
        assert float(child.stdout.read()) >= STALL_MIN_S  # the stall really was that long
        stats = observer.stats()
        assert MemberState.SUSPECT in states  # it was suspected...
        if grace_s:
            assert MemberState.DEAD not in states  # ...held while its link was up, never dead
            assert stats["death_held_link_up"] > 0 and stats["dead_declared"] == 0
        else:
            assert MemberState.DEAD in states and stats["dead_declared"] >= 1
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        observer.stop(leave=False)
