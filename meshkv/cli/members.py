"""``meshkv members``: ask any member (a seed) for the member table and print it.

This module knows nothing of how members gossip; it uses the state query only.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from meshkv.cli.common import (
    ConfigOption,
    JsonOption,
    SeedsOption,
    TimeoutOption,
    load_or_exit,
    query_any_seed,
)
from meshkv.cli.member_table import member_rows, member_table


def register(app: typer.Typer) -> None:
    app.command("members")(members)


def members(
    seeds: list[str] | None = SeedsOption,
    as_json: bool = JsonOption,
    timeout_s: float = TimeoutOption,
    config_path: Path | None = ConfigOption,
) -> None:
    """Print every member a seed knows: id, address, status, incarnation, namespace."""
    config = load_or_exit(config_path, {"mesh_seeds": seeds})
    views = query_any_seed(config, timeout_s)
    if as_json:
        print(json.dumps(member_rows(views), indent=2))
    else:
        Console().print(member_table(views))
