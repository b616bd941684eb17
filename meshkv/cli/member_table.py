"""How members are shown: one row per member as a rich table or as JSON-ready dicts.

Metadata keys are read through `meshkv.member_meta` (a light module: listing members does not
load the node, its store or numpy).

This module knows nothing of sockets or of how the member list was obtained.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.table import Table

from meshkv import member_meta
from meshkv.gossip.member import MemberState, MemberView

UNSET = "-"
"""Shown for a member that does not advertise the key (e.g. a gossip-only member)."""
_STATE_STYLES = {
    MemberState.ALIVE: "green",
    MemberState.SUSPECT: "yellow",
    MemberState.DEAD: "red",
    MemberState.LEFT: "dim",
}


def status_of(member: MemberView) -> str:
    return member.state.name.lower()


def namespace_of(member: MemberView) -> str:
    return member_meta.namespace_of(member.meta) or UNSET


def role_of(member: MemberView) -> str:
    return member_meta.role_of(member.meta) or UNSET


def member_rows(members: Iterable[MemberView]) -> list[dict[str, Any]]:
    """Members sorted by id, as plain dicts (the ``--json`` form)."""
    return [
        {
            "id": m.name,
            "address": m.address,
            "status": status_of(m),
            "incarnation": m.incarnation,
            "namespace": namespace_of(m),
            "role": role_of(m),
            "meta": dict(m.meta),
        }
        for m in sorted(members, key=lambda m: m.name)
    ]


def member_table(members: Iterable[MemberView], *, title: str | None = None) -> Table:
    table = Table(title=title)
    for column in ("id", "address", "status", "incarnation", "namespace", "role"):
        table.add_column(column, justify="right" if column == "incarnation" else "left")
    for m in sorted(members, key=lambda m: m.name):
        style = _STATE_STYLES[m.state]
        table.add_row(
            m.name,
            m.address,
            f"[{style}]{status_of(m)}[/{style}]",
            str(m.incarnation),
            namespace_of(m),
            role_of(m),
        )
    return table
