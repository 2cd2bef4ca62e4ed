"""The C++ core's sparse-row helpers (``attnrules.sparse_acts``): the nonzero entries of dense rows
(what the kept activations store) and sparse rows times a float64 matrix (exact importance's SAE
error term), against torch and an exact oracle."""
from fractions import Fraction

import pytest
import torch

from attnrules.sparse_acts import nonzero_bits, nonzero_entries, sparse_times


def _sparse_rows(m: int, n: int, active: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(m, n)
    x.scatter_(1, torch.randint(0, n, (m, active), generator=g), torch.rand(m, active, generator=g) * 4 - 1)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nonzero_entries_are_the_entries_whose_bits_are_not_plus_zero(dtype):
    x = _sparse_rows(7, 300, 20, seed=1).to(dtype)
    x[0, 3], x[1, 5], x[2, 7], x[3, 9] = -0.0, float("nan"), float("inf"), -float("inf")
    x[4] = 0.0  # a row without entries
    counts, index, values = nonzero_entries(x)
    keep = nonzero_bits(x)
    assert counts == keep.sum(1).tolist() and counts[4] == 0
    assert torch.equal(index, torch.nonzero(keep)[:, 1])
    assert torch.equal(values.isnan(), x[keep].isnan())
    same = ~values.isnan()
    assert torch.equal(values[same], x[keep][same]) and torch.equal(torch.signbit(values), torch.signbit(x[keep]))


def _fma_chain(row: torch.Tensor, dense: torch.Tensor, col: int) -> float:
    """One output element as documented: fused multiply-adds (each exactly rounded once) in index order."""
    acc = 0.0
    for i in torch.nonzero(row).flatten().tolist():
        acc = float(Fraction(float(row[i])) * Fraction(float(dense[i, col])) + Fraction(acc))
    return acc


def test_sparse_times_is_an_fma_chain_in_index_order():
    rows = _sparse_rows(5, 200, 30, seed=2)
    dense = torch.randn(200, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = sparse_times(rows, dense)
    for r in range(5):
        assert out[r].tolist() == [_fma_chain(rows[r], dense, c) for c in range(9)]


@pytest.mark.parametrize("m,n,d,active", [(252, 24_576, 768, 50), (17, 4096, 256, 30), (1, 300, 17, 5)])
def test_sparse_times_matches_the_dense_product_and_is_row_independent(m, n, d, active):
    rows = _sparse_rows(m, n, active, seed=m)
    rows[0, :3] = -0.0
    dense = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = sparse_times(rows, dense)
    reference = rows.double() @ dense
    bound = 1e-14 * (rows.double().abs() @ dense.abs())
    assert bool(((out - reference).abs() <= bound).all())
    for r in (0, m // 2, m - 1):  # each row alone, and inside a shuffled batch: the same bits
        assert torch.equal(sparse_times(rows[r:r + 1], dense)[0], out[r])
    order = torch.randperm(m, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sparse_times(rows[order], dense), out[order])


def test_sparse_times_spreads_nan_and_falls_back_to_the_dense_product_for_other_dtypes():
    rows = _sparse_rows(3, 50, 5, seed=6)
    rows[1, 7] = float("nan")
    dense = torch.randn(50, 4, dtype=torch.float64)
    out = sparse_times(rows, dense)
    assert bool(out[1].isnan().all()) and not bool(out[[0, 2]].isnan().any())
    torch.testing.assert_close(sparse_times(rows.double(), dense), rows.double() @ dense, rtol=0, atol=0,
                               equal_nan=True)


def test_without_the_cpp_core_torch_gives_the_same_entries_and_the_dense_product(monkeypatch):
    import attnrules.sparse_acts as sparse_acts

    rows = _sparse_rows(4, 120, 9, seed=7)
    dense = torch.randn(120, 5, dtype=torch.float64)
    with_core = nonzero_entries(rows)
    monkeypatch.setattr(sparse_acts, "_C", None)
    counts, index, values = nonzero_entries(rows)
    assert counts == with_core[0] and torch.equal(index, with_core[1]) and torch.equal(values, with_core[2])
    assert torch.equal(sparse_times(rows, dense), rows.double() @ dense)
