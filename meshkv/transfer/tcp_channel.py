"""The tcp channel: for hosts without NIXL/UCX, chunk bytes ride with data-plane messages.

It has no memory registration and no transfers of its own; the data plane sees
``kind == "tcp"`` and sends payloads with `GetReply` and `Put` messages over ZMQ (as frames
after the message's, see `meshkv.dataplane.messages`), where
the receiver checks each chunk's checksum before publishing it, exactly as for NIXL. This class
exists so the handshake and peer bookkeeping read the same for both channels; asking it to move
bytes is a bug on our side.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshkv.errors import UsageError
from meshkv.store import Region
from meshkv.transfer.channel import (
    SegmentInfo,
    SlotAddress,
    TransferHandle,
    TransferState,
)


class TcpChannel:
    kind = "tcp"

    def metadata(self) -> bytes:
        return b""

    def segments(self) -> list[SegmentInfo]:
        return []

    def add_peer(self, name: str, metadata: bytes, segments: Sequence[SegmentInfo]) -> bool:
        return True

    def remove_peer(self, name: str) -> None:
        return None

    def post_write(
        self, peer: str, local: Sequence[Region], remote: Sequence[SlotAddress]
    ) -> TransferHandle:
        raise UsageError("the tcp channel carries bytes inline; there is nothing to post")

    def poll(self, handle: TransferHandle) -> TransferState:
        raise UsageError("the tcp channel has no transfers to poll")

    def release(self, handle: TransferHandle, *, failed: bool) -> None:
        raise UsageError("the tcp channel has no transfers to release")

    def write(
        self, peer: str, local: Sequence[Region], remote: Sequence[SlotAddress], deadline_s: float
    ) -> bool:
        raise UsageError("the tcp channel carries bytes inline; there is nothing to write")

    def close(self) -> None:
        return None
