"""REF's metric conventions and the N sweep."""
import math

import pytest
import torch

from attnrules.evaluation import binary_metrics, n_terms_grid


def test_counts_and_scores():
    act = torch.tensor([0.5, 0.2, 0.0, 0.0, 0.3])
    pred = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.1])
    m = binary_metrics(act, pred)
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 1, 1, 1)
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3) and m.f1 == pytest.approx(2 / 3)


def test_precision_is_one_with_no_predicted_positives():
    m = binary_metrics(torch.tensor([1.0, 0.0]), torch.tensor([0.0, -1.0]))
    assert m.precision == 1.0 and m.recall == 0.0 and m.f1 == 0.0


def test_recall_is_one_with_no_positives():
    m = binary_metrics(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert m.recall == 1.0 and m.precision == 1.0 and m.f1 == 1.0


def test_f1_zero_when_precision_and_recall_are_zero():
    m = binary_metrics(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)


def test_threshold_applies_to_truth_and_prediction():
    m = binary_metrics(torch.tensor([0.5, 2.0]), torch.tensor([2.0, 0.5]), threshold=1.0)
    assert (m.tp, m.fp, m.fn, m.tn) == (0, 1, 1, 0)


def test_spearman_nan_on_constant_input():
    m = binary_metrics(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 0.0]))
    assert math.isnan(m.spearman)
    m = binary_metrics(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 3.0, 5.0]))
    assert m.spearman == pytest.approx(1.0)


def test_sweep_grid_is_refs():
    assert n_terms_grid() == [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert n_terms_grid(100) == [4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="max_rules must be at least 4"):
        n_terms_grid(2)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="act_max and predicted"):
        binary_metrics(torch.zeros(3), torch.zeros(4))
