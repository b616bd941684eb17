"""One sample of every wire message (gossip and data plane), for the golden-bytes test.

The frames these encode to were captured, with and without auth, from the hand-written
message classes at commit 4586c3a (tests/golden/wire_frames.json); the message mechanism in
`meshkv.wire` must keep producing and accepting exactly those bytes. Never regenerate the
golden file from new code: a change here is a wire change, and needs a protocol version bump.

Data-plane v6 (tools: the bodies of every data-plane message other than ``lookup_reply*`` were
checked byte for byte against the v5 frames before the v6 frames were written): the header's
version byte (and so every MAC) changed; ``lookup_reply*`` gained ``runs``; ``chain_at`` is new.
"""

from __future__ import annotations

from typing import Any

from meshkv.dataplane import messages as dm
from meshkv.gossip import messages as gm
from meshkv.gossip.member import MemberState
from meshkv.gossip.updates import Alive, Dead, Suspect
from meshkv.transfer.channel import SegmentInfo

KEY = bytes(range(16))
SENT_MS = 1_790_000_000_000
NOW_S = 1_790_000_000.25
"""The sender's clock for auth trailers, and the receiver's when it checks them."""
SECRET = "golden-mesh-secret"

ALIVE = Alive(name="a/0", nonce=7, incarnation=1_700_000_000_000, address="127.0.0.1:7001",
              meta={"ns": "n", "free": 12, "ratio": 0.5, "ok": True})  # fmt: skip
SUSPECT = Suspect(name="b/1", nonce=2**64 - 1, incarnation=3, source="a/0")
LEFT = Dead(name="c/0", nonce=0, incarnation=9, source="c/0", left=True)
DEAD = Dead(name="e/0", nonce=5, incarnation=4, source="a/0", left=False)
RECORD = gm.MemberRecord(name="d/0", nonce=1, address="h:9", incarnation=2,
                         state=MemberState.DEAD, meta={})  # fmt: skip
ALIVE_RECORD = gm.MemberRecord(name="a/0", nonce=7, incarnation=1_700_000_000_000,
                               address="127.0.0.1:7001", state=MemberState.ALIVE,
                               meta={"ns": "n", "free": 12})  # fmt: skip

GOSSIP: dict[str, Any] = {
    "ping": gm.Ping(seq=1, target="b/1", source="a/0", source_address="127.0.0.1:7001",
                    updates=(ALIVE, SUSPECT, LEFT, DEAD)),
    "ping_empty": gm.Ping(seq=0, target="b/1", source="a/0", source_address="h:1"),
    "ack": gm.Ack(seq=2**32 - 1, source="b/1", updates=(SUSPECT,)),
    "ping_req": gm.PingReq(seq=3, target="c/0", target_address="h:2", source="a/0",
                           source_address="h:1", updates=(ALIVE,)),
    "nack": gm.Nack(seq=4, source="c/0"),
    "gossip": gm.Gossip(source="a/0", updates=(ALIVE, LEFT)),
    "push_pull": gm.PushPull(source="a/0", source_address="h:1", reply_wanted=True,
                             records=(RECORD, ALIVE_RECORD)),
    "push_pull_no_reply": gm.PushPull(source="a/0", source_address="h:1", reply_wanted=False,
                                      records=()),
    "state_query": gm.StateQuery(query_id=5),
    "state_reply": gm.StateReply(query_id=5, part=1, parts=2, records=(RECORD, ALIVE_RECORD)),
}  # fmt: skip

DATA: dict[str, Any] = {
    "hello": dm.Hello(req=1, sender="a/0", nonce=7, channel="nixl", agent=b"md",
                      segments=[SegmentInfo(segment=0, address=4096, nbytes=1 << 20),
                                SegmentInfo(segment=1, address=1 << 40, nbytes=4096)]),
    "hello_reply": dm.HelloReply(req=1, sender="b/0", nonce=8, channel="tcp", agent=b"",
                                 segments=[]),
    "lookup": dm.Lookup(req=2, epoch=3, keys=[KEY, KEY[::-1]]),
    "lookup_reply": dm.LookupReply(req=2, epoch=3, held=2, pointers=["a/0", "c/0"], runs=[1, 3]),
    "lookup_reply_empty": dm.LookupReply(req=2, epoch=3, held=0),
    "get": dm.Get(req=4, epoch=3, sender="a/0", keys=[KEY, KEY[::-1]],
                  dest=[dm.SlotRef(0, 4096), dm.SlotRef(2, 0)], budget_ms=100, sent_ms=SENT_MS),
    "get_piece": dm.Get(req=4, epoch=3, sender="a/0", keys=[KEY], dest=[dm.SlotRef(0, 8192)],
                        budget_ms=100, sent_ms=SENT_MS, offset=4096, nbytes=4096),
    "get_tcp": dm.Get(req=4, epoch=3, sender="a/0", keys=[KEY], dest=[], budget_ms=250,
                      sent_ms=SENT_MS),
    "get_reply": dm.GetReply(req=4, checksums=[b"c" * 16, b"d" * 16]),
    "get_reply_tcp": dm.GetReply(req=4, checksums=[b"c" * 16], payloads=[b"x" * 10]),
    "put": dm.Put(req=5, epoch=3, keys=[KEY, KEY[::-1]], chunk_bytes=1 << 20),
    "put_tcp": dm.Put(req=5, epoch=3, keys=[KEY], chunk_bytes=10, checksums=[b"c" * 16],
                      payloads=[b"x" * 10]),
    "put_reply": dm.PutReply(req=5, epoch=3, slots=[dm.SlotRef(1, 0), None], stored=0),
    "put_reply_tcp": dm.PutReply(req=5, epoch=3, slots=[], stored=1),
    "commit": dm.Commit(req=6, keys=[KEY], checksums=[b"c" * 16]),
    "commit_reply": dm.CommitReply(req=6, stored=1),
    "held_at": dm.HeldAt(req=7, epoch=3, keys=[KEY], holder="a/0"),
    "error": dm.Error(req=8, reason="stale_epoch"),
    "chain_at": dm.ChainAt(req=9, epoch=3, head=KEY, start=16, keys=[KEY[::-1]], holder="a/0"),
}  # fmt: skip
