"""Judging rules and probing the model: metrics and the N sweep (:mod:`~attnrules.evaluation.metrics`),
and interventions — distractor prevalence, insertion and checks (:mod:`~attnrules.evaluation.insertion`),
counterfactual counts (:mod:`~attnrules.evaluation.counts`)."""
from attnrules.evaluation.metrics import Metrics, SweepPoint, binary_metrics, n_terms_grid, sweep

__all__ = ["Metrics", "SweepPoint", "binary_metrics", "n_terms_grid", "sweep"]
