"""``lmcache_controller`` (and ``meshkv controller``): LMCache's controller command line.

The flags are LMCache's, spelled and typed the same (``--config``, ``--host``, ``--port``,
``--monitor-ports``, ``--monitor-port``, ``--health-check-interval``,
``--lmcache-worker-timeout``) and any number of ``key=value`` overrides; see
`meshkv.compat.controller_settings` for what each key means here. An unknown ``key=value`` is
a warning; a bad flag or value is one line on stderr and exit status 2; a port that cannot be
bound is one line and exit status 1.

The process runs until SIGINT or SIGTERM, then leaves the mesh gracefully.

This module knows nothing of gossip or HTTP beyond starting and stopping the shim.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from meshkv.compat.controller_settings import MONITOR_PORTS_EXAMPLE, CommandLine, load_settings
from meshkv.errors import ConfigError, TransportError

EXIT_FAILURE = 1
EXIT_USAGE = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WATCH_INTERVAL_S = 1.0
"""How often the foreground loop checks that the seed members still run."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser(prog: str = "lmcache_controller") -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=prog,
        description="meshkv's lmcache_controller: seeds the gossip mesh on the monitor ports "
        "and serves LMCache's controller HTTP API. Not on any data path.",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Overrides of controller keys and meshkv config keys "
        "(e.g. mesh_secret=..., mesh_gossip_profile=local, chunk_size=256).",
    )
    parser.add_argument("--config", help="Controller YAML file ($LMCACHE_CONTROLLER_CONFIG_FILE).")
    parser.add_argument("--host", help="Address to bind and advertise (default 0.0.0.0).")
    parser.add_argument("--port", type=int, help="HTTP API port (default 9000).")
    parser.add_argument(
        "--monitor-ports",
        help=f"JSON of the seed members' ports, e.g. '{MONITOR_PORTS_EXAMPLE}'; "
        '"heartbeat" is accepted and not bound (gossip probes are the heartbeats).',
    )
    parser.add_argument(
        "--monitor-port",
        type=int,
        help="LMCache's older form: one seed member on this port (no reply port).",
    )
    parser.add_argument(
        "--health-check-interval",
        type=int,
        help="Accepted (-1 or >= 1); gossip probes every member continuously.",
    )
    parser.add_argument(
        "--lmcache-worker-timeout",
        type=int,
        help="Accepted; workers leave the listings when gossip declares them dead.",
    )
    return parser


def parse_command_line(argv: Sequence[str] | None, prog: str = "lmcache_controller") -> CommandLine:
    args, extra = build_parser(prog).parse_known_args(argv)
    return CommandLine(
        config_path=args.config,
        host=args.host,
        port=args.port,
        monitor_ports=args.monitor_ports,
        monitor_port=args.monitor_port,
        health_check_interval=args.health_check_interval,
        lmcache_worker_timeout=args.lmcache_worker_timeout,
        extra=(*args.overrides, *extra),
    )


def main(argv: Sequence[str] | None = None, prog: str = "lmcache_controller") -> int:
    """Runs the shim until SIGINT/SIGTERM; returns the exit status."""
    command_line = parse_command_line(argv, prog)
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("vllm.meshkv").setLevel(logging.INFO)
    try:
        settings, config = load_settings(command_line)
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from meshkv.compat.controller_shim import ControllerShim  # here: --help and errors stay fast

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    try:
        shim = ControllerShim(settings, config)
    except TransportError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    shim.start()
    try:
        while not stop.wait(WATCH_INTERVAL_S):
            failed = [m.me.name for m in shim.members.values() if not m.running]
            if failed:
                print(f"{prog}: seed member {failed[0]} stopped; exiting", file=sys.stderr)
                return EXIT_FAILURE
    finally:
        shim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
