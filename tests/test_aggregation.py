"""REF's aggregation types and the unigram baseline against predictions computed by hand (reference
§4.2–4.4), on a tiny case: 5 input features, 3 positions, scored at t = 2.

Exemplar 0 (activations, position: feature=act):   t'=0: f0=1    t'=1: f1=2, f4=1    t'=2: f2=3, f1=1
Skip-gram terms (q, k, A, V): (2, 1, 0.5, 2.0), (2, 0, -1.0, 1.0), (2, 4, 1.0, -0.5), (3, 1, 1.0, 1.0)
(f3 is never active: the last term never matches). Exemplar 1 has no active feature at all.
"""
import math

import pytest
import torch

from attnrules.pipeline import ExtractSettings
from attnrules.pipeline.settings import InvalidSetting
from attnrules.rules import SkipgramRuleSet
from attnrules.rules.matches import AGGREGATIONS
from attnrules.rules.unigram import UnigramRuleSet

NAN = math.nan


def _acts():
    acts = torch.zeros(2, 3, 5, dtype=torch.float64)
    acts[0, 0, 0] = 1.0
    acts[0, 1, 1], acts[0, 1, 4] = 2.0, 1.0
    acts[0, 2, 2], acts[0, 2, 1] = 3.0, 1.0
    return acts, torch.tensor([2, 2])


def _terms(method, power, **extra):
    q, k = torch.tensor([2, 2, 2, 3]), torch.tensor([1, 0, 4, 1])
    a = torch.tensor([0.5, -1.0, 1.0, 1.0], dtype=torch.float64)
    v = torch.tensor([2.0, 1.0, -0.5, 1.0], dtype=torch.float64)
    return SkipgramRuleSet("L0H0.0", q, k, a, v, key_power=power, method=method, **extra)


# Weights (REF magnitude): one kq row per match, score = kv = F[t,q]·F[t',k]²·A·V:
#   t'=1 via (2,1): 3·2²·0.5·2 = 12    t'=2 via (2,1): 3·1·0.5·2 = 3    t'=0 via (2,0): 3·1·(−1)·1 = −3
#   t'=1 via (2,4): 3·1·1·(−0.5) = −1.5
# per key position: t'=0: −3; t'=1: 12, −1.5; t'=2: 3.  No value rows (value_* → NaN).
WEIGHTS = {"max": 12.0, "sum": 10.5, "kq_max": 12.0, "kq_sum": 10.5, "kqv_max": 12.0, "kqv_sum": 10.5,
           "value_max": NAN, "value_sum": NAN, "value_last": NAN, "pos_sum_max": 10.5, "pos_max_sum": 12.0}
# Exemplar 1: REF's kq 0-row at t'=t (score 0), nothing else.
WEIGHTS_EMPTY = {**{a: 0.0 for a in AGGREGATIONS}, "value_max": NAN, "value_sum": NAN, "value_last": NAN}

# Importance (REF's rule with importance): kq score = F[t,q]·F[t',k]·A, kv = score·V:
#   (2,1)@1: 3·2·0.5 = 3, kv 6    (2,1)@2: 1.5, kv 3    (2,0)@0: −3, kv −3    (2,4)@1: 3, kv −1.5
# value rows (value features f1 (V=2), f0 (V=1), no key position): f1@1: 4, f1@2: 2, f0@0: 1
IMPORTANCE = {"max": 4.0, "sum": 11.5, "kq_max": 3.0, "kq_sum": 4.5, "kqv_max": 6.0, "kqv_sum": 4.5,
              "value_max": 4.0, "value_sum": 7.0, "value_last": NAN, "pos_sum_max": 6.0, "pos_max_sum": 1.5}
# Exemplar 1: a kq 0-row (at t'=t) and a value 0-row (no key position): value_last has no row.
IMPORTANCE_EMPTY = {**{a: 0.0 for a in AGGREGATIONS}, "value_last": NAN}

# Unigram over keys f1 (V=2), f0 (V=1): value rows with key positions, f1@1: 4, f1@2: 2, f0@0: 1.
UNIGRAM = {"max": 4.0, "sum": 7.0, "kq_max": NAN, "kq_sum": NAN, "kqv_max": NAN, "kqv_sum": NAN,
           "value_max": 4.0, "value_sum": 7.0, "value_last": 2.0, "pos_sum_max": 4.0, "pos_max_sum": 7.0}
UNIGRAM_EMPTY = {**{a: 0.0 for a in AGGREGATIONS}, "kq_max": NAN, "kq_sum": NAN, "kqv_max": NAN, "kqv_sum": NAN}


def _check(rules, want, want_empty):
    acts, positions = _acts()
    for aggregation in AGGREGATIONS:
        got = rules.predict(acts, positions, aggregation=aggregation)
        expected = torch.tensor([want[aggregation], want_empty[aggregation]], dtype=torch.float64)
        torch.testing.assert_close(got, expected, equal_nan=True, msg=f"{rules.method} {aggregation}")


