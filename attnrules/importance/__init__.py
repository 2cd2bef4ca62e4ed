"""Masked-gradient importances of (query, key) pairs: REF's closed form for paper mode
(:mod:`~attnrules.importance.paper`) and the gradient through the real head (:mod:`~attnrules.importance.exact`)."""
from attnrules.importance.exact import (
    ExactTerms,
    exact_factors_all_pairs,
    exact_importance,
    exact_importance_terms,
    exact_vectors_all_pairs,
    rank_all_pairs_by_exact_importance,
)
from attnrules.importance.paper import (
    exemplar_factors_all_pairs,
    paper_importance,
    rank_all_pairs_by_importance,
    rotary_factors_all_pairs,
    select_terms,
)

__all__ = ["ExactTerms", "exact_factors_all_pairs", "exact_importance", "exact_importance_terms", "exact_vectors_all_pairs",
           "exemplar_factors_all_pairs", "paper_importance", "rank_all_pairs_by_exact_importance",
           "rank_all_pairs_by_importance", "rotary_factors_all_pairs", "select_terms"]
