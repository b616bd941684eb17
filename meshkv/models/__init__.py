"""Locally generated model checkpoints for tests, benchmarks and the demo."""
