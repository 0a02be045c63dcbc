"""Seconds until the `csdiff` command answers `--help`, a bad argument or a bad config key.

Each command runs in a fresh process (as a user's shell starts it), ``--repeats`` times; the
table gives the median and its ratio to two floors measured the same way: a bare Python start
and ``import lightning.pytorch`` (the least any LightningCLI verb must load, since its parser is
built from the Trainer's signature). Ratios, not seconds, compare runs on a loaded machine.

    python benchmarks/cli_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSDIFF = [sys.executable, "-m", "csdiff"]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")

COMMANDS: list[tuple[str, list[str]]] = [
    ("python start (floor)", [sys.executable, "-c", "pass"]),
    ("import lightning.pytorch (floor)", [sys.executable, "-c", "import lightning.pytorch"]),
    ("csdiff --help", [*CSDIFF, "--help"]),
    ("csdiff frobnicate (unknown verb)", [*CSDIFF, "frobnicate"]),
    ("csdiff layers --help", [*CSDIFF, "layers", "--help"]),
    ("csdiff layers --formt json (bad option)", [*CSDIFF, "layers", "--formt", "json"]),
    ("csdiff scarce-splits --help", [*CSDIFF, "scarce-splits", "--help"]),
    ("csdiff extract --help", [*CSDIFF, "extract", "--help"]),
    ("csdiff fit --help", [*CSDIFF, "fit", "--help"]),
    ("csdiff fit --config missing.yaml", [*CSDIFF, "fit", "--config", "missing.yaml"]),
    (
        "csdiff fit quickstart + bad model key",
        [*CSDIFF, "fit", "--config", QUICKSTART, "--model.init_args.no_such_key", "1"],
    ),
    ("csdiff fit quickstart + bad trainer key", [*CSDIFF, "fit", "--config", QUICKSTART, "--trainer.max_epochz", "1"]),
]


def seconds(cmd: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="titles (substrings) of the commands to time")
    args = parser.parse_args()
    chosen = [c for c in COMMANDS if args.only is None or "floor" in c[0] or any(s in c[0] for s in args.only)]
    rows = []
    for title, cmd in chosen:
        runs = [seconds(cmd) for _ in range(args.repeats)]
        rows.append((title, statistics.median(s for s, _ in runs), runs[-1][1]))
    python, lightning = rows[0][1], rows[1][1]
    print(f"{'command':<42} {'exit':>4} {'median s':>9} {'/ python':>9} {'/ lightning':>12}")
    for title, median, code in rows:
        print(f"{title:<42} {code:>4} {median:>9.2f} {median / python:>9.1f} {median / lightning:>12.2f}")
    under = [t for t, m, _ in rows[2:] if m < 2.0]
    print(
        f"{len(under)} of {len(rows) - 2} commands answer in under 2 s; importing lightning.pytorch alone takes {lightning:.2f} s"
    )


if __name__ == "__main__":
    main()
