"""The tcp channel: for hosts without NIXL/UCX, chunk bytes ride with data-plane messages.

It has no memory registration and moves no bytes: it is only the handshake half of the channel
contract (`Channel`), so greetings and peer bookkeeping read the same for both channels. The
bytes travel inline, as frames after a `GetReply`'s or a `Put`'s own
(`meshkv.dataplane.byte_path.InlineBytes`), and the receiver checks each chunk's checksum
before publishing it, exactly as for NIXL.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshkv.transfer.channel import SegmentInfo


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

    def close(self) -> None:
        return None
