"""``meshkv join``: run one member in the foreground until Ctrl-C or SIGTERM (graceful leave).

On a terminal the member table is shown live; otherwise each membership change is one plain
log line on stdout. On exit a last line ``stats {json}`` gives the member's counters (a storage
member's data-plane and push counters too, as ``data.*`` and ``push.*``).

`start_member` is the one place that decides what a member is: with ``--capacity`` a
storage-only `MeshNode` (a store of that many GiB serving chunks of every namespace, with its
data plane), without it a gossip-only member that seeds the mesh. The display reads the
member's gossip runner either way.

This module knows nothing of SWIM's rules or of the wire format.
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live

from meshkv.cli.common import (
    EXIT_CONFIG,
    ConfigOption,
    SeedsOption,
    fail,
    load_or_exit,
)
from meshkv.cli.member_table import member_table, namespace_of, status_of
from meshkv.config import MeshConfig
from meshkv.errors import TransportError, UsageError
from meshkv.gossip.events import MemberEvent
from meshkv.gossip.runner import GossipRunner
from meshkv.member_meta import ROLE_STORAGE
from meshkv.node import build_member
from meshkv.node.build import ROLE_GOSSIP

REFRESH_S = 0.5
"""How often the live table (or the plain event log) is brought up to date."""
EVENT_LINES_MAX = 1024
"""Membership changes buffered for the plain log; more are counted and skipped."""
STOP_TIMEOUT_S = 3.0
"""Longest wait for the member to leave and close its sockets."""


def register(app: typer.Typer) -> None:
    app.command("join")(join)


def join(
    config_path: Path | None = ConfigOption,
    host: str | None = typer.Option(None, "--host", help="Address to bind and advertise."),
    port: int | None = typer.Option(None, "--port", help="Gossip port (0: any free port)."),
    seeds: list[str] | None = SeedsOption,
    member_id: str | None = typer.Option(
        None, "--id", help="Instance id; the member is named ID/0 (default: hostname-pid)."
    ),
    profile: str | None = typer.Option(
        None, "--profile", help='Gossip timing: "lan", "local" (one host) or "test".'
    ),
    capacity_gib: float = typer.Option(
        0.0,
        "--capacity",
        help="GiB of memory to contribute as a storage-only member (0: gossip only, a seed).",
    ),
    data_port: int | None = typer.Option(
        None, "--data-port", help="Data-plane port with --capacity (0: any free port)."
    ),
    lookup_port: int | None = typer.Option(
        None, "--lookup-port", help="Lookup port with --capacity (0: any free port)."
    ),
) -> None:
    """Run a member in the foreground; Ctrl-C or SIGTERM leaves the mesh gracefully."""
    config = load_or_exit(
        config_path,
        {
            "p2p_host": host,
            "p2p_init_ports": port,
            "mesh_seeds": seeds,
            "lmcache_instance_id": member_id,
            "mesh_gossip_profile": profile,
            "p2p_lookup_ports": data_port,
            "mesh_lookup_stream_ports": lookup_port,
            "max_local_cpu_size": capacity_gib or None,
            "enable_p2p": True if capacity_gib else None,
        },
    )
    raise typer.Exit(run_member(config, storage=capacity_gib > 0))


def start_member(
    config: MeshConfig, *, storage: bool
) -> tuple[GossipRunner, Callable[[], None], Callable[[], dict[str, int]]]:
    """Builds and starts this process's member; returns its gossip runner, its stop and its
    counters."""
    if storage:
        node = build_member(config, ROLE_STORAGE)
        node.start()
        lookups = f", lookups at {node.lookup_address}" if node.lookup_address else ""
        print(f"storage member {node.name}: data plane at {node.data_address}{lookups}", flush=True)
        return node.gossip, lambda: node.stop(leave=True), node.stats
    runner = build_member(config, ROLE_GOSSIP)
    runner.start(config.seeds)
    return runner, lambda: runner.stop(leave=True, timeout_s=STOP_TIMEOUT_S), runner.stats


def run_member(config: MeshConfig, *, storage: bool = False) -> int:
    """Runs the member until a stop signal; returns the exit code."""
    try:
        member, stop_member, stats = start_member(config, storage=storage)
    except TransportError as exc:
        fail(str(exc))
    except UsageError as exc:  # e.g. an --id that is not a valid member name
        fail(f"cannot start a member: {exc}", EXIT_CONFIG)
    stop = _stop_on_signals()
    try:
        if sys.stdout.isatty():
            _show_live(member, stop)
        else:
            _log_changes(member, stop)
    finally:
        stop_member()
    print("stats " + json.dumps(dict(sorted(stats().items()))), flush=True)
    if member.failure is not None:
        print(f"meshkv: member stopped: {member.failure!r}", file=sys.stderr)
        return 1
    return 0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def request_stop(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop


def _show_live(member: GossipRunner, stop: threading.Event) -> None:
    title = f"meshkv member {member.me.name} at {member.address} (Ctrl-C leaves)"
    with Live(member_table(member.members(), title=title), console=Console()) as live:
        while member.running and not stop.wait(REFRESH_S):
            live.update(member_table(member.members(), title=title))


def _log_changes(member: GossipRunner, stop: threading.Event) -> None:
    lines: queue.Queue[str] = queue.Queue(maxsize=EVENT_LINES_MAX)
    skipped = 0

    def on_event(event: MemberEvent) -> None:  # on the gossip thread: never block it
        nonlocal skipped
        try:
            lines.put_nowait(_event_line(event))
        except queue.Full:
            skipped += 1

    member.subscribe(on_event)
    print(f"member {member.me.name} listening on {member.address}", flush=True)
    while member.running and not stop.wait(REFRESH_S):
        while not lines.empty():
            print(lines.get_nowait(), flush=True)
        if skipped:
            print(f"{_clock()} {skipped} changes not shown", flush=True)
            skipped = 0


def _event_line(event: MemberEvent) -> str:
    m = event.member
    return (
        f"{_clock()} {event.kind.name.lower()} {m.name} at {m.address} status={status_of(m)} "
        f"incarnation={m.incarnation} namespace={namespace_of(m)}"
    )


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S.%f")[:-3]
