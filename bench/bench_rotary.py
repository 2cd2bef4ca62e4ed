"""Benchmark of ``engine.offset_topk`` (best offset of a rotary head's scores) on GPT-2-small shapes.

All 24,576 queries × 24,576 keys × 64 offsets (rows 0..63 of tables from base 10,000, rotary_dim
= d_head = 64, the math of ``attnrules.circuit.rotary``), global top-10,000 pairs by their best-offset
A × V (signed, random value weights), CPU backend. Two inputs:

  random      queries, keys, weights ~ N(0, 1)
  structured  a trained-head-like case: low-norm random rows (× 0.25) plus 256 strong query rows and
              256 strong key rows (× 2); the strong key j is strong query j rotated to an offset
              δ_j (so A peaks at δ_j) plus noise: 256 strongly aligned pairs among 65,536 strong ones

Providers, all in this one process, medians of ``--repeats`` runs after a warm-up:

  pass            one offset-free ``pair_topk`` global k=10,000 on the same inputs: the unit ("passes")
  offset_topk     this engine (bound ranked by pair_topk, exact rescoring)
  per_offset      what scoring every offset with today's engine costs: 64 ``pair_topk`` calls with the
                  queries rotated to each offset, merged (the union of the per-offset top-k holds the
                  answer); run once (64 calls), not repeated; its merged answer verifies offset_topk
                  at full size
  torch_chunked   brute force in plain torch: 128 queries at a time, all offsets, max, running top-k;
                  timed on a strided subset of the queries (``--chunked-share``) and scaled up

Also: the share of pairs the bound prunes (pairs whose bound lies below the final k-th score, over
all pairs), how many pairs offset_topk ranked and rescored, and a check against a float64 brute force
over pairs × offsets on a reduced size (``--verify-n`` queries and keys).

    python bench/bench_rotary.py                 # full size, writes bench/results/rotary.json
    python bench/bench_rotary.py --quick --out /tmp/rotary.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import attnrules.engine as engine
from attnrules.circuit.rotary import Rotary
from attnrules.benchmark import machine, write_report
from attnrules.engine import merge, offsets

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "rotary.json"
CASES = ("random", "structured")


def tables(d: int, n_off: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n_off, d/2] float64: pair i turns by θ_i = base^(−2i/d) per position (rotary_dim = d)."""
    p = d // 2
    theta = base ** (-2.0 * torch.arange(p, dtype=torch.float64) / d)
    phi = torch.arange(n_off, dtype=torch.float64)[:, None] * theta[None, :]
    return phi.cos(), phi.sin()


