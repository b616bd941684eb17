"""Member identity validation and the precedence table (state x update x order -> next state)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkv.errors import UsageError
from meshkv.gossip.member import (
    PRECEDENCE,
    MemberInfo,
    MemberState,
    Order,
    TransitionError,
    UpdateKind,
    next_state,
    order_of,
)

A, S, D, L = MemberState
NEWER, SAME, OLDER, OTHER = Order


def test_table_is_complete() -> None:
    states = [None, *MemberState]
    for key in itertools.product(states, UpdateKind, Order):
        assert key in PRECEDENCE, key


@pytest.mark.parametrize(
    ("state", "kind", "order", "expected"),
    [
        (None, UpdateKind.ALIVE, NEWER, A),  # a new member is learned from Alive only
        (None, UpdateKind.SUSPECT, NEWER, None),
        (None, UpdateKind.DEAD, NEWER, None),
        (A, UpdateKind.ALIVE, SAME, None),
        (A, UpdateKind.ALIVE, NEWER, A),
        (A, UpdateKind.SUSPECT, SAME, S),  # suspicion at the same incarnation wins
        (A, UpdateKind.SUSPECT, OLDER, None),
        (S, UpdateKind.ALIVE, SAME, None),  # only a higher incarnation refutes
        (S, UpdateKind.ALIVE, NEWER, A),
        (S, UpdateKind.SUSPECT, SAME, S),  # a confirmation
        (S, UpdateKind.DEAD, SAME, D),
        (D, UpdateKind.ALIVE, SAME, None),  # the dead stay dead at their incarnation
        (D, UpdateKind.ALIVE, NEWER, A),
        (D, UpdateKind.SUSPECT, SAME, None),
        (D, UpdateKind.LEFT, SAME, L),  # a graceful leave outranks a death
        (L, UpdateKind.DEAD, SAME, None),
        (L, UpdateKind.ALIVE, NEWER, A),  # a new incarnation comes back
        (A, UpdateKind.DEAD, OTHER, None),  # deaths of another boot are ignored
        (D, UpdateKind.SUSPECT, OTHER, None),
    ],
)
def test_precedence(
    state: MemberState | None,
    kind: UpdateKind,
    order: Order,
    expected: MemberState | None,
) -> None:
    assert next_state("m/0", state, kind, order) is expected


def test_missing_entry_names_member_state_and_event() -> None:
    table = dict(PRECEDENCE)
    del table[(S, UpdateKind.DEAD, SAME)]
    with pytest.raises(TransitionError) as caught:
        next_state("inst-7/1", S, UpdateKind.DEAD, SAME, table)
    message = str(caught.value)
    assert "inst-7/1" in message and "SUSPECT" in message and "DEAD" in message
    assert caught.value.member == "inst-7/1" and caught.value.state is S


@pytest.mark.parametrize(
    ("kind", "held", "update", "expected"),
    [
        (UpdateKind.ALIVE, (5, 10), (5, 11), NEWER),
        (UpdateKind.ALIVE, (5, 10), (5, 10), SAME),
        (UpdateKind.SUSPECT, (5, 10), (5, 9), OLDER),
        (UpdateKind.ALIVE, (5, 10), (6, 11), NEWER),  # a restart: new nonce, higher inc
        (UpdateKind.ALIVE, (5, 10), (6, 9), OLDER),  # an older boot
        (UpdateKind.ALIVE, (5, 10), (6, 10), NEWER),  # tie broken by nonce
        (UpdateKind.ALIVE, (6, 10), (5, 10), OLDER),
        (UpdateKind.DEAD, (5, 10), (6, 99), OTHER),
    ],
)
def test_order_of(
    kind: UpdateKind, held: tuple[int, int], update: tuple[int, int], expected: Order
) -> None:
    assert order_of(kind, held, update) is expected


_RANK = {A: 0, S: 1, D: 2, L: 3}
_KIND_STATE = {
    UpdateKind.ALIVE: A,
    UpdateKind.SUSPECT: S,
    UpdateKind.DEAD: D,
    UpdateKind.LEFT: L,
}


def _fold(start: tuple[MemberState, int], updates: list[tuple[UpdateKind, int]]) -> tuple:
    state, inc = start
    for kind, update_inc in updates:
        order = order_of(kind, (1, inc), (1, update_inc))
        target = next_state("m/0", state, kind, order)
        if target is not None:
            state, inc = target, update_inc
    return state, inc


updates_strategy = st.lists(
    st.tuples(st.sampled_from(list(UpdateKind)), st.integers(0, 4)), min_size=1, max_size=8
)


@settings(max_examples=300, deadline=None)
@given(updates=updates_strategy, seed=st.randoms())
def test_merging_is_order_independent(updates: list, seed) -> None:
    """Gossip delivers updates in any order; every order must end in the same record."""
    shuffled = list(updates)
    seed.shuffle(shuffled)
    assert _fold((A, 0), updates) == _fold((A, 0), shuffled)


@settings(max_examples=300, deadline=None)
@given(updates=updates_strategy)
def test_merging_keeps_the_highest_ranked_update(updates: list) -> None:
    """The result is the update ranked highest by (incarnation, ALIVE<SUSPECT<DEAD<LEFT)."""
    candidates = [(0, 0, A), *((inc, _RANK[_KIND_STATE[k]], _KIND_STATE[k]) for k, inc in updates)]
    best_inc, _, best_state = max(candidates, key=lambda c: (c[0], c[1]))
    assert _fold((A, 0), updates) == (best_state, best_inc)


def test_member_info_validates() -> None:
    info = MemberInfo(name="inst/0", nonce=2**64 - 1, address="127.0.0.1:7946", meta={"a": 1})
    assert info.meta["a"] == 1
    with pytest.raises(TypeError):
        info.meta["a"] = 2  # type: ignore[index]
    bad = [
        {"name": ""},
        {"name": "x" * 129},
        {"name": "a\nb"},
        {"nonce": -1},
        {"nonce": 2**64},
        {"nonce": True},
        {"address": "127.0.0.1"},
        {"address": "127.0.0.1:0"},
        {"address": "127.0.0.1:70000"},
        {"address": ":80"},
        {"meta": {"k": [1]}},
        {"meta": {"": 1}},
        {"meta": {f"k{i}": i for i in range(33)}},
        {"meta": {"k": "x" * 5000}},
    ]
    base = {"name": "inst/0", "nonce": 1, "address": "h:1", "meta": {}}
    for change in bad:
        with pytest.raises(UsageError):
            MemberInfo(**{**base, **change})
