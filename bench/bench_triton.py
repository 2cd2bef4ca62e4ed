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
dense peak for the chosen precision from a small table (null when the GPU is not in it).

Writes bench/results/triton.json atomically. Without a CUDA GPU it prints why and exits with
status 2 without writing anything.

    python bench/bench_triton.py [--precision ieee|tf32|tf32x3] [--quick] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "triton.json"
# Dense peaks in TFLOP/s: (fp32 on CUDA cores, tf32 on tensor cores). tf32x3 runs three tf32 products.
# Matched as substrings of torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAKS = {
    "H100 80GB HBM3": (67.0, 494.7),
    "H100 SXM": (67.0, 494.7),
    "H100 NVL": (60.0, 417.5),
    "H100 PCIe": (51.2, 378.0),
    "H200": (67.0, 494.7),
    "A100": (19.5, 156.0),
    "L40S": (91.6, 183.0),
}


def peak_tflops(gpu: str, precision: str) -> Optional[float]:
    """Dense peak of this GPU for the precision, or None when unknown."""
    for name, (fp32, tf32) in PEAKS.items():
        if name in gpu:
            return {"ieee": fp32, "tf32": tf32, "tf32x3": tf32 / 3}[precision]
    return None


def _median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    fn()  # compile and autotune outside the timing
    return float(triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median"))


def _materialised(scores: Callable[[slice, slice], torch.Tensor], nq: int, nk: int, k: int, by: str):
    s = scores(slice(0, nq), slice(0, nk))
    if by == "global":
        return torch.topk(s.flatten(), k).values
    return torch.topk(s if by == "query" else s.T, k, dim=1).values


def _chunked(scores: Callable[[slice, slice], torch.Tensor], nq: int, nk: int, k: int, by: str, chunk: int = 2048):
    if by == "global":
        best = None
        for r in range(0, nq, chunk):
            top = torch.topk(scores(slice(r, r + chunk), slice(0, nk)).flatten(), k).values
            best = top if best is None else torch.topk(torch.cat([best, top]), k).values
        return best
    if by == "query":
        return torch.cat([torch.topk(scores(slice(r, r + chunk), slice(0, nk)), k, dim=1).values
                          for r in range(0, nq, chunk)])
    return torch.cat([torch.topk(scores(slice(0, nq), slice(c, c + chunk)).T, k, dim=1).values
                      for c in range(0, nk, chunk)])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=("ieee", "tf32", "tf32x3"), default="ieee")
    parser.add_argument("--quick", action="store_true", help="4,096 × 4,096 instead of 24,576² (a smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_triton: no CUDA GPU here (or TRITON_INTERPRET=1 is set): nothing measured, "
              f"{args.out} not written.", file=sys.stderr)
        return 2

    import triton

    from attnrules import engine
    from attnrules.kernels import topk_stream

    # The baselines use the same precision as the kernels.
    torch.backends.cuda.matmul.allow_tf32 = args.precision != "ieee"
    dev = torch.device("cuda")
    n, d, n_ex = (4096, 64, 100) if args.quick else (24576, 64, 100)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(n, d, device=dev, generator=g) / d**0.5
    kk = torch.randn(n, d, device=dev, generator=g) / d**0.5
    v = torch.randn(n, device=dev, generator=g)
    qa = torch.rand(n, n_ex, device=dev, generator=g)
    ka = torch.randn(n, n_ex, device=dev, generator=g)

    def pair_scores(rows: slice, cols: slice) -> torch.Tensor:
        return (q[rows] @ kk[cols].T) * v[cols]

    def dual_scores(rows: slice, cols: slice) -> torch.Tensor:
        return (q[rows] @ kk[cols].T) * (qa[rows] @ ka[cols].T)

    cases = [
        ("global top-10,000 of A×V", "pair", 10000, "global"),
        ("per-key top-100 queries", "pair", 100, "key"),
        ("per-query top-100 keys", "pair", 100, "query"),
        ("dual, 100 exemplars, global top-10,000", "dual", 10000, "global"),
    ]
    gpu = torch.cuda.get_device_name(dev)
    peak = peak_tflops(gpu, args.precision)
    rows = []
    for name, op, k, by in cases:
        flops = 2.0 * n * n * (d + (n_ex if op == "dual" else 0))
        if op == "pair":
            run_triton = partial(engine.pair_topk, q, kk, k, by=by, key_weight=v, backend="triton",
                                 precision=args.precision)
            scores = pair_scores
        else:
            run_triton = partial(engine.dual_topk, q, kk, qa, ka, k, by=by, backend="triton",
                                 precision=args.precision)
            scores = dual_scores
        ours = run_triton()
        reference = _materialised(scores, n, n, k, by)
        # Agreement: the sorted top scores of the fused kernel against the materialised ones.
        max_diff = float((ours.scores - reference).abs().max())
        providers = {
            "triton": run_triton,
            "torch-materialised": partial(_materialised, scores, n, n, k, by),
            "torch-chunked": partial(_chunked, scores, n, n, k, by),
        }
        timings = {}
        for provider, fn in providers.items():
            try:
                timings[provider] = _median_ms(fn)
            except torch.cuda.OutOfMemoryError:
                timings[provider] = None
                torch.cuda.empty_cache()
        for provider, ms in timings.items():
            tflops = None if ms is None else flops / (ms * 1e-3) / 1e12
            rows.append({
                "case": name, "operation": op, "by": by, "k": k, "provider": provider,
                "shape": {"n_queries": n, "n_keys": n, "d": d, "n_exemplars": n_ex if op == "dual" else None},
                "median_ms": ms, "tflops": tflops,
                "fraction_of_peak": None if tflops is None or peak is None else tflops / peak,
                # How many times faster the triton backend ran than this provider.
                "triton_speedup": None if ms is None or timings["triton"] is None else ms / timings["triton"],
                "max_abs_score_diff_vs_materialised": max_diff if provider == "triton" else None,
                "autotuned_config": str(topk_stream.tuned_kernel.best_config) if provider == "triton" else None,
            })
            shown = "out of memory" if ms is None else f"{ms:9.3f} ms  {tflops:7.2f} TFLOP/s"
            print(f"{name:42s} {provider:20s} {shown}", flush=True)
    result = {
        "benchmark": "bench_triton",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"gpu": gpu, "cuda": torch.version.cuda, "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "precision": args.precision,
        "tf32": {"kernel_input_precision": args.precision,
                 "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32},
        "peak_tflops": peak,
        "peak_source": "dense datasheet peak for the precision (bench_triton.PEAKS)" if peak else "unknown GPU",
        "timing": "triton.testing.do_bench median, warmup 50 ms, rep 400 ms",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, suffix=".tmp", delete=False) as f:
        json.dump(result, f, indent=2)
    os.replace(f.name, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
