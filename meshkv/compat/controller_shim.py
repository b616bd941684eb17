"""`ControllerShim`: what runs behind ``lmcache_controller``: seed members and the HTTP API.

Members' configs name two controller URLs, ``controller_pull_url`` and ``controller_reply_url``,
and meshkv uses both as gossip seeds. The shim therefore runs one real gossip member on each
port (``lmcache_controller@HOST:PULL/pull`` and ``.../reply``, role ``seed``: no store, no data
plane, on no ring), so whichever URL a member reaches, a member answers, and either can be down
without the other. Both probe and are probed like any member and learn the whole member table by
gossip. LMCache's legacy ``--monitor-port`` gives only the pull member. The ``heartbeat`` port
is accepted and not bound: gossip probes are meshkv's heartbeats.

The HTTP API (FastAPI on uvicorn, as LMCache's controller) reads the pull member's table and
asks the homes for lookups. Nothing here is on a
data path: killing the shim costs the mesh one seed, nothing else; a restarted shim rejoins
through the members it remembered (`RememberedSeeds`) and relearns the table by gossip.

This module knows nothing of the command line or of HTTP routing.
"""

from __future__ import annotations

import logging
import socket
import threading

from meshkv.compat.controller_settings import ControllerSettings
from meshkv.compat.http_api import ControllerApi
from meshkv.compat.http_app import build_app
from meshkv.compat.http_server import HttpServer
from meshkv.compat.mesh_lookup import MeshLookup
from meshkv.compat.remembered_seeds import RememberedSeeds
from meshkv.compat.worker_table import LISTED_STATES, WorkerTable
from meshkv.config import MeshConfig
from meshkv.errors import TransportError
from meshkv.gossip.events import EventKind, MemberEvent
from meshkv.gossip.runner import GossipRunner
from meshkv.member_meta import ROLE_SEED
from meshkv.node.build import build_member
from meshkv.node.membership import peer_of
from meshkv.wire import AuthPolicy

log = logging.getLogger("vllm.meshkv.compat.controller")

SEED_SAVE_INTERVAL_S = 1.0
"""How often the remembered seeds are brought up to date (written only when they change)."""
STOP_TIMEOUT_S = 3.0
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")
ROUTE_PROBE_ADDRESS = ("10.255.255.255", 1)


def log_member_event(event: MemberEvent) -> None:
    """Membership changes at INFO (metadata updates, e.g. chunk counts, at DEBUG)."""
    view = event.member
    level = logging.DEBUG if event.kind is EventKind.UPDATED else logging.INFO
    log.log(level, "member %s %s (gossip %s)", view.name, event.kind.value, view.address)


