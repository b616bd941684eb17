"""MeshKVConnector: meshkv's vLLM KV connector (a facade, a scheduler side, a worker side).

`connector.py` is what vLLM instantiates; `scheduler.py` and `worker.py` hold each role's logic;
`metadata.py` is the only thing passed between them; `geometry.py` maps vLLM's per-layer caches
onto chunk buffers; `copy_queue.py` moves blocks, ordered against the forward, over the small
device interface in `copy_device.py` (CPU: synchronous; CUDA: a copy stream, events, pinned
memory); `plugin.py` registers the connector's name with vLLM. Importing this package imports
nothing heavy.
"""
