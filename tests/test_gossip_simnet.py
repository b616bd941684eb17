"""Whole-mesh scenarios in the deterministic simulated network.

Every run is driven by one seed (shown in every failure message: replay it with the same seed).
The simulated network checks its invariants on every member event (incarnations never go back,
transitions make sense, nobody gets events about itself) and records deaths of members that were
up and reachable; each scenario then asks for convergence (one member list again).
"""

from __future__ import annotations

import pytest

from meshkv.gossip.config import GossipConfig
from meshkv.gossip.member import MemberState
from meshkv.gossip.simnet import NetworkFaults, SimNet

LAN = GossipConfig.lan()
TEST = GossipConfig.test()


def _boot(sim: SimNet, n: int, *, seeds: int = 3, spread_s: float = 0.0) -> None:
    """Starts ``n`` members: the first ``seeds`` are seeds, every other one joins them."""
    names = [f"inst{i}/0" for i in range(n)]
    seed_names = names[:seeds]
    for i, name in enumerate(names):
        joins = [s for s in seed_names if s != name]
        if spread_s:
            sim.at(
                i * spread_s / n, lambda name=name, joins=joins: sim.add_member(name, seeds=joins)
            )
        else:
            sim.add_member(name, seeds=joins)
    sim.run_for(spread_s)


def _converge(sim: SimNet, timeout_s: float) -> float:
    took = sim.run_until_true(sim.converged, timeout_s=timeout_s, step_s=0.25)
    sim.check(took is not None, f"no single member list after {timeout_s} s")
    assert took is not None
    return took


def _check_tables_match_events(sim: SimNet, sample: int = 10) -> None:
    """What members() says agrees with what the event stream said, and everyone is alive
    in its own table."""
    for name in sim.up_names()[:sample]:
        member = sim.members[name]
        views = {v.name: v for v in member.swim.members()}
        sim.check(views[name].state is MemberState.ALIVE, f"{name} is not alive to itself")
        for other, (nonce, state, incarnation) in sim.views[name].items():
            view = views.get(other)
            if view is None:
                sim.check(state in (MemberState.DEAD, MemberState.LEFT), f"{other} vanished")
                continue
            # a bare incarnation bump (a refutation seen only as Alive) raises no event
            sim.check(
                (view.nonce, view.state) == (nonce, state) and view.incarnation >= incarnation,
                f"{name}: events and table disagree about {other}",
            )


def test_thousand_members_converge_from_joins_via_seeds() -> None:
    # A 1,000-member join storm relays about N^2 * ln N updates; to keep it a test-sized run:
    # fewer sends per update than the default (about 1e-2 member pairs are expected to miss an
    # update in all), 16 KiB frames so that the backlog drains in fewer packets, and no
    # anti-entropy round, so what converges is gossip alone. tools/bench_gossip.py runs the
    # defaults at this size.
    config = TEST.replace(
        retransmit_mult=2.5,
        gossip_interval_s=0.1,
        max_packet_bytes=16384,
        max_piggyback=256,
        push_pull_interval_s=60.0,
    )
    sim = SimNet(seed=1000, config=config)
    _boot(sim, 1000, seeds=3, spread_s=2.0)
    took = _converge(sim, timeout_s=30)
    print(f"1000 members converged {took:.1f} s after the last join; {sim!r}")
    assert sim.false_deaths == [], sim
    _check_tables_match_events(sim)


@pytest.mark.parametrize("seed", [1, 2])
def test_crash_is_seen_by_every_member(seed: int) -> None:
    sim = SimNet(seed=seed, config=LAN)
    _boot(sim, 64)
    _converge(sim, timeout_s=10)
    sim.run_for(2)
    for victim in ("inst10/0", "inst40/0"):
        sim.crash(victim)
        took = sim.run_until_true(
            lambda v=victim: all(sim.state_seen(o, v) is MemberState.DEAD for o in sim.up_names()),
            timeout_s=10,
            step_s=0.05,
        )
        sim.check(took is not None and took <= 3.0, f"crash of {victim} seen by all in {took} s")
    assert sim.false_deaths == [], sim