def advertised_host(host: str) -> str:
    """The address the seed members bind and advertise: ``host``, or for a wildcard the
    address of the interface this host routes through (a wildcard cannot be advertised)."""
    if host not in WILDCARD_HOSTS:
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(ROUTE_PROBE_ADDRESS)  # UDP: picks a route, sends nothing
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class ControllerShim:
    """Seed members on the monitor ports and LMCache's HTTP API on ``http_port``."""

    def __init__(self, settings: ControllerSettings, config: MeshConfig) -> None:
        self.settings = settings
        self.config = config
        auth = AuthPolicy.from_config(config)
        host = advertised_host(settings.host)
        instance = f"lmcache_controller@{host}:{settings.monitor_ports.pull}"
        ports = {"pull": settings.monitor_ports.pull, "reply": settings.monitor_ports.reply}
        self.members: dict[str, GossipRunner] = {}
        try:
            for role, port in ports.items():
                if port is not None:
                    self.members[role] = build_member(
                        config, ROLE_SEED, name=f"{instance}/{role}", host=host, port=port
                    )
        except TransportError:
            self._discard_members()
            raise
        self._pull = self.members["pull"]
        self.workers = WorkerTable()
        self.lookup = MeshLookup(
            name=self._pull.me.name,
            vnodes=config.mesh_vnodes,
            default_chunk_size=config.chunk_size,
            auth=auth,
            members=self._pull.members,
        )
        self._pull.subscribe(self.workers.on_event)
        self._pull.subscribe(log_member_event)
        self._pull.subscribe(self.lookup.on_event)
        self.api = ControllerApi(
            members=self._pull.members,
            workers=self.workers,
            lookup=self.lookup,
            lookup_timeout_s=config.lookup_timeout_ms / 1000,
            message_counts=self._message_counts,
        )
        try:
            self.http = HttpServer(build_app(self.api), settings.host, settings.http_port)
        except OSError as exc:
            self._discard_members()
            self.lookup.close()
            raise TransportError(
                f"cannot serve HTTP on {settings.host}:{settings.http_port}: {exc.strerror}"
            ) from None
        self.remembered = RememberedSeeds(settings.state_file)
        self._stopping = threading.Event()
        self._saver = threading.Thread(target=self._save_seeds, name="meshkv-seeds", daemon=True)

    @property
    def http_address(self) -> str:
        return f"{self.settings.host}:{self.http.port}"

    def seed_addresses(self) -> list[str]:
        return [member.address for member in self.members.values()]

    def start(self) -> None:
        """Joins the mesh (through ``mesh_seeds`` and the remembered members) and serves.

        A member stops joining once it knows any member, so the seed members join through
        the outside seeds only, and through each other only when there are none: a seed
        member whose first join went to its just-started sibling would know nobody else
        until some engine's push-pull reached it (15 s and more on the lan profile).
        """
        own = self.seed_addresses()
        outside = [s for s in [*self.config.mesh_seeds, *self.remembered.load()] if s not in own]
        for member in self.members.values():
            member.start(outside or [a for a in own if a != member.address])
        self.http.start()
        self._saver.start()
        self._log_start(outside)

    def stop(self) -> None:
        """Stops serving HTTP, then leaves the mesh gracefully. Safe to call twice."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.http.stop()
        if self._saver.is_alive():
            self._saver.join(STOP_TIMEOUT_S)
        for member in self.members.values():
            member.stop(leave=True, timeout_s=STOP_TIMEOUT_S)
        self.lookup.close()

    def _message_counts(self) -> dict[str, int]:
        """Gossip messages each seed member received (LMCache's per-socket message counts)."""
        return {role: member.stats()["rx_ok"] for role, member in self.members.items()}

    def _discard_members(self) -> None:
        """Closes members that were built but never started (a later port failed to bind)."""
        for member in self.members.values():
            member.stop(leave=False, timeout_s=STOP_TIMEOUT_S)  # frees its port

    def _save_seeds(self) -> None:
        own = {member.me.name for member in self.members.values()}
        while not self._stopping.wait(SEED_SAVE_INTERVAL_S):
            try:
                views = self._pull.members()
            except TransportError:
                continue
            self.remembered.save(
                v.address
                for v in views
                if v.state in LISTED_STATES and v.name not in own and peer_of(v) is not None
            )

    def _log_start(self, outside_seeds: list[str]) -> None:
        s = self.settings
        addresses = ", ".join(f"{role} {m.address}" for role, m in self.members.items())
        log.info("meshkv lmcache_controller: HTTP API on http://%s", self.http_address)
        log.info("seed members (gossip, no store, on no ring): %s", addresses)
        if outside_seeds:
            log.info("joining the mesh through %s", ", ".join(outside_seeds))
        if s.host in WILDCARD_HOSTS:
            log.warning(
                "--host %s: the seed members bind and advertise %s; name that address in "
                "controller_pull_url/controller_reply_url",
                s.host or "(empty)",
                self._pull.address.rpartition(":")[0],
            )
        if s.monitor_ports.heartbeat is not None:
            log.info(
                "heartbeat port %d accepted and not bound: gossip probes replace LMCache's "
                "worker heartbeats",
                s.monitor_ports.heartbeat,
            )
        if s.health_check_interval_s != -1:
            log.info(
                "health_check_interval=%ds accepted: gossip probes every member continuously",
                s.health_check_interval_s,
            )
        log.info(
            "lmcache_worker_timeout=%ds accepted: workers leave the listings when gossip "
            "declares them dead (seconds after a crash)",
            s.worker_timeout_s,
        )
