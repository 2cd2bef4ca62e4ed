"""The "cpu" backend (attnrules._C) against the float64 oracle: every mode, awkward shapes, threads, ISAs."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnrules import engine
from attnrules.engine import cpu_backend
from topk_oracle import assert_exact, assert_matches, random_inputs, score_matrix, tolerance

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(), reason="attnrules._C was not built")

# None of these is a multiple of a micro-tile (12 × 32 for AVX-512, 6 × 16 for AVX2, 4 × 16 portable).
SHAPES = [(1, 1, 3), (7, 5, 4), (37, 53, 16), (130, 70, 64)]
ISAS = cpu_backend.supported_isas()


def _ks(nq, nk, by):
    n = {"global": nq * nk, "query": nk, "key": nq}[by]
    return sorted({1, min(5, n), n})


def _same(a: engine.TopK, b: engine.TopK) -> bool:
    """Bit for bit: scores, indices and order."""
    return (
        torch.equal(a.scores, b.scores) and torch.equal(a.query_idx, b.query_idx) and torch.equal(a.key_idx, b.key_idx)
    )


def _check_result_types(res: engine.TopK, by: str, nq: int, nk: int, k: int) -> None:
    shape = {"global": (k,), "query": (nq, k), "key": (nk, k)}[by]
    assert res.by == by and res.scores.shape == shape
    assert res.scores.dtype == torch.float32
    assert res.query_idx.dtype == res.key_idx.dtype == torch.int64
    if by == "query":
        assert torch.equal(res.query_idx, torch.arange(nq)[:, None].expand(nq, k))
    if by == "key":
        assert torch.equal(res.key_idx, torch.arange(nk)[:, None].expand(nk, k))


@pytest.mark.parametrize("nq,nk,d", SHAPES)
@pytest.mark.parametrize("by", engine.BY_CHOICES)
@pytest.mark.parametrize("score", ["signed", "absolute", "exp"])
@pytest.mark.parametrize("weighted", [False, True])
def test_pair_topk_matches_float64(nq, nk, d, by, score, weighted):
    q, k, w, _, _ = random_inputs(nq, nk, d, seed=nq + nk)
    if score == "exp":  # keep exp() in range as REF's scores are (A is ~0.1 there)
        q, k = q / d, k / d
    w = w if weighted else None
    s = score_matrix(q, k, key_weight=w, score=score)
    for kk in _ks(nq, nk, by):
        one = engine.pair_topk(q, k, kk, by=by, key_weight=w, score=score, backend="cpu", threads=1)
        two = engine.pair_topk(q, k, kk, by=by, key_weight=w, score=score, backend="cpu", threads=2, block_q=12, block_k=32)
        _check_result_types(one, by, nq, nk, kk)
        assert_matches(one, s, kk, by, tol=tolerance(s, d))
        assert _same(one, two), "thread count or block size changed the answer"


@pytest.mark.parametrize("nq,nk,d", SHAPES)
@pytest.mark.parametrize("by", engine.BY_CHOICES)
@pytest.mark.parametrize("score", ["signed", "absolute"])
def test_dual_topk_matches_float64(nq, nk, d, by, score):
    q, k, _, qa, ka = random_inputs(nq, nk, d, n_ex=9, seed=3)
    s = score_matrix(q, k, score=score, query_acts=qa, key_acts=ka)
    for kk in _ks(nq, nk, by):
        one = engine.dual_topk(q, k, qa, ka, kk, by=by, score=score, backend="cpu", threads=1)
        two = engine.dual_topk(q, k, qa, ka, kk, by=by, score=score, backend="cpu", threads=2, block_q=24, block_k=32)
        _check_result_types(one, by, nq, nk, kk)
        assert_matches(one, s, kk, by, tol=tolerance(s, d) * 10)
        assert _same(one, two), "thread count or block size changed the answer"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_every_isa_matches_float64(isa, by):
    q, k, w, qa, ka = random_inputs(61, 83, 64, n_ex=100, seed=7)
    s = score_matrix(q, k, key_weight=w)
    res = engine.pair_topk(q, k, 17, by=by, key_weight=w, backend="cpu", isa=isa, threads=2)
    assert_matches(res, s, 17, by, tol=tolerance(s, 64))
    s = score_matrix(q / 8, k / 8, key_weight=w, score="exp")
    res = engine.pair_topk(q / 8, k / 8, 17, by=by, key_weight=w, score="exp", backend="cpu", isa=isa, threads=2)
    assert_matches(res, s, 17, by, tol=tolerance(s, 64))
    s = score_matrix(q, k, query_acts=qa, key_acts=ka, score="absolute")
    res = engine.dual_topk(q, k, qa, ka, 17, by=by, score="absolute", backend="cpu", isa=isa, threads=2)
    assert_matches(res, s, 17, by, tol=tolerance(s, 64) * 10)


@pytest.mark.skipif(not {"avx512", "avx2"} <= set(ISAS), reason="needs a CPU with AVX-512 and AVX2")
def test_avx2_and_avx512_agree_bit_for_bit():
    # Both accumulate each dot product with one fused multiply-add per term, in the same order.
    q, k, w, qa, ka = random_inputs(45, 77, 64, n_ex=30, seed=11)
    for by in engine.BY_CHOICES:
        for score in ["signed", "absolute", "exp"]:
            a, b = (engine.pair_topk(q / 8, k / 8, 9, by=by, key_weight=w, score=score, backend="cpu", isa=isa)
                    for isa in ("avx512", "avx2"))  # fmt: skip
            assert _same(a, b)
        a, b = (engine.dual_topk(q, k, qa, ka, 9, by=by, backend="cpu", isa=isa) for isa in ("avx512", "avx2"))
        assert _same(a, b)


@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_ties_broken_by_lower_index(by):
    # Small integers are exact in float32: many equal scores, including +0 and -0 (zero weights).
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-2, 3, (23, 3), generator=g).float()
    k = torch.randint(-2, 3, (19, 3), generator=g).float()
    w = torch.randint(-1, 2, (19,), generator=g).float()
    s = score_matrix(q, k, key_weight=w)
    n = {"global": 437, "query": 19, "key": 23}[by]
    for kk in _ks(23, 19, by) + [11]:
        for threads in (1, 2):
            res = engine.pair_topk(q, k, min(kk, n), by=by, key_weight=w, backend="cpu", threads=threads)
            assert_exact(res, s, res.scores.shape[-1], by)


def test_agrees_with_the_float64_oracle_at_d64():
    """Every pair the cpu backend returns is in the float64 oracle's top k, except pairs whose scores
    differ from the k-th by less than float32 rounding (assert_matches), and the scores agree."""
    q, k, w, _, _ = random_inputs(300, 500, 64, seed=2)
    s = score_matrix(q, k, key_weight=w)
    for by, kk in [("global", 1000), ("query", 50), ("key", 50)]:
        ref = engine.pair_topk(q.double(), k.double(), kk, by=by, key_weight=w.double(), backend="torch")
        res = engine.pair_topk(q, k, kk, by=by, key_weight=w, backend="cpu")
        np.testing.assert_allclose(res.scores.numpy(), ref.scores.numpy(), rtol=0, atol=1e-4)
        assert_matches(res, s, kk, by, tol=tolerance(s, 64))


@pytest.mark.parametrize("by", ["query", "key"])
def test_sampled_threshold_guess_never_changes_the_answer(by):
    q, k, w, qa, ka = random_inputs(150, 400, 16, n_ex=5, seed=4)
    # Sorted by norm, the first rows/cols score highest: a strided sample still sees them, but a
    # guess from the top of this ordering is too high for some rows, which are then redone.
    order = torch.argsort(q.norm(dim=1), descending=True)
    q, qa = q[order].contiguous(), qa[order].contiguous()
    s = score_matrix(q, k, key_weight=w)
    plain = engine.pair_topk(q, k, 20, by=by, key_weight=w, backend="cpu", sample_cols=0)
    assert_matches(plain, s, 20, by, tol=tolerance(s, 16))
    for sample in (16, 40, 100):
        guessed = engine.pair_topk(q, k, 20, by=by, key_weight=w, backend="cpu", sample_cols=sample, threads=2)
        assert _same(plain, guessed)
        guessed = engine.dual_topk(q, k, qa, ka, 20, by=by, backend="cpu", sample_cols=sample)
        assert _same(engine.dual_topk(q, k, qa, ka, 20, by=by, backend="cpu", sample_cols=0), guessed)


def test_a_biased_sample_forces_redo_and_stays_exact():
    # Every 10th key is huge: a stride-10 sample sees only those, so every row's guess is too high.
    from attnrules import _C

    q, k, _, _, _ = random_inputs(40, 300, 8, seed=6)
    q, k = q.abs().contiguous(), k.abs()
    k[::10] *= 50
    s = score_matrix(q, k)
    res = engine.pair_topk(q, k, 60, by="query", backend="cpu", sample_cols=30)
    assert_matches(res, s, 60, "query", tol=tolerance(s, 8))
    # the redo path really ran: every row was scored again (the counter of the core)
    out_s, out_c = torch.empty(40 * 60), torch.empty(40 * 60, dtype=torch.int64)
    stats = _C.topk(q, k.contiguous(), 60, True, "signed", out_scores=out_s, out_rows=None, out_cols=out_c,
                    sample_cols=30)
    assert stats["redone"] == 40
    assert torch.equal(out_s.view(40, 60), res.scores) and torch.equal(out_c.view(40, 60), res.key_idx)
    unbiased = _C.topk(q, k.contiguous(), 60, True, "signed", out_scores=out_s, out_rows=None, out_cols=out_c,
                       sample_cols=0)
    assert unbiased["redone"] == 0


def test_inputs_that_need_gradients_are_accepted():
    q, k, w, _, _ = random_inputs(20, 30, 8, seed=8)
    res = engine.pair_topk(q.requires_grad_(), k, 5, key_weight=w, backend="cpu")
    assert_matches(res, score_matrix(q, k, key_weight=w), 5, "global", tol=1e-4)


def test_overflow_to_nan_is_an_error():
    # The engine's NaN policy (the same on every backend: tests/test_engine_contract.py).
    q = torch.full((3, 2), 100.0)
    with pytest.raises(ValueError, match=r"pair \(query 0, key 0\) is NaN"):
        engine.pair_topk(q, q, 2, key_weight=torch.zeros(3), score="exp", backend="cpu")


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(queries=torch.randn(6, 4, dtype=torch.float64), keys=torch.randn(5, 4, dtype=torch.float64)), TypeError,
         "queries must be float32 for backend='cpu'"),
        (dict(keys=torch.randn(4, 5).T), ValueError, r"keys must be C-contiguous .* keys.contiguous\(\)"),
        (dict(key_weight=torch.randn(10)[::2]), ValueError, "key_weight must be C-contiguous"),
        (dict(threads=0), ValueError, "threads must be a positive int or None"),
        (dict(block_q=-3), ValueError, "block_q must be a positive int or None"),
        (dict(sample_cols=-1), ValueError, "sample_cols must be a non-negative int or None"),
        (dict(isa="neon"), ValueError, "isa must be one of"),
    ],
)  # fmt: skip
def test_rejects_with_a_clear_error(change, error, match):
    args = dict(queries=torch.randn(6, 4), keys=torch.randn(5, 4), k=3, backend="cpu")
    args.update(change)
    with pytest.raises(error, match=match):
        engine.pair_topk(**args)


def test_dual_rejects_non_contiguous_activations():
    q, k = torch.randn(6, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="key_acts must be C-contiguous"):
        engine.dual_topk(q, k, torch.rand(6, 7), torch.rand(7, 5).T, 2, backend="cpu")


def test_core_never_converts_its_inputs():
    # The binding itself refuses (rather than copies) float64 or strided arrays.
    from attnrules import _C

    out_s, out_r, out_c = torch.empty(2), torch.empty(2, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    for rows in (torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 6).T):
        with pytest.raises(TypeError):
            _C.topk(rows, torch.randn(5, 4), 2, False, "signed", out_scores=out_s, out_rows=out_r, out_cols=out_c)


def test_auto_picks_cpu_for_float32_cpu_tensors(monkeypatch):
    from attnrules.engine import cpu_backend, torch_backend

    assert "cpu" in engine.available_backends()
    ran = []
    for module in (cpu_backend, torch_backend):
        real = module.topk
        monkeypatch.setattr(module, "topk", lambda request, _real=real, _name=module.__name__, **o: ran.append(_name) or _real(request, **o))
    q, k, w, _, _ = random_inputs(30, 40, 8, seed=9)
    auto = engine.pair_topk(q, k, 7, key_weight=w)
    assert ran == ["attnrules.engine.cpu_backend"]
    assert _same(auto, engine.pair_topk(q, k, 7, key_weight=w, backend="cpu"))
    engine.pair_topk(q.double(), k.double(), 7, key_weight=w.double())  # float64: the torch reference
    assert ran[-1] == "attnrules.engine.torch_backend"


CSRC = Path(__file__).resolve().parents[1] / "csrc"


@pytest.mark.skipif(not CSRC.is_dir(), reason="the C++ sources are not here")
def test_csrc_comments_cite_files_that_exist():
    # A file named in a comment of csrc/ (e.g. "the driver (topk.cpp)", "kernel_*.cpp") must be there.
    cited = set()
    for path in sorted(CSRC.iterdir()):
        text = path.read_text()
        comments = re.findall(r"//[^\n]*|/\*.*?\*/", text, flags=re.S)
        for name in re.findall(r"[\w*]+\.(?:cpp|h|inc)\b", "\n".join(comments)):
            cited.add(name)
            assert list(CSRC.glob(name)), f"{path.name} cites {name}, which is not in csrc/"
    assert {"topk.cpp", "engine.h", "kernel_*.cpp"} <= cited


# Runs in a child process: before the fix an exception leaving an OpenMP region called std::terminate.
_THROW_IN_PARALLEL = """
import torch
from attnrules import _C

