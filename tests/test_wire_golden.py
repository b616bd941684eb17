"""Golden bytes: every gossip and data-plane message encodes to, and is decoded from, exactly
the frames captured before the message mechanism moved into `meshkv.wire` (see wire_samples).

With auth on, the nonce (and so the MAC) is random: the frame must match up to the trailer's
time field, and the receiver must accept both the golden frame (at the clock it was signed
at) and the new one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from meshkv.dataplane import messages as dm
from meshkv.gossip import messages as gm
from meshkv.gossip.config import GossipConfig
from meshkv.wire import AUTH_TRAILER_BYTES, AuthPolicy, FrameCodec
from tests.wire_samples import DATA, GOSSIP, NOW_S, SECRET

GOLDEN: dict[str, dict[str, list[str]]] = json.loads(
    (Path(__file__).parent / "golden" / "wire_frames.json").read_text()
)
_RANDOM_TRAILER_BYTES = 8 + 32
"""Nonce and MAC: the part of an auth trailer that differs on every encode."""

CASES = [
    (f"{protocol}/{name}{suffix}", message)
    for protocol, samples in (("gossip", GOSSIP), ("data", DATA))
    for name, message in samples.items()
    for suffix in ("", "+auth")
]


def _codec(case: str) -> FrameCodec:
    auth = AuthPolicy.from_strings(SECRET) if case.endswith("+auth") else None
    if case.startswith("gossip/"):
        return gm.gossip_codec(GossipConfig.test(), auth)
    return dm.make_codec(1 << 20, auth)


def _encode(case: str, message: Any) -> list[bytes]:
    codec = _codec(case)
    if case.startswith("gossip/"):
        return [gm.encode_message(codec, message)]
    return [bytes(frame) for frame in dm.encode_frames(codec, message)]


def _decode(case: str, frames: list[bytes], now_s: float) -> Any:
    messages = gm.MESSAGES if case.startswith("gossip/") else dm.MESSAGES
    return messages.decode(_codec(case), frames[0], frames[1:], now_s=now_s)


def test_every_message_type_has_a_golden_frame() -> None:
    covered = {type(m) for m in (*GOSSIP.values(), *DATA.values())}
    assert covered >= {*gm.Message.__args__, *dm.Message.__args__}  # type: ignore[attr-defined]
    assert set(GOSSIP) | set(DATA) and {case for case, _ in CASES} == set(GOLDEN)


@pytest.mark.parametrize(("case", "message"), CASES, ids=[c for c, _ in CASES])
def test_the_golden_frames_decode_to_the_sample(case: str, message: Any) -> None:
    frames = [bytes.fromhex(h) for h in GOLDEN[case]["frames"]]
    assert _decode(case, frames, NOW_S) == message


@pytest.mark.parametrize(("case", "message"), CASES, ids=[c for c, _ in CASES])
def test_the_sample_encodes_to_the_golden_frames(case: str, message: Any) -> None:
    golden = [bytes.fromhex(h) for h in GOLDEN[case]["frames"]]
    frames = _encode(case, message)
    if not case.endswith("+auth"):
        assert frames == golden
        return
    assert frames[1:] == golden[1:]
    body_end = len(golden[0]) - AUTH_TRAILER_BYTES
    assert frames[0][: body_end + 1] == golden[0][: body_end + 1]  # header, body, key id
    assert len(frames[0]) == len(golden[0])
    assert _decode(case, frames, time.time()) == message
    assert frames[0][-_RANDOM_TRAILER_BYTES:] != golden[0][-_RANDOM_TRAILER_BYTES:]