@pytest.mark.parametrize("seed", [3, 4])
def test_loss_and_a_stall_declare_no_healthy_member_dead(seed: int) -> None:
    faults = NetworkFaults(loss=0.05, duplicate=0.01, jitter_s=0.005)
    sim = SimNet(seed=seed, config=LAN, faults=faults)
    _boot(sim, 64)
    _converge(sim, timeout_s=15)
    for round_, name in enumerate(("inst5/0", "inst20/0", "inst33/0", "inst50/0")):
        sim.at(sim.now_s + 1 + round_ * 5, lambda name=name: sim.stall(name, 1.0))
    sim.run_for(25)
    assert sim.false_deaths == [], sim
    refuted = sum(m.swim.stats["refute"] for m in sim.members.values())
    assert refuted > 0  # the stalls were noticed, and answered
    _converge(sim, timeout_s=5)
    _check_tables_match_events(sim)


def test_partition_heals_into_one_member_list() -> None:
    sim = SimNet(seed=5, config=TEST)
    _boot(sim, 40)
    _converge(sim, timeout_s=10)
    left = [f"inst{i}/0" for i in range(20)]
    right = [f"inst{i}/0" for i in range(20, 40)]
    sim.partition(left, right)

    def split() -> bool:
        return all(
            sim.state_seen(a, b) is MemberState.DEAD and sim.state_seen(b, a) is MemberState.DEAD
            for a in left
            for b in right
        )

    gone = sim.run_until_true(split, timeout_s=15)
    sim.check(gone is not None, "the two sides never saw each other dead")
    sim.run_for(3)
    sim.heal()
    took = _converge(sim, timeout_s=30)
    print(f"partition healed {took:.1f} s after it ended; {sim!r}")
    _check_tables_match_events(sim)


def test_restarted_member_is_alive_again_everywhere() -> None:
    sim = SimNet(seed=6, config=TEST)
    _boot(sim, 64)
    _converge(sim, timeout_s=10)
    old_nonce = sim.members["inst9/0"].nonce
    sim.crash("inst9/0")
    dead = sim.run_until_true(
        lambda: all(sim.state_seen(o, "inst9/0") is MemberState.DEAD for o in sim.up_names()),
        timeout_s=10,
    )
    sim.check(dead is not None, "the crash was not seen")
    sim.restart("inst9/0", seeds=["inst0/0"])
    _converge(sim, timeout_s=5)
    new_nonce = sim.members["inst9/0"].nonce
    assert new_nonce != old_nonce
    assert all(sim.views[o]["inst9/0"][0] == new_nonce for o in sim.up_names() if o != "inst9/0")
    _check_tables_match_events(sim)


def test_graceful_leave_is_seen_as_left() -> None:
    sim = SimNet(seed=7, config=LAN)
    _boot(sim, 64)
    _converge(sim, timeout_s=10)
    leaver = sim.members["inst30/0"]
    leaver.swim.leave(sim.now_s)
    sim._flush(leaver)
    took = sim.run_until_true(
        lambda: all(sim.state_seen(o, "inst30/0") is MemberState.LEFT
                    for o in sim.up_names() if o != "inst30/0"),
        timeout_s=5,
        step_s=0.05,
    )  # fmt: skip
    sim.check(took is not None and took <= 1.0, f"leave seen by all in {took} s")
    sim.crash("inst30/0")  # the process exits after leaving: it stays LEFT, never DEAD
    sim.run_for(5)
    assert all(sim.state_seen(o, "inst30/0") is MemberState.LEFT for o in sim.up_names())


def _four_members(seed: int) -> SimNet:
    sim = SimNet(seed=seed, config=GossipConfig.local())
    _boot(sim, 4, seeds=1)
    _converge(sim, timeout_s=10)
    return sim


def _seen_dead_by_all(sim: SimNet, victim: str) -> bool:
    return all(sim.state_seen(o, victim) is MemberState.DEAD for o in sim.up_names() if o != victim)