g = torch.Generator().manual_seed(0)
rows, cols = torch.randn(300, 16, generator=g), torch.randn(200, 16, generator=g)

def call(per_row, threads, **hook):
    k = 7
    n = 300 * k if per_row else k
    s, r, c = torch.empty(n), torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    _C.topk(rows, cols, k, per_row, "signed", out_scores=s, out_rows=None if per_row else r, out_cols=c,
            threads=threads, block_rows=12, block_cols=32, **hook)
    return s, c

for per_row in (False, True):
    for threads in (1, 2):
        before = call(per_row, threads)
        for kind, error, match in [("bad_alloc", MemoryError, "out of memory"),
                                   ("runtime_error", RuntimeError, "test hook")]:
            try:
                call(per_row, threads, test_throw=kind)
            except error as e:
                assert match in str(e), (kind, str(e))
            else:
                raise AssertionError(f"test_throw={kind!r} raised nothing")
        after = call(per_row, threads)  # the engine still works, with the same answer
        assert all(torch.equal(a, b) for a, b in zip(before, after))
try:
    call(False, 2, test_throw="segfault")
except ValueError as e:
    assert "test_throw" in str(e)
print("survived")
"""


def test_exception_in_a_parallel_region_reaches_python():
    done = subprocess.run([sys.executable, "-c", _THROW_IN_PARALLEL], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit status {done.returncode} (negative: killed by a signal)\n{done.stderr}"
    assert done.stdout.strip() == "survived"


def _global(q, k, kk, *, threads, share=True, block_rows=0, block_cols=0):
    """_C.topk by="global" with its stats: (scores, rows, cols, stats)."""
    from attnrules import _C

    s, r, c = torch.empty(kk), torch.empty(kk, dtype=torch.int64), torch.empty(kk, dtype=torch.int64)
    stats = _C.topk(q, k, kk, False, "signed", out_scores=s, out_rows=r, out_cols=c, threads=threads,
                    block_rows=block_rows, block_cols=block_cols, share_threshold=share)  # fmt: skip
    return s, r, c, stats


def test_global_shared_threshold_keeps_the_exact_answer_with_ties():
    # Small integers: exact float32 scores with many ties at every k-th score, so the shared threshold
    # must keep each score equal to it for the lower (query, key) to win.
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-2, 3, (301, 3), generator=g).float()
    k = torch.randint(-2, 3, (257, 3), generator=g).float()
    s = score_matrix(q, k)
    for kk in (1, 37, 1000, 5000):
        ref = engine.pair_topk(q, k, kk, backend="torch")
        assert_exact(ref, s, kk, "global")
        for threads in (1, 2, 3, 4, 8):
            for share in (True, False):
                got = _global(q, k, kk, threads=threads, share=share, block_rows=12, block_cols=32)
                res = engine.TopK(got[0], got[1], got[2], "global")
                assert _same(res, ref), (kk, threads, share)
            res = engine.pair_topk(q, k, kk, backend="cpu", threads=threads)
            assert _same(res, ref), (kk, threads)


def test_global_threads_share_one_threshold():
    # Alone, each thread collects 2k candidates before it can prune and then prunes with the k-th best
    # of its own half; with the shared threshold both prune with a bound from both halves. Measured on
    # a quiet 2-core machine: ~23.4k pushed shared against ~28.1k alone (15.2k with one thread); on a
    # loaded one, where the threads run in turn, the shared count falls towards the one-thread count.
    q, k, _, _, _ = random_inputs(4096, 4096, 16, seed=12)
    one = _global(q, k, 1000, threads=1)
    for attempt in range(6):  # work is shared out at run time: retry if the OS ran one thread only
        shared = _global(q, k, 1000, threads=2)
        alone = _global(q, k, 1000, threads=2, share=False)
        assert all(torch.equal(a, b) for a, b in zip(shared[:3], alone[:3])), "sharing changed the answer"
        assert all(torch.equal(a, b) for a, b in zip(shared[:3], one[:3])), "the thread count changed the answer"
        if shared[3]["pushed"] < 0.9 * alone[3]["pushed"] and shared[3]["selections"] < alone[3]["selections"]:
            break
    else:
        raise AssertionError(f"no fewer candidates pushed with the shared threshold: {shared[3]} vs {alone[3]}")
    assert one[3]["pushed"] > 0 and one[3]["selections"] > 0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("nq,nk,d,k,sample", [(300, 70, 9, 20, None), (300, 70, 9, 20, 40), (37, 29, 5, 37, None),
                                              (5000, 40, 64, 100, None)])  # fmt: skip
def test_both_sides_in_one_sweep_equal_two_per_key_passes(isa, nq, nk, d, k, sample):
    """cpu_backend.per_key_both_sides: each key's best queries by A and by -A, bit for bit the per-key
    pass on queries and on -queries, and the float64 oracle's."""
    q, kk, _, _, _ = random_inputs(nq, nk, d, seed=nq + k)
    high, low = _sides(q, kk, k, isa=isa, sample_cols=sample)
    assert _same(high, engine.pair_topk(q, kk, k, by="key", backend="cpu", isa=isa))
    assert _same(low, engine.pair_topk(-q, kk, k, by="key", backend="cpu", isa=isa))
    assert_matches(low, score_matrix(-q, kk), k, "key", tol=tolerance(score_matrix(q, kk), d))


