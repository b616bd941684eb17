"""An authenticated mesh: outsiders without the secret can neither join nor read nor push."""

from __future__ import annotations

import time

import zmq

from meshkv.dataplane import messages as m
from meshkv.node import MeshNode
from meshkv.wire import AuthPolicy
from tests.test_node import NAMESPACE, chunk, keys_for, make_config, wait_for

SECRET = "correct horse battery staple"
OTHER = "incorrect horse battery staple"


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
        wait_for(lambda: {p.name for p in a.members()} == {"a/0", "b/0"})
        keys = keys_for(2)
        a.put(keys, [chunk(k) for k in keys])
        wait_for(a.pusher.idle)
        time.sleep(1.0)  # give the outsiders every chance to get in
        for node in (a, b):
            assert {p.name for p in node.members()} == {"a/0", "b/0"}
        drops = a.gossip.stats()
        assert drops["drop_unauthenticated"] > 0 and drops["drop_bad_auth"] > 0
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
        wait_for(lambda: "b/0" in {p.name for p in a.members()}, timeout_s=10)
    finally:
        b.stop(leave=False)
        a.stop(leave=False)
