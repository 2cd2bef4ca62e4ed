"""Judging rules and probing the model: metrics and the N sweep (:mod:`~attnrules.evaluation.metrics`),
pattern (hard) negatives and the evaluations beyond REF's (:mod:`~attnrules.evaluation.negatives`),
and interventions — distractor prevalence, insertion and checks (:mod:`~attnrules.evaluation.insertion`),
counterfactual counts (:mod:`~attnrules.evaluation.counts`)."""
from attnrules.evaluation.metrics import Metrics, SweepPoint, binary_metrics, n_terms_grid, sweep
from attnrules.evaluation.negatives import PatternNegatives, PatternPool, evaluate_beyond_random, sample_pattern_negatives

__all__ = ["Metrics", "PatternNegatives", "PatternPool", "SweepPoint", "binary_metrics", "evaluate_beyond_random",
           "n_terms_grid", "sample_pattern_negatives", "sweep"]
