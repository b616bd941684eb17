"""Benchmarks: shared helpers (`common`) and the lookup benchmark (`lookup`). Each writes JSON and a
plot; numbers are medians of several runs, ratios measured side by side in one run.
"""
