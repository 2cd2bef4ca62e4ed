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

import contextlib
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


def run_cpu(case: str, x: dict, cfg: dict, threads: Optional[int], isa: str = "auto") -> Callable[[], float]:
    def go() -> float:
        t = time.perf_counter()
        if case == "dual":
            engine.dual_topk(x["q"], x["k"], x["qa"], x["ka"], cfg["k_global"], backend="cpu", threads=threads, isa=isa)
        else:
            by = {"global": "global", "per_key": "key", "per_query": "query"}[case]
            k = cfg["k_global"] if by == "global" else cfg["k_row"]
            engine.pair_topk(x["q"], x["k"], k, by=by, key_weight=x["w"], backend="cpu", threads=threads, isa=isa)
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


# Environment that restricts torch's BLAS to AVX2 (MKL, oneDNN, ATen kernels). On AMD CPUs MKL runs its
# AVX2 "zen" sgemm kernel whatever this says (so there the plain sgemm peak is already an AVX2 one);
# on Intel CPUs with AVX-512 these variables make MKL and oneDNN drop to their AVX2 kernels.
AVX2_ENV = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def sgemm_peak_avx2() -> float:
    """:func:`sgemm_peak` in a fresh process with torch's BLAS restricted to AVX2 (:data:`AVX2_ENV`)."""
    done = subprocess.run([sys.executable, "-m", "attnrules.benchmark", "sgemm"], capture_output=True, text=True,
                          env={**os.environ, **AVX2_ENV})  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"measuring the AVX2 sgemm peak failed: {done.stderr.strip()[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def interleaved(cfg: dict, *, rounds: int, threads: Optional[int] = None, isa: str = "auto") -> dict:
    """The engine's global, per-key and per-query cases timed in turn, ``rounds`` times, in this process:
    medians and the per-row ÷ global ratios, side by side so that a shared machine's load moves them alike."""
    x = inputs(cfg)
    runs = {case: run_cpu(case, x, cfg, threads, isa=isa) for case in ("global", "per_key", "per_query")}
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {case: [] for case in runs}
    for _ in range(rounds):
        for case, run in runs.items():
            times[case].append(run())
    median = {case: statistics.median(v) for case, v in times.items()}
    return dict(rounds=rounds, isa=isa, median_s=median, per_key_vs_global=median["per_key"] / median["global"],
                per_query_vs_global=median["per_query"] / median["global"], times_s=times)  # fmt: skip


def avx2_global(cfg: dict, *, repeats: int, threads: Optional[int] = None) -> Optional[dict]:
    """The global case with the AVX2 kernel forced (``isa="avx2"``) against this machine's sgemm peak
    and its AVX2-only sgemm peak, measured side by side; None when the CPU lacks AVX2."""
    from attnrules.engine import cpu_backend

    if "avx2" not in cpu_backend.supported_isas():
        return None
    x = inputs(cfg)
    engine_runs = {isa: run_cpu("global", x, cfg, threads, isa=isa) for isa in ("avx2", "auto")}
    times: dict[str, list[float]] = {isa: [] for isa in engine_runs}
    peaks: dict[str, list[float]] = {"sgemm": [], "sgemm_avx2": []}
    for run in engine_runs.values():
        run()
    for r in range(repeats):
        for isa, run in engine_runs.items():
            times[isa].append(run())
        peaks["sgemm"].append(sgemm_peak())
        if r == repeats // 2:  # one fresh process (best of 5 products): starting torch takes seconds
            peaks["sgemm_avx2"].append(sgemm_peak_avx2())
    gflops = {isa: flops("global", cfg) / statistics.median(v) / 1e9 for isa, v in times.items()}
    peak, peak_avx2 = max(peaks["sgemm"]), max(peaks["sgemm_avx2"])
    return dict(median_s={isa: statistics.median(v) for isa, v in times.items()}, gflops=gflops,
                sgemm_peak_gflops=peak, sgemm_avx2_peak_gflops=peak_avx2, avx2_env=AVX2_ENV,
                avx2_fraction_of_avx2_sgemm_peak=gflops["avx2"] / peak_avx2,
                avx2_fraction_of_sgemm_peak=gflops["avx2"] / peak, goal_fraction=0.75,
                goal_met=gflops["avx2"] / peak_avx2 >= 0.75, times_s=times, sgemm_runs_gflops=peaks)  # fmt: skip


