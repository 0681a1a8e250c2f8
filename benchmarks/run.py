#!/usr/bin/env python
"""Run the benchmarks (each writes its results under benchmarks/results/), one after another in
their own processes, stopping at the first failure.

    python benchmarks/run.py                 # all of them (`make bench`)
    python benchmarks/run.py backends cuda   # some, by name
    python benchmarks/run.py --list

Options after `--` go to every benchmark run, e.g. `run.py backends -- --reps 5`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (script, what it measures)
BENCHMARKS = {
    "cuda": ("bench_cuda.py", "PyTorch backend vs diffusers: sampling and a training step"),
    "backends": ("bench_backends.py", "PyTorch vs MindSpore backend: training step, sampling, UNet, VAE"),
    "gpu": ("bench_gpu.py", "PyTorch backend vs diffusers on a GPU, full-size SD1.5: DreamBooth/LoRA step per memory saver, inference latency"),
    "data": ("bench_data.py", "host-side data pipeline with 12 MP JPEGs: per-item decode vs cache vs cache + workers"),
    "conversion": ("bench_conversion.py", "full-size checkpoint conversion vs its peers (~10 GB of files)"),
}


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"benchmarks to run, of {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (script, what) in BENCHMARKS.items():
            print(f"{name:12s} {script:22s} {what}")
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    for name in args.names or list(BENCHMARKS):
        script = os.path.join(HERE, BENCHMARKS[name][0])
        print(f"== {name}: {script} {' '.join(extra)}", flush=True)
        rc = subprocess.call([sys.executable, script, *extra])
        if rc:
            print(f"== {name} failed (exit {rc})", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
