"""Binary precision / recall / F1 and Spearman of rule predictions, with REF's conventions (§4.5),
and the sweep over the number of rule terms (the paper's Fig. 4).

- truth: the exemplar's sequence max activation > threshold; prediction: predicted score > threshold
  (or > ``prediction_threshold`` when given: the output SAE's own threshold of the feature)
- precision = 1 when nothing is predicted active; recall = 1 when nothing is active; F1 = 0 when
  precision + recall = 0; Spearman is NaN on constant input.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from attnrules.evaluation.grid_matches import grid_matches
from attnrules.rules import SkipgramRuleSet
from attnrules.rules.matches import default_aggregation
from attnrules.rules.skipgram import scale_for


@dataclass(frozen=True)
class Metrics:
    tp: int
    fp: int
    fn: int
    tn: int
    precision: float
    recall: float
    f1: float
    spearman: float
    pvalue: float

    def to_dict(self) -> dict:
        return asdict(self)


def binary_metrics(act_max: torch.Tensor, predicted: torch.Tensor, *, threshold: float = 0.0,
                   prediction_threshold: float | None = None) -> Metrics:
    """Metrics of ``predicted`` scores against true activations ``act_max`` (both ``[N]``); predictions
    fire above ``prediction_threshold`` when given (e.g. a JumpReLU feature's own threshold), else above
    ``threshold``."""
    if act_max.shape != predicted.shape or act_max.dim() != 1:
        raise ValueError(
            f"act_max and predicted must be 1-D of one length, got {tuple(act_max.shape)} and {tuple(predicted.shape)}"
        )
    truth = act_max > threshold
    guess = predicted > (threshold if prediction_threshold is None else prediction_threshold)
    tp = int((truth & guess).sum())
    fp = int((~truth & guess).sum())
    fn = int((truth & ~guess).sum())
    tn = int((~truth & ~guess).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    rho, p = _spearman(act_max, predicted)
    return Metrics(tp, fp, fn, tn, precision, recall, f1, rho, p)


def _spearman(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    from scipy.stats import spearmanr

    if x.numel() < 2:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: NaN, as REF
        result = spearmanr(x.double().numpy(), y.double().numpy())
    return float(result.statistic), float(result.pvalue)


def n_terms_grid(max_rules: int = 4096) -> list[int]:
    """REF's numbers of terms: 4, 8, 16, …, up to max_rules (powers of two)."""
    if max_rules < 4:
        raise ValueError(f"max_rules must be at least 4, got {max_rules}")
    return [2**i for i in range(2, int(math.log2(max_rules)) + 1)]


@dataclass(frozen=True)
class SweepPoint:
    """One rule set of the sweep evaluated: its method, N, its real number of terms, the metrics, on which
    negatives ("random": REF's, "pattern": hard ones), the aggregation used, and the predicted labels
    ``[n_exemplars]`` (bool, in the evaluation set's order)."""

    method: str
    n_terms: int  # N asked for
    n_selected: int  # terms the rule really has (fewer with ties, zeros or few candidates)
    metrics: Metrics
    negatives: str = "random"
    aggregation: Optional[str] = None
    predicted: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {"method": self.method, "num_rules": self.n_terms, "num_terms": self.n_selected, **self.metrics.to_dict(),
                "negatives": self.negatives, "aggregation": self.aggregation}


def sweep(
    build: Callable[[int], SkipgramRuleSet],
    acts: torch.Tensor,
    positions: torch.Tensor,
    act_max: torch.Tensor,
    grid: list[int],
    *,
    threshold: float = 0.0,
    prediction_threshold: float | None = None,
    negatives: str = "random",
    aggregation: Optional[str] = None,
) -> list[SweepPoint]:
    """Build a rule set for every N in ``grid`` and evaluate it on the given exemplars (predictions
    above ``prediction_threshold`` when given, else above ``threshold``; its matches reduced by
    ``aggregation``, default REF's for its method, see :mod:`attnrules.rules.matches`). ``negatives``
    labels the evaluation ("random": REF's exemplars, "pattern": with hard negatives). Each point keeps
    its predicted labels."""
    points = []
    scale = scale_for(acts)  # acts.max() once for every N (an exact rule's floor is relative to it)
    for n, rules, rows in grid_matches(build, grid, acts, positions, scale):  # the largest set evaluated once
        how = aggregation or default_aggregation(rules.method)
        predicted = rows.aggregate(how)
        points.append(sweep_point(rules.method, n, len(rules), predicted, act_max,
                                  threshold=threshold, prediction_threshold=prediction_threshold, negatives=negatives,
                                  aggregation=how))
    return points


def sweep_point(method: str, n_terms: int, n_selected: int, predicted: torch.Tensor, act_max: torch.Tensor, *,
                threshold: float = 0.0, prediction_threshold: float | None = None, negatives: str = "random",
                aggregation: Optional[str] = None) -> SweepPoint:
    """The :class:`SweepPoint` of one rule set's predicted scores ``[N]`` against ``act_max [N]``."""
    metrics = binary_metrics(act_max, predicted, threshold=threshold, prediction_threshold=prediction_threshold)
    fires = predicted > (threshold if prediction_threshold is None else prediction_threshold)
    return SweepPoint(method, n_terms, n_selected, metrics, negatives, aggregation, fires)
