"""HashRing: the documented point and probe hashes, homes equal to a brute-force reference,
minimal movement on join and leave, preference lists, epochs, shares, determinism across
processes, and clear errors on misuse."""

import hashlib
import json
import os
import subprocess
import sys

import mmh3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkv.errors import UsageError
from meshkv.ring import HashRing, member_points, positions_of

MASK_64 = (1 << 64) - 1
names = st.text(alphabet="abcdefgh-/0123456789", min_size=1, max_size=10)
member_sets = st.sets(names, min_size=1, max_size=7)
small_vnodes = st.integers(1, 12)
probe_counts = st.integers(1, 5)
positions = st.integers(0, MASK_64)
tails = st.binary(min_size=8, max_size=8)


def key_at(position: int, tail: bytes = bytes(8)) -> bytes:
    return position.to_bytes(8, "big") + tail


def keys_for(count: int, label: str = "k") -> list[bytes]:
    return [hashlib.blake2b(f"{label}{i}".encode(), digest_size=16).digest() for i in range(count)]


def fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & MASK_64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & MASK_64
    return k ^ (k >> 33)


def reference_home(members: set[str], vnodes: int, probes: int, position: int) -> str:
    """The home as the module docstring defines it, by brute force over every point."""
    points = [
        (mmh3.hash64(f"{name}#{i}".encode(), 0, signed=False)[0], name)
        for name in members
        for i in range(vnodes)
    ]
    candidates = []
    for j in range(probes):
        probe = position if j == 0 else fmix64(position ^ ((j * 0x9E3779B97F4A7C15) & MASK_64))
        distance, owner = min(((point - probe) & MASK_64, name) for point, name in points)
        candidates.append((distance, j, owner))
    return min(candidates)[2]


def test_member_points_follow_the_documented_hash() -> None:
    points = member_points("engine-17/0", 5)
    expected = [mmh3.hash64(f"engine-17/0#{i}".encode(), 0, signed=False)[0] for i in range(5)]
    assert points.dtype == np.uint64
    assert points.tolist() == expected


@settings(max_examples=60, deadline=None)
@given(member_sets, small_vnodes, probe_counts, st.lists(positions, min_size=1, max_size=20))
def test_homes_match_the_brute_force_reference(
    members: set[str], vnodes: int, probes: int, where: list[int]
) -> None:
    ring = HashRing(members, vnodes, probes=probes)
    batched = ring.homes(np.array(where, dtype=np.uint64))
    for position, index in zip(where, batched.tolist(), strict=True):
        expected = reference_home(members, vnodes, probes, position)
        assert ring.members[index] == expected
        assert ring.home(key_at(position)) == expected


@pytest.mark.parametrize("probes", [1, 4])
def test_homes_at_the_points_themselves_and_the_ring_edges(probes: int) -> None:
    members = {"a/0", "b/0", "c/0"}
    ring = HashRing(members, 4, probes=probes)
    edges = [0, 1, MASK_64 - 1, MASK_64]
    for name in members:
        for point in member_points(name, 4).tolist():
            edges += [point, (point - 1) & MASK_64, (point + 1) & MASK_64]
    got = ring.homes(np.array(edges, dtype=np.uint64)).tolist()
    assert [ring.members[i] for i in got] == [reference_home(members, 4, probes, p) for p in edges]
    if probes == 1:  # a key exactly on a point belongs to that point's member
        point = int(member_points("b/0", 4)[0])
        assert ring.home(key_at(point)) == "b/0"


@settings(max_examples=40, deadline=None)
@given(member_sets, names, probe_counts, st.lists(tails, min_size=1, max_size=300))
def test_a_join_moves_keys_only_to_the_new_member(
    members: set[str], newcomer: str, probes: int, key_tails: list[bytes]
) -> None:
    members.discard(newcomer)
    if not members:
        return
    before = HashRing(members, 16, probes=probes)
    after = before.with_member(newcomer)
    for key in (hashlib.blake2b(t, digest_size=16).digest() for t in key_tails):
        assert after.home(key) in (before.home(key), newcomer)


@settings(max_examples=40, deadline=None)
@given(member_sets, probe_counts, st.data())
def test_a_leave_moves_only_the_leavers_keys(
    members: set[str], probes: int, data: st.DataObject
) -> None:
    if len(members) < 2:
        return
    leaver = data.draw(st.sampled_from(sorted(members)))
    before = HashRing(members, 16, probes=probes)
    after = before.without_member(leaver)
    homes_before = before.homes(positions_of(keys_for(300)))
    homes_after = after.homes(positions_of(keys_for(300)))
    for old, new in zip(homes_before.tolist(), homes_after.tolist(), strict=True):
        if before.members[old] != leaver:
            assert after.members[new] == before.members[old]


