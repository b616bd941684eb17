"""A push points the home at the producer's copy before the bytes travel.

A prompt asked for on another engine right after one engine computed it reaches the home while
the push is still on its way (issue 16: a mesh hit that missed or came in part, and was
recomputed). The home cannot hold the pushed bytes here at all (its store has room for one
chunk), which keeps the window open for as long as the test needs: readers must still find
every chunk, at the producer, byte for byte.
"""

from __future__ import annotations

import numpy as np

from tests.test_node import Mesh, chunk, keys_for
from tests.test_node import mesh as mesh  # the same fixture: both channels

CHUNK_BYTES = 512 * 1024
HOME_BUDGET_GIB = 1 / 1024  # 1 MiB: one chunk of 512 KiB at most


def test_a_home_that_lacks_the_bytes_points_readers_at_the_producer(mesh: Mesh) -> None:
    producer, reader = mesh.add("a"), mesh.add("c")
    home = mesh.add("b", max_local_cpu_size=HOME_BUDGET_GIB)
    ring = producer.membership.ring().current
    keys = next(
        ks for salt in range(200) if ring.home((ks := keys_for(4, salt=str(salt)))[0]) == home.name
    )
    assert producer.put(keys, [chunk(k, CHUNK_BYTES) for k in keys]) == 4
    mesh.settle()
    assert home.store.lookup_prefix(keys) < 4  # the home could not take them all
    assert home.lookup(keys) == 4  # the rest are pointed at the producer
    with reader.get(keys, CHUNK_BYTES) as lease:
        assert lease.count == 4
        for key, view in zip(keys, lease.views, strict=True):
            assert np.array_equal(view, chunk(key, CHUNK_BYTES))
