"""The error tree: our own misuse, a peer's protocol violation, a transport failure.

Every inbound boundary (a socket read, a config load) converts foreign failures into one of these,
so callers can tell "fix your config" from "a peer sent garbage" from "the network failed".
"""


class MeshKVError(Exception):
    """Base of every error meshkv raises on purpose."""


class ConfigError(MeshKVError):
    """A configuration value is missing or invalid. The message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class UsageError(MeshKVError):
    """This process called an API the wrong way (a bug on our side, not a peer's)."""


class ProtocolError(MeshKVError):
    """A peer sent a frame we refuse. `reason` is a short counter label (e.g. "bad_version")."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TransportError(MeshKVError):
    """A send, receive or transfer failed or missed its deadline."""