def test_weights_rule_aggregations():
    _check(_terms("weights", 2), WEIGHTS, WEIGHTS_EMPTY)


def test_importance_rule_aggregations():
    rules = _terms("importance", 1, value_features=torch.tensor([1, 0]),
                   value_feature_scores=torch.tensor([2.0, 1.0], dtype=torch.float64))
    _check(rules, IMPORTANCE, IMPORTANCE_EMPTY)


def test_unigram_rule_aggregations():
    _check(UnigramRuleSet("L0H0.0", torch.tensor([1, 0]), torch.tensor([2.0, 1.0], dtype=torch.float64)),
           UNIGRAM, UNIGRAM_EMPTY)


def test_defaults_are_refs():
    acts, positions = _acts()
    importance = _terms("importance", 1, value_features=torch.tensor([1, 0]),
                        value_feature_scores=torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert importance.predict(acts, positions)[0].item() == IMPORTANCE["kqv_max"]  # REF: kqv_max for importance
    assert _terms("weights", 2).predict(acts, positions)[0].item() == WEIGHTS["max"]  # and max for the others
    unigram = UnigramRuleSet("L0H0.0", torch.tensor([1, 0]), torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert unigram.predict(acts, positions)[0].item() == UNIGRAM["max"]


def test_value_last_is_nan_when_no_value_row_sits_at_the_query():
    """REF's left join: rows exist, but none at t' = t, so the exemplar's group is missing (NaN), not 0."""
    acts, positions = _acts()
    acts[0, 2, 1] = 0.0  # f1 no longer at t'=2
    got = UnigramRuleSet("L0H0.0", torch.tensor([1, 0]), torch.tensor([2.0, 1.0])).predict(
        acts.float(), positions, aggregation="value_last")
    assert math.isnan(got[0].item()) and got[1].item() == 0.0


def test_unknown_aggregation_is_rejected():
    acts, positions = _acts()
    with pytest.raises(ValueError, match="aggregation must be one of"):
        _terms("weights", 2).predict(acts, positions, aggregation="mean")
    with pytest.raises(InvalidSetting, match="aggregation"):
        ExtractSettings(aggregation="mean")
    assert ExtractSettings().aggregation == "ref" and ExtractSettings().unigram is False


def test_cli_options_reach_the_settings():
    from attnrules.cli import build_parser, settings_from_args

    parser = build_parser()
    got = settings_from_args(parser.parse_args(["extract", "--aggregation", "pos_max_sum", "--unigram",
                                                "--no-pattern-negatives", "--pattern-pool", "64"]))
    assert (got.aggregation, got.unigram, got.pattern_negatives, got.pattern_pool) == ("pos_max_sum", True, False, 64)
    with pytest.raises(SystemExit):
        parser.parse_args(["extract", "--aggregation", "mean"])


def test_pipeline_sweeps_the_unigram_baseline_with_the_asked_aggregation():
    """On the planted L0H0.0 ([If] … [then]): the unigram rule (top value keys, no query) is swept with the
    other orderings, every point records its aggregation, and the unigram's predictions are the literal
    reading "some top-N key with V > 0 active at t' ≤ t" (checked here on the val exemplars)."""
    from attnrules.exemplars import input_activations, sample_exemplars, scan_output_features
    from attnrules.pipeline import extract_feature
    from attnrules.scoring import value_scores
    from attnrules.toy import build_toy

    toy = build_toy()
    corpus = toy.corpus(1500, seed=0)
    scan = scan_output_features(toy.model, toy.output_saes[0], corpus)
    ex = sample_exemplars(scan, 0, seq_len=corpus.shape[1])
    acts = {s: input_activations(toy.model, toy.input_sae, corpus[getattr(ex, s).sequence]) for s in ("train", "val")}
    circuit = toy.circuit(0)
    n_in = circuit.n_inputs
    for aggregation, expected in (("ref", {"weights": "max", "importance": "kqv_max", "unigram": "max"}),
                                  ("sum", {"weights": "sum", "importance": "sum", "unigram": "sum"})):
        settings = ExtractSettings(num_values=n_in, num_queries=n_in, max_rules=8, unigram=True, aggregation=aggregation,
                                   backend="torch")
        _, points, _ = extract_feature(circuit, 0, (acts["train"], ex.train.position),
                                       (acts["val"], ex.val.position, ex.val.act_max), settings)
        assert {(p.method, p.aggregation) for p in points} == set(expected.items())
    v = value_scores(circuit, 0)
    top = torch.sort(v, descending=True, stable=True).indices
    for p in (p for p in points if p.method == "unigram"):
        keys = top[: p.n_terms]
        upto = torch.arange(corpus.shape[1])[None, :] <= ex.val.position[:, None]
        literal = ((acts["val"][:, :, keys] > 0) & upto[:, :, None] & (v[keys] > 0)).any(dim=(1, 2))
        assert torch.equal(p.predicted, literal), p.n_terms
