"""The chain index (`meshkv.dataplane.chain_index`): slices of one prompt make one entry, the
bound holds, and an answer only ever names what some producer recorded for that key."""

from __future__ import annotations

import secrets

from hypothesis import given, settings
from hypothesis import strategies as st

from meshkv.dataplane.chain_index import ChainIndex, answer_lookup
from meshkv.keys import chunk_keys, root_key


def prompt(chunks: int, salt: str = "") -> list[bytes]:
    return chunk_keys(root_key(bytes(16), salt), list(range(chunks * 4)), 4)


def test_a_prompt_stored_in_chunked_prefill_slices_is_one_entry() -> None:
    index = ChainIndex()
    keys = prompt(40)
    for start in range(0, 40, 7):  # slices of 7 chunks, as a chunked prefill saves them
        assert index.record(keys[0], start, keys[start : start + 7], "producer/0") > 0
    assert len(index) == 1 and index.chunks == 40
    assert index.holders(keys) == ["producer/0"] * 40
    assert index.holders(keys[:10]) == ["producer/0"] * 10


def test_a_prompt_that_diverges_takes_over_the_entry_from_where_it_differs() -> None:
    index = ChainIndex()
    a = prompt(20, "a")
    b = a[:12] + prompt(8, "b")  # shares a's first 12 chunks (keys alone; enough here)
    index.record(a[0], 0, a, "a/0")
    index.record(b[0], 0, b, "b/0")
    assert index.holders(b) == ["b/0"] * 20
    assert index.holders(a) == ["b/0"] * 12  # a's own tail is no longer in the entry
    assert index.chunks == 20


def test_a_slice_that_leaves_a_gap_or_names_another_head_is_not_recorded() -> None:
    index = ChainIndex()
    keys = prompt(8)
    assert index.record(keys[0], 3, keys[3:], "p/0") == 0
    assert index.record(keys[0], 0, keys[1:], "p/0") == 0
    assert len(index) == 0 and index.holders(keys) == []


def test_past_the_bound_the_least_recently_used_entries_go_whole() -> None:
    index = ChainIndex(chunks_max=20)
    first, second, third = prompt(8, "1"), prompt(8, "2"), prompt(8, "3")
    index.record(first[0], 0, first, "p/0")
    index.record(second[0], 0, second, "p/0")
    assert index.holders(first)  # first is now the most recently used
    index.record(third[0], 0, third, "p/0")
    assert index.chunks == 16 and index.holders(second) == []
    assert len(index.holders(first)) == 8 and len(index.holders(third)) == 8


def test_an_answer_stops_at_a_dead_holder_and_at_a_chunk_this_member_no_longer_has() -> None:
    keys = prompt(7)
    chained = ["me/0", "me/0", "x/0", "x/0", "me/0", "me/0", "y/0"]

    def held_here(asked: list[bytes]) -> set[bytes]:
        return {keys[4]} & set(asked)  # keys[5] was evicted here

    names, runs = answer_lookup("me/0", keys, 2, chained, lambda ks: [], lambda n: True,
                                held_here)  # fmt: skip
    assert (names, runs) == (["x/0", "me/0"], [2, 1])  # position 5: "me/0", not held
    names, runs = answer_lookup("me/0", keys, 2, chained[:3], lambda ks: ["z/0"] * len(ks),
                                lambda n: n != "z/0", held_here)  # fmt: skip
    assert (names, runs) == (["x/0"], [1])  # the directory's holder is dead


SLICE = st.tuples(st.integers(0, 3), st.integers(0, 24), st.integers(1, 12), st.integers(0, 2))


@settings(max_examples=200, deadline=None)
@given(st.lists(SLICE, max_size=40), st.integers(1, 60))
def test_recorded_answers_name_only_recorded_holders_and_the_bound_holds(
    slices: list[tuple[int, int, int, int]], chunks_max: int
) -> None:
    prompts = [prompt(36, str(i)) for i in range(4)]
    index = ChainIndex(chunks_max=chunks_max)
    recorded: set[tuple[bytes, str]] = set()
    for which, start, count, holder in slices:
        keys = prompts[which]
        name = f"h{holder}/0"
        if index.record(keys[0], start, keys[start : start + count], name):
            recorded.update((k, name) for k in keys[start : start + count])
        assert index.chunks <= chunks_max
    for keys in prompts:
        holders = index.holders(keys)
        assert all((k, h) in recorded for k, h in zip(keys, holders, strict=False))


def test_random_keys_have_no_entry() -> None:
    index = ChainIndex()
    keys = prompt(4)
    index.record(keys[0], 0, keys, "p/0")
    assert index.holders([secrets.token_bytes(16), *keys[1:]]) == []
