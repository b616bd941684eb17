"""GossipConfig: profiles are valid and every invalid value names its key."""

from __future__ import annotations

import pytest

from meshkv.errors import ConfigError
from meshkv.gossip.config import GossipConfig


@pytest.mark.parametrize("profile", [GossipConfig.lan, GossipConfig.local, GossipConfig.test])
def test_profiles_are_valid(profile) -> None:
    config = profile()
    assert config.probe_timeout_s < config.probe_interval_s


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"probe_interval_s": 0}, "gossip.probe_interval_s"),
        ({"probe_timeout_s": 0.3}, "gossip.probe_timeout_s"),
        ({"indirect_checks": -1}, "gossip.indirect_checks"),
        ({"suspicion_mult": 0}, "gossip.suspicion_mult"),
        ({"suspicion_max_timeout_mult": 0.5}, "gossip.suspicion_max_timeout_mult"),
        ({"awareness_max_multiplier": 0}, "gossip.awareness_max_multiplier"),
        ({"max_packet_bytes": 512}, "gossip.max_packet_bytes"),
        ({"max_meta_bytes": 4000}, "gossip.max_packet_bytes"),
        ({"max_meta_bytes": 0}, "gossip.max_meta_bytes"),
        ({"max_members": 0}, "gossip.max_members"),
        ({"gossip_interval_s": -1.0}, "gossip.gossip_interval_s"),
        ({"stall_grace_s": -1.0}, "gossip.stall_grace_s"),
    ],
)
def test_invalid_values_name_their_key(change: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        GossipConfig().replace(**change)
    assert caught.value.key == key


def test_zero_disables_optional_mechanisms() -> None:
    config = GossipConfig().replace(
        indirect_checks=0,
        gossip_fanout=0,
        push_pull_interval_s=0,
        dead_retention_s=0,
        stall_grace_s=0,
    )
    assert config.gossip_fanout == 0
