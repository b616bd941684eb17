"""``meshkv ring``: each live member's share of the consistent-hash ring, as a seed sees it.

The ring holds the alive and suspect members (suspects still serve until declared dead).
This module knows nothing of how members gossip or how homes are found.
"""

from __future__ import annotations

import json
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
from meshkv.cli.member_table import namespace_of, status_of
from meshkv.gossip.member import MemberState

RING_STATES = (MemberState.ALIVE, MemberState.SUSPECT)


def register(app: typer.Typer) -> None:
    app.command("ring")(ring)


def ring(
    seeds: list[str] | None = SeedsOption,
    as_json: bool = JsonOption,
    timeout_s: float = TimeoutOption,
    config_path: Path | None = ConfigOption,
) -> None:
    """Print each live member's share of the ring (fraction of keys it is home for)."""
    from meshkv.ring import HashRing  # here: numpy costs every other command 0.3 s to import

    config = load_or_exit(config_path, {"mesh_seeds": seeds})
    live = {m.name: m for m in query_any_seed(config, timeout_s) if m.state in RING_STATES}
    hash_ring = HashRing(live, config.mesh_vnodes)
    shares = hash_ring.shares()
    rows = [
        {
            "id": name,
            "address": live[name].address,
            "status": status_of(live[name]),
            "namespace": namespace_of(live[name]),
            "share": shares[name],
        }
        for name in hash_ring.members
    ]
    if as_json:
        summary = {"epoch": hash_ring.epoch, "vnodes": hash_ring.vnodes, "members": rows}
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"ring epoch {hash_ring.epoch:016x}, {hash_ring.vnodes} vnodes")
    for column in ("id", "address", "status", "namespace", "share"):
        table.add_column(column, justify="right" if column == "share" else "left")
    for row in rows:
        table.add_row(row["id"], row["address"], row["status"], row["namespace"],
                      f"{row['share']:.1%}")  # fmt: skip
    Console().print(table)
