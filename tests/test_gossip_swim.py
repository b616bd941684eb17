"""The SWIM core's behaviours, each driven in a small deterministic simulated network."""

from __future__ import annotations

import random

import pytest

from meshkv.errors import UsageError
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.events import EventKind
from meshkv.gossip.member import MemberInfo, MemberState
from meshkv.gossip.messages import Ack, Gossip, Ping, decode_message, encode_message, gossip_codec
from meshkv.gossip.simnet import SimNet
from meshkv.gossip.swim import Swim
from meshkv.gossip.updates import Alive, Suspect
from meshkv.wire import FrameCodec, Protocol

CONFIG = GossipConfig.test()


def _cluster(n: int, seed: int = 1, config: GossipConfig = CONFIG) -> SimNet:
    sim = SimNet(seed=seed, config=config)
    sim.add_member("m0/0")
    for i in range(1, n):
        sim.add_member(f"m{i}/0", seeds=["m0/0"])
    converged = sim.run_until_true(sim.converged, timeout_s=10)
    sim.check(converged is not None, f"{n} members did not converge")
    return sim


def _swim(name: str = "me/0", address: str = "127.0.0.1:7000", **meta: object) -> Swim:
    me = MemberInfo(name=name, nonce=1, address=address, meta=meta)
    return Swim(config=CONFIG, me=me, incarnation_start=100, rng=random.Random(0), now_s=0.0)


def test_ping_is_acked_with_piggybacked_updates() -> None:
    swim = _swim()
    ping = Ping(seq=9, target="me/0", source="x/0", source_address="127.0.0.1:7001")
    swim.receive(encode_message(gossip_codec(CONFIG), ping), 0.0)
    (out,) = swim.take_outgoing()
    ack = decode_message(gossip_codec(CONFIG), out.frame)
    assert out.address == "127.0.0.1:7001"
    assert isinstance(ack, Ack) and ack.seq == 9
    assert [u.name for u in ack.updates] == ["me/0"]  # its own Alive rides along


def test_ping_for_someone_else_is_dropped() -> None:
    swim = _swim()
    ping = Ping(seq=9, target="other/0", source="x/0", source_address="127.0.0.1:7001")
    swim.receive(encode_message(gossip_codec(CONFIG), ping), 0.0)
    assert swim.take_outgoing() == [] and swim.stats["drop_wrong_target"] == 1


def test_suspicion_of_oneself_is_refuted_with_a_higher_incarnation() -> None:
    swim = _swim()
    suspect = Suspect(name="me/0", nonce=1, incarnation=100, source="x/0")
    ping = Ping(seq=1, target="me/0", source="x/0", source_address="h:1", updates=(suspect,))
    swim.receive(encode_message(gossip_codec(CONFIG), ping), 0.0)
    assert swim.incarnation == 101 and swim.stats["refute"] == 1
    ack = decode_message(gossip_codec(CONFIG), swim.take_outgoing()[0].frame)
    assert any(u.name == "me/0" and u.incarnation == 101 for u in ack.updates)  # type: ignore[union-attr]
    # an older claim, or one about an older boot, needs no refutation
    for old in (
        Suspect(name="me/0", nonce=1, incarnation=50, source="x/0"),
        Suspect(name="me/0", nonce=0, incarnation=99, source="x/0"),
    ):
        ping = Ping(seq=2, target="me/0", source="x/0", source_address="h:1", updates=(old,))
        swim.receive(encode_message(gossip_codec(CONFIG), ping), 0.0)
    assert swim.incarnation == 101


def test_codec_must_match_the_config() -> None:
    me = MemberInfo(name="a/0", nonce=1, address="h:1", meta={})
    wrong = [
        FrameCodec(Protocol.DATA, 1, max_frame_bytes=CONFIG.max_packet_bytes),
        gossip_codec(CONFIG.replace(max_packet_bytes=8192)),
    ]
    for codec in wrong:
        with pytest.raises(UsageError):
            Swim(config=CONFIG, me=me, incarnation_start=1, rng=random.Random(0), now_s=0.0,
                 codec=codec)  # fmt: skip


def test_meta_bounds() -> None:
    with pytest.raises(UsageError):
        _swim(blob="x" * (CONFIG.max_meta_bytes + 1))
    swim = _swim()
    with pytest.raises(UsageError):
        swim.update_meta({"blob": "x" * (CONFIG.max_meta_bytes + 1)}, 0.0)


def test_join_retries_are_bounded_then_seeds_retried_while_alone() -> None:
    swim = _swim()
    swim.join(["127.0.0.1:9999", "127.0.0.1:7000"], 0.0)  # our own address is skipped
    now = 0.0
    for _ in range(2000):
        now = max(now, swim.next_deadline_s())
        swim.tick(now)
        if now > 30:
            break
    sent = [o.address for o in swim.take_outgoing()]
    assert swim.stats["join_attempt"] == CONFIG.join_max_attempts
    assert set(sent) == {"127.0.0.1:9999"}
    pushes = swim.stats["tx_push_pull"]
    assert CONFIG.join_max_attempts < pushes < CONFIG.join_max_attempts + 30 / 1.0


def test_indirect_probe_keeps_a_member_whose_direct_link_is_cut() -> None:
    sim = _cluster(5, seed=3)
    sim.cut_link("m1/0", "m2/0")
    sim.run_for(10)
    assert sim.false_deaths == []
    assert sim.state_seen("m1/0", "m2/0") is MemberState.ALIVE
    relayed = sum(m.swim.stats["tx_ping_req"] for m in sim.members.values())
    assert relayed > 0


