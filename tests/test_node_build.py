"""One way to become a member: `build_member` for every role, and the config rules it rests on
(`DataPlaneConfig`, `GossipConfig.profile`, `AuthPolicy.from_config`). Real sockets on
127.0.0.1, tcp channel; nothing is sent."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from meshkv import __version__
from meshkv.config import MeshConfig
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.errors import ConfigError, UsageError
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.runner import HEALTH_COUNTERS, GossipRunner
from meshkv.member_meta import ANY_NAMESPACE, ROLE_STORAGE
from meshkv.node import MeshNode, build_member
from meshkv.wire import AuthPolicy

SECRET = "a-mesh-secret-of-16+"


def config(**extra: object) -> MeshConfig:
    settings = {"p2p_host": "127.0.0.1", "lmcache_instance_id": "m", "mesh_gossip_profile": "test"}
    return MeshConfig(**{**settings, "transfer_channel": "tcp", **extra})


@pytest.mark.parametrize(
    ("role", "meta"), [("gossip", {"v": __version__}), ("seed", {"role": "seed", "v": __version__})]
)
def test_gossip_only_and_seed_members_are_bare_runners_with_what_they_always_advertised(
    role: str, meta: dict[str, str]
) -> None:
    runner = build_member(config(), role, port=0)
    try:
        assert isinstance(runner, GossipRunner)
        assert (runner.me.name, dict(runner.me.meta)) == ("m/0", meta)
    finally:
        runner.stop(leave=False)


def test_a_seed_takes_the_name_host_and_port_it_is_given() -> None:
    runner = build_member(config(), "seed", name="shim@h:1/pull", host="127.0.0.1", port=0)
    try:
        assert runner.me.name == "shim@h:1/pull" and runner.address.startswith("127.0.0.1:")
    finally:
        runner.stop(leave=False)


def test_a_storage_member_serves_every_namespace_and_shares_one_boot_nonce() -> None:
    node = build_member(config(max_local_cpu_size=0.0625), ROLE_STORAGE, namespace="ignored")
    assert isinstance(node, MeshNode)
    node.start()
    try:
        assert node.membership.me.namespace == ANY_NAMESPACE
        assert node.membership.me.role == ROLE_STORAGE
        assert node.gossip.me.nonce == node.nonce == node.membership.me.nonce
        assert node.gossip.me.meta["data"] == node.data_address
    finally:
        node.stop(leave=False)


def test_an_unknown_role_is_refused() -> None:
    with pytest.raises(UsageError):
        build_member(config(), "observer")


def test_the_gossip_profile_is_chosen_by_name_and_a_bad_name_names_the_key() -> None:
    assert GossipConfig.profile("local") == GossipConfig.local()
    with pytest.raises(ConfigError) as err:
        GossipConfig.profile("fast")
    assert err.value.key == "mesh_gossip_profile"


def test_authentication_follows_the_secrets_of_the_config() -> None:
    assert not AuthPolicy.from_config(config()).enabled
    rotating = AuthPolicy.from_config(config(mesh_secret=SECRET, mesh_previous_secret=SECRET[::-1]))
    assert rotating.secrets == (SECRET.encode(), SECRET[::-1].encode())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("push_queue_max", 0),
        ("put_reservation_s", 0.0),
        ("expire_interval_s", -1.0),
        ("transfer_poll_max_s", 1e-6),
        ("max_frame_bytes", 1 << 20),
        ("fetch_share_of_lookup_timeout", 1.5),
    ],
)
def test_a_bad_data_plane_setting_names_its_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError) as err:
        DataPlaneConfig(**{key: value})
    assert err.value.key == f"dataplane.{key}"


def test_a_tcp_get_asks_for_a_frame_less_its_headroom() -> None:
    tuning = DataPlaneConfig(max_frame_bytes=64 << 20, inline_reply_headroom_bytes=1 << 20)
    assert tuning.inline_reply_max_bytes == 63 << 20


def test_a_member_serves_its_gossip_health_counters_as_metrics() -> None:
    node = build_member(config(max_local_cpu_size=0.0625), ROLE_STORAGE, namespace="ignored")
    node.start()
    try:
        text = generate_latest(node.metrics.registry).decode()
        for key in HEALTH_COUNTERS:
            assert f'meshkv_gossip_{key.replace(".", "_")}{{member="m/0"}} 0.0' in text
    finally:
        node.stop(leave=False)
