"""Benchmark of the "cpu" engine backend on GPT-2-small shapes, against the machine's sgemm peak and baselines.

Cases (queries × keys, d = 64, random weights):
  1. global      top-k_global pairs of (q·k) × key_weight (A × V)
  2. per_key     top-k_row queries of every key (the candidate table for all keys at once)
  3. per_query   top-k_row keys of every query
  4. dual        dual_topk with n_ex exemplars, global top-k_global
Providers: "cpu" (this engine), "gemm" (the bare product through torch in row chunks, GEMM time only),
"torch" (materialised matmul + topk), "torch_chunked" (matmul + topk per row block, merged), and
"faiss" (IndexFlatIP search; per-key and per-query cases). Each (case, provider) runs in its own
process (``--inline``: all in this one), and its peak resident memory over its inputs is sampled.

    python bench/bench_cpu_engine.py                  # full size, writes bench/results/cpu_engine.json
    python bench/bench_cpu_engine.py --quick --out /tmp/x.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

# The measuring code is the package's (also behind `attnrules bench`); this script keeps the repository's
# command line and writes bench/results/cpu_engine.json. Imported before any measurement: `import
# attnrules` loads the whole library (transformer_lens, pandas, ...), whose resident memory is not the engine's.
from attnrules.benchmark import CASES, PROVIDERS, markdown, measure, run_cpu_benchmark, shapes, write_report

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu_engine.json"


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, for smoke tests")
    p.add_argument("--n", type=int, default=None, help="queries = keys (default 24576; 1024 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="threads for the cpu engine (default: all)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--inline", action="store_true", help="run everything in this process (peak RSS sampled)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", nargs=2, metavar=("CASE", "PROVIDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    cfg = shapes(args.quick, args.n)
    if args.worker:
        print(json.dumps(measure(*args.worker, cfg, args.repeats, args.threads)))
        return {}
    report = run_cpu_benchmark(
        cfg, repeats=args.repeats, threads=args.threads, cases=tuple(args.cases.split(",")),
        providers=tuple(args.providers.split(",")), isolated=not args.inline, quick=args.quick,
        command=" ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
        progress=lambda line: print(line, file=sys.stderr, flush=True))
    write_report(args.out, report)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
