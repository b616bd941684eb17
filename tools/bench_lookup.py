"""Side by side: "who holds this prompt's chunks" through LMCache's controller and through
meshkv. The benchmark lives in `tools.bench.lookup` (its docstring says what it measures);
this script keeps its command line:

    python tools/bench_lookup.py --quick --out bench-results/quick
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench.lookup.main import main

if __name__ == "__main__":
    main()
