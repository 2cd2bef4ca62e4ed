"""The whole pipeline, with default settings, on planted models unlike the toy (tests/planted.py):
made-up vocabularies, BOS last or renamed, heads in layers 1 and 2, LNPre with biases or RMSPre,
attention scales that are not sqrt(d_head), input SAEs of < 100 features (with a decoder bias, or
rotated), noise and dead output features. Every head runs without a failed step, every planted
rule is recovered, noise gets no rule, and exact mode clears the false distractor."""
import pytest
import torch

from attnrules.pipeline import ExtractSettings, extract_head
from planted import build_glyph, build_rune

N_SEQUENCES = 2000


def input_feature(planted, word: str) -> int:
    """The input feature of a word, read off the SAE's own encoding of its embedding."""
    with torch.no_grad():
        return int(torch.argmax(planted.input_sae.encode(planted.model.W_E[planted.token_id(word)])))


@pytest.fixture(scope="module", params=["glyph", "rune"])
def run(request):
    planted = {"glyph": build_glyph, "rune": build_rune}[request.param]()
    tokens = planted.corpus(N_SEQUENCES, seed=1)
    results = {head: extract_head(planted.model, planted.input_sae, sae, tokens, progress=False)
               for head, sae in planted.output_saes.items()}
    return planted, {f.name: f for r in results.values() for f in r.features}, results


def terms(feature, method: str, n: int = 8) -> list[tuple[int, int]]:
    return [(t.query, t.key) for t in feature.rule_set(method).terms[:n]]


def test_every_head_runs_without_a_failed_step(run):
    planted, features, results = run
    for result in results.values():
        assert result.metadata["failed_steps"] == 0, result.metadata
        assert all(not f.errors for f in result.features)
    expected = {f.name for f in planted.features if f.kind != "dead"}
    assert expected <= set(features), f"not sampled: {expected - set(features)}"
    assert not any(f.kind == "dead" and f.name in features for f in planted.features)


def test_skipgrams_are_recovered_by_every_ordering_and_exact_predictions_are_clean(run):
    planted, features, _ = run
    for rule in (f for f in planted.features if f.kind in ("skipgram", "false_distractor")):
        pair = (input_feature(planted, rule.query), input_feature(planted, rule.key))
        f = features[rule.name]
        for method in ("weights", "importance", "exact"):
            assert pair in terms(f, method, 3), (rule.name, method, f.rule_set(method).text)
    for rule in (f for f in planted.features if f.kind == "skipgram"):
        exact = [p for p in features[rule.name].sweep if p.method == "exact"]
        assert exact and all(p.f1 == 1.0 for p in exact), (rule.name, exact)


def test_disjunction_keys_and_unseen_keys(run):
    """Both keys lead the exhaustive A×V ranking; REF's top-activating positives never hold the weak
    key, so it gets no importance and is listed as unseen; quantile positives recover it."""
    planted, features, _ = run
    for rule in (f for f in planted.features if f.kind == "disjunction"):
        f = features[rule.name]
        query = input_feature(planted, rule.query)
        strong, *weak = (input_feature(planted, k) for k in rule.keys)
        both = {(query, strong), *((query, k) for k in weak)}
        by_weight = [(p.query, p.key) for p in f.pairs if p.ranking == "weights_all_pairs"]
        assert set(by_weight[: len(both)]) == both
        assert set(weak) <= {u.key for u in f.unseen_keys}
        assert strong not in {u.key for u in f.unseen_keys}
        assert not set(weak) & {k for _, k in terms(f, "importance")}
        settings = ExtractSettings(features=(rule.index,), positives="quantiles")
        spread = extract_head(planted.model, planted.input_sae, planted.output_saes[rule.head],
                              planted.corpus(N_SEQUENCES, seed=1), settings=settings, progress=False).features[0]
        assert not spread.unseen_keys
        for method in ("importance", "exact"):
            assert both <= set(terms(spread, method, 4)), (method, spread.rule_set(method).text)


def test_real_distractors_are_confirmed_and_false_ones_cleared(run):
    planted, features, _ = run
    for rule in (f for f in planted.features if f.kind in ("absence", "false_distractor")):
        f = features[rule.name]
        pair = (input_feature(planted, rule.query), input_feature(planted, rule.key))
        distractor = input_feature(planted, rule.distractor)
        kept = {(a.query, a.key): a.kept for a in f.absence}
        checks = {c.distractor: c for a in f.absence + f.absence_dropped if (a.query, a.key) == pair
                  for c in a.checks}
        if rule.kind == "absence":
            assert distractor in kept.get(pair, ()), (rule.name, f.absence)
            assert checks[distractor].status == "confirmed"
            # above layer 0 an input feature reads '"token" (L{layer}.in{id})' (described from the corpus)
            ending = f"(L{planted.layer}.in{distractor})]" if planted.input_sae.layer else "unless [0]"
            assert any(a.text.endswith(ending) for a in f.absence if (a.query, a.key) == pair)
        else:  # paper mode claims it, insertion and the real logits deny it
            assert distractor in checks, (rule.name, f.absence, f.absence_dropped)
            assert checks[distractor].status == "cleared"
            assert checks[distractor].logit_distractor < checks[distractor].logit_key
            assert distractor not in kept.get(pair, ())
        for a in f.absence:  # no distractor with a float-noise value is ever claimed
            assert all(abs(v) > 1e-4 for v in a.distractor_value)


def test_query_bias_rule_is_an_exact_mode_term(run):
    planted, features, _ = run
    for rule in (f for f in planted.features if f.kind == "query_bias"):
        f = features[rule.name]
        key = input_feature(planted, rule.key)
        assert (-2, key) in terms(f, "exact", 3), f.rule_set("exact").text
        label = f"(L{planted.layer}.in{key})]"  # above layer 0: '"token" (L{layer}.in{id})', from the corpus
        assert any(t.startswith("[") and f"{label} … [any query, via b_Q] → {rule.name}" in t
                   for t in f.rule_set("exact").text)


def test_counting_threshold_is_found(run):
    planted, features, _ = run
    for rule in (f for f in planted.features if f.kind == "counting"):
        f = features[rule.name]
        assert f.counting is not None, (rule.name, f.counting_check)
        assert (f.counting.kind, f.counting.threshold) == ("threshold", rule.min_count)
        assert f.counting_check.n_base >= f.counting_check.min_base
    for rule in (f for f in planted.features if f.kind in ("skipgram", "absence", "noise")):
        assert features[rule.name].counting is None


def test_noise_features_get_no_rule(run):
    planted, features, _ = run
    for rule in (f for f in planted.features if f.kind == "noise"):
        f = features[rule.name]
        assert not f.absence and f.counting is None
        assert any("float noise" in n for n in f.notes)