def _sides(q, kk, k, **options) -> tuple[engine.TopK, engine.TopK]:
    scores, picked = cpu_backend.per_key_both_sides(q, kk, k, **options)
    assert scores.shape == picked.shape == (2, kk.shape[0], k)
    fixed = torch.arange(kk.shape[0])[:, None].expand(-1, k)
    return tuple(engine.TopK(scores[side], picked[side], fixed, "key") for side in (0, 1))


def test_both_sides_ties_and_a_biased_sample_redo():
    """Integer inputs (exact, many ties: by the lower query on both sides), and a sample that sees only
    huge queries, so that every key's guess is too high and both its sides are scored again."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-2, 3, (400, 6), generator=g).float()
    kk = torch.randint(-2, 3, (30, 6), generator=g).float()
    high, low = _sides(q, kk, 50, sample_cols=40)
    assert_exact(high, score_matrix(q, kk), 50, "key")
    assert_exact(low, score_matrix(-q, kk), 50, "key")
    biased = q.abs()
    biased[::10] *= 50  # a stride-10 sample sees only these: every guess is too high
    kk = kk.abs() + 1
    high, low = _sides(biased, kk, 60, sample_cols=40)
    assert_exact(high, score_matrix(biased, kk), 60, "key")
    assert_exact(low, score_matrix(-biased, kk), 60, "key")


@pytest.mark.parametrize("prefix", [1, 5, 49, 50, 80])
def test_both_sides_sorted_prefix_keeps_the_set(prefix):
    """sorted_prefix: the same k entries per row, the best `prefix` sorted first, the rest all below them."""
    q, kk, _, _, _ = random_inputs(400, 30, 8, seed=prefix)
    full_s, full_q = cpu_backend.per_key_both_sides(q, kk, 50)
    part_s, part_q = cpu_backend.per_key_both_sides(q, kk, 50, sorted_prefix=prefix)
    n = min(prefix, 50)
    assert torch.equal(part_s[..., :n], full_s[..., :n]) and torch.equal(part_q[..., :n], full_q[..., :n])
    assert torch.equal(part_s.sort(dim=-1).values, full_s.sort(dim=-1).values)
    assert torch.equal(part_q.sort(dim=-1).values, full_q.sort(dim=-1).values)
    if n < 50:
        assert bool((part_s[..., n:] <= part_s[..., n - 1 : n]).all())
