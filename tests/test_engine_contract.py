"""The engine contract across backends: one option vocabulary, the capability table, one NaN policy,
one merge. Every backend available here runs the same calls (Triton in its interpreter)."""
import inspect

import numpy as np
import pytest
import torch

from attnrules import engine
from attnrules.engine import contract, cpu_backend, merge, torch_backend, triton_backend
from attnrules.kernels import plan, topk_stream
from attnrules.kernels.pair_topk import pair_candidates
from topk_oracle import assert_exact, expected_topk, random_inputs, score_matrix

BACKENDS = engine.available_backends()


def _same(a: engine.TopK, b: engine.TopK) -> bool:
    return (torch.equal(a.scores, b.scores) and torch.equal(a.query_idx, b.query_idx)
            and torch.equal(a.key_idx, b.key_idx))  # fmt: skip


def _integer_inputs(nq=23, nk=19, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (nq, d), generator=g).float()
    k = torch.randint(-2, 3, (nk, d), generator=g).float()
    w = torch.randint(-1, 2, (nk,), generator=g).float()
    return q, k, w


# ------------------------------------------------------------------------------ option vocabulary


@pytest.mark.parametrize("name", engine.BACKENDS)
def test_each_backend_takes_exactly_the_options_of_its_row(name):
    module = {"torch": torch_backend, "cpu": cpu_backend, "triton": triton_backend}[name]
    params = inspect.signature(module.topk).parameters
    taken = {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    assert taken == set(engine.CAPABILITIES[name].accepted_options())
    assert {"block_q", "block_k"} <= taken


@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_one_vocabulary_gives_one_answer_on_every_backend(by):
    q, k, w = _integer_inputs()
    s = score_matrix(q, k, key_weight=w)
    for backend in BACKENDS:
        res = engine.pair_topk(q, k, 7, by=by, key_weight=w, backend=backend, block_q=16, block_k=32)
        assert_exact(res, s, 7, by)


def test_unknown_option_names_it_and_the_accepted_ones():
    q, k, _ = _integer_inputs()
    for backend in ["auto", *engine.BACKENDS]:
        with pytest.raises(ValueError, match=r"unknown option 'block_r': every backend accepts block_q, block_k; "
                                             r"backend-specific options are \(torch: none; cpu: threads, isa, "
                                             r"sample_cols; triton: precision, n_splits, program_k\)"):
            engine.pair_topk(q, k, 3, backend=backend, block_r=16)


def test_another_backends_option_is_an_error_when_named_and_ignored_under_auto():
    q, k, _ = _integer_inputs()
    with pytest.raises(ValueError, match="option 'threads' applies to backend 'cpu', not 'torch'; "
                                         "backend 'torch' accepts block_q, block_k"):
        engine.pair_topk(q, k, 3, backend="torch", threads=2)
    with pytest.raises(ValueError, match="option 'precision' applies to backend 'triton', not 'torch'"):
        engine.dual_topk(q, k, q, k, 3, backend="torch", precision="tf32")
    # float64 on CPU: auto takes torch and drops the cpu / triton tuning that came along.
    res = engine.pair_topk(q.double(), k.double(), 3, threads=2, precision="tf32", program_k=8)
    assert _same(res, engine.pair_topk(q.double(), k.double(), 3, backend="torch"))


def test_block_sizes_are_checked_alike_on_every_backend():
    q, k, _ = _integer_inputs()
    for backend in ["auto", *BACKENDS]:
        for bad in (0, -3, 2.5, True):
            with pytest.raises(ValueError, match="block_q must be a positive int or None"):
                engine.pair_topk(q, k, 3, backend=backend, block_q=bad)


def test_numpy_integers_are_accepted_for_k_and_options():
    q, k, w = _integer_inputs()
    s = score_matrix(q, k, key_weight=w)
    for backend in BACKENDS:
        for by in engine.BY_CHOICES:
            res = engine.pair_topk(q, k, np.int64(5), by=by, key_weight=w, backend=backend,
                                   block_q=np.int32(16), block_k=np.int64(16))  # fmt: skip
            assert_exact(res, s, 5, by)
            assert res.scores.shape[-1] == 5


# -------------------------------------------------------------------------------- capability table


def test_the_table_matches_the_kernels_limits():
    assert engine.CAPABILITIES["triton"].max_k_per_row == plan.MAX_ROW_K
    assert set(engine.CAPABILITIES) == set(engine.BACKENDS)
    for cap in engine.CAPABILITIES.values():
        assert cap.dual and set(cap.scores) == set(engine.SCORE_CHOICES)


def test_capabilities_say_what_runs_here():
    caps = engine.capabilities()
    assert caps["torch"].available and caps["torch"].devices_here == (contract.ANY_DEVICE,)
    assert caps["triton"].available and "cpu" in caps["triton"].devices_here  # the interpreter (conftest)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in caps["triton"].why_not["cuda"]
    assert sorted(engine.available_backends()) == sorted(n for n, c in caps.items() if c.available)


def test_triton_on_cpu_tensors_without_the_interpreter_says_so(monkeypatch):
    q, k, _ = _integer_inputs()
    monkeypatch.setattr(topk_stream, "INTERPRETED", False)
    assert "TRITON_INTERPRET=1" in engine.capabilities()["triton"].why_not["cpu"]
    with pytest.raises(ValueError, match="backend 'triton' cannot run on cpu tensors here"):
        engine.pair_topk(q, k, 3, backend="triton")
    assert _same(engine.pair_topk(q, k, 3), engine.pair_topk(q, k, 3, backend="cpu"))  # auto is unaffected


def test_auto_never_picks_the_interpreter_and_falls_back_by_the_table(monkeypatch):
    q, k, w = _integer_inputs()
    calls = []
    real = triton_backend.topk
    monkeypatch.setattr(triton_backend, "topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    engine.pair_topk(q, k, 3, key_weight=w)
    assert not calls, "auto ran the Triton interpreter on CPU tensors"
    # Without the C++ core, auto takes the reference; naming "cpu" says what is missing.
    monkeypatch.setattr(cpu_backend, "is_available", lambda: False)
    assert not engine.capabilities()["cpu"].available
    assert _same(engine.pair_topk(q, k, 3, key_weight=w), engine.pair_topk(q, k, 3, key_weight=w, backend="torch"))
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available here: it needs attnrules._C"):
        engine.pair_topk(q, k, 3, backend="cpu")


def test_named_backend_refusals_come_from_the_table():
    q, k, _, _, _ = random_inputs(20, 1100, 4, seed=0)
    with pytest.raises(ValueError, match="k=1025 is above the per-row limit of 1024 of backend 'triton'"):
        engine.pair_topk(q, k, 1025, by="query", backend="triton")
    engine.pair_topk(q, k, 1025, by="query")  # auto: the CPU core has no such limit
    with pytest.raises(TypeError, match="queries must be float32 for backend='cpu', got torch.float64"):
        engine.pair_topk(q.double(), k.double(), 3, backend="cpu")


def test_auto_copies_non_contiguous_float32_views():
    q, k, w, qa, ka = random_inputs(30, 40, 8, n_ex=5, seed=9)
    kt = k.T.contiguous().T  # same values, column-major
    wv = torch.stack([w, w], 1)[:, 0]  # strided view
    assert not kt.is_contiguous() and not wv.is_contiguous()
    ref = engine.pair_topk(q, k, 7, key_weight=w, backend="cpu")
    assert _same(engine.pair_topk(q, kt, 7, key_weight=wv), ref)
    assert _same(engine.dual_topk(q, kt, qa, ka.T.contiguous().T, 7), engine.dual_topk(q, k, qa, ka, 7, backend="cpu"))
    with pytest.raises(ValueError, match=r"keys must be C-contiguous for backend='cpu' \(inputs are never copied\)"):
        engine.pair_topk(q, kt, 7, backend="cpu")


# ------------------------------------------------------------------------------------ NaN policy

NAN_CASES = {
    # exp(q·k) = exp(200) overflows float32; key 1 has weight 0: inf × 0.
    "exp_overflow_times_zero_weight": dict(
        queries=torch.tensor([[10.0, 0.0], [0.0, 0.1], [10.0, 10.0]]),
        keys=torch.tensor([[0.1, 0.1], [20.0, 0.0], [0.0, 0.2], [10.0, 10.0]]),
        key_weight=torch.tensor([1.0, 0.0, 2.0, 0.0]),
        score="exp",
        pair=(0, 1),
    ),
    # q·k = 1e40 overflows float32 to inf; key 2 has weight 0: inf × 0.
    "dot_overflow_times_zero_weight": dict(
        queries=torch.tensor([[0.0, 1.0], [1e20, 1e20], [1.0, 1.0]]),
        keys=torch.tensor([[1.0, 0.0], [0.5, 0.5], [1e20, 1e20]]),
        key_weight=torch.tensor([1.0, -1.0, 0.0]),
        score="signed",
        pair=(1, 2),
    ),
}


@pytest.mark.parametrize("case", sorted(NAN_CASES))
@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_a_nan_score_is_the_same_error_on_every_backend(case, by):
    c = dict(NAN_CASES[case])
    pair = c.pop("pair")
    messages = {}
    for backend in ["auto", *BACKENDS]:
        for score in ([c["score"], "absolute"] if c["score"] == "signed" else [c["score"]]):
            args = dict(c, score=score)
            with pytest.raises(ValueError) as err:
                engine.pair_topk(k=2, by=by, backend=backend, **args)
            messages[(backend, score)] = str(err.value)
    for (backend, score), message in messages.items():
        assert f"pair_topk(score={score!r}, by={by!r})" in message
        assert f"the score of pair (query {pair[0]}, key {pair[1]}) is NaN" in message, message
        assert f"key_weight[{pair[1]}] = 0" in message
        assert message == messages[("auto", score)], backend


@pytest.mark.parametrize("by", engine.BY_CHOICES)
def test_dual_overflow_nan_is_the_same_error_on_every_backend(by):
    q = torch.tensor([[1.0, 0.0], [1e20, 1e20]])
    k = torch.tensor([[1.0, 1.0], [1e20, 1e20], [0.0, 1.0]])
    qa = torch.tensor([[1.0], [0.0]])
    ka = torch.tensor([[1.0], [1.0], [2.0]])
    messages = set()
    for backend in ["auto", *BACKENDS]:
        with pytest.raises(ValueError, match=r"dual_topk\(score='signed'.*pair \(query 1, key 1\) is NaN: "
                                             r"queries\[1\]·keys\[1\] = inf times query_acts\[1\]·key_acts\[1\] = 0"):
            engine.dual_topk(q, k, qa, ka, 2, by=by, backend=backend)
        try:
            engine.dual_topk(q, k, qa, ka, 2, by=by, backend=backend)
        except ValueError as e:
            messages.add(str(e))
    assert len(messages) == 1


@pytest.mark.parametrize("by", engine.BY_CHOICES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow in the interpreter
def test_infinite_scores_rank_the_same_on_every_backend(by):
    # exp(200) = inf without a zero weight: ±inf are numbers, ties by the lower index.
    q = torch.tensor([[10.0, 10.0], [1.0, 0.0], [10.0, 10.0]])
    k = torch.tensor([[10.0, 0.0], [0.0, 0.1], [10.0, 10.0], [0.0, 10.0]])
    w = torch.tensor([0.5, 1.0, -2.0, 3.0])
    n = {"global": 12, "query": 4, "key": 3}[by]
    results = [engine.pair_topk(q, k, n, by=by, key_weight=w, score="exp", backend=b) for b in BACKENDS]
    assert torch.isinf(results[0].scores).any()
    for res in results[1:]:
        assert torch.equal(res.query_idx, results[0].query_idx) and torch.equal(res.key_idx, results[0].key_idx)
        np.testing.assert_allclose(res.scores.numpy(), results[0].scores.numpy(), rtol=1e-6)


def test_large_but_finite_scores_are_not_scanned_or_refused():
    q, k, w, _, _ = random_inputs(20, 30, 8, seed=3)
    w[::3] = 0.0  # zero weights, but exp(q·k) stays far below the overflow bound
    request = contract._check_request(q / 4, k / 4, 5, "global", "exp", w, None, None)
    assert contract._could_be_nan(request) == (False, None)
    big = contract._check_request(q * 100, k, 5, "global", "exp", w, None, None)
    possible, keys = contract._could_be_nan(big)
    assert possible and torch.equal(keys, torch.nonzero(w == 0).flatten())  # only the zero-weight keys


def test_a_nan_that_a_backend_computes_is_refused_after_it_runs():
    # Backstop: a result holding a NaN raises the same error even if the reference saw none.
    q, k, _ = _integer_inputs()
    request = contract._check_request(q, k, 2, "global", "signed", None, None, None)
    bad = engine.TopK(torch.tensor([float("nan"), 1.0]), torch.tensor([3, 0]), torch.tensor([4, 1]), "global")
    with pytest.raises(ValueError, match=r"pair \(query 3, key 4\) is NaN"):
        contract._check_result(request, bad)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow in the interpreter
def test_kernel_ranks_any_nan_first():
    # inf × 0 on this CPU gives a NaN with the sign bit set; the kernel folds every NaN above +inf so
    # that it reaches the engine's check instead of dropping out of the top k.
    rows = torch.tensor([[1.0, 1.0], [1e20, 1e20]])
    cols = torch.tensor([[1.0, 1.0], [1e20, 1e20], [2.0, 2.0]])
    w = torch.tensor([1.0, 0.0, 1.0])
    found = triton_backend.global_candidates(
        pair_candidates(rows, cols, 1, per_row=False, col_weight=w, block_r=16, block_c=16))
    s, r, c = merge.top_pairs(found.scores, found.rows, found.cols, 3, 1)
    assert torch.isnan(s).all() and (r.item(), c.item()) == (1, 1)
    rows_found = triton_backend.row_candidates(
        pair_candidates(rows, cols, 1, per_row=True, col_weight=w, block_r=16, block_c=16))
    s, c = merge.top_per_row(rows_found.scores, rows_found.cols, 1, valid=rows_found.valid)
    assert torch.isnan(s[1, 0]) and c[1, 0] == 1 and c[0, 0] == 2


# ----------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_is_the_contract_order(dtype):
    g = torch.Generator().manual_seed(0)
    s = torch.randint(-3, 4, (9, 40), generator=g).to(dtype)
    s[s == 0] = torch.where(torch.rand(int((s == 0).sum()), generator=g) < 0.5, -0.0, 0.0).to(dtype)
    oracle = s.double().numpy()
    exp_s, exp_q, exp_k = expected_topk(oracle, 25, "global")
    # Candidates in a scrambled order, as programs and tiles deliver them.
    perm = torch.randperm(s.numel(), generator=g)
    rows, cols = torch.arange(9).repeat_interleave(40)[perm], torch.arange(40).repeat(9)[perm]
    got_s, got_r, got_c = merge.top_pairs(s.flatten()[perm], rows, cols, 40, 25)
    np.testing.assert_array_equal(got_r.numpy(), exp_q)
    np.testing.assert_array_equal(got_c.numpy(), exp_k)
    np.testing.assert_array_equal(got_s.double().numpy(), exp_s)
    exp_s, _, exp_c = expected_topk(oracle, 6, "query")
    col_perm = torch.randperm(40, generator=g)
    valid = torch.ones(9, 41, dtype=torch.bool)
    valid[:, -1] = False  # an empty slot, with a score that would otherwise win
    sc = torch.cat([s[:, col_perm], torch.full((9, 1), 99.0, dtype=dtype)], 1)
    cc = torch.cat([col_perm.expand(9, -1), torch.zeros(9, 1, dtype=torch.int64)], 1)
    got_s, got_c = merge.top_per_row(sc, cc, 6, valid=valid)
    np.testing.assert_array_equal(got_c.numpy(), exp_c)
    np.testing.assert_array_equal(got_s.double().numpy(), exp_s)


def test_merge_packing_round_trips_in_the_contract_order():
    g = torch.Generator().manual_seed(1)
    scores = torch.cat([torch.randn(1000, generator=g) * 1e3, torch.tensor([0.0, -0.0, float("inf"), -float("inf")])])
    index = torch.randint(0, 2**32 - 1, scores.shape, generator=g)
    keys = merge.pack_float32(scores, index)
    s1, i1 = merge.unpack_float32(keys)  # the one decoder, also of the Triton kernels' buffers
    assert torch.equal(i1, index)
    assert torch.equal(s1, torch.where(scores == 0, 0.0, scores))
    order = torch.argsort(keys, descending=True)
    assert torch.all(scores[order][:-1] >= scores[order][1:])


def test_plan_reads_the_sm_count(monkeypatch):
    monkeypatch.setattr(topk_stream, "INTERPRETED", False)
    monkeypatch.setattr(plan, "sm_count", lambda device: 8)
    gpu = torch.device("cuda")  # only named: sm_count is replaced
    p = plan.plan(n_rows=64, n_cols=100_000, d=64, k=10, global_mode=True, block_r=64, block_c=64, device=gpu)
    assert p.grid == (1, 4 * 8)  # PROGRAMS_PER_SM × SMs programs for one row block
    monkeypatch.setattr(plan, "sm_count", lambda device: 100)
    assert plan.plan(n_rows=64, n_cols=100_000, d=64, k=10, global_mode=True, block_r=64, block_c=64,
                     device=gpu).n_splits > 32
