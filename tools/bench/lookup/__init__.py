"""Side by side: "who holds this prompt's chunks" through LMCache's controller and through meshkv.

One run, all lookup paths measured in the same interleaved rounds (this machine drifts):

- ``lmcache``: LMCache 0.5.6's real ``lmcache_controller`` (in its own venv, made here under
  ``.bench/lmcache-venv``), with N simulated LMCache workers that register and admit K chunk
  hashes each using LMCache's own messages (tools/lmcache_side/sim_workers.py). A lookup is the
  ``BatchedP2PLookupMsg`` round trip an LMCache engine makes before every prefill, over a
  DEALER, as LMCacheWorker sends it (this driver's encoder is checked byte for byte against
  msgspec's at every setup).
- ``meshkv``: N meshkv members holding the same chunks, each chunk at its ring home only, and
  the home of each prompt chain's first chunk holding its chain entry (who holds every chunk
  of the chain: the later groups' homes), as producers' ``CHAIN_AT`` leave it; the asker is a
  real `MeshNode` in this process (one of the N) and a lookup is its `MeshNode.lookup`
  (`meshkv.node.locate`): the prompt's first home asked for the whole prompt, other homes only
  for what it does not cover, chunks homed at the asker answered from its own store and chain
  index. The members join through meshkv's own ``lmcache_controller`` shim, named in their
  configs as LMCache configs name the controller.
- ``echo``: a plain pyzmq DEALER/ROUTER echo of the LMCache request bytes: the floor.

Measured for N in {2, 8, 32, 64} members and prompts of {4, 32, 128} chunks: lookup latency
(p50, p99) for prompts held by the first-registered instance, by the last-registered one, a
miss, and (meshkv) prompts homed at the asker; server CPU per lookup (all server processes,
from /proc schedstat, with /proc stat utime+stime as a coarse cross-check, also net of the
idle rate); the client's CPU per lookup; throughput with 1, 8 and 32 concurrent requesters
(closed loop, the same prompt mix for every path). LMCache's requesters are DEALERs driven by
one poll loop; meshkv's concurrent requesters share the asker's one client through
`MeshNode.lookup_async` (one request loop, many lookups in flight). Aggregate load
(`aggregate`): every one of the N members asks at once (meshkv) against N LMCache worker
processes asking the one controller: total lookups/s and CPU per lookup, client and server
summed; CPU per lookup client + server is also given for every latency cell. Then the
failure timeline at one N: LMCache's controller and meshkv's shim are SIGKILLed together and
every lookup of the next 30 s is recorded (answer, miss, timeout, error, time to answer);
LMCache is shown with its default 30 s request timeout and with a tuned 500 ms one.

Writes DIR/lookup.json and DIR/lookup.png and prints the table, the meshkv/LMCache ratios and
the issue's targets, all from this one run.

    python tools/bench_lookup.py --out bench-results/lookup
    python tools/bench_lookup.py --quick --out bench-results/quick   # ~2 minute smoke run
    python -m tools.bench.lookup --quick                             # the same, as a module

Modules: `settings` (sizes, timeouts, targets), `workload` (keys, holdings, prompts), `paths`
(the path interface, the echo floor, LMCache), `meshkv_path`, `mesh_member` (a member
process), `measure` (latency, throughput, CPU), `aggregate` (every asker at once), `failure`
(the timeline), `report` (ratios, targets, table, plot), `main`; `member_path` measures a
member's service core alone (CPU per lookup by phase, and its profile), `driver_loop` the
data plane's socket loops alone (a server and a client), `member_cpu` real members' CPU by
thread (idle, and per lookup, with py-spy profiles), `asker_layers` an asker's CPU per remote
lookup layer by layer (raw round trip, codec, request client, `MeshNode.lookup`).

meshkv code never imports LMCache: everything LMCache runs in its venv's processes, and this
driver speaks to it over the wire only.
"""
