"""vLLM finds MeshKVConnector by name (plugin entry point) and by module path."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm")

from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

from meshkv.connector import plugin
from meshkv.connector.connector import MeshKVConnector


def test_the_entry_point_is_installed_and_registers_the_name_once_per_process():
    (entry,) = [
        e for e in entry_points(group="vllm.general_plugins") if e.name == "meshkv_connector"
    ]
    assert entry.load() is plugin.register
    plugin.register()
    plugin.register()  # vLLM may load plugins more than once in a process
    config = KVTransferConfig(kv_connector="MeshKVConnector", kv_role="kv_both")
    assert KVConnectorFactory.get_connector_class(config) is MeshKVConnector


def test_kv_connector_module_path_finds_it_too():
    config = KVTransferConfig(
        kv_connector="MeshKVConnector",
        kv_connector_module_path="meshkv.connector.connector",
        kv_role="kv_both",
    )
    assert KVConnectorFactory.get_connector_class(config) is MeshKVConnector


def test_load_failures_are_recomputed_whatever_the_policy():
    """A chunk lost between lookup and load is a miss: vLLM's default "fail" would fail the
    request, so the scheduler side switches it (the e2e engines run with the default)."""
    from meshkv.connector.connector import recompute_load_failures

    for policy in ("fail", "recompute"):
        config = KVTransferConfig(
            kv_connector="MeshKVConnector", kv_role="kv_both", kv_load_failure_policy=policy
        )
        recompute_load_failures(config)
        assert config.kv_load_failure_policy == "recompute"
    assert KVTransferConfig(kv_connector="X", kv_role="kv_both").kv_load_failure_policy == "fail"
