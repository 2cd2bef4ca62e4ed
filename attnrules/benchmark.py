"""The engine benchmark: the all-pairs top-k engine timed on this machine against its GEMM peak and baselines.

Behind ``attnrules bench`` and the repository's ``bench/bench_cpu_engine.py`` and ``bench/bench_triton.py``
(one measuring code for all three).

CPU (:func:`run_cpu_benchmark`). Cases (queries × keys, d = 64, random weights):
  1. global      top-k_global pairs of (q·k) × key_weight (A × V)
  2. per_key     top-k_row queries of every key (the candidate table for all keys at once)
  3. per_query   top-k_row keys of every query
  4. dual        dual_topk with n_ex exemplars, global top-k_global
Providers: "cpu" (this engine), "gemm" (the bare product through torch in row chunks, GEMM time only),
"torch" (materialised matmul + topk), "torch_chunked" (matmul + topk per row block, merged), and
"faiss" (IndexFlatIP search; per-key and per-query cases; skipped when faiss is not installed). The
machine's sgemm peak (torch, 2048³) is measured in the same run; every provider's GFLOP/s is given as a
fraction of it, and its time as a ratio to the engine's. Each (case, provider) runs in this process or
(``isolated``) in its own one; its peak resident memory over its inputs is sampled (with psutil).

GPU (:func:`run_gpu_benchmark`, needs a CUDA GPU): the same cases on the triton backend against cuBLAS
matmul + ``torch.topk`` (materialised and in row chunks), timed with ``triton.testing.do_bench``
(medians); the GPU's GEMM peak is measured in the same run (a large ``torch.matmul`` at the chosen
precision), and a datasheet peak is given too for GPUs in :data:`PEAKS`.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

import attnrules.engine as engine

CASES = ("global", "per_key", "per_query", "dual")
PROVIDERS = ("cpu", "gemm", "torch", "torch_chunked", "faiss")
FULL = dict(n=24576, d=64, k_global=10_000, k_row=100, n_ex=100)
QUICK = dict(n=1024, d=64, k_global=500, k_row=20, n_ex=16)
MIB = 2**20


def shapes(quick: bool, n: Optional[int] = None) -> dict:
    """The CPU benchmark's shapes: full (GPT-2 small, 24,576²) or quick (1,024²); ``n`` replaces the size,
    and the k's are capped to what exists."""
    cfg = dict(QUICK if quick else FULL)
    cfg["n"] = n or cfg["n"]
    cfg["k_row"] = min(cfg["k_row"], cfg["n"])
    cfg["k_global"] = min(cfg["k_global"], cfg["n"] ** 2)
    return cfg


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


def installed(provider: str) -> bool:
    """Whether this machine can run the provider (faiss is optional)."""
    if provider != "faiss":
        return True
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# --- measuring ---


class PeakRSS:
    """Peak resident memory while a block runs, sampled every 2 ms (``peak`` None without psutil)."""

    def __enter__(self) -> "PeakRSS":
        try:
            import psutil
        except ImportError:
            self.proc, self.peak = None, None
            return self
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _rss() -> Optional[int]:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def measure(case: str, provider: str, cfg: dict, repeats: int, threads: Optional[int]) -> dict:
    """Runs one (case, provider) `repeats` times (after a warm-up) in this process."""
    x = inputs(cfg)
    base = _rss()
    input_mib = sum(t.numel() * t.element_size() for name, t in x.items()
                    if case == "dual" or name in ("q", "k", "w")) / MIB  # fmt: skip
    make = {"cpu": lambda: run_cpu(case, x, cfg, threads), "gemm": lambda: run_gemm(case, x, cfg),
            "torch": lambda: run_torch(case, x, cfg), "torch_chunked": lambda: run_torch_chunked(case, x, cfg),
            "faiss": lambda: run_faiss(case, x, cfg)}[provider]  # fmt: skip
    go = make()
    with PeakRSS() as rss:
        go()  # warm-up (first-touch page faults, thread pools)
        times = [go() for _ in range(repeats)]
    over = None if rss.peak is None or base is None else max(0.0, (rss.peak - base) / MIB)
    return dict(times_s=times, median_s=statistics.median(times), input_mib=input_mib,
                peak_rss_over_inputs_mib=over)  # fmt: skip


