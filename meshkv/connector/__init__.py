"""MeshKVConnector: meshkv's vLLM KV connector (a facade, a scheduler side, a worker side).

`connector.py` is what vLLM instantiates; `scheduler.py` and `worker.py` hold each role's logic;
`metadata.py` is the only thing passed between them; `geometry.py` copies blocks to and from
chunk buffers; `plugin.py` registers the connector's name with vLLM. Importing this package
imports nothing heavy.
"""
