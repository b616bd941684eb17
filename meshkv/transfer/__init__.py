"""Moving chunk bytes between members: the NIXL channel (WRITE over UCX) and the tcp channel."""

from meshkv.errors import ConfigError
from meshkv.store import SegmentPool
from meshkv.transfer.channel import (
    Channel,
    SegmentInfo,
    SlotAddress,
    TransferHandle,
    TransferState,
    WriteChannel,
)
from meshkv.transfer.tcp_channel import TcpChannel


def make_channel(kind: str, agent_name: str, pool: SegmentPool) -> Channel:
    """The channel named by ``transfer_channel``; NIXL is imported only when chosen.

    ``agent_name`` must be unique per boot of the member (e.g. name plus boot nonce): NIXL
    refuses an agent name it already knows. Raises ConfigError if the kind is unknown or NIXL
    is not installed, TransportError if the NIXL agent or its UCX backend cannot start.
    """
    if kind == "tcp":
        return TcpChannel()
    if kind == "nixl":
        try:
            from meshkv.transfer.nixl_channel import NixlChannel
        except ImportError as exc:
            raise ConfigError(
                "transfer_channel", f'"nixl" needs the nixl package ({exc}); or use "tcp"'
            ) from None
        return NixlChannel(agent_name, pool)
    raise ConfigError("transfer_channel", f"unknown channel {kind!r}")


__all__ = [
    "Channel",
    "SegmentInfo",
    "SlotAddress",
    "TcpChannel",
    "TransferHandle",
    "TransferState",
    "WriteChannel",
    "make_channel",
]