def test_crashed_member_is_suspected_then_dead_everywhere() -> None:
    sim = _cluster(8, seed=4)
    sim.keep_event_log = True
    sim.crash("m5/0")
    took = sim.run_until_true(
        lambda: all(sim.state_seen(o, "m5/0") is MemberState.DEAD for o in sim.up_names()),
        timeout_s=10,
    )
    assert took is not None and took < 3.0
    kinds = {(o, e.kind) for _, o, e in sim.event_log if e.member.name == "m5/0"}
    assert all((o, EventKind.DEAD) in kinds for o in sim.up_names())
    assert any(k is EventKind.SUSPECT for _, k in kinds)


def test_leave_is_seen_as_left_and_the_leaver_stops_probing() -> None:
    sim = _cluster(8, seed=5)
    leaver = sim.members["m3/0"]
    leaver.swim.leave(sim.now_s)
    sim._flush(leaver)
    probes_before = leaver.swim.stats["probe"]
    took = sim.run_until_true(
        lambda: all(sim.state_seen(o, "m3/0") is MemberState.LEFT for o in sim.up_names()
                    if o != "m3/0"),
        timeout_s=5,
    )  # fmt: skip
    assert took is not None and took < 1.0
    sim.run_for(2)
    assert leaver.swim.stats["probe"] == probes_before
    assert all(sim.state_seen(o, "m3/0") is MemberState.LEFT for o in sim.up_names() if o != "m3/0")


def test_meta_update_reaches_everyone() -> None:
    sim = _cluster(8, seed=6)
    sim.keep_event_log = True
    member = sim.members["m2/0"]
    before = member.swim.incarnation
    member.swim.update_meta({"free_bytes": 123}, sim.now_s)
    sim._flush(member)
    sim.run_for(1.0)
    assert member.swim.incarnation == before + 1
    updated = {o for _, o, e in sim.event_log if e.kind is EventKind.UPDATED}
    assert updated == set(sim.up_names()) - {"m2/0"}
    for name in sim.up_names():
        view = {v.name: v for v in sim.members[name].swim.members()}["m2/0"]
        assert dict(view.meta) == {"free_bytes": 123}


def test_restarted_member_supersedes_its_old_record() -> None:
    sim = _cluster(8, seed=7)
    old_nonce = sim.members["m4/0"].nonce
    sim.crash("m4/0")
    sim.run_for(0.5)  # restarts before anyone declares it dead
    sim.restart("m4/0", seeds=["m0/0"])
    assert sim.run_until_true(sim.converged, timeout_s=5) is not None
    for name in sim.up_names():
        if name != "m4/0":
            assert sim.views[name]["m4/0"][0] != old_nonce


def test_state_query_returns_the_whole_table_in_parts() -> None:
    config = CONFIG.replace(max_packet_bytes=1400, max_meta_bytes=256)
    sim = _cluster(60, seed=8, config=config)
    records = sim.query_state("m7/0")
    assert sorted(r.name for r in records) == sorted(sim.up_names())
    assert all(r.state is MemberState.ALIVE for r in records)
    assert sim.members["m7/0"].swim.stats["tx_state_reply"] > 1
    swim = sim.members["m7/0"].swim
    from meshkv.gossip.messages import StateQuery

    swim.receive(encode_message(gossip_codec(config), StateQuery(query_id=3)), sim.now_s)
    assert swim.stats["drop_no_reply_to"] == 1  # nowhere to answer


def test_next_deadline_is_never_in_the_past_after_tick() -> None:
    sim = _cluster(6, seed=9)
    for member in sim.members.values():
        member.swim.tick(sim.now_s)
        assert sim.now_s < member.swim.next_deadline_s() < sim.now_s + 60


def test_same_seed_same_run() -> None:
    def run(seed: int) -> list[tuple[float, str, str, str]]:
        sim = SimNet(seed=seed, config=CONFIG)
        sim.keep_event_log = True
        sim.add_member("m0/0")
        for i in range(1, 12):
            sim.add_member(f"m{i}/0", seeds=["m0/0"])
        sim.run_for(1)
        sim.crash("m3/0")
        sim.run_for(3)
        return [(t, o, e.kind.value, e.member.name) for t, o, e in sim.event_log]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_a_stalled_member_comes_back_without_accusing_anyone() -> None:
    sim = _cluster(6, seed=10, config=GossipConfig.lan())  # LAN timing tolerates 1 s stalls
    sim.stall("m2/0", 1.0)
    sim.run_for(1.5)
    others = [name for name in sim.up_names() if name != "m2/0"]
    assert all(sim.state_seen("m2/0", other) is MemberState.ALIVE for other in others)
    assert all(sim.state_seen(other, "m2/0") is MemberState.ALIVE for other in others)
    assert sim.members["m2/0"].swim.stats["refute"] >= 1  # it was suspected meanwhile
    assert sim.false_deaths == []


def test_a_probe_overdue_by_an_interval_gives_no_verdict() -> None:
    swim = _swim()
    peer = Alive(name="p/0", nonce=2, incarnation=1, address="127.0.0.1:7002", meta={})
    gossip = Gossip(source="p/0", updates=(peer,))
    swim.receive(encode_message(gossip_codec(CONFIG), gossip), 0.0)
    now = 0.0
    while not swim.stats["probe"]:
        now = swim.next_deadline_s()
        swim.tick(now)
    swim.tick(now + 5 * CONFIG.probe_interval_s)  # no ack came: but we were the ones away
    assert swim.stats["probe_late"] == 1 and swim.stats["probe_failed"] == 0
    assert [v.state for v in swim.members() if v.name == "p/0"] == [MemberState.ALIVE]
