"""meshkv's tools: benchmarks (`tools.bench`), the chaos harness (`tools.chaos`), setup helpers.

A package so that tests import them (``from tools import chaos``); each tool also runs as a
script (``python tools/chaos.py``). Nothing in ``meshkv`` imports this package.
"""