MULTI_FULL = dict(n=24576, d=64, n_features=2048, k=10_000)
MULTI_QUICK = dict(n=1024, d=64, n_features=64, k=500)


def measure_multi_topk(cfg: dict, *, repeats: int, single_repeats: int = 3, backend: str = "auto",
                       table_depth: Optional[int] = None, check: int = 8, threads: Optional[int] = None,
                       progress: Optional[Callable[[str], None]] = None) -> dict:
    """``engine.multi_topk`` (every output feature of a head, global top-k each) against one feature's
    full pass, side by side: each round times ``single_repeats`` single passes (``pair_topk`` global,
    what ``rank_all_pairs`` runs per feature) and one multi_topk run; the best of each is reported, with
    each round's ratio. ``check`` features are compared with ``pair_topk`` pair for pair.
    ``cfg``: n (queries = keys), d, n_features, k (:data:`MULTI_FULL`, :data:`MULTI_QUICK`)."""
    from attnrules.engine import cpu_backend, features

    g = torch.Generator().manual_seed(0)
    n, d, k = cfg["n"], cfg["d"], cfg["k"]
    q, kk, v = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(n, cfg["n_features"], generator=g)
    opts = {} if threads is None else {"threads": threads}

    def single(j: int) -> engine.TopK:
        return engine.pair_topk(q, kk, k, key_weight=v[:, j % cfg["n_features"]].contiguous(), backend=backend, **opts)

    single(0)  # warm-up
    base = _rss()
    single_times, times, ratios, single_cpu, multi_cpu = [], [], [], [], []
    with PeakRSS() as rss:
        for r in range(repeats):
            best = float("inf")
            for j in range(single_repeats):
                t, c = time.perf_counter(), time.process_time()
                single(r * single_repeats + j)
                single_times.append(time.perf_counter() - t)
                single_cpu.append(time.process_time() - c)
                best = min(best, single_times[-1])
            t, c = time.perf_counter(), time.process_time()
            result = engine.multi_topk(q, kk, v, k, table_depth=table_depth, backend=backend, **opts)
            times.append(time.perf_counter() - t)
            multi_cpu.append(time.process_time() - c)
            ratios.append(times[-1] / best)
            if progress:
                progress(f"multi_topk round {r}: single pass {best:.3f} s, multi_topk {times[-1]:.3f} s ({ratios[-1]:.2f}×)")
    native = features._native_applies(q, backend)
    depth = min(features.DEFAULT_DEPTH, k, n) if table_depth is None else table_depth
    t = time.perf_counter()  # the table alone, once, to show where the time goes
    if native:
        cpu_backend.per_key_both_sides(q, kk, depth, sorted_prefix=features.SORTED_PREFIX, **opts)
    else:
        engine.pair_topk(q, kk, depth, by="key", backend=backend, **opts)
        engine.pair_topk(-q, kk, depth, by="key", backend=backend, **opts)
    table_s = time.perf_counter() - t
    single_s, multi_s = min(single_times), min(times)
    checked = list(range(0, cfg["n_features"], max(1, cfg["n_features"] // max(1, check))))[:check]
    identical = sum(all(torch.equal(getattr(one, f), getattr(result, f)[j]) for f in ("scores", "query_idx", "key_idx"))
                    for j, one in ((j, single(j)) for j in checked))  # fmt: skip
    return dict(
        config=dict(cfg, repeats=repeats, single_repeats=single_repeats, backend=backend, table_depth=depth,
                    threads=threads),  # fmt: skip
        native=native, single_feature_s=single_s, single_feature_median_s=statistics.median(single_times),
        single_feature_times_s=single_times, multi_topk_s=multi_s, multi_topk_times_s=times,
        round_ratios=ratios, median_round_ratio=statistics.median(ratios),
        # CPU time of the process (all threads): the work done, less moved than wall time by other jobs
        # that share the cores (not by their use of the memory bus).
        single_feature_cpu_s=min(single_cpu), multi_topk_cpu_s=min(multi_cpu),
        cpu_time_ratio=min(multi_cpu) / min(single_cpu),
        phases=dict(table_s=table_s, answer_and_deeper_rows_s=multi_s - table_s),
        per_feature_ms=1e3 * multi_s / cfg["n_features"], vs_one_single_pass=multi_s / single_s,
        goal_vs_one_single_pass=5.0, goal_met=multi_s / single_s <= 5.0,
        extrapolated_single_calls_s=single_s * cfg["n_features"],
        speedup_vs_single_calls=single_s * cfg["n_features"] / multi_s,
        checked_features=checked, identical_to_pair_topk=f"{identical}/{len(checked)}",
        output_mib=sum(x.numel() * x.element_size() for x in (result.scores, result.query_idx, result.key_idx)) / MIB,
        peak_rss_over_inputs_mib=None if rss.peak is None or base is None else max(0.0, (rss.peak - base) / MIB),
    )  # fmt: skip


def run_cpu_benchmark(cfg: dict, *, repeats: int, threads: Optional[int] = None, cases: tuple = CASES,
                      providers: tuple = PROVIDERS, isolated: bool = False, quick: bool = False,
                      command: str = "", progress: Optional[Callable[[str], None]] = None,
                      side_by_side: bool = True) -> dict:
    """Measures every (case, provider) of ``cfg`` (see :func:`shapes`); returns the report (the JSON of
    ``bench/results/cpu_engine.json``). Providers this machine lacks (faiss) are left out and listed
    under ``skipped_providers``. ``side_by_side`` (when the cpu provider runs) adds the engine's goals,
    measured in this process with the cases in turn: ``interleaved`` (per-key ÷ global, ``repeats``
    rounds), ``avx2`` (the AVX2 kernel's fraction of the AVX2-only sgemm peak, :func:`avx2_global`) and
    ``multi_topk`` (:func:`measure_multi_topk` at :data:`MULTI_FULL`, or :data:`MULTI_QUICK` when
    ``quick``)."""
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
    if side_by_side and "cpu" in providers:
        rounds = max(3, repeats)
        report["interleaved"] = interleaved(cfg, rounds=rounds, threads=threads)
        report["interleaved"]["goal_per_key_vs_global"] = 1.3
        if progress:
            progress(f"interleaved: per-key ÷ global {report['interleaved']['per_key_vs_global']:.3f}")
        report["avx2"] = avx2_global(cfg, repeats=rounds, threads=threads)
        if progress and report["avx2"]:
            progress(f"avx2 global: {100 * report['avx2']['avx2_fraction_of_avx2_sgemm_peak']:.0f}% of the AVX2 sgemm peak")
        report["multi_topk"] = measure_multi_topk(MULTI_QUICK if quick else MULTI_FULL, repeats=1 if quick else 3,
                                                  threads=threads, progress=progress)  # fmt: skip
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
    return "\n".join(lines + _goal_lines(report))


def _goal_lines(report: dict) -> list[str]:
    """The side-by-side goals of :func:`run_cpu_benchmark` as sentences (after the table)."""
    lines = []
    if report.get("interleaved"):
        s = report["interleaved"]
        lines.append(f"side by side ({s['rounds']} rounds, medians): per-key top-{report['config']['k_row']} ÷ global "
                     f"{s['per_key_vs_global']:.2f}× (goal ≤ 1.3×), per-query ÷ global {s['per_query_vs_global']:.2f}×")
    if report.get("avx2"):
        a = report["avx2"]
        lines.append(f"AVX2 kernel, global case: {a['gflops']['avx2']:.1f} GFLOP/s = "
                     f"{100 * a['avx2_fraction_of_avx2_sgemm_peak']:.0f}% of the AVX2-only sgemm peak "
                     f"({a['sgemm_avx2_peak_gflops']:.1f} GFLOP/s; goal ≥ 75%), "
                     f"{100 * a['avx2_fraction_of_sgemm_peak']:.0f}% of the default one ({a['sgemm_peak_gflops']:.1f})")
    if report.get("multi_topk"):
        m = report["multi_topk"]
        c = m["config"]
        lines.append(f"multi_topk: {c['n_features']} features × global top-{c['k']:,} of {c['n']:,}² pairs in "
                     f"{m['multi_topk_s']:.3f} s = {m['vs_one_single_pass']:.1f}× one feature's pass "
                     f"({m['single_feature_s']:.3f} s; goal ≤ 5×; in CPU time {m['cpu_time_ratio']:.1f}×), "
                     f"{m['speedup_vs_single_calls']:.0f}× faster than "
                     f"{c['n_features']} single calls; identical to pair_topk: {m['identical_to_pair_topk']}")
    return [""] + lines if lines else []


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
    """Dense datasheet peak of this GPU for the precision ("ieee" = fp32 CUDA cores, "tf32" = TF32
    tensor cores, "tf32x3" = a third of it), or None when unknown."""
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


def _median_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (synchronised), after one untimed
    call (compilation)."""
    import triton.testing

    fn()
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _wall_ms(fn: Callable[[], object]) -> float:
    """One timed call after an untimed one: the dry run's stand-in for do_bench (CPU, interpreter)."""
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


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


def gpu_gemm_peak_tflops(precision: str, n: int = 8192, warmup: int = 25, rep: int = 100) -> float:
    """TFLOP/s of cuBLAS's n³ float32 GEMM on this GPU at the precision (TF32 tensor cores unless "ieee")."""
    dev = torch.device("cuda")
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    with _tf32_matmul(precision != "ieee"):
        ms = _median_ms(lambda: a @ b, warmup=warmup, rep=rep)
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


class _tf32_matmul:
    """Context: torch matmuls on CUDA use TF32 tensor cores (``on``) or fp32, restored afterwards."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.before


def gpu_machine() -> dict:
    """GPU name, SMs, memory, clocks and driver (nvidia-smi when present), CUDA and package versions."""
    import numpy
    import triton

    info: dict = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                  "versions": {"torch": torch.__version__, "triton": triton.__version__, "numpy": numpy.__version__,
                               "cuda": torch.version.cuda}}  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1))  # fmt: skip
    fields = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)  # fmt: skip
        values = [v.strip() for v in out.stdout.splitlines()[0].split(",")] if out.returncode == 0 else []
        info["nvidia_smi"] = dict(zip(fields.split(","), values)) or None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        info["nvidia_smi"] = None
    return info


GPU_PRECISIONS = ("tf32", "tf32x3", "ieee")


def run_gpu_benchmark(*, precision: Optional[str] = None, precisions: Optional[tuple] = None, quick: bool = False,
                      n: Optional[int] = None, dry_run: bool = False,
                      progress: Optional[Callable[[str], None]] = None) -> dict:
    """The triton backend at each precision against cuBLAS: the bare GEMM of the same shape (TF32 and
    FP32), GEMM + ``torch.topk`` on the materialised matrix and in row chunks (TF32); returns the
    report (the JSON of ``bench/results/triton.json``). Needs a CUDA GPU (:func:`no_gpu_reason`),
    except ``dry_run``: CPU tensors in Triton's interpreter, one wall-clock call per provider, a small
    ``n`` — it checks the code path and the report, and measures nothing worth reading.

    ``precision`` (one) or ``precisions`` (several; default all of :data:`GPU_PRECISIONS`): the
    triton backend's options; every triton answer is compared with the fp32 ("ieee") one."""
    import triton

    from attnrules.kernels import plan as kernel_plan

    if precisions is None:
        precisions = (precision,) if precision is not None else GPU_PRECISIONS
    dev = torch.device("cpu" if dry_run else "cuda")
    shape = dict(GPU_QUICK if quick else GPU_FULL)
    n = n or (64 if dry_run else shape["n"])
    d, n_ex = shape["d"], (16 if dry_run else shape["n_ex"])
    timer = _wall_ms if dry_run else _median_ms
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

    def gemm(op: str) -> Callable[[], object]:
        return (lambda: q @ kk.T) if op == "pair" else (lambda: (q @ kk.T, qa @ ka.T))

    k_global, k_row = min(10000, n * n // 8), min(100, n // 2)
    cases = [
        (f"global top-{k_global:,} of A×V", "pair", k_global, "global"),
        (f"per-key top-{k_row} queries", "pair", k_row, "key"),
        (f"per-query top-{k_row} keys", "pair", k_row, "query"),
        (f"dual, {n_ex} exemplars, global top-{k_global:,}", "dual", k_global, "global"),
    ]
    machine = gpu_machine()
    gpu = machine.get("gpu", "none (dry run)")
    peaks = {"tf32": peak_tflops(gpu, "tf32"), "fp32": peak_tflops(gpu, "ieee")}
    if dry_run:
        measured = {"tf32": None, "fp32": None}
    else:
        size = 4096 if quick else 8192
        measured = {"tf32": gpu_gemm_peak_tflops("tf32", n=size), "fp32": gpu_gemm_peak_tflops("ieee", n=size)}
        if progress:
            progress(f"cuBLAS GEMM peak {size}³: TF32 {measured['tf32']:.1f}, FP32 {measured['fp32']:.1f} TFLOP/s")
    rows = []
    for name, op, k, by in cases:
        flop = 2.0 * n * n * (d + (n_ex if op == "dual" else 0))
        scores = pair_scores if op == "pair" else dual_scores

        def run_triton(p: str, op=op, k=k, by=by):
            if op == "pair":
                return engine.pair_topk(q, kk, k, by=by, key_weight=v, backend="triton", precision=p)
            return engine.dual_topk(q, kk, qa, ka, k, by=by, backend="triton", precision=p)

        answers = {p: run_triton(p) for p in dict.fromkeys(tuple(precisions) + ("ieee",))}
        with _tf32_matmul(False):
            reference = _materialised(scores, n, n, k, by)  # fp32 cuBLAS
        fp32 = answers["ieee"]
        timings, notes = {}, {}
        for p in precisions:
            ans = answers[p]
            notes[f"triton-{p}"] = {
                "equals_fp32_answer": bool(torch.equal(ans.query_idx, fp32.query_idx)
                                           and torch.equal(ans.key_idx, fp32.key_idx)
                                           and torch.equal(ans.scores, fp32.scores)),
                "max_abs_score_diff_vs_materialised_fp32": float((ans.scores - reference).abs().max()),
            }
            timings[f"triton-{p}"] = partial(run_triton, p)
        for tf32, label in ((True, "tf32"), (False, "fp32")):
            timings[f"cublas-gemm-{label}"] = (gemm(op), tf32)
        timings["torch-materialised-tf32"] = (partial(_materialised, scores, n, n, k, by), True)
        timings["torch-chunked-tf32"] = (partial(_chunked, scores, n, n, k, by), True)
        results = {}
        for provider, fn in timings.items():
            fn, tf32 = fn if isinstance(fn, tuple) else (fn, False)
            try:
                with _tf32_matmul(tf32) if not dry_run else contextlib.nullcontext():
                    results[provider] = timer(fn)
            except torch.cuda.OutOfMemoryError:
                results[provider] = None
                torch.cuda.empty_cache()
        gemm_tf32 = results.get("cublas-gemm-tf32")
        default = results.get(f"triton-{kernel_plan.DEFAULT_PRECISION}") or results.get(f"triton-{precisions[0]}")
        for provider, ms in results.items():
            tflops = None if ms is None else flop / (ms * 1e-3) / 1e12
            row = {
                "case": name, "operation": op, "by": by, "k": k, "provider": provider,
                "shape": {"n_queries": n, "n_keys": n, "d": d, "n_exemplars": n_ex if op == "dual" else None},
                "median_ms": ms, "tflops": tflops,
                "fraction_of_tf32_peak": _ratio(tflops, peaks["tf32"]),
                "fraction_of_fp32_peak": _ratio(tflops, peaks["fp32"]),
                "fraction_of_measured_tf32_gemm_peak": _ratio(tflops, measured["tf32"]),
                "fraction_of_measured_fp32_gemm_peak": _ratio(tflops, measured["fp32"]),
                "time_vs_tf32_gemm": _ratio(ms, gemm_tf32),
                # How many times faster the default triton precision ran than this provider.
                "default_triton_speedup": _ratio(ms, default),
            }
            row.update(notes.get(provider, {}))
            rows.append(row)
            if progress:
                shown = "out of memory" if ms is None else f"{ms:9.3f} ms  {tflops:7.2f} TFLOP/s"
                progress(f"{name:42s} {provider:24s} {shown}")
    return {
        "benchmark": "bench_triton",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dry_run": dry_run,
        "machine": machine,
        "versions": machine["versions"],
        "precision": precisions[0],
        "precisions": list(precisions),
        "default_precision": kernel_plan.DEFAULT_PRECISION,
        "quick": quick,
        "tf32": {"kernel_filter": "TF32 tensor cores for 'tf32'/'tf32x3', then fp32 rescore; 'ieee' fp32 only",
                 "baselines": "cublas-gemm-tf32, torch-*-tf32: torch.backends.cuda.matmul.allow_tf32=True; "
                              "cublas-gemm-fp32 and the reference answer: False"},
        "peak_tflops": peak_tflops(gpu, precisions[0]),
        "datasheet_peaks_tflops": peaks,
        "peak_source": "dense datasheet peaks (attnrules.benchmark.PEAKS)" if peaks["tf32"] else "unknown GPU",
        "measured_gemm_peak_tflops": measured["tf32" if precisions[0] != "ieee" else "fp32"],
        "measured_gemm_peaks_tflops": measured,
        "timing": "one wall-clock call (dry run)" if dry_run else "triton.testing.do_bench median, warmup 25 ms, rep 100 ms",
        "goals": _gpu_goals(rows, kernel_plan.DEFAULT_PRECISION),
        "rows": rows,
    }


BLOCK_SWEEP = {  # (block_q, block_k) tried per case; the plan's defaults are (16, 128) global, (64, 32) per key
    "global": [(16, 32), (16, 64), (16, 128), (32, 64), (32, 128), (64, 64), (64, 128), (128, 64)],
    "key": [(32, 32), (64, 32), (128, 32), (64, 16), (64, 64), (64, 128), (128, 64)],
}


def run_gpu_block_sweep(*, quick: bool = False, dry_run: bool = False,
                        progress: Optional[Callable[[str], None]] = None) -> dict:
    """The triton backend (default precision) at each block shape of :data:`BLOCK_SWEEP` on the
    global top-10,000 and per-key top-100 cases of :func:`run_gpu_benchmark`: median ms and whether
    the answer equals the default blocks' one. A shape that fails to compile or launch (registers,
    shared memory) is recorded with its error, not skipped. Evidence for the plan's block defaults."""
    dev = torch.device("cpu" if dry_run else "cuda")
    n = 64 if dry_run else (GPU_QUICK if quick else GPU_FULL)["n"]
    d = GPU_FULL["d"]
    g = torch.Generator(device=dev).manual_seed(0)
    q, kk = torch.randn(n, d, device=dev, generator=g) / d**0.5, torch.randn(n, d, device=dev, generator=g) / d**0.5
    v = torch.randn(n, device=dev, generator=g)
    timer = _wall_ms if dry_run else _median_ms
    rows = []
    for by, k in (("global", min(10000, n * n // 8)), ("key", min(100, n // 2))):
        reference = engine.pair_topk(q, kk, k, by=by, key_weight=v, backend="triton")
        for block_q, block_k in BLOCK_SWEEP[by]:
            run = partial(engine.pair_topk, q, kk, k, by=by, key_weight=v, backend="triton", block_q=block_q,
                          block_k=block_k)
            row = {"by": by, "k": k, "n": n, "d": d, "block_q": block_q, "block_k": block_k}
            try:
                ans = run()
                row["equals_default_answer"] = bool(torch.equal(ans.query_idx, reference.query_idx)
                                                    and torch.equal(ans.key_idx, reference.key_idx)
                                                    and torch.equal(ans.scores, reference.scores))
                row["median_ms"] = timer(run)
            except Exception as err:  # noqa: BLE001 — a block shape the compiler or GPU refuses is a finding
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            if progress:
                shown = row.get("error") or f"{row['median_ms']:9.3f} ms  same answer: {row['equals_default_answer']}"
                progress(f"blocks by={by:6s} block_q={block_q:4d} block_k={block_k:4d}  {shown}")
    return {"benchmark": "triton_blocks", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dry_run": dry_run,
            "machine": gpu_machine(), "precision": "tf32 (default)",
            "timing": "one wall-clock call (dry run)" if dry_run else "triton.testing.do_bench median",
            "rows": rows}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def _gpu_goals(rows: list, default: str) -> dict:
    """The README's GPU targets, read off the global top-10,000 case (pair) at the default precision."""
    by = {r["provider"]: r for r in rows if r["operation"] == "pair" and r["by"] == "global"}
    ours, gemm, mat = by.get(f"triton-{default}"), by.get("cublas-gemm-tf32"), by.get("torch-materialised-tf32")
    vs_gemm = None if not ours or not gemm else _ratio(ours["median_ms"], gemm["median_ms"])
    speedup = None if not ours or not mat else _ratio(mat["median_ms"], ours["median_ms"])
    return {"global_time_vs_tf32_gemm": vs_gemm, "target_time_vs_tf32_gemm": 1.5,
            "global_fraction_of_tf32_peak": ours and ours["fraction_of_tf32_peak"], "target_fraction_of_tf32_peak": 0.6,
            "global_speedup_vs_materialised": speedup, "target_speedup_vs_materialised": 10.0}  # fmt: skip


def gpu_markdown(report: dict) -> str:
    """The GPU report as a markdown table."""
    lines = ["| case | provider | median ms | TFLOP/s | % TF32 peak | % FP32 peak | × TF32 GEMM | default triton × faster |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["rows"]:
        pct = [None if f is None else 100 * f for f in (r["fraction_of_tf32_peak"], r["fraction_of_fp32_peak"])]
        lines.append(f"| {r['case']} | {r['provider']} | {_num(r['median_ms'], '.3f')} | {_num(r['tflops'], '.2f')} | "
                     f"{_num(pct[0], '.0f')}% | {_num(pct[1], '.0f')}% | {_num(r['time_vs_tf32_gemm'], '.2f')} | "
                     f"{_num(r['default_triton_speedup'], '.2f')} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":  # workers: of measure_isolated (CASE PROVIDER CFG_JSON REPEATS THREADS), of sgemm_peak_avx2 (sgemm)
    if sys.argv[1:] == ["sgemm"]:
        print(json.dumps(sgemm_peak()))
    else:
        _case, _provider, _cfg, _repeats, _threads = sys.argv[1:6]
        print(json.dumps(measure(_case, _provider, json.loads(_cfg), int(_repeats), int(_threads) or None)))