@pytest.mark.parametrize("seed", [5, 6])
def test_a_stalled_member_whose_link_is_up_is_held_not_declared_dead(seed: int) -> None:
    # a busy engine: its gossip loop stalls for 10 s (GIL held elsewhere), but its ZMQ I/O
    # thread answers heartbeats, so the others' drivers report its link up
    sim = _four_members(seed)
    sim.set_link("inst1/0", True)
    sim.stall("inst1/0", 10.0)
    sim.run_for(10.5)
    assert not any(sim.state_seen(o, "inst1/0") is MemberState.DEAD for o in sim.up_names())
    held = sum(m.swim.stats["death_held_link_up"] for m in sim.members.values())
    assert held > 0  # the suspicion ran out and was held, not just never raised
    _converge(sim, timeout_s=5)  # it refuted once it ran again
    assert sim.members["inst1/0"].swim.stats["refute"] > 0


def test_members_keep_links_to_their_suspects_only() -> None:
    sim = _four_members(10)
    assert all(not m.watching for m in sim.members.values())  # converged: nobody suspected
    stalled = sim.members["inst1/0"]
    sim.set_link("inst1/0", True)
    sim.stall("inst1/0", 8.0)
    watched_while_stalled: set[str] = set()

    def note() -> None:
        for member in sim.members.values():
            if member.watching:
                assert set(member.watching) == {stalled.address}
                assert member.watching[stalled.address] is True
                watched_while_stalled.add(member.name)

    for at_s in range(1, 8):
        sim.at(sim.now_s + at_s, note)
    sim.run_for(8.0)
    assert watched_while_stalled == {"inst0/0", "inst2/0", "inst3/0"}
    _converge(sim, timeout_s=5)  # it refuted: suspected by nobody, watched by nobody
    assert all(not m.watching for m in sim.members.values())


@pytest.mark.parametrize("seed", [5, 6])
def test_the_same_stall_without_a_link_is_declared_dead(seed: int) -> None:
    sim = _four_members(seed)
    sim.stall("inst1/0", 10.0)
    took = sim.run_until_true(lambda: _seen_dead_by_all(sim, "inst1/0"), timeout_s=10)
    sim.check(took is not None and took <= 3.0, f"stall without a link seen dead in {took} s")
    deaths = sum(m.swim.stats["dead_declared"] for m in sim.members.values())
    suspicions = sum(m.swim.stats["suspect_raised"] for m in sim.members.values())
    seen_dead = sum(m.swim.stats["event_dead"] for m in sim.members.values())
    assert deaths >= 1 and suspicions >= 1 and seen_dead == 3


def test_a_held_suspect_is_declared_dead_once_its_link_goes_down() -> None:
    sim = _four_members(7)
    sim.set_link("inst1/0", True)
    sim.stall("inst1/0", 60.0)
    sim.run_for(5.0)
    assert not _seen_dead_by_all(sim, "inst1/0")
    sim.set_link("inst1/0", False)  # frozen or killed: heartbeats stop
    took = sim.run_until_true(lambda: _seen_dead_by_all(sim, "inst1/0"), timeout_s=5)
    sim.check(took is not None and took <= 1.0, f"link down, seen dead in {took} s")


def test_a_held_suspect_is_declared_dead_after_the_stall_grace() -> None:
    sim = _four_members(8)
    grace_s = sim.config.stall_grace_s
    sim.set_link("inst1/0", True)
    sim.stall("inst1/0", 2 * grace_s)
    sim.run_for(grace_s - 1.0)
    assert not _seen_dead_by_all(sim, "inst1/0")
    took = sim.run_until_true(lambda: _seen_dead_by_all(sim, "inst1/0"), timeout_s=5)
    sim.check(took is not None, "a wedged member with its link up was never declared dead")


def test_no_stall_grace_declares_a_stalled_member_dead_even_with_its_link_up() -> None:
    sim = SimNet(seed=9, config=GossipConfig.local().replace(stall_grace_s=0))
    _boot(sim, 4, seeds=1)
    _converge(sim, timeout_s=10)
    sim.set_link("inst1/0", True)
    sim.stall("inst1/0", 10.0)
    took = sim.run_until_true(lambda: _seen_dead_by_all(sim, "inst1/0"), timeout_s=10)
    sim.check(took is not None and took <= 3.0, f"stall_grace_s=0, seen dead in {took} s")
