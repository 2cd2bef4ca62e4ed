"""Side-by-side ratios of the CPU engine's cases, robust to a noisy machine.

The global, per-key and per-query cases (24,576 × 24,576, d = 64; k = 10,000 and 100) run in turn
in one process for several rounds; medians and the per-row ÷ global ratios are written to
``bench/results/cpu_interleaved.json``, with the machine (load average included). The full benchmark
(bench_cpu_engine.py, ``attnrules bench``) runs the same measurement (``attnrules.benchmark.interleaved``).

    python bench/bench_cpu_interleaved.py [--rounds 9] [--threads 2] [--isa avx2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnrules.benchmark import interleaved, machine, shapes, write_report

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu_interleaved.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: all)")
    parser.add_argument("--isa", default="auto", help="engine kernel: auto, avx512, avx2, generic")
    parser.add_argument("--n", type=int, default=24_576)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result = interleaved(shapes(quick=False, n=args.n), rounds=args.rounds, threads=args.threads, isa=args.isa)
    report = dict(n=args.n, threads=args.threads or torch.get_num_threads(), machine=machine(), **result)
    write_report(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "times_s"}, indent=1))


if __name__ == "__main__":
    main()
