"""Closed-form importances against an autograd oracle that builds REF's surrogate with a mask."""
import dataclasses

import pytest
import torch

from attnrules.circuit import HeadCircuit
from attnrules.importance import (
    exemplar_factors_all_pairs,
    paper_importance,
    rank_all_pairs_by_importance,
    select_terms,
)
from attnrules.engine import available_backends
from topk_oracle import assert_matches, score_matrix


def random_circuit(n_in=40, d_model=12, d_head=5, n_out=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype) / s[0] ** 0.5  # noqa: E731
    return HeadCircuit.from_tensors(r(n_in, d_model), r(d_model, d_head), r(d_model, d_head), r(d_model, d_head),
                                    r(d_head, n_out), r(n_out), layer=1, head=2)


def random_acts(n=7, t=9, n_in=40, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(n, t, n_in, generator=g, dtype=dtype)
    acts = acts * (torch.rand(n, t, n_in, generator=g, dtype=dtype) < 0.3)  # sparse, like SAE activations
    positions = torch.randint(0, t, (n,), generator=g)
    return acts, positions


def autograd_importance(circuit, feature, queries, keys, acts, positions, loss_type="activation"):
    """REF's eval_at_position, literally: an explicit mask parameter and backward per example; REF's
    mask is [keys, queries], returned transposed as [queries, keys], attnrules' one order."""
    kq = circuit.key_proj[keys] @ circuit.query_proj[queries].T
    dv = circuit.value_proj[keys]
    w, b = circuit.out_encoder[:, feature], circuit.out_bias[feature]
    mask = torch.ones_like(kq, requires_grad=True)
    for f, t in zip(acts, positions.tolist()):
        qa, ka = f[t, queries], f[: t + 1, keys]
        vv = ka @ dv
        logits = (torch.einsum("nk,q->nkq", ka, qa) * (kq * mask)[None]).reshape(t + 1, -1).sum(-1)
        pred = (logits.softmax(-1) @ vv) @ w
        if loss_type == "post_activation":
            pred = torch.relu(pred + b)
        pred.backward()
    return mask.grad.T


@pytest.mark.parametrize("loss_type", ["activation", "post_activation"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_equals_autograd(loss_type, seed):
    circuit = random_circuit(seed=seed)
    # bias 0: the ReLU of the post_activation loss is open for some exemplars and closed for others
    circuit = dataclasses.replace(circuit, out_bias=torch.zeros_like(circuit.out_bias))
    acts, positions = random_acts(n=30, seed=seed + 10)
    keys = torch.tensor([3, 0, 17, 25, 8, 39])
    queries = torch.tensor([5, 3, 30, 11])
    got = paper_importance(circuit, 2, queries, keys, acts, positions, loss_type=loss_type)
    want = autograd_importance(circuit, 2, queries, keys, acts, positions, loss_type)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)


def test_single_key_or_query_keeps_its_dimension():
    # REF's mask.grad.squeeze() drops a dimension when |K| or |Q| is 1; ours does not.
    circuit = random_circuit()
    acts, positions = random_acts()
    got = paper_importance(circuit, 0, torch.tensor([9, 2]), torch.tensor([4]), acts, positions)
    assert got.shape == (2, 1)
    torch.testing.assert_close(got, autograd_importance(circuit, 0, torch.tensor([9, 2]), torch.tensor([4]), acts, positions))


def test_all_pairs_factors_reproduce_the_full_cross_product():
    circuit = random_circuit()
    acts, positions = random_acts()
    everything = torch.arange(circuit.n_inputs)
    full = paper_importance(circuit, 1, everything, everything, acts, positions)  # [queries, keys]
    qa, ka = exemplar_factors_all_pairs(circuit, 1, acts, positions)
    s = score_matrix(circuit.query_proj, circuit.key_proj, query_acts=qa, key_acts=ka)  # [queries, keys]
    torch.testing.assert_close(torch.from_numpy(s), full, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("score", ["signed", "absolute"])
def test_exhaustive_ranking_matches_float64_oracle(score):
    c64 = random_circuit()
    c32 = HeadCircuit(*(getattr(c64, f).float() for f in ("query_proj", "key_proj", "value_proj", "out_encoder", "out_bias")))
    acts, positions = random_acts()
    res = rank_all_pairs_by_importance(c32, 3, acts.float(), positions, 50, score=score, backend="torch")
    qa, ka = exemplar_factors_all_pairs(c64, 3, acts, positions)
    s = score_matrix(c64.query_proj, c64.key_proj, query_acts=qa, key_acts=ka, score=score)
    assert_matches(res, s, 50, "global", tol=1e-4 * float(abs(s).max()))


def test_select_terms_follows_ref():
    imp = torch.tensor([[0.5, -0.9, 0.0], [0.2, 0.2, -0.1]])
    assert select_terms(imp, 2).tolist() == [[True, True, False], [False, False, False]]
    assert select_terms(imp, 2, absolute=False).tolist() == [[True, False, False], [False, False, False]]
    # ties at the threshold: fewer than N terms, as REF
    assert select_terms(imp, 3).sum() == 2
    assert select_terms(imp, 6).all()
    with pytest.raises(ValueError, match="n must be a positive"):
        select_terms(imp, 0)


def test_bad_exemplars_are_rejected():
    circuit = random_circuit()
    acts, positions = random_acts()
    keys = queries = torch.arange(3)
    with pytest.raises(ValueError, match="acts must be"):
        paper_importance(circuit, 0, queries, keys, acts[:, :, :5], positions)
    with pytest.raises(ValueError, match="positions must be"):
        paper_importance(circuit, 0, queries, keys, acts, positions[:3])
    with pytest.raises(ValueError, match="positions must lie in"):
        paper_importance(circuit, 0, queries, keys, acts, positions + 100)
    with pytest.raises(ValueError, match="feature must be an output-feature index"):
        paper_importance(circuit, 6, keys, queries, acts, positions)
    with pytest.raises(ValueError, match="loss_type must be"):
        paper_importance(circuit, 0, queries, keys, acts, positions, loss_type="mse")
    bad = acts.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="acts contains NaN"):
        paper_importance(circuit, 0, queries, keys, bad, positions)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if "cpu" in available_backends() else []))