@settings(max_examples=60, deadline=None)
@given(member_sets, small_vnodes, probe_counts, st.integers(-1, 9), positions, tails)
def test_preference_list_is_distinct_members_starting_with_home(
    members: set[str], vnodes: int, probes: int, n: int, position: int, tail: bytes
) -> None:
    ring = HashRing(members, vnodes, probes=probes)
    key = key_at(position, tail)
    chosen = ring.preference_list(key, n)
    assert len(chosen) == max(0, min(n, len(members)))
    assert len(set(chosen)) == len(chosen)
    assert set(chosen) <= members
    if chosen:
        assert chosen[0] == ring.home(key)


@pytest.mark.parametrize(("count", "vnodes", "n"), [(10, 8, 4), (40, 128, 40)])
def test_preference_list_walks_clockwise_from_the_home_point(
    count: int, vnodes: int, n: int
) -> None:
    members = [f"m{i}" for i in range(count)]
    ring = HashRing(members, vnodes, probes=1)
    points = sorted((p, name) for name in members for p in member_points(name, vnodes).tolist())
    walk_lengths = []
    for key in keys_for(300):
        position = int(positions_of([key])[0])
        start = next((i for i, (p, _) in enumerate(points) if p >= position), 0)
        walk = [points[(start + s) % len(points)][1] for s in range(len(points))]
        expected = list(dict.fromkeys(walk))[:n]
        assert ring.preference_list(key, n) == expected
        walk_lengths.append(walk.index(expected[-1]) + 1)
    # Some walks are longer than the first window of points the ring scans (8 per member).
    assert max(walk_lengths) > 8 * n or n < count


@settings(max_examples=40, deadline=None)
@given(member_sets, probe_counts, st.lists(st.binary(min_size=16, max_size=16), max_size=50))
def test_batched_lookup_equals_single_lookup(
    members: set[str], probes: int, keys: list[bytes]
) -> None:
    ring = HashRing(members, 32, probes=probes)
    batched = ring.homes(positions_of(keys))
    assert [ring.members[i] for i in batched.tolist()] == [ring.home(k) for k in keys]


@settings(max_examples=60, deadline=None)
@given(
    member_sets,
    probe_counts,
    st.lists(st.integers(0, MASK_64), min_size=0, max_size=6),
    st.lists(st.tuples(st.integers(0, 5), tails), max_size=40),
)
def test_homes_of_keys_sharing_positions_equal_single_lookups(
    members: set[str], probes: int, spots: list[int], picks: list[tuple[int, bytes]]
) -> None:
    """Keys of one home group share a position; homes_of computes each position once, in
    plain ints for a few positions and vectorised for more: both must equal `home`."""
    ring = HashRing(members, 32, probes=probes)
    keys = [key_at(spots[i % len(spots)], tail) for i, tail in picks] if spots else []
    assert ring.homes_of(keys) == [ring.home(k) for k in keys]


@pytest.mark.parametrize("probes", [1, 4])
def test_large_batches_equal_single_lookups(probes: int) -> None:
    ring = HashRing([f"engine-{i}/0" for i in range(20)], 64, probes=probes)
    keys = keys_for(3000, label="large")
    batched = ring.homes(positions_of(keys)).tolist()
    assert [ring.members[i] for i in batched] == [ring.home(k) for k in keys]


def test_positions_are_the_first_eight_bytes_big_endian() -> None:
    keys = [key_at(0), key_at(MASK_64), bytes(range(16))]
    assert positions_of(keys).tolist() == [0, MASK_64, 0x0001020304050607]
    assert positions_of([]).shape == (0,)


def test_epoch_depends_only_on_the_member_set_and_parameters() -> None:
    ring = HashRing(["b", "a", "c", "a"])
    assert ring.epoch == HashRing(["c", "b", "a"]).epoch
    assert ring == HashRing(["c", "b", "a"]) and hash(ring) == hash(HashRing(("a", "b", "c")))
    others = [
        HashRing(["a", "b"]),
        HashRing(["a", "b", "c", "d"]),
        HashRing(["a", "b", "cc"]),
        HashRing(["a", "bc"]),
        HashRing(["ab", "c"]),
        HashRing(["a", "b", "c"], 128),
        HashRing(["a", "b", "c"], probes=1),
        HashRing([]),
    ]
    epochs = {ring.epoch} | {other.epoch for other in others}
    assert len(epochs) == len(others) + 1
    assert all(0 <= e <= MASK_64 for e in epochs)


