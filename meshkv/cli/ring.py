"""``meshkv ring``: each live member's share of its namespace's ring, as a seed sees it.

Rings are built as members build them (`meshkv.node.membership`): one ring per namespace, of
its alive and suspect members plus the storage-only members (namespace ``*``), which serve
every namespace; seeds (the shim) are on no ring. With only storage-only members there is one
ring, ``*``. Members that advertise no namespace (gossip-only) share one ring, ``-``.

This module knows nothing of how members gossip or how homes are found.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from meshkv.cli.common import (
    ConfigOption,
    JsonOption,
    SeedsOption,
    TimeoutOption,
    load_or_exit,
    query_any_seed,
)
from meshkv.cli.member_table import namespace_of, role_of, status_of
from meshkv.gossip.member import MemberState, MemberView
from meshkv.member_meta import ANY_NAMESPACE, ROLE_SEED

RING_STATES = (MemberState.ALIVE, MemberState.SUSPECT)


def register(app: typer.Typer) -> None:
    app.command("ring")(ring)


def rings_of(views: Iterable[MemberView]) -> dict[str, list[MemberView]]:
    """The members of each namespace's ring, by namespace, sorted by name."""
    live = [v for v in views if v.state in RING_STATES and role_of(v) != ROLE_SEED]
    storage = [v for v in live if namespace_of(v) == ANY_NAMESPACE]
    namespaces = sorted({namespace_of(v) for v in live} - {ANY_NAMESPACE})
    rings = {
        ns: sorted([v for v in live if namespace_of(v) == ns] + storage, key=lambda v: v.name)
        for ns in namespaces
    }
    if not rings and storage:
        rings[ANY_NAMESPACE] = sorted(storage, key=lambda v: v.name)
    return rings


def ring(
    seeds: list[str] | None = SeedsOption,
    as_json: bool = JsonOption,
    timeout_s: float = TimeoutOption,
    config_path: Path | None = ConfigOption,
) -> None:
    """Print each live member's share of its ring (the fraction of keys it is home for)."""
    from meshkv.ring import HashRing  # here: numpy costs every other command 0.3 s to import

    config = load_or_exit(config_path, {"mesh_seeds": seeds})
    summaries = []
    for namespace, members in rings_of(query_any_seed(config, timeout_s)).items():
        hash_ring = HashRing([m.name for m in members], config.mesh_vnodes)
        shares = hash_ring.shares()
        rows = [
            {"id": m.name, "address": m.address, "status": status_of(m), "share": shares[m.name]}
            for m in members
        ]
        summaries.append({"namespace": namespace, "epoch": hash_ring.epoch, "members": rows})
    if as_json:
        print(json.dumps({"vnodes": config.mesh_vnodes, "rings": summaries}, indent=2))
        return
    console = Console()
    if not summaries:
        console.print("no live member is on a ring")
    for summary in summaries:
        title = (
            f"namespace {summary['namespace']}: ring epoch {summary['epoch']:016x}, "
            f"{config.mesh_vnodes} vnodes"
        )
        table = Table(title=title)
        for column in ("id", "address", "status", "share"):
            table.add_column(column, justify="right" if column == "share" else "left")
        for row in summary["members"]:
            table.add_row(row["id"], row["address"], row["status"], f"{row['share']:.1%}")
        console.print(table)
