"""Rules over input features: skip-grams (:mod:`~attnrules.rules.skipgram`), absence
(:mod:`~attnrules.rules.absence`) and counting (:mod:`~attnrules.rules.counting`) rules, combined
rule sets (:mod:`~attnrules.rules.combined`), REF's unigram baseline (:mod:`~attnrules.rules.unigram`)
and evaluation rows and aggregation types (:mod:`~attnrules.rules.matches`), and the descriptions that
render input features as text (:mod:`~attnrules.rules.descriptions`)."""
from attnrules.rules.absence import AbsenceRule, DistractorCheck, PaperDistractor, absence_rules, paper_distractor
from attnrules.rules.combined import CombinedRuleSet, Conditions
from attnrules.rules.counting import CountingRule, CountResponse
from attnrules.rules.matches import AGGREGATIONS, Matches
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
from attnrules.rules.unigram import UnigramRuleSet, rules_from_values

__all__ = ["AGGREGATIONS", "EXACT_ACT_FLOOR", "EXACT_REL_TOL", "PSEUDO_IDS", "AbsenceRule", "CombinedRuleSet",
           "Conditions", "CountResponse", "CountingRule", "DistractorCheck", "Matches", "PaperDistractor",
           "SkipgramRuleSet", "UnigramRuleSet", "absence_rules", "describe_term_side", "paper_distractor",
           "rules_from_exact", "rules_from_importance", "rules_from_values", "rules_from_weights"]
