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
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import psutil
import torch

# Imported before any measurement: `import attnrules` loads the whole library (transformer_lens, pandas,
# ...), whose resident memory is not the engine's.
import attnrules.engine as engine

CASES = ("global", "per_key", "per_query", "dual")
PROVIDERS = ("cpu", "gemm", "torch", "torch_chunked", "faiss")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu_engine.json"
MIB = 2**20


def shapes(args: argparse.Namespace) -> dict:
    if args.quick:
        return dict(n=args.n or 1024, d=64, k_global=500, k_row=20, n_ex=16)
    return dict(n=args.n or 24576, d=64, k_global=10_000, k_row=100, n_ex=100)


def inputs(cfg: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    n, d = cfg["n"], cfg["d"]
    return dict(
        q=torch.randn(n, d, generator=g),
        k=torch.randn(n, d, generator=g),
        w=torch.randn(n, generator=g),
        qa=torch.rand(n, cfg["n_ex"], generator=g),
        ka=torch.randn(n, cfg["n_ex"], generator=g),
    )


def flops(case: str, cfg: dict) -> float:
    inner = cfg["d"] + (cfg["n_ex"] if case == "dual" else 0)
    return 2.0 * cfg["n"] * cfg["n"] * inner


# --- providers: each returns a function that runs the case once and returns the seconds to count ---


def run_cpu(case: str, x: dict, cfg: dict, threads: Optional[int]) -> Callable[[], float]:
    def go() -> float:
        t = time.perf_counter()
        if case == "dual":
            engine.dual_topk(x["q"], x["k"], x["qa"], x["ka"], cfg["k_global"], backend="cpu", threads=threads)
        else:
            by = {"global": "global", "per_key": "key", "per_query": "query"}[case]
            k = cfg["k_global"] if by == "global" else cfg["k_row"]
            engine.pair_topk(x["q"], x["k"], k, by=by, key_weight=x["w"], backend="cpu", threads=threads)
        return time.perf_counter() - t

    return go


def _scores(case: str, x: dict, rows: slice) -> torch.Tensor:
    """Scores of queries[rows] × all keys, materialised."""
    s = x["q"][rows] @ x["k"].T
    return s * (x["qa"][rows] @ x["ka"].T) if case == "dual" else s * x["w"]


def run_gemm(case: str, x: dict, cfg: dict, chunk: int = 2048) -> Callable[[], float]:
    """The bare products of the case, row chunk by row chunk into one reused buffer: GEMM time only."""
    n = cfg["n"]
    out = torch.empty(min(chunk, n), n)

    def go() -> float:
        total = 0.0
        for r0 in range(0, n, chunk):
            rows = slice(r0, min(r0 + chunk, n))
            o = out[: rows.stop - r0]
            t = time.perf_counter()
            torch.matmul(x["q"][rows], x["k"].T, out=o)
            if case == "dual":
                torch.matmul(x["qa"][rows], x["ka"].T, out=o)
            total += time.perf_counter() - t
        return total

    return go


def run_torch(case: str, x: dict, cfg: dict) -> Callable[[], float]:
    """Materialise the whole score matrix, then torch.topk."""

    def go() -> float:
        t = time.perf_counter()
        s = _scores(case, x, slice(None))
        if case in ("global", "dual"):
            torch.topk(s.view(-1), cfg["k_global"])
        else:
            torch.topk(s, cfg["k_row"], dim=0 if case == "per_key" else 1)
        del s
        return time.perf_counter() - t

    return go


def run_torch_chunked(case: str, x: dict, cfg: dict, chunk: int = 2048) -> Callable[[], float]:
    """Row blocks of queries: matmul + topk per block, merged into a running top-k."""
    n = cfg["n"]

    def go() -> float:
        t = time.perf_counter()
        best_s = best_i = None
        for r0 in range(0, n, chunk):
            rows = slice(r0, min(r0 + chunk, n))
            s = _scores(case, x, rows)
            if case in ("global", "dual"):
                v, i = torch.topk(s.view(-1), min(cfg["k_global"], s.numel()))
                i = i + r0 * n
                if best_s is not None:
                    v, j = torch.topk(torch.cat([best_s, v]), cfg["k_global"])
                    i = torch.cat([best_i, i])[j]
                best_s, best_i = v, i
            elif case == "per_query":
                torch.topk(s, cfg["k_row"], dim=1)
            else:  # per key: running top-k down the query blocks
                v, i = torch.topk(s, min(cfg["k_row"], s.shape[0]), dim=0)
                i = i + r0
                if best_s is not None:
                    v, j = torch.topk(torch.cat([best_s, v]), cfg["k_row"], dim=0)
                    i = torch.gather(torch.cat([best_i, i]), 0, j)
                best_s, best_i = v, i
        return time.perf_counter() - t

    return go


def run_faiss(case: str, x: dict, cfg: dict) -> Callable[[], float]:
    """IndexFlatIP: (q·k) × w[k] = q · (w[k] k), so the weighted keys are the database (per query),
    or the queries are the database searched by the weighted keys (per key)."""
    import faiss

    weighted = (x["k"] * x["w"][:, None]).numpy()
    db, search = (weighted, x["q"].numpy()) if case == "per_query" else (x["q"].numpy(), weighted)

    def go() -> float:
        t = time.perf_counter()
        index = faiss.IndexFlatIP(cfg["d"])
        index.add(db)
        index.search(search, cfg["k_row"])
        return time.perf_counter() - t

    return go


def applies(case: str, provider: str) -> bool:
    return provider != "faiss" or case in ("per_key", "per_query")


# --- measuring ---


class PeakRSS:
    """Peak resident memory while a block runs, sampled every 2 ms."""

    def __enter__(self) -> "PeakRSS":
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure(case: str, provider: str, cfg: dict, repeats: int, threads: Optional[int]) -> dict:
    """Runs one (case, provider) `repeats` times (after a warm-up) in this process."""
    x = inputs(cfg)
    base = psutil.Process().memory_info().rss
    input_mib = sum(t.numel() * t.element_size() for name, t in x.items()
                    if case == "dual" or name in ("q", "k", "w")) / MIB  # fmt: skip
    make = {"cpu": lambda: run_cpu(case, x, cfg, threads), "gemm": lambda: run_gemm(case, x, cfg),
            "torch": lambda: run_torch(case, x, cfg), "torch_chunked": lambda: run_torch_chunked(case, x, cfg),
            "faiss": lambda: run_faiss(case, x, cfg)}[provider]  # fmt: skip
    go = make()
    with PeakRSS() as rss:
        go()  # warm-up (first-touch page faults, thread pools)
        times = [go() for _ in range(repeats)]
    return dict(times_s=times, median_s=statistics.median(times), input_mib=input_mib,
                peak_rss_over_inputs_mib=max(0.0, (rss.peak - base) / MIB))  # fmt: skip


def measure_isolated(case: str, provider: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, provider, "--repeats", str(args.repeats)]
    cmd += ["--quick"] * args.quick + (["--n", str(args.n)] if args.n else [])
    cmd += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def sgemm_peak(repeats: int = 5, n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / min(times) / 1e9


def machine() -> dict:
    from attnrules import _C

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("numpy", "faiss", "psutil"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    info = _C.build_info()
    return dict(cpu_model=model, physical_cores=psutil.cpu_count(logical=False), logical_cores=psutil.cpu_count(),
                torch_threads=torch.get_num_threads(), isa=info["isa"], openmp=info["openmp"],
                load_average=os.getloadavg(), versions=versions)  # fmt: skip


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def markdown(report: dict) -> str:
    lines = ["| case | provider | median s | GFLOP/s | % sgemm peak | × vs cpu | peak MiB over inputs |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for case in report["cases"]:
        for provider, r in case["results"].items():
            lines.append(f"| {case['case']} | {provider} | {r['median_s']:.3f} | {r['gflops']:.1f} | "
                         f"{100 * r['fraction_of_peak']:.0f}% | {r['time_vs_cpu']:.2f} | {r['peak_rss_over_inputs_mib']:.0f} |")  # fmt: skip
    return "\n".join(lines)


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
    cfg = shapes(args)
    if args.worker:
        print(json.dumps(measure(*args.worker, cfg, args.repeats, args.threads)))
        return {}

    peak = sgemm_peak()
    report = dict(benchmark="cpu_engine", command=" ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
                  machine=machine(), config=dict(cfg, repeats=args.repeats, threads=args.threads, quick=args.quick),
                  sgemm_peak_gflops=peak, cases=[])  # fmt: skip
    for case in args.cases.split(","):
        results = {}
        for provider in [p for p in args.providers.split(",") if applies(case, p)]:
            r = (measure(case, provider, cfg, args.repeats, args.threads) if args.inline
                 else measure_isolated(case, provider, args))  # fmt: skip
            r["gflops"] = flops(case, cfg) / r["median_s"] / 1e9
            r["fraction_of_peak"] = r["gflops"] / peak
            results[provider] = r
            print(f"{case:9s} {provider:13s} {r['median_s']:8.3f} s", file=sys.stderr, flush=True)
        cpu = results.get("cpu", {}).get("median_s")
        for r in results.values():
            r["time_vs_cpu"] = r["median_s"] / cpu if cpu else float("nan")
        gemm_at_peak = flops(case, cfg) / (peak * 1e9)
        report["cases"].append(dict(case=case, flops=flops(case, cfg), gemm_at_peak_s=gemm_at_peak,
                                    cpu_vs_gemm_at_peak=cpu / gemm_at_peak if cpu else None, results=results))  # fmt: skip
    by_case = {c["case"]: c for c in report["cases"]}
    if "global" in by_case and "per_key" in by_case and "cpu" in by_case["global"]["results"]:
        report["per_key_vs_global"] = (by_case["per_key"]["results"]["cpu"]["median_s"]
                                       / by_case["global"]["results"]["cpu"]["median_s"])  # fmt: skip
    write_atomic(args.out, report)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
