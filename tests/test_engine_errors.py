"""Bad input to the engine gets a clear error that names the argument."""
import pytest
import torch

from attnrules import engine


def _qk():
    return torch.randn(6, 4), torch.randn(5, 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(queries=torch.randn(6)), "queries must be 2-D"),
        (dict(keys=torch.randn(5, 3)), "keys must have 4 columns"),
        (dict(keys=torch.randn(5, 4, dtype=torch.float64)), "keys has dtype"),
        (dict(queries=torch.randn(6, 4).half(), keys=torch.randn(5, 4).half()), "queries must be float32"),
        (dict(queries=torch.full((6, 4), float("nan"))), "queries contains NaN"),
        (dict(key_weight=torch.tensor([1.0, float("nan"), 0, 0, 0])), "key_weight contains NaN"),
        (dict(key_weight=torch.randn(4)), r"key_weight must have shape \[5\]"),
        (dict(k=31), r"k=31 is larger than the number of candidates \(30\)"),
        (dict(k=6, by="query"), r"k=6 is larger than the number of candidates \(5\)"),
        (dict(k=7, by="key"), r"k=7 is larger than the number of candidates \(6\)"),
        (dict(k=0), "k must be a positive int"),
        (dict(k=2.5), "k must be a positive int"),
        (dict(by="row"), "by must be one of"),
        (dict(score="square"), "score must be one of"),
        (dict(backend="gpu"), "backend must be 'auto' or one of"),
        (dict(queries=[[1.0]]), "queries must be a torch.Tensor or numpy array"),
    ],
)
def test_pair_topk_rejects(kwargs, match):
    q, k = _qk()
    args = dict(queries=q, keys=k, k=3)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        engine.pair_topk(**args)


def test_dual_topk_rejects_mismatched_exemplars():
    q, k = _qk()
    with pytest.raises(ValueError, match="key_acts must have 7 columns"):
        engine.dual_topk(q, k, torch.rand(6, 7), torch.rand(5, 3), 2)
    with pytest.raises(ValueError, match="query_acts must have one row per query"):
        engine.dual_topk(q, k, torch.rand(5, 7), torch.rand(5, 7), 2)
    with pytest.raises(ValueError, match="score='exp' applies to pair_topk only"):
        engine.dual_topk(q, k, torch.rand(6, 7), torch.rand(5, 7), 2, score="exp")


def test_dual_topk_rejects_mismatched_devices():
    q, k = _qk()
    with pytest.raises(ValueError, match="is on meta but queries are on cpu"):
        engine.pair_topk(q, torch.empty(5, 4, device="meta"), 2, backend="torch")


def test_numpy_arrays_are_taken_without_a_copy():
    import numpy as np

    q = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    k = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    got = engine.pair_topk(q, k, 3, key_weight=np.ones(5, dtype=np.float32), backend="torch")
    want = engine.pair_topk(torch.from_numpy(q), torch.from_numpy(k), 3, backend="torch")
    assert torch.equal(got.query_idx, want.query_idx) and torch.equal(got.key_idx, want.key_idx)