GOLDEN_MEMBERS = ["engine-0/0", "engine-1/0", "engine-2/0", "storage-a/0"]
GOLDEN = {
    1: (
        0x4DD614C67173DCA7,
        "storage-a/0 engine-1/0 engine-2/0 engine-1/0 storage-a/0 engine-1/0 engine-2/0 "
        "storage-a/0",
    ),
    4: (
        0x7F4AFB737FBB6847,
        "engine-2/0 engine-1/0 storage-a/0 storage-a/0 storage-a/0 engine-0/0 engine-2/0 "
        "storage-a/0",
    ),
}


@pytest.mark.parametrize("probes", sorted(GOLDEN))
def test_homes_and_epochs_match_the_recorded_values(probes: int) -> None:
    """Members on other machines and versions compute these same values; change = new scheme."""
    ring = HashRing(GOLDEN_MEMBERS, 256, probes=probes)
    epoch, homes = GOLDEN[probes]
    assert ring.epoch == epoch
    assert [ring.home(k) for k in keys_for(8, label="")] == homes.split()
    assert HashRing([]).epoch == 0xA50B7A2C0352F623


CHILD = """
import json, sys
from meshkv.ring import HashRing, positions_of
members, keys = json.loads(sys.argv[1])
ring = HashRing(members)
homes = ring.homes(positions_of([bytes.fromhex(k) for k in keys])).tolist()
print(json.dumps([ring.epoch, [ring.members[i] for i in homes]]))
"""


def test_homes_and_epoch_are_the_same_in_another_process() -> None:
    members = [f"engine-{i}/0" for i in range(12)]
    keys = keys_for(200)
    ring = HashRing(members)
    expected = [ring.epoch, [ring.home(k) for k in keys]]
    arg = json.dumps([members, [k.hex() for k in keys]])
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        child = subprocess.run(
            [sys.executable, "-c", CHILD, arg], env=env, capture_output=True, text=True, timeout=60
        )
        assert child.returncode == 0, child.stderr
        assert json.loads(child.stdout) == expected


@pytest.mark.parametrize("probes", [1, 2, 4])
def test_shares_sum_to_one_and_match_random_keys(probes: int) -> None:
    ring = HashRing([f"engine-{i}/0" for i in range(8)], 64, probes=probes)
    shares = ring.shares()
    assert list(shares) == list(ring.members)
    assert sum(shares.values()) == pytest.approx(1.0)
    rng = np.random.default_rng(7)
    sample = rng.integers(0, MASK_64, size=400_000, dtype=np.uint64, endpoint=True)
    counted = np.bincount(ring.homes(sample), minlength=8) / sample.size
    # 400k keys over 8 members: the sampling error of each fraction is about 0.0005.
    assert np.abs(counted - np.array(list(shares.values()))).max() < 0.003


def test_multi_probe_evens_out_the_shares() -> None:
    members = [f"engine-{i}/0" for i in range(64)]
    one = max(HashRing(members, 256, probes=1).shares().values())
    four = max(HashRing(members, 256, probes=4).shares().values())
    assert four < one


def test_shares_of_tiny_rings() -> None:
    assert HashRing([]).shares() == {}
    assert HashRing(["solo"], 1, probes=4).shares() == {"solo": 1.0}


def test_an_empty_ring_has_no_home() -> None:
    ring = HashRing([])
    assert ring.members == ()
    with pytest.raises(UsageError, match="no members"):
        ring.home(keys_for(1)[0])
    with pytest.raises(UsageError, match="no members"):
        ring.homes(np.zeros(3, dtype=np.uint64))
    assert ring.preference_list(keys_for(1)[0], 3) == []


@pytest.mark.parametrize(
    ("members", "vnodes", "probes"),
    [(["a"], 0, 1), (["a"], 4097, 1), (["a"], 8, 0), (["a"], 8, 33), ([""], 8, 1), ([3], 8, 1)],
)
def test_bad_construction_is_a_usage_error(members: list, vnodes: int, probes: int) -> None:
    with pytest.raises(UsageError):
        HashRing(members, vnodes, probes=probes)


def test_misuse_of_lookups_and_edits_is_a_usage_error() -> None:
    ring = HashRing(["a", "b"], 8)
    with pytest.raises(UsageError, match="16 bytes"):
        ring.home(b"short")
    with pytest.raises(UsageError):
        positions_of([bytes(16), bytes(15)])
    with pytest.raises(UsageError, match="uint64"):
        ring.homes(np.zeros(3, dtype=np.int64))
    with pytest.raises(UsageError, match="already"):
        ring.with_member("a")
    with pytest.raises(UsageError, match="not a ring member"):
        ring.without_member("c")
    assert ring.with_member("c") == HashRing(["a", "b", "c"], 8)
    assert ring.without_member("a").members == ("b",)
