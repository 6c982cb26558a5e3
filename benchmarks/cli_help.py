"""Wall time of `python -m deat --help` and of each subcommand's help, as JSON (target: top-level help < 1 s).

    python benchmarks/cli_help.py [--repeats 5]

Each command runs in a fresh interpreter (imports included, as a user pays them); the median is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for command in ([], ["train"], ["evaluate"], ["report"]):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "deat", *command, "--help"], cwd=REPO, check=True,
                           capture_output=True)
            times.append(time.perf_counter() - start)
        print(json.dumps({"command": " ".join(["python -m deat", *command, "--help"]),
                          "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                          "repeats": args.repeats, "python": platform.python_version(),
                          "machine": platform.machine()}))


if __name__ == "__main__":
    main()
