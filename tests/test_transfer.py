"""The transfer package without a peer process: channel choice and the tcp channel's contract."""

from __future__ import annotations

import pytest

from meshkv.errors import ConfigError
from meshkv.store import ChunkStore
from meshkv.transfer import TcpChannel, make_channel


def test_make_channel_refuses_an_unknown_kind() -> None:
    store = ChunkStore.with_budget(1 << 20, segment_bytes=1 << 20)
    with pytest.raises(ConfigError) as err:
        make_channel("rdma", "m-1", store.pool)
    assert err.value.key == "transfer_channel"


def test_tcp_channel_handshakes_and_has_no_way_to_move_bytes() -> None:
    store = ChunkStore.with_budget(1 << 20, segment_bytes=1 << 20)
    channel = make_channel("tcp", "m-1", store.pool)
    assert isinstance(channel, TcpChannel) and channel.kind == "tcp"
    assert channel.metadata() == b"" and channel.segments() == []
    assert channel.add_peer("other", b"", [])
    assert not hasattr(channel, "post_write") and not hasattr(channel, "write")
    channel.remove_peer("other")
    channel.close()
