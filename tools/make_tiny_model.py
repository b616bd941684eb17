"""Write the tiny test Llama (see meshkv.models.tiny_llama) and print its path and digest.

python tools/make_tiny_model.py [--out .models/tiny-llama] [--overwrite]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from meshkv.models.tiny_llama import DEFAULT_MODEL_DIR, directory_digest, make_tiny_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="model directory")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if complete")
    args = parser.parse_args()
    started = time.perf_counter()
    path = make_tiny_llama(args.out, overwrite=args.overwrite)
    elapsed_s = time.perf_counter() - started
    print(f"{path}  sha256={directory_digest(path)}  ({elapsed_s:.1f} s)")


if __name__ == "__main__":
    main()
