"""meshkv: share vLLM KV cache between engines through a gossip mesh, with no central controller."""

__version__ = "0.1.0"