@pytest.mark.parametrize("k", [1, 60, "every live pair", 5000])
def test_exhaustive_ranking_over_live_features_equals_the_full_ranking(backend, k, monkeypatch):
    """|importance| is ranked among the features with a nonzero factor (every other pair's is exactly 0):
    the same pairs, scores and tie order as the full ranking, on integer (tie-heavy) and random inputs;
    the full ranking when the live pairs are fewer than k (5000) or the k-th of them scores 0."""
    import attnrules.importance.paper as paper

    calls = []
    real = paper.engine.dual_topk
    monkeypatch.setattr(paper.engine, "dual_topk", lambda q, *a, **kw: calls.append(len(q)) or real(q, *a, **kw))
    for integer in (True, False):
        circuit = random_circuit(n_in=120, dtype=torch.float32)
        if integer:  # signs and 0/1 activations: many equal scores
            circuit = dataclasses.replace(circuit, query_proj=circuit.query_proj.sign(), key_proj=circuit.key_proj.sign())
        acts, positions = random_acts(n=6, t=8, n_in=120, dtype=torch.float32)
        acts[:, :, 90:] = 0.0  # features never active: dead queries and keys
        if integer:
            acts = (acts > 0.5).float()
        qa, ka = exemplar_factors_all_pairs(circuit, 2, acts, positions)
        live = int(qa.any(1).sum()) * int(ka.any(1).sum())
        kk = live if k == "every live pair" else k
        calls.clear()
        got = rank_all_pairs_by_importance(circuit, 2, acts, positions, kk, backend=backend)
        full = real(circuit.query_proj, circuit.key_proj, qa, ka, kk, score="absolute", backend=backend)
        assert torch.equal(got.scores, full.scores) and torch.equal(got.query_idx, full.query_idx)
        assert torch.equal(got.key_idx, full.key_idx)
        if kk > live:
            assert calls == [120]  # the full ranking only
        else:  # the live pairs first; the full ranking too only when the k-th live score is 0
            assert calls[0] < 120 and len(calls) == (1 if float(full.scores.min()) > 0 else 2), calls
