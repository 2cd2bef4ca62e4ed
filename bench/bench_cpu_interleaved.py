"""Side-by-side ratios of the CPU engine's cases, robust to a noisy machine.

The global, per-key and per-query cases (24,576 × 24,576, d = 64; k = 10,000 and 100) run in turn
in one process for several rounds; medians and the per-row ÷ global ratios are written to
``bench/results/cpu_interleaved.json``. The full benchmark (bench_cpu_engine.py) runs each case in
its own process, minutes apart, so its ratios move with the machine's load.

    python bench/bench_cpu_interleaved.py [--rounds 9] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from attnrules.benchmark import inputs, run_cpu, shapes
from attnrules.files import write_json

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu_interleaved.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: all)")
    parser.add_argument("--n", type=int, default=24_576)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    # The shapes, inputs and engine calls of attnrules.benchmark (bench_cpu_engine.py, `attnrules bench`).
    cfg = shapes(quick=False, n=args.n)
    x = inputs(cfg)
    cases = {case: run_cpu(case, x, cfg, args.threads) for case in ("global", "per_key", "per_query")}
    for run in cases.values():  # warm-up
        run()
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(args.rounds):
        for case, run in cases.items():
            times[case].append(run())
    median = {c: statistics.median(v) for c, v in times.items()}
    report = {
        "n": args.n, "rounds": args.rounds, "threads": args.threads or torch.get_num_threads(),
        "median_s": median,
        "per_key_vs_global": median["per_key"] / median["global"],
        "per_query_vs_global": median["per_query"] / median["global"],
        "times_s": times,
    }
    write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "times_s"}, indent=1))


if __name__ == "__main__":
    main()
