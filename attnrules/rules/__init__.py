"""Rules over input features: skip-grams (:mod:`~attnrules.rules.skipgram`), absence
(:mod:`~attnrules.rules.absence`) and counting (:mod:`~attnrules.rules.counting`) rules, and the
descriptions that render input features as text (:mod:`~attnrules.rules.descriptions`)."""
from attnrules.rules.absence import AbsenceRule, DistractorCheck, PaperDistractor, absence_rules, paper_distractor
from attnrules.rules.counting import CountingRule, CountResponse
from attnrules.rules.skipgram import (
    EXACT_ACT_FLOOR,
    EXACT_REL_TOL,
    PSEUDO_IDS,
    SkipgramRuleSet,
    describe_term_side,
    rules_from_exact,
    rules_from_importance,
    rules_from_weights,
)

__all__ = ["EXACT_ACT_FLOOR", "EXACT_REL_TOL", "PSEUDO_IDS", "AbsenceRule", "CountResponse", "CountingRule",
           "DistractorCheck", "PaperDistractor", "SkipgramRuleSet", "absence_rules", "describe_term_side",
           "paper_distractor", "rules_from_exact", "rules_from_importance", "rules_from_weights"]
