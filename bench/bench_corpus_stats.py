"""What the corpus statistics add to the scan pass, on GPT-2-small shapes.

The scan (one pass over the corpus to the head's layer) now also feeds two observers
(:mod:`attnrules.pipeline.corpus_stats`): the input SAE's encode of ``hook_resid_pre`` with a running
per-feature top-k and activity count (:class:`~attnrules.rules.descriptions.InputStatsObserver`), and
the attention metrics of every head from ``hook_pattern``
(:class:`~attnrules.evaluation.head_metrics.HeadMetricsObserver`). This times each observer on
random activations of one scan batch (64 sequences × 64 tokens, d_model 768, a 24,576-feature ReLU
SAE with about 1% of features active a token; 12 heads), median of ``--repeats`` after a warm-up, and
scales to the paper's corpus (50,000 sequences of 64 tokens, 3.2 M tokens) per layer.

    python bench/bench_corpus_stats.py                     # CPU; writes bench/results/corpus_stats.json
    python bench/bench_corpus_stats.py --device cuda --out /tmp/corpus_stats_gpu.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from attnrules import benchmark
from attnrules.evaluation.head_metrics import HeadMetricsObserver
from attnrules.rules.descriptions import InputStatsObserver
from attnrules.sources import InputSAE

CORPUS_SEQUENCES, SEQ_LEN = 50_000, 64


def sae(n_in: int, d_model: int, device: str) -> InputSAE:
    """A random ReLU SAE whose bias leaves about 1% of features active on unit-variance inputs."""
    g = torch.Generator().manual_seed(0)
    w_enc = torch.randn(d_model, n_in, generator=g) / d_model**0.5
    w_dec = torch.randn(n_in, d_model, generator=g) / d_model**0.5
    b_enc = torch.full((n_in,), -2.33)  # P(N(0,1) > 2.33) ≈ 1%
    return InputSAE.from_tensors(w_enc.to(device), b_enc.to(device), w_dec.to(device),
                                 torch.zeros(d_model, device=device), layer=5)


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="sequences per scan batch")
    parser.add_argument("--n-in", type=int, default=24_576)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "corpus_stats.json")
    args = parser.parse_args()
    d_model, n_heads, device = 768, 12, args.device
    input_sae = sae(args.n_in, d_model, device)
    resid = torch.randn(args.batch, SEQ_LEN, d_model, device=device)
    scores = torch.randn(args.batch, n_heads, SEQ_LEN, SEQ_LEN, device=device)
    pattern = scores.masked_fill(~torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool, device=device).tril(), float("-inf")
                                 ).softmax(-1)
    tokens = torch.randint(0, 50_257, (args.batch, SEQ_LEN))
    rows = slice(0, args.batch)

    def inputs() -> None:
        observer = InputStatsObserver(input_sae)
        observer.observe(rows, {input_sae.hook_name: resid})

    def heads() -> None:
        observer = HeadMetricsObserver(5, tokens)
        observer.observe(rows, {"blocks.5.attn.hook_pattern": pattern})

    tokens_per_batch = args.batch * SEQ_LEN
    batches = CORPUS_SEQUENCES / args.batch
    result = {"benchmark": "corpus statistics observers", "device": device, "machine": benchmark.machine(),
              "shapes": {"batch": args.batch, "seq_len": SEQ_LEN, "d_model": d_model, "n_in": args.n_in,
                         "n_heads": n_heads},
              "repeats": args.repeats, "cases": []}
    for name, fn, flops in (("input_stats", inputs, 2 * d_model * args.n_in * tokens_per_batch),
                            ("head_metrics", heads, None)):
        seconds = timed(fn, args.repeats, device)
        case = {"case": name, "seconds_per_batch": seconds, "us_per_token": seconds / tokens_per_batch * 1e6,
                "seconds_per_layer_50k_corpus": seconds * batches}
        if flops:
            case["gflops"] = flops / seconds / 1e9
        result["cases"].append(case)
        print(f"{name}: {seconds * 1e3:.1f} ms per batch of {tokens_per_batch} tokens, "
              f"{case['us_per_token']:.2f} µs/token, {case['seconds_per_layer_50k_corpus']:.0f} s per layer on "
              f"{CORPUS_SEQUENCES:,} × {SEQ_LEN} tokens" + (f", {case['gflops']:.1f} GFLOP/s" if flops else ""))
    result["load_average"] = os.getloadavg()  # these machines are shared: the load says how far to trust it
    benchmark.write_report(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
