"""GPU benchmark of the triton backend on GPT-2-small shapes, against cuBLAS.

Cases (Nq = Nk = 24,576 input features, d_head = 64):
  1. global top-10,000 of A×V          pair_topk(q, k, 10000, key_weight=v)
  2. per-key top-100 queries           pair_topk(..., by="key")
  3. per-query top-100 keys            pair_topk(..., by="query")
  4. dual_topk, 100 exemplars, global top-10,000

Providers: "triton-<precision>" for each precision asked (default: tf32, tf32x3, ieee — every answer
is compared with the fp32 one: ``equals_fp32_answer``), "cublas-gemm-tf32" / "cublas-gemm-fp32"
(the bare GEMM of the same shape, output materialised), "torch-materialised-tf32" (GEMM of the full
Nq×Nk matrix, then torch.topk) and "torch-chunked-tf32" (the same on blocks of 2,048 rows, merged).
Times are medians of ``triton.testing.do_bench`` (synchronised). TFLOP/s counts the inner products
only (2·Nq·Nk·d, plus 2·Nq·Nk·n for dual), as fractions of the GPU's datasheet TF32 and FP32 peaks
and of cuBLAS's n³ GEMM peaks measured in the same run; ``goals`` reads the README's targets off
case 1. The measuring code is attnrules.benchmark (``attnrules bench`` runs it too).

Writes bench/results/triton.json atomically. Without a CUDA GPU it prints why and exits with status 2
without writing anything. ``--dry-run`` (with TRITON_INTERPRET=1, no GPU) runs the same code on CPU
tensors at n = 64 and writes the report to --out: a check of the script, not a measurement.

    python bench/bench_triton.py [--precision tf32 --precision ieee ...] [--quick] [--n N] [--out PATH]
    python bench/bench_triton.py --blocks   # block shapes at the default precision → triton_blocks.json
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

# The measuring code is the package's (also behind `attnrules bench --device cuda`).
from attnrules.benchmark import GPU_PRECISIONS, no_gpu_reason, run_gpu_benchmark, run_gpu_block_sweep, write_report

RESULTS = Path(__file__).resolve().parent / "results" / "triton.json"
BLOCKS = RESULTS.with_name("triton_blocks.json")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", action="append", choices=GPU_PRECISIONS, default=None,
                        help="triton precision to time (repeat for several; default: all)")
    parser.add_argument("--quick", action="store_true", help="4,096 × 4,096 instead of 24,576² (a smoke test)")
    parser.add_argument("--n", type=int, default=None, help="queries = keys (default 24,576; quick 4,096)")
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, default=None, help=f"default {RESULTS} ({BLOCKS} with --blocks)")
    parser.add_argument("--blocks", action="store_true",
                        help="instead: time the default precision at several block shapes (global, per key)")
    args = parser.parse_args(argv)
    args.out = args.out or (BLOCKS if args.blocks else RESULTS)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--dry-run needs TRITON_INTERPRET=1 in the environment (Triton's CPU interpreter)")
    if not args.dry_run and no_gpu_reason():
        print(f"bench_triton: {no_gpu_reason()}: nothing measured, {args.out} not written.", file=sys.stderr)
        return 2
    show = lambda line: print(line, flush=True)  # noqa: E731
    if args.blocks:
        result = run_gpu_block_sweep(quick=args.quick, dry_run=args.dry_run, progress=show)
    else:
        result = run_gpu_benchmark(precisions=tuple(args.precision or GPU_PRECISIONS), quick=args.quick, n=args.n,
                                   dry_run=args.dry_run, progress=show)
    result["command"] = "python bench/bench_triton.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_report(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
