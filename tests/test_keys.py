"""Chunk keys: deterministic everywhere, prefix-chained, namespace- and salt-isolated."""

import os
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from meshkv.keys import (
    HOME_GROUP_CHUNKS,
    KEY_BYTES,
    Namespace,
    chunk_keys,
    ring_position,
    root_key,
)

NS = Namespace(
    model_id="tiny-llama@abc123",
    kv_dtype="bfloat16",
    kv_layout="cpu",
    block_geometry=(2, 128, 128),
    num_layers=4,
    chunk_size=256,
    tp_world_size=1,
    tp_rank=0,
)
tokens = st.lists(st.integers(0, 2**32 - 1), max_size=1200)


@given(tokens)
def test_only_full_chunks_get_keys(ids: list[int]) -> None:
    keys = chunk_keys(root_key(NS.digest()), ids, 256)
    assert len(keys) == len(ids) // 256
    assert all(len(k) == KEY_BYTES for k in keys)


@given(tokens, tokens)
def test_keys_depend_on_the_whole_prefix(a: list[int], b: list[int]) -> None:
    root = root_key(NS.digest())
    ka, kb = chunk_keys(root, a, 64), chunk_keys(root, b, 64)
    for i, (x, y) in enumerate(zip(ka, kb, strict=False)):
        assert (x == y) == (a[: (i + 1) * 64] == b[: (i + 1) * 64])


@given(tokens)
def test_each_group_of_chunks_shares_one_ring_position(ids: list[int]) -> None:
    keys = chunk_keys(root_key(NS.digest()), ids, 16)
    for i, key in enumerate(keys):
        anchor = keys[i - i % HOME_GROUP_CHUNKS]
        assert ring_position(key) == ring_position(anchor)
    anchors = keys[::HOME_GROUP_CHUNKS]
    assert len({ring_position(k) for k in anchors}) == len(anchors)
    assert len(set(keys)) == len(keys)


def test_salt_and_namespace_isolate() -> None:
    ids = list(range(512))
    base = chunk_keys(root_key(NS.digest()), ids, 256)
    salted = chunk_keys(root_key(NS.digest(), "tenant-a"), ids, 256)
    other_rank = Namespace(
        **{**{f: getattr(NS, f) for f in NS.__slots__}, "tp_world_size": 2, "tp_rank": 1}
    )
    other = chunk_keys(root_key(other_rank.digest()), ids, 256)
    assert not set(base) & set(salted) and not set(base) & set(other)
    assert chunk_keys(root_key(NS.digest(), "tenant-a"), ids, 256) == salted


def test_keys_identical_in_another_process_with_another_hash_seed() -> None:
    code = (
        "from tests.test_keys import NS; from meshkv.keys import *;"
        "print(chunk_keys(root_key(NS.digest(), 's'), list(range(1000)), 256)[-1].hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "987"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    here = chunk_keys(root_key(NS.digest(), "s"), list(range(1000)), 256)[-1].hex()
    assert out.stdout.strip() == here


def test_ring_position_is_first_eight_bytes_big_endian() -> None:
    assert ring_position(bytes(range(16))) == 0x0001020304050607
