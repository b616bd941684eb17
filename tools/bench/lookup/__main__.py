"""``python -m tools.bench.lookup``: the same as ``python tools/bench_lookup.py``."""

from tools.bench.lookup.main import main

main()
