"""The gossip metadata schema: what members advertise, how untrusted values are read, and the
chunk count a member re-advertises only when it changes."""

from __future__ import annotations

import pytest

from meshkv import member_meta as mm
from meshkv.node.chunk_count_advert import ChunkCountAdvert


def _engine_meta(**changes: object) -> dict[str, str | int]:
    meta = mm.member_meta(
        namespace="ab" * 16,
        role=mm.ROLE_ENGINE,
        data_address="127.0.0.1:8201",
        channel="tcp",
        capacity_bytes=1 << 30,
        chunk_size=256,
        chunk_count=3,
        admin_port=8500,
        version="test",
        lookup_address="127.0.0.1:8301",
    )
    return {**meta, **changes}


def test_an_engine_advertises_every_key_the_readers_need():
    meta = _engine_meta()
    assert mm.namespace_of(meta) == "ab" * 16
    assert mm.role_of(meta) == mm.ROLE_ENGINE
    assert mm.data_address_of(meta) == "127.0.0.1:8201"
    assert mm.lookup_address_of(meta) == "127.0.0.1:8301"
    assert (mm.chunk_size_of(meta), mm.chunk_count_of(meta), mm.admin_port_of(meta)) == (
        256,
        3,
        8500,
    )


def test_a_member_without_an_admin_port_does_not_advertise_one():
    meta = mm.member_meta(
        namespace="*",
        role=mm.ROLE_STORAGE,
        data_address="h:1",
        channel="nixl",
        capacity_bytes=1,
        chunk_size=256,
        chunk_count=0,
        admin_port=None,
        version="test",
    )
    assert mm.ADMIN_PORT not in meta and mm.admin_port_of(meta) is None
    assert mm.LOOKUP_ADDRESS not in meta and mm.lookup_address_of(meta) is None


def test_a_seed_advertises_a_role_and_no_data_plane():
    meta = mm.seed_meta(version="test")
    assert mm.role_of(meta) == mm.ROLE_SEED and mm.data_address_of(meta) is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (mm.CHUNK_SIZE, 0),
        (mm.CHUNK_SIZE, "256"),
        (mm.CHUNK_COUNT, -1),
        (mm.CHUNK_COUNT, True),
        (mm.ADMIN_PORT, 70000),
        (mm.NAMESPACE, 5),
        (mm.DATA_ADDRESS, ""),
        (mm.LOOKUP_ADDRESS, 8301),
        (mm.ROLE, None),
    ],
)
def test_a_value_of_the_wrong_type_or_range_reads_as_absent(key, value):
    meta = _engine_meta(**{key: value})
    readers = {
        mm.CHUNK_SIZE: mm.chunk_size_of,
        mm.CHUNK_COUNT: mm.chunk_count_of,
        mm.ADMIN_PORT: mm.admin_port_of,
        mm.NAMESPACE: mm.namespace_of,
        mm.DATA_ADDRESS: mm.data_address_of,
        mm.LOOKUP_ADDRESS: mm.lookup_address_of,
        mm.ROLE: mm.role_of,
    }
    assert readers[key](meta) is None


def test_the_chunk_count_is_re_advertised_only_when_it_changes():
    published: list[dict[str, str | int]] = []
    held = [3]
    advert = ChunkCountAdvert(meta=_engine_meta(), count=lambda: held[0], publish=published.append)
    assert advert.refresh() is False  # the member started out advertising 3
    held[0] = 9
    assert advert.refresh() is True
    assert advert.refresh() is False
    held[0] = 0
    assert advert.refresh() is True
    assert [mm.chunk_count_of(m) for m in published] == [9, 0]
    assert {k: v for k, v in published[-1].items() if k != mm.CHUNK_COUNT} == {
        k: v for k, v in _engine_meta().items() if k != mm.CHUNK_COUNT
    }