def inputs(case: str, n: int, d: int, cos: torch.Tensor, sin: torch.Tensor, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    q, k, w = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(n, generator=g)
    if case == "structured":
        p = d // 2
        rot = Rotary(torch.arange(p), torch.arange(p, 2 * p), torch.arange(2 * p, d), cos, sin)
        q, k = 0.25 * q, 0.25 * k
        n_strong = min(256, n // 8)
        qs = torch.randperm(n, generator=g)[:n_strong]
        ks = torch.randperm(n, generator=g)[:n_strong]
        delta = torch.randint(0, cos.shape[0], (n_strong,), generator=g)
        q[qs] = 2.0 * torch.randn(n_strong, d, generator=g)
        k[ks] = rot.rotate(q[qs].double(), delta).float() + 0.5 * torch.randn(n_strong, d, generator=g)
        w[ks] = w[ks].abs() + 0.5
    return dict(q=q.contiguous(), k=k.contiguous(), w=w)


# --- providers ---


def run_offset_topk(x: dict, cos, sin, kk: int, threads: Optional[int]) -> engine.OffsetTopK:
    return engine.offset_topk(x["q"], x["k"], kk, cos=cos, sin=sin, key_weight=x["w"], backend="cpu", threads=threads)


def run_pass(x: dict, kk: int, threads: Optional[int]) -> engine.TopK:
    return engine.pair_topk(x["q"], x["k"], kk, key_weight=x["w"], backend="cpu", threads=threads)


def rotate_queries(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, o: int) -> torch.Tensor:
    """Queries rotated to offset row o: rotated · key = A_o(q, key)."""
    p = cos.shape[1]
    c, s = cos[o].float(), sin[o].float()
    qa, qb = q[:, :p], q[:, p:2 * p]
    return torch.cat([qa * c - qb * s, qb * c + qa * s, q[:, 2 * p:]], 1).contiguous()


def run_per_offset(x: dict, cos, sin, kk: int, threads: Optional[int]) -> tuple[float, dict]:
    """64 offset-free pair_topk calls (one per offset) and their merge: (seconds, answer)."""
    nk = x["k"].shape[0]
    t = time.perf_counter()
    ids, scores, offs = [], [], []
    for o in range(cos.shape[0]):
        r = engine.pair_topk(rotate_queries(x["q"], cos, sin, o), x["k"], kk, key_weight=x["w"], backend="cpu",
                             threads=threads)  # fmt: skip
        ids.append(r.query_idx * nk + r.key_idx)
        scores.append(r.scores)
        offs.append(torch.full_like(r.key_idx, o))
    ids, scores, offs = torch.cat(ids), torch.cat(scores), torch.cat(offs)
    order = torch.sort(scores, descending=True, stable=True).indices  # per pair its best offset first
    ids, scores, offs = ids[order], scores[order], offs[order]
    uniq, first = _first_of_each(ids)
    s, i = merge.top_flat(scores[first], uniq, kk)
    seconds = time.perf_counter() - t
    return seconds, dict(ids=i, scores=s)


def _first_of_each(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids and the position of each one's first occurrence."""
    order = torch.sort(ids, stable=True).indices
    sorted_ids = ids[order]
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return sorted_ids[new], order[new]


def run_torch_chunked(x: dict, cos, sin, kk: int, share: float, chunk: int = 128) -> dict:
    """Brute force in plain torch (float32) on a strided share of the queries: seconds, scaled up."""
    n = x["q"].shape[0]
    step = max(1, round(1 / share))
    rows = torch.arange(0, n, step)
    qs = x["q"][rows]
    p = cos.shape[1]
    n_off = cos.shape[0]
    c, s = cos.float(), sin.float()
    kw = x["k"] * x["w"][:, None]
    t = time.perf_counter()
    best_s = best_i = None
    for r0 in range(0, rows.numel(), chunk):
        q = qs[r0:r0 + chunk]
        qa, qb = q[:, None, :p], q[:, None, p:2 * p]
        rq = torch.cat([qa * c - qb * s, qb * c + qa * s, q[:, None, 2 * p:].expand(-1, n_off, -1)], 2)
        a = (rq.reshape(-1, q.shape[1]) @ kw.T).reshape(q.shape[0], n_off, -1).amax(1)
        v, i = torch.topk(a.flatten(), min(kk, a.numel()))
        i = i + r0 * kw.shape[0]
        if best_s is not None:
            v, j = torch.topk(torch.cat([best_s, v]), min(kk, best_s.numel() + v.numel()))
            i = torch.cat([best_i, i])[j]
        best_s, best_i = v, i
    seconds = time.perf_counter() - t
    return dict(seconds_subset=seconds, queries_timed=int(rows.numel()), median_s=seconds * n / rows.numel(),
                extrapolated=rows.numel() < n)  # fmt: skip


# --- checks ---


def rotate_queries64(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, o: int) -> torch.Tensor:
    """float64 rotated queries, for the brute force."""
    p = cos.shape[1]
    qa, qb = q[:, :p], q[:, p:2 * p]
    return torch.cat([qa * cos[o] - qb * sin[o], qb * cos[o] + qa * sin[o], q[:, 2 * p:]], 1)


def verify(n: int, d: int, cos, sin, kk: int, threads) -> dict:
    """offset_topk against the float64 brute force on n × n, both cases."""
    out = {}
    for case in CASES:
        x = inputs(case, n, d, cos, sin, seed=1)
        res = run_offset_topk(x, cos, sin, kk, threads)
        q, k, w = x["q"].double(), x["k"].double(), x["w"].double()
        best_s = torch.empty(0, dtype=torch.float64)
        best_i = torch.empty(0, dtype=torch.int64)
        arg_all = torch.empty(n * n, dtype=torch.int64)
        for r0 in range(0, n, 64):
            rows = torch.arange(r0, min(r0 + 64, n))
            a = torch.stack([rotate_queries64(q[rows], cos, sin, o) @ k.T for o in range(cos.shape[0])], 0) * w
            vals, arg = a.max(0)
            ids = (rows[:, None] * n + torch.arange(n)[None, :]).flatten()
            arg_all[ids] = arg.flatten()
            best_s, best_i = merge.top_flat(torch.cat([best_s, vals.flatten()]), torch.cat([best_i, ids]), kk)
        got_i = res.query_idx * n + res.key_idx
        tol = 1e-6 * float(best_s.abs().max())
        same_pairs = bool(torch.equal(got_i, best_i))
        out[case] = dict(n=n, k=kk, same_pairs_and_order=same_pairs,
                         max_score_diff=float((res.scores.double() - best_s).abs().max()),
                         same_offsets=bool(torch.equal(res.offset_idx, arg_all[best_i])) if same_pairs else None,
                         ok=bool((res.scores.double() - best_s).abs().max() <= tol) and same_pairs)  # fmt: skip
    return out


def full_size_check(res: engine.OffsetTopK, per_offset: dict, nk: int) -> dict:
    """offset_topk against the merged per-offset answer (float32 scores) at full size."""
    got = res.query_idx * nk + res.key_idx
    same = set(got.tolist()) == set(per_offset["ids"].tolist())
    return dict(same_pair_set=same, max_score_diff=float((res.scores - per_offset["scores"]).abs().max()))


# --- measuring ---


class Stats:
    """Counts what offset_topk did: the sizes of its pair_topk calls and the pairs it rescored."""

    def __enter__(self) -> "Stats":
        self.ranked, self.rescored, self.rescored64 = [], 0, 0
        self._rank, self._above = offsets.pair_topk, offsets._Problem.above
        stats = self

        def rank(q, k, m, **kw):
            stats.ranked.append((int(q.shape[0]), int(m)))
            return stats._rank(q, k, m, **kw)

        def above(problem, qi, ki, tau, k=None):
            pos, s = stats._above(problem, qi, ki, tau, k)
            stats.rescored += qi.numel()
            stats.rescored64 += pos.numel()
            return pos, s

        offsets.pair_topk, offsets._Problem.above = rank, above
        return self

    def __exit__(self, *exc) -> None:
        offsets.pair_topk, offsets._Problem.above = self._rank, self._above


def timed(fn, repeats: int) -> tuple[list[float], object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def pruned_share(x: dict, cos, sin, kth: float) -> float:
    """Share of all pairs whose bound lies below the final k-th score (they are never rescored)."""
    problem = offsets._build(x["q"], x["k"], x["w"], cos, sin, "signed", {})
    above = 0
    for r0 in range(0, problem.nq, 1024):
        above += int((problem.q_t[r0:r0 + 1024] @ problem.k_t.T >= kth).sum())
    return 1.0 - above / (problem.nq * problem.nk)


def markdown(report: dict) -> str:
    lines = ["| case | provider | median s | passes | note |", "|---|---|---:|---:|---|"]
    for case in report["cases"]:
        for name, r in case["results"].items():
            lines.append(f"| {case['case']} | {name} | {r['median_s']:.3f} | {r['passes']:.2f} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2,048² pairs, k=500: a smoke test")
    p.add_argument("--n", type=int, default=None, help="queries = keys (default 24576; 2048 with --quick)")
    p.add_argument("--k", type=int, default=None, help="global k (default 10000; 500 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--chunked-share", type=float, default=1 / 16, help="share of queries the torch brute force runs on")
    p.add_argument("--verify-n", type=int, default=1024, help="size of the float64 brute-force check (0: skip)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    n = args.n or (2048 if args.quick else 24576)
    kk = args.k or (500 if args.quick else 10_000)
    repeats = args.repeats or (1 if args.quick else 3)
    d, n_off, base = 64, 64, 10000.0
    cos, sin = tables(d, n_off, base)
    report = dict(benchmark="rotary", command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                  machine=machine(),
                  config=dict(n=n, d=d, rotary_dim=d, n_offsets=n_off, offsets="0..63", base=base, k=kk, score="signed",
                              weights="random N(0,1) value weights (A × V)", repeats=repeats, threads=args.threads,
                              quick=args.quick, chunked_share=args.chunked_share),
                  cases=[])  # fmt: skip
    for case in args.cases.split(","):
        x = inputs(case, n, d, cos, sin)
        pass_times, _ = timed(lambda: run_pass(x, kk, args.threads), repeats)
        with Stats() as st:
            run_offset_topk(x, cos, sin, kk, args.threads)
        off_times, res = timed(lambda: run_offset_topk(x, cos, sin, kk, args.threads), repeats)
        unit = statistics.median(pass_times)
        per_off_s, per_off = run_per_offset(x, cos, sin, kk, args.threads)
        chunked = run_torch_chunked(x, cos, sin, kk, args.chunked_share)
        kth = float(res.scores[-1])
        results = {
            "pass": dict(median_s=unit, times_s=pass_times, note="one offset-free pair_topk, global k"),
            "offset_topk": dict(median_s=statistics.median(off_times), times_s=off_times,
                                note=f"ranked {st.ranked} (rows, m) by pair_topk; rescored {st.rescored} pairs "
                                     f"(float64: {st.rescored64})"),
            "per_offset": dict(median_s=per_off_s, times_s=[per_off_s],
                               note=f"{n_off} pair_topk calls with rotated queries + merge, run once (all {n_off} calls)"),
            "torch_chunked": dict(median_s=chunked["median_s"], times_s=[chunked["seconds_subset"]],
                                  note=f"brute force on {chunked['queries_timed']} of {n} queries, time scaled by "
                                       f"{n / chunked['queries_timed']:.1f}" if chunked["extrapolated"] else "all queries"),
        }  # fmt: skip
        for r in results.values():
            r["passes"] = r["median_s"] / unit
        off_s = results["offset_topk"]["median_s"]
        report["cases"].append(dict(
            case=case, results=results,
            offset_topk_passes=off_s / unit,
            speedup_vs_per_offset=per_off_s / off_s, speedup_vs_torch_chunked=chunked["median_s"] / off_s,
            kth_score=kth, pruned_share=pruned_share(x, cos, sin, kth),
            ranked_calls=st.ranked, rescored_pairs=st.rescored, rescored_float64=st.rescored64,
            full_size_check_vs_per_offset=full_size_check(res, per_off, n),
        ))  # fmt: skip
        print(f"{case}: offset_topk {off_s:.3f} s = {off_s / unit:.2f} passes (pass {unit:.3f} s); "
              f"per-offset {per_off_s:.2f} s; torch chunked {chunked['median_s']:.1f} s", file=sys.stderr, flush=True)
    if args.verify_n:
        report["verify_float64"] = verify(args.verify_n, d, cos, sin, min(kk, args.verify_n), args.threads)
    report["goals"] = {c["case"]: dict(passes=c["offset_topk_passes"], goal=8 if c["case"] == "random" else 2,
                                       met=c["offset_topk_passes"] <= (8 if c["case"] == "random" else 2))
                       for c in report["cases"]}  # fmt: skip
    report["machine"]["load_average_end"] = os.getloadavg()
    write_report(args.out, report)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