def measure_isolated(case: str, provider: str, cfg: dict, repeats: int, threads: Optional[int]) -> dict:
    """:func:`measure` in a fresh process (``python -m attnrules.benchmark``), so that its memory is its own."""
    cmd = [sys.executable, "-m", "attnrules.benchmark", case, provider, json.dumps(cfg), str(repeats),
           str(threads or 0)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {case}/{provider} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sgemm_peak(repeats: int = 5, n: int = 2048) -> float:
    """GFLOP/s of torch's n³ float32 GEMM on this CPU (best of ``repeats``, after a warm-up)."""
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

    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())  # fmt: skip
    except OSError:
        model = platform.processor() or platform.machine()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("numpy", "faiss", "psutil"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:
        import psutil

        physical, logical = psutil.cpu_count(logical=False), psutil.cpu_count()
    except ImportError:
        physical, logical = None, os.cpu_count()
    info = _C.build_info()
    return dict(cpu_model=model, physical_cores=physical, logical_cores=logical,
                torch_threads=torch.get_num_threads(), isa=info["isa"], openmp=info["openmp"],
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
                versions=versions)  # fmt: skip


def run_cpu_benchmark(cfg: dict, *, repeats: int, threads: Optional[int] = None, cases: tuple = CASES,
                      providers: tuple = PROVIDERS, isolated: bool = False, quick: bool = False,
                      command: str = "", progress: Optional[Callable[[str], None]] = None) -> dict:
    """Measures every (case, provider) of ``cfg`` (see :func:`shapes`); returns the report (the JSON of
    ``bench/results/cpu_engine.json``). Providers this machine lacks (faiss) are left out and listed
    under ``skipped_providers``."""
    peak = sgemm_peak()
    report = dict(benchmark="cpu_engine", command=command, machine=machine(),
                  config=dict(cfg, repeats=repeats, threads=threads, quick=quick),
                  sgemm_peak_gflops=peak, cases=[])  # fmt: skip
    missing = [p for p in providers if not installed(p)]
    if missing:
        report["skipped_providers"] = {p: "not installed" for p in missing}
    for case in cases:
        results = {}
        for provider in [p for p in providers if applies(case, p) and p not in missing]:
            r = (measure_isolated if isolated else measure)(case, provider, cfg, repeats, threads)
            r["gflops"] = flops(case, cfg) / r["median_s"] / 1e9
            r["fraction_of_peak"] = r["gflops"] / peak
            results[provider] = r
            if progress:
                progress(f"{case:9s} {provider:13s} {r['median_s']:8.3f} s")
        cpu = results.get("cpu", {}).get("median_s")
        for r in results.values():
            r["time_vs_cpu"] = r["median_s"] / cpu if cpu else None
        gemm_at_peak = flops(case, cfg) / (peak * 1e9)
        report["cases"].append(dict(case=case, flops=flops(case, cfg), gemm_at_peak_s=gemm_at_peak,
                                    cpu_vs_gemm_at_peak=cpu / gemm_at_peak if cpu else None, results=results))  # fmt: skip
    by_case = {c["case"]: c for c in report["cases"]}
    if "global" in by_case and "per_key" in by_case and "cpu" in by_case["global"]["results"]:
        report["per_key_vs_global"] = (by_case["per_key"]["results"]["cpu"]["median_s"]
                                       / by_case["global"]["results"]["cpu"]["median_s"])  # fmt: skip
    return report


def _num(value: Optional[float], fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    """The CPU report as a markdown table: times, GFLOP/s, fraction of the sgemm peak, ratio to the engine."""
    lines = ["| case | provider | median s | GFLOP/s | % sgemm peak | × vs cpu | peak MiB over inputs |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for case in report["cases"]:
        for provider, r in case["results"].items():
            lines.append(f"| {case['case']} | {provider} | {r['median_s']:.3f} | {r['gflops']:.1f} | "
                         f"{100 * r['fraction_of_peak']:.0f}% | {_num(r['time_vs_cpu'], '.2f')} | "
                         f"{_num(r['peak_rss_over_inputs_mib'], '.0f')} |")  # fmt: skip
    return "\n".join(lines)


def write_report(path: Path | str, report: dict) -> Path:
    """The report as JSON (indent 2), atomically."""
    from attnrules.files import write_atomic

    return write_atomic(path, json.dumps(report, indent=2))


# --- GPU (triton backend) ---

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
GPU_FULL = dict(n=24576, d=64, n_ex=100)
GPU_QUICK = dict(n=4096, d=64, n_ex=100)


def peak_tflops(gpu: str, precision: str) -> Optional[float]:
    """Dense datasheet peak of this GPU for the precision, or None when unknown."""
    for name, (fp32, tf32) in PEAKS.items():
        if name in gpu:
            return {"ieee": fp32, "tf32": tf32, "tf32x3": tf32 / 3}[precision]
    return None


def no_gpu_reason() -> Optional[str]:
    """Why the GPU benchmark cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set"
    return None


def _median_ms(fn: Callable[[], object], warmup: int = 50, rep: int = 400) -> float:
    import triton.testing

    fn()  # compile and autotune outside the timing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _materialised(scores: Callable[[slice, slice], torch.Tensor], nq: int, nk: int, k: int, by: str):
    s = scores(slice(0, nq), slice(0, nk))
    if by == "global":
        return torch.topk(s.flatten(), k).values
    return torch.topk(s if by == "query" else s.T, k, dim=1).values


def _chunked(scores: Callable[[slice, slice], torch.Tensor], nq: int, nk: int, k: int, by: str, chunk: int = 2048):
    if by == "global":
        best = None
        for r in range(0, nq, chunk):
            block = scores(slice(r, r + chunk), slice(0, nk)).flatten()
            top = torch.topk(block, min(k, block.numel())).values
            best = top if best is None else torch.topk(torch.cat([best, top]), k).values
        return best
    if by == "query":
        return torch.cat([torch.topk(scores(slice(r, r + chunk), slice(0, nk)), k, dim=1).values
                          for r in range(0, nq, chunk)])
    return torch.cat([torch.topk(scores(slice(0, nq), slice(c, c + chunk)).T, k, dim=1).values
                      for c in range(0, nk, chunk)])


def gpu_gemm_peak_tflops(precision: str, n: int = 8192, warmup: int = 50, rep: int = 400) -> float:
    """TFLOP/s of cuBLAS's n³ float32 GEMM on this GPU at the precision (tf32 allowed unless "ieee")."""
    dev = torch.device("cuda")
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    ms = _median_ms(lambda: a @ b, warmup=warmup, rep=rep)
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


def run_gpu_benchmark(*, precision: str = "ieee", quick: bool = False, n: Optional[int] = None,
                      progress: Optional[Callable[[str], None]] = None) -> dict:
    """The triton backend against cuBLAS matmul + torch.topk (materialised, chunked); returns the report
    (the JSON of ``bench/results/triton.json``). Needs a CUDA GPU (:func:`no_gpu_reason`)."""
    import triton

    from attnrules.kernels import topk_stream

    # The baselines use the same precision as the kernels.
    torch.backends.cuda.matmul.allow_tf32 = precision != "ieee"
    dev = torch.device("cuda")
    shape = dict(GPU_QUICK if quick else GPU_FULL)
    n = n or shape["n"]
    d, n_ex = shape["d"], shape["n_ex"]
    warmup, rep = (25, 100) if quick else (50, 400)
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

    k_global, k_row = min(10000, n * n), min(100, n)
    cases = [
        (f"global top-{k_global:,} of A×V", "pair", k_global, "global"),
        (f"per-key top-{k_row} queries", "pair", k_row, "key"),
        (f"per-query top-{k_row} keys", "pair", k_row, "query"),
        (f"dual, {n_ex} exemplars, global top-{k_global:,}", "dual", k_global, "global"),
    ]
    gpu = torch.cuda.get_device_name(dev)
    peak = peak_tflops(gpu, precision)
    measured = gpu_gemm_peak_tflops(precision, n=4096 if quick else 8192, warmup=warmup, rep=rep)
    if progress:
        progress(f"cuBLAS GEMM peak ({precision}): {measured:.1f} TFLOP/s")
    rows = []
    for name, op, k, by in cases:
        flop = 2.0 * n * n * (d + (n_ex if op == "dual" else 0))
        if op == "pair":
            run_triton = partial(engine.pair_topk, q, kk, k, by=by, key_weight=v, backend="triton", precision=precision)
            scores = pair_scores
        else:
            run_triton = partial(engine.dual_topk, q, kk, qa, ka, k, by=by, backend="triton", precision=precision)
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
                timings[provider] = _median_ms(fn, warmup=warmup, rep=rep)
            except torch.cuda.OutOfMemoryError:
                timings[provider] = None
                torch.cuda.empty_cache()
        for provider, ms in timings.items():
            tflops = None if ms is None else flop / (ms * 1e-3) / 1e12
            rows.append({
                "case": name, "operation": op, "by": by, "k": k, "provider": provider,
                "shape": {"n_queries": n, "n_keys": n, "d": d, "n_exemplars": n_ex if op == "dual" else None},
                "median_ms": ms, "tflops": tflops,
                "fraction_of_peak": None if tflops is None or peak is None else tflops / peak,
                "fraction_of_measured_peak": None if tflops is None else tflops / measured,
                # How many times faster the triton backend ran than this provider.
                "triton_speedup": None if ms is None or timings["triton"] is None else ms / timings["triton"],
                "max_abs_score_diff_vs_materialised": max_diff if provider == "triton" else None,
                "autotuned_config": str(topk_stream.tuned_kernel.best_config) if provider == "triton" else None,
            })
            if progress:
                shown = "out of memory" if ms is None else f"{ms:9.3f} ms  {tflops:7.2f} TFLOP/s"
                progress(f"{name:42s} {provider:20s} {shown}")
    return {
        "benchmark": "bench_triton",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"gpu": gpu, "cuda": torch.version.cuda, "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "precision": precision,
        "quick": quick,
        "tf32": {"kernel_input_precision": precision,
                 "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32},
        "peak_tflops": peak,
        "peak_source": "dense datasheet peak for the precision (attnrules.benchmark.PEAKS)" if peak else "unknown GPU",
        "measured_gemm_peak_tflops": measured,
        "timing": f"triton.testing.do_bench median, warmup {warmup} ms, rep {rep} ms",
        "rows": rows,
    }


def gpu_markdown(report: dict) -> str:
    """The GPU report as a markdown table."""
    lines = ["| case | provider | median ms | TFLOP/s | % measured GEMM peak | % datasheet peak | triton × faster |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["rows"]:
        pct = [None if f is None else 100 * f for f in (r["fraction_of_measured_peak"], r["fraction_of_peak"])]
        lines.append(f"| {r['case']} | {r['provider']} | {_num(r['median_ms'], '.3f')} | {_num(r['tflops'], '.2f')} | "
                     f"{_num(pct[0], '.0f')}% | {_num(pct[1], '.0f')}% | {_num(r['triton_speedup'], '.2f')} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":  # the worker of measure_isolated: CASE PROVIDER CFG_JSON REPEATS THREADS
    _case, _provider, _cfg, _repeats, _threads = sys.argv[1:6]
    print(json.dumps(measure(_case, _provider, json.loads(_cfg), int(_repeats), int(_threads) or None)))
