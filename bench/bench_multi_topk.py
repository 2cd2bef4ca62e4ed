"""Benchmark of ``engine.multi_topk``: every output feature of a GPT-2-shaped head ranked exhaustively.

One head: 24,576 input features (queries = keys), d_head 64, 2,048 output features with random value
scores (key_weights [24576, 2048]), global top-10,000 per feature. Measured in the same process, side
by side (interleaved rounds): one feature's full pass (``pair_topk`` global k = 10,000, what
``rank_all_pairs`` runs per feature) and ``multi_topk`` for all features, each the best of its runs.
Reported: multi_topk's time over one single pass (goal ≤ 5×) and over the extrapolated 2,048 single
calls; a sample of features is checked against ``pair_topk`` pair for pair (bit for bit on the cpu
backend). The measuring code is ``attnrules.benchmark.measure_multi_topk`` (also run by ``attnrules bench``).

    python bench/bench_multi_topk.py                 # full size, writes bench/results/multi_topk.json
    python bench/bench_multi_topk.py --quick --out /tmp/x.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from attnrules.benchmark import MULTI_FULL, MULTI_QUICK, machine, measure_multi_topk, write_report

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "multi_topk.json"


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, for smoke tests")
    p.add_argument("--n", type=int, default=None, help="input features (default 24576)")
    p.add_argument("--features", type=int, default=None, help="output features (default 2048)")
    p.add_argument("--k", type=int, default=None, help="global top-k per feature (default 10000)")
    p.add_argument("--repeats", type=int, default=None, help="rounds: single passes, then one multi_topk run "
                   "(default 3; 1 with --quick)")
    p.add_argument("--single-repeats", type=int, default=3, help="timed single-feature passes per round")
    p.add_argument("--table-depth", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--check", type=int, default=8, help="features checked against pair_topk")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    cfg = dict(MULTI_QUICK) if args.quick else dict(MULTI_FULL)
    cfg.update({key: value for key, value in (("n", args.n), ("n_features", args.features), ("k", args.k)) if value})
    result = measure_multi_topk(cfg, repeats=args.repeats or (1 if args.quick else 3),
                                single_repeats=args.single_repeats, backend=args.backend, table_depth=args.table_depth,
                                check=args.check, threads=args.threads,
                                progress=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    report = dict(benchmark="multi_topk",
                  command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                  machine=machine(), quick=args.quick, **result)  # fmt: skip
    write_report(args.out, report)
    c, ph = result["config"], result["phases"]
    print(f"| features | k | single pass s | multi_topk s | × one pass | × faster than {c['n_features']} single calls |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {c['n_features']} | {c['k']} | {result['single_feature_s']:.3f} | {result['multi_topk_s']:.3f} | "
          f"{result['vs_one_single_pass']:.1f} | {result['speedup_vs_single_calls']:.0f} |")
    print(f"table {ph['table_s']:.3f} s, answers and deeper rows {ph['answer_and_deeper_rows_s']:.3f} s "
          f"({result['per_feature_ms']:.2f} ms/feature); median round ratio {result['median_round_ratio']:.2f}×; "
          f"CPU-time ratio {result['cpu_time_ratio']:.2f}×; "
          f"identical to pair_topk: {result['identical_to_pair_topk']}; peak RSS over inputs "
          f"{result['peak_rss_over_inputs_mib']:.0f} MiB; load average {report['machine']['load_average']}")
    return report


if __name__ == "__main__":
    main()
