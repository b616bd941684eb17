"""Network namespaces for tests: private networks on one machine, links to cut, loss to add.

A `Lab` makes namespaces (``ip netns``), bridges and veth pairs inside them, and deletes them
all on `close` (deleting a namespace deletes the links in it). Addresses exist only inside the
lab's namespaces; the host's own network is never touched. Names carry a tag unique to the run,
so two runs on one machine do not meet.

Loss is dropped packets by ``iptables -m statistic --mode random`` on a namespace's INPUT chain:
``tc qdisc ... netem`` is the usual tool, but this machine's kernel has no netem module (``tc``
answers "Specified qdisc kind is unknown"), while the statistic match is built in.

This module knows nothing of meshkv.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess

COMMAND_TIMEOUT_S = 10.0
"""Longest one ``ip``/``iptables`` command may take."""


class LabError(RuntimeError):
    """An ``ip`` or ``iptables`` command failed; the message has its stderr."""


def run(*argv: str) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def why_not_available() -> str | None:
    """None where namespaces can be made here; else the reason (for a skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on this machine"
    probe = f"mkvprobe{secrets.token_hex(3)}"
    try:
        run("ip", "netns", "add", probe)
    except (LabError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot make a network namespace here: {exc}"
    with contextlib.suppress(LabError, OSError, subprocess.TimeoutExpired):
        run("ip", "netns", "del", probe)
    return None


def why_no_loss() -> str | None:
    """None where `Lab.set_loss` works; else the reason."""
    if shutil.which("iptables") is None:
        return "no `iptables` command (apt-get install iptables); tc netem is not in this kernel"
    return None


class Lab:
    """Namespaces, bridges and veth pairs made for one test; `close` removes them all."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"mkv{secrets.token_hex(3)}"
        self.namespaces: list[str] = []

    def namespace(self, short: str) -> str:
        """Makes namespace ``<tag>-<short>`` with its loopback up; returns its name."""
        name = f"{self.tag}-{short}"
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def bridge(self, ns: str, name: str) -> None:
        run("ip", "-n", ns, "link", "add", name, "type", "bridge")
        run("ip", "-n", ns, "link", "set", name, "up")

    def plug(self, ns: str, address: str, *, switch: str, bridge: str, port: str) -> None:
        """A veth pair: ``eth0`` in ``ns`` holding ``address`` (CIDR), ``port`` on ``bridge``
        in the ``switch`` namespace."""
        run(
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            switch,
        )
        run("ip", "-n", ns, "addr", "add", address, "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", switch, "link", "set", port, "master", bridge)
        run("ip", "-n", switch, "link", "set", port, "up")

    def trunk(self, switch: str, left: str, right: str, name: str) -> None:
        """Joins two bridges of ``switch`` by a veth pair; cut it with `set_link(name, ...)`."""
        run("ip", "-n", switch, "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        for end, bridge in ((name, left), (f"{name}p", right)):
            run("ip", "-n", switch, "link", "set", end, "master", bridge)
            run("ip", "-n", switch, "link", "set", end, "up")

    def set_link(self, ns: str, link: str, *, up: bool) -> None:
        run("ip", "-n", ns, "link", "set", link, "up" if up else "down")

    def set_loss(self, ns: str, percent: float) -> None:
        """Drops ``percent`` % of the packets ``ns`` receives, at random (0: none)."""
        run("ip", "netns", "exec", ns, "iptables", "-F", "INPUT")
        if percent > 0:
            run(
                "ip",
                "netns",
                "exec",
                ns,
                "iptables",
                "-A",
                "INPUT",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                f"{percent / 100:.4f}",
                "-j",
                "DROP",
            )

    def dropped(self, ns: str) -> int:
        """Packets the loss rule of ``ns`` has dropped so far."""
        out = run("ip", "netns", "exec", ns, "iptables", "-L", "INPUT", "-v", "-x", "-n")
        rows = [line.split() for line in out.splitlines()[2:] if "DROP" in line]
        return sum(int(row[0]) for row in rows)

    def exec_prefix(self, ns: str) -> list[str]:
        """Runs a command inside ``ns`` (``ip netns exec`` execs it: the PID is the command's)."""
        return ["ip", "netns", "exec", ns]

    def close(self) -> None:
        """Deletes every namespace made (and with them every link); safe to call twice."""
        while self.namespaces:
            ns = self.namespaces.pop()
            with contextlib.suppress(LabError, OSError, subprocess.TimeoutExpired):
                run("ip", "netns", "del", ns)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
