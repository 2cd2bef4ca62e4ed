"""GPU benchmark of the triton backend on GPT-2-small shapes, against cuBLAS matmul + torch.topk.

Cases (Nq = Nk = 24,576 input features, d_head = 64):
  1. global top-10,000 of A×V          pair_topk(q, k, 10000, key_weight=v)
  2. per-key top-100 queries           pair_topk(..., by="key")
  3. per-query top-100 keys            pair_topk(..., by="query")
  4. dual_topk, 100 exemplars, global top-10,000

Providers: "triton" (the fused kernels through attnrules.engine), "torch-materialised" (cuBLAS
matmul of the full Nq×Nk matrix, then torch.topk) and "torch-chunked" (the same on blocks of 2,048
rows, merged). Times are medians of ``triton.testing.do_bench`` (synchronised). TFLOP/s counts the
inner products only (2·Nq·Nk·d, plus 2·Nq·Nk·n for dual); the fraction of peak uses the GPU's
dense peak for the chosen precision from a small table (null when the GPU is not in it), and
fraction_of_measured_peak the cuBLAS GEMM peak measured in the same run. The measuring code is
attnrules.benchmark (`attnrules bench` runs it too).

Writes bench/results/triton.json atomically. Without a CUDA GPU it prints why and exits with
status 2 without writing anything.

    python bench/bench_triton.py [--precision ieee|tf32|tf32x3] [--quick] [--out PATH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

# The measuring code is the package's (also behind `attnrules bench --device cuda`).
from attnrules.benchmark import PEAKS, no_gpu_reason, peak_tflops, run_gpu_benchmark, write_report  # noqa: F401

RESULTS = Path(__file__).resolve().parent / "results" / "triton.json"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=("ieee", "tf32", "tf32x3"), default="ieee")
    parser.add_argument("--quick", action="store_true", help="4,096 × 4,096 instead of 24,576² (a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if no_gpu_reason():
        print("bench_triton: no CUDA GPU here (or TRITON_INTERPRET=1 is set): nothing measured, "
              f"{args.out} not written.", file=sys.stderr)
        return 2
    result = run_gpu_benchmark(precision=args.precision, quick=args.quick, progress=lambda line: print(line, flush=True))
    write_report(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
