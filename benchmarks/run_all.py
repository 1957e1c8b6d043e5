"""Runs every performance benchmark (``make bench``) and writes ``benchmarks/results/perf_*``.

Default sizes fit in about 10 minutes on 2 CPU cores; ``--full`` runs the sizes quoted in
``benchmarks/README.md`` where they differ; ``--quick`` runs tiny sizes (the smoke test).

    PYTHONPATH=$PWD python benchmarks/run_all.py [--full | --quick] [--only flops loss ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: per benchmark: arguments for the default, --full and --quick runs
PLANS: Dict[str, Dict[str, List[str]]] = {
    "flops": {"default": [], "full": [], "quick": ["--quick", "--batch", "16"]},
    "loss": {
        "default": ["--tokens", "1000", "2000", "4000", "10000", "20000", "50000", "100000", "--time-max", "10000"],
        "full": ["--full", "--repeats", "5"],
        "quick": ["--tokens", "200", "400", "--repeats", "1", "--no-rss"],
    },
    "step": {
        "default": ["--batch", "64", "--repeats", "5"],
        "full": ["--batch", "128", "--repeats", "9"],
        "quick": ["--batch", "4", "--repeats", "1", "--shares", "0.5", "--no-rss"],
    },
    "capture": {"default": [], "full": ["--batch", "128"], "quick": ["--batch", "4"]},
    "sync": {"default": ["--world", "2"], "full": ["--world", "2"], "quick": ["--batch", "6", "--b2", "2", "--img", "16"]},
    "budget": {
        "default": ["--steps", "100"],
        "full": ["--steps", "400", "--seeds", "0", "1"],
        "quick": ["--steps", "2", "--eval-images", "8"],
    },
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="the larger sizes (hours on 2 cores)")
    g.add_argument("--quick", action="store_true", help="tiny sizes, seconds each (smoke test)")
    p.add_argument("--only", nargs="*", default=list(PLANS), choices=list(PLANS))
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args()
    mode = "full" if args.full else "quick" if args.quick else "default"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "10000000000")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "10000000000")
    failed = []
    for name in args.only:
        cmd = [sys.executable, str(HERE / f"bench_{name}.py")] + PLANS[name][mode] + (["--out", args.out] if args.out else [])
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
