"""vLLM general plugin: registers `MeshKVConnector` by name in vLLM's connector factory.

vLLM calls `register` in every process it starts (API server, engine core, workers) through the
`vllm.general_plugins` entry point in pyproject.toml, so `--kv-transfer-config
'{"kv_connector":"MeshKVConnector", ...}'` works without `kv_connector_module_path`. The
factory imports the connector module lazily, only when the connector is used; this module stays
cheap to import and knows nothing but the connector's name and location.
"""

from __future__ import annotations

import contextlib

CONNECTOR_NAME = "MeshKVConnector"
CONNECTOR_MODULE = "meshkv.connector.connector"


def register() -> None:
    """Register the connector with vLLM's factory; a repeat call is a no-op."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    with contextlib.suppress(ValueError):  # already registered in this process
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
