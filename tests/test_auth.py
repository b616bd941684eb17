"""An authenticated mesh: outsiders without the secret can neither join nor read nor push."""

from __future__ import annotations

import zmq

from meshkv.dataplane import messages as m
from meshkv.node import MeshNode
from meshkv.wire import AuthPolicy
from tests.conftest import wait_until
from tests.test_node import NAMESPACE, chunk, keys_for, make_config

SECRET = "correct horse battery staple"
OTHER = "incorrect horse battery staple"
OUTSIDER_TRIES = 3  # join attempts refused from each outsider (it retries while refused)


def member(name: str, seeds: list[str], secret: str | None, previous: str | None = None):
    node = MeshNode(
        make_config(
            "tcp", seeds, lmcache_instance_id=name, mesh_secret=secret,
            mesh_previous_secret=previous,
        ),
        namespace=NAMESPACE,
    )  # fmt: skip
    node.start()
    return node


def test_members_without_the_secret_cannot_join_read_or_push() -> None:
    a = member("a", [], SECRET)
    b = member("b", [a.gossip_address], SECRET)
    outsiders = [member("open", [a.gossip_address], None)]
    outsiders.append(member("wrong", [a.gossip_address], OTHER))
    try:
        wait_until(
            "a and b see each other", lambda: {p.name for p in a.members()} == {"a/0", "b/0"}
        )
        keys = keys_for(2)
        a.put(keys, [chunk(k) for k in keys])
        wait_until("a's pushes done", a.pusher.idle)

        def both_outsiders_refused_again_and_again() -> bool:
            drops = a.gossip.stats()
            return min(drops["drop_unauthenticated"], drops["drop_bad_auth"]) >= OUTSIDER_TRIES

        wait_until("both outsiders refused", both_outsiders_refused_again_and_again)
        for node in (a, b):
            assert {p.name for p in node.members()} == {"a/0", "b/0"}
        for outsider in outsiders:  # alone: nothing to read, and its frames are refused
            assert outsider.lookup(keys, timeout_s=0.5) == 0

        context = zmq.Context.instance()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{a.data_address}")
        for policy in (AuthPolicy(), AuthPolicy.from_strings(OTHER)):
            codec = m.make_codec(1 << 20, policy)
            sock.send(m.encode(codec, m.Lookup(req=1, epoch=0, keys=keys)))
            payloads = [b"x" * 8] * 2
            put = m.Put(req=2, epoch=0, keys=keys, chunk_bytes=8, checksums=[b"c"] * 2,
                        payloads=payloads)  # fmt: skip
            sock.send_multipart(m.encode_frames(codec, put))
        assert not sock.poll(1000), "an unauthenticated request got an answer"
        sock.close(linger=0)
        stats = a.server.stats
        assert stats["drop_unauthenticated"] == 2 and stats["drop_bad_auth"] == 2
        assert a.store.stats().chunks == 2  # nothing pushed by outsiders
        assert b.lookup(keys) == 2  # the mesh itself works
    finally:
        for node in [*outsiders, b, a]:
            node.stop(leave=False)


def test_key_rotation_accepts_the_previous_secret() -> None:
    a = member("a", [], OTHER, previous=SECRET)  # already rotated to OTHER
    b = member("b", [a.gossip_address], SECRET)  # not yet rotated
    try:
        # during a rotation, a member still signing with the previous secret is accepted
        wait_until("a sees b", lambda: "b/0" in {p.name for p in a.members()}, 10)
    finally:
        b.stop(leave=False)
        a.stop(leave=False)
