"""Simulated LMCache workers for the lookup benchmark (tools/bench/lookup); LMCache venv only.

Plays N LMCache instances (TP rank 0 each) against a real ``lmcache_controller``, speaking
LMCache's own message classes and msgspec encoding, the way LMCache's ``LMCacheWorker`` does:

1. each instance binds a REP socket (the controller connects back to the registered ip:port),
   then registers with ``RegisterMsg`` over a DEALER to the reply port, frames ``[b"", payload]``
   (the controller's ROUTER drops a message without the empty delimiter), and waits for
   ``RegisterRetMsg``;
2. each instance admits its keys with ``BatchedKVOperationMsg`` over PUSH to the pull port, in
   batches of LMCache's ``kv_msg_batch_size`` (50) with consecutive sequence numbers;
3. every instance is checked with a ``BatchedP2PLookupMsg`` of all its keys, which must come back
   as a full hit at that instance, so the benchmark never measures a half-loaded controller.

Protocol with the parent: one JSON line on stdin (reply_url, pull_url, location, instances:
[{instance_id, keys}]); one JSON line on stdout (ready, timings, sample encodings the parent
checks its own encoder against); then the instances stay registered until stdin closes.

This script knows LMCache and nothing of meshkv; meshkv never imports it.
"""

from __future__ import annotations

import json
import sys
import time

import msgspec
import zmq
from lmcache.v1.cache_controller.message import (
    BatchedKVOperationMsg,
    BatchedP2PLookupMsg,
    BatchedP2PLookupRetMsg,
    KVOpEvent,
    Msg,
    OpType,
    RegisterMsg,
    RegisterRetMsg,
)

ADMIT_BATCH_OPS = 50
"""LMCache's default kv_msg_batch_size: admits per BatchedKVOperationMsg."""
REPLY_TIMEOUT_MS = 10_000
"""Longest wait for one controller reply during setup."""
VERIFY_ATTEMPTS_MAX = 200
"""Checks per instance before giving up on the controller having applied its admits."""
VERIFY_RETRY_S = 0.01
"""Pause between checks while the controller drains the pull socket."""
VERIFIER_INSTANCE_ID = "bench-verifier"


def request(dealer: zmq.Socket, msg: msgspec.Struct) -> object:
    """One DEALER round trip to the controller's ROUTER, as LMCacheWorker does it."""
    dealer.send_multipart([b"", msgspec.msgpack.encode(msg)])
    if not dealer.poll(REPLY_TIMEOUT_MS):
        raise TimeoutError(f"no reply to {type(msg).__name__} in {REPLY_TIMEOUT_MS} ms")
    frames = dealer.recv_multipart()
    return msgspec.msgpack.decode(frames[-1], type=Msg)


def register_all(
    context: zmq.Context, dealer: zmq.Socket, instances: list[dict]
) -> list[zmq.Socket]:
    """Registers every instance in order; returns the sockets that must stay open."""
    held: list[zmq.Socket] = []
    for inst in instances:
        rep = context.socket(zmq.REP)
        rep_port = rep.bind_to_random_port("tcp://127.0.0.1")
        peer = context.socket(zmq.ROUTER)
        peer_port = peer.bind_to_random_port("tcp://127.0.0.1")
        held += [rep, peer]
        inst["port"] = rep_port
        inst["peer_init_url"] = f"127.0.0.1:{peer_port}"
        ret = request(
            dealer,
            RegisterMsg(
                instance_id=inst["instance_id"],
                worker_id=0,
                ip="127.0.0.1",
                port=rep_port,
                peer_init_url=inst["peer_init_url"],
            ),
        )
        if not isinstance(ret, RegisterRetMsg):
            raise RuntimeError(f"register {inst['instance_id']}: got {ret!r}")
    return held


def admit_all(push: zmq.Socket, instances: list[dict], location: str) -> int:
    """Pushes every instance's keys as ADMIT batches; returns the number of messages."""
    sent = 0
    for inst in instances:
        keys = inst["keys"]
        for start in range(0, len(keys), ADMIT_BATCH_OPS):
            ops = [
                KVOpEvent(op_type=OpType.ADMIT, key=key, seq_num=start + offset)
                for offset, key in enumerate(keys[start : start + ADMIT_BATCH_OPS])
            ]
            msg = BatchedKVOperationMsg(
                instance_id=inst["instance_id"], worker_id=0, location=location, operations=ops
            )
            push.send_multipart([msgspec.msgpack.encode(msg)])
            sent += 1
    return sent


def verify_all(dealer: zmq.Socket, instances: list[dict]) -> None:
    """Waits until each instance answers a lookup of all its keys as a full hit there."""
    for inst in instances:
        want = (inst["instance_id"], len(inst["keys"]))
        got = None
        for _ in range(VERIFY_ATTEMPTS_MAX):
            ret = request(
                dealer,
                BatchedP2PLookupMsg(
                    hashes=inst["keys"], instance_id=VERIFIER_INSTANCE_ID, worker_id=0
                ),
            )
            assert isinstance(ret, BatchedP2PLookupRetMsg), ret
            got = (ret.layout_info[0][0], ret.layout_info[0][2])
            if got == want:
                break
            time.sleep(VERIFY_RETRY_S)
        else:
            raise RuntimeError(f"controller never held {want}, last answer {got}")


def sample_encodings(instances: list[dict]) -> dict[str, str]:
    """LMCache's own bytes for a lookup request and reply, for the parent's encoder check."""
    inst = instances[-1]
    request_msg = BatchedP2PLookupMsg(
        hashes=inst["keys"][:3], instance_id="bench-requester", worker_id=0
    )
    reply_msg = BatchedP2PLookupRetMsg(
        layout_info=[(inst["instance_id"], "LocalCPUBackend", 3, inst["peer_init_url"])]
    )
    return {
        "lookup_request_hex": msgspec.msgpack.encode(request_msg).hex(),
        "lookup_request_hashes": inst["keys"][:3],
        "lookup_reply_hex": msgspec.msgpack.encode(reply_msg).hex(),
    }


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    instances: list[dict] = spec["instances"]
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://{spec['reply_url']}")
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(f"tcp://{spec['pull_url']}")

    t0 = time.perf_counter()
    held = register_all(context, dealer, instances)
    t1 = time.perf_counter()
    messages = admit_all(push, instances, spec["location"])
    verify_all(dealer, instances)
    t2 = time.perf_counter()

    ready = {
        "ready": True,
        "instances": [
            {
                "instance_id": i["instance_id"],
                "port": i["port"],
                "peer_init_url": i["peer_init_url"],
            }
            for i in instances
        ],
        "register_s": t1 - t0,
        "admit_and_verify_s": t2 - t1,
        "admit_messages": messages,
        **sample_encodings(instances),
    }
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    sys.stdin.read()  # stay registered until the parent closes our stdin
    for sock in [dealer, push, *held]:
        sock.close(linger=0)
    context.term()


if __name__ == "__main__":
    main()
