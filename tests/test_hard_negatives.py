"""Pattern (hard) negatives and combined rule sets on the planted models.

The truth of every planted feature is read from the tokens alone (``planted_truth``), never from the
code under test: a pattern negative must hold its rule's query at the scored position and its key at
or before it, in a sequence where the feature fires nowhere.
"""
import dataclasses

import pytest
import torch

from attnrules.evaluation.negatives import PatternPool, sample_pattern_negatives
from attnrules.exemplars import sample_exemplars, scan_output_features
from attnrules.pipeline import ExtractSettings, extract_head
from attnrules.rules import SkipgramRuleSet
from attnrules.rules.absence import AbsenceRule
from attnrules.rules.combined import CombinedRuleSet, Conditions
from attnrules.rules.counting import CountingRule, CountResponse
from attnrules.toy import VOCAB

SETTINGS = dict(max_rules=16, exhaustive_k=0, show_exemplars=3, backend="torch")  # the torch reference engine
ORDERINGS = ("weights", "importance", "exact")


@pytest.fixture(scope="module")
def corpus(toy):
    return toy.corpus(3000, seed=0)


@pytest.fixture(scope="module")
def heads(toy, corpus):
    """Head 0 (two skip-grams and the absence feature) and head 1 (the counting feature) extracted."""
    return {head: extract_head(toy.model, toy.input_sae, toy.output_saes[head], corpus, progress=False,
                               settings=ExtractSettings(features=features, **SETTINGS))
            for head, features in ((0, (0, 1, 2)), (1, (0,)))}


def planted_truth(tokens, feature):
    """[N, T] bool: where a planted feature fires, from the tokens alone."""
    at = lambda w: tokens == VOCAB.index(w)  # noqa: E731
    count = lambda w: torch.cumsum(at(w), dim=1)  # noqa: E731
    if feature.kind == "skipgram":
        return at(feature.query) & (count(feature.key) > 0)
    if feature.kind == "absence":
        return at(feature.query) & (count(feature.key) > 0) & (count(feature.distractor) == 0)
    if feature.kind == "counting":
        return at(feature.query) & (count(feature.key) >= feature.min_count)
    raise AssertionError(feature.kind)


def _f1(result, name, negatives, method):
    return {r.num_rules: r.f1 for r in result.feature(name).sweep if r.negatives == negatives and r.method == method}


@pytest.mark.parametrize("head,name", [(0, "L0H0.1"), (1, "L0H1.0")])
def test_skipgram_sets_fall_short_on_pattern_negatives_and_combined_sets_restore_f1(heads, head, name):
    result = heads[head]
    for method in ORDERINGS:
        assert set(_f1(result, name, "random", method).values()) == {1.0}, method  # REF's evaluation: no gap
        plain = _f1(result, name, "pattern", method)
        assert plain and max(plain.values()) < 1.0, (method, plain)
        combined = _f1(result, name, "pattern", method + "+absence+counting")
        assert set(combined.values()) == {1.0}, (method, combined)
        assert set(_f1(result, name, "random", method + "+absence+counting").values()) == {1.0}


@pytest.mark.parametrize("name", ["L0H0.0", "L0H0.2"])
def test_nothing_drops_on_plain_skipgram_features(heads, name):
    result = heads[0]
    for method in ORDERINGS:
        for combined in ("", "+absence+counting"):
            assert set(_f1(result, name, "pattern", method + combined).values()) == {1.0}, method + combined
    pattern = next(p for p in result.feature(name).predictions if p.negatives == "pattern")
    assert pattern.n_candidates == 0  # the rule fires exactly where the feature does: no hard negative exists


@pytest.mark.parametrize("head,name", [(0, "L0H0.1"), (1, "L0H1.0")])
def test_pattern_negatives_hold_the_pattern_and_never_leak(toy, corpus, heads, head, name):
    feature, result = toy.feature(name), heads[head].feature(name)
    pattern = next(p for p in result.predictions if p.negatives == "pattern")
    random_set = next(p for p in result.predictions if p.negatives == "random")
    truth = planted_truth(corpus, feature)
    negatives = [(s, t) for s, t, a in zip(pattern.sequence, pattern.position, pattern.act_max) if a == 0.0]
    assert len(negatives) >= 10
    for s, t in negatives:
        assert not truth[s].any()  # the feature fires nowhere in the sequence
        assert corpus[s, t] == VOCAB.index(feature.query)
        assert (corpus[s, : t + 1] == VOCAB.index(feature.key)).any()
    # the positives are REF's val positives; no negative comes from the feature's own train/val/test exemplars
    scan = scan_output_features(toy.model, toy.output_saes[head], corpus)
    ex = sample_exemplars(scan, feature.index, seq_len=corpus.shape[1], examples_per_bin=150, seed=feature.index)
    own = set(torch.cat([ex.train.sequence, ex.val.sequence, ex.test.sequence]).tolist())
    assert not own & {s for s, _ in negatives}
    positives = [s for s, a in zip(pattern.sequence, pattern.act_max) if a > 0]
    assert sorted(positives) == sorted(ex.val.sequence[ex.val.positive].tolist())
    assert random_set.sequence == tuple(ex.val.sequence.tolist())
    # per-example predictions: the combined set's labels are exactly the truth on pattern negatives
    labels = {(x.method, x.num_rules): x.predicted for x in pattern.labels}
    truth_labels = "".join("1" if a > 0 else "0" for a in pattern.act_max)
    assert labels[("weights+absence+counting", 4)] == truth_labels
    assert labels[("weights", 4)] != truth_labels


def test_pattern_views_show_the_match_and_what_silences_it(toy, heads):
    absence = heads[0].feature("L0H0.1")
    assert absence.pattern_negatives
    for view in absence.pattern_negatives:
        assert view.tokens[view.position] == "com"
        match = next(m for m in view.matches if m.method == "weights")
        assert view.tokens[match.key_position] == "http"
        hit = next(c for c in view.conditions if c.kind == "distractor")
        assert all(view.tokens[p] == "twitter" for p in hit.positions) and max(hit.positions) <= view.position
    counting = heads[1].feature("L0H1.0")
    for view in counting.pattern_negatives:
        hit = next(c for c in view.conditions if c.kind == "count")
        assert hit.min_count == 2 and [view.tokens[p] for p in hit.positions] == ["games"]
    top = heads[0].feature("L0H0.0").exemplars[0]
    assert any(view_tokens == ("If", "then") for view_tokens in
               [(top.tokens[m.key_position], top.tokens[top.position]) for m in top.matches])


def test_pattern_negatives_respect_rotary_offsets():
    """toy-rope's L0H0.0 fires only for the bigram "Harry Potter" (offset 1): positioned rules find no
    pattern negative, although the corpus holds many silent "Harry … Potter" at other offsets, which the
    same terms read without offsets do take."""
    from attnrules.rules import rules_from_weights
    from attnrules.scoring import candidate_table
    from attnrules.toy.rope import build_toy_rope

    rope = build_toy_rope()
    tokens = rope.corpus(1500, seed=0)
    circuit = rope.circuit(0)
    harry, potter = VOCAB.index("Harry"), VOCAB.index("Potter")
    bigram = torch.zeros_like(tokens, dtype=torch.bool)
    bigram[:, 1:] = (tokens[:, 1:] == potter) & (tokens[:, :-1] == harry)
    far = (tokens == potter) & (torch.cumsum(tokens == harry, dim=1) > 0) & ~bigram
    silent = ~bigram.any(dim=1)
    assert int((far.any(dim=1) & silent).sum()) >= 20  # the hard negatives an offset-blind rule would take
    act_max = silent.logical_not().double()  # the feature fires exactly on the bigram (tests/test_planted.py)
    table = candidate_table(circuit, 0, num_values=4, num_queries=4, backend="torch")
    rules = rules_from_weights(table, 4, circuit)
    pool = PatternPool.build(rope.model, rope.input_sae, tokens, 1500)
    found = sample_pattern_negatives(pool, 0, act_max, [rules], torch.zeros(0, dtype=torch.long), count=150)
    assert found.n_candidates == 0
    blind = dataclasses.replace(rules, offsets=None, offset_attn=None)
    assert sample_pattern_negatives(pool, 0, act_max, [blind], torch.zeros(0, dtype=torch.long),
                                    count=150).n_candidates > 0


def test_sampled_splits_are_disjoint_and_refs_sizes(toy, corpus):
    scan = scan_output_features(toy.model, toy.output_saes[0], corpus)
    rules = SkipgramRuleSet("L0H0.1", torch.tensor([VOCAB.index("com")]), torch.tensor([VOCAB.index("http")]),
                            torch.tensor([1.0]), torch.tensor([1.0]))
    pool = PatternPool.build(toy.model, toy.input_sae, corpus, 2048, seed=1)
    exclude = torch.arange(0, 3000, 2)  # every even row is someone's exemplar
    found = sample_pattern_negatives(pool, 1, scan.act_max[:, 1], [rules], exclude, count=60, seed=3)
    parts = [getattr(found.splits, s).sequence.tolist() for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [20, 20, 20]  # REF's thirds
    rows = sum(parts, [])
    assert len(set(rows)) == 60 and all(r % 2 == 1 for r in rows) and set(rows) <= set(pool.sequences.tolist())
    dense = pool.dense(pool.rows_of(torch.tensor(rows[:5])))
    torch.testing.assert_close(dense, toy.input_sae.encode(
        torch.nn.functional.one_hot(corpus[rows[:5]], dense.shape[-1]).double().add(
            torch.cat([torch.zeros(corpus.shape[1], len(VOCAB)), torch.eye(corpus.shape[1])], 1).double()).to(
            dense.dtype)))


def test_combined_set_conditions_by_hand():
    """[http] … [com] unless [twitter], and count([games]) ≥ 2 on the term (games, games)."""
    http, com, twitter, games = (VOCAB.index(w) for w in ("http", "com", "twitter", "games"))
    rules = SkipgramRuleSet("L0H0.1", torch.tensor([com, games]), torch.tensor([http, games]),
                            torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    absence = AbsenceRule("L0H0.1", com, http, 1.0, 1.0, (twitter,), (2.0,), (-1.0,))
    counting = CountingRule("L0H0.1", "threshold", 0, 0, None, 2, CountResponse((), (), (), 0), query=games, key=games)
    combined = CombinedRuleSet(rules, Conditions.of([absence], counting))
    assert combined.method == "weights+absence+counting"
    words = [["http", "com"], ["http", "twitter", "com"], ["twitter", "http", "com"], ["games"], ["games", "games"],
             ["http", "com", "twitter"]]
    acts = torch.zeros(len(words), 4, len(VOCAB))
    positions = torch.tensor([len(w) - 1 for w in words])
    for i, w in enumerate(words):
        for t, word in enumerate(w):
            acts[i, t, VOCAB.index(word)] = 1.0
    positions[-1] = 1  # scored at com: the twitter after it does not count
    assert (rules.predict(acts, positions) > 0).tolist() == [True] * 6
    assert (combined.predict(acts, positions) > 0).tolist() == [True, False, False, False, True, True]


def test_files_carry_both_evaluations(heads, tmp_path):
    """results.json (through load_results), metrics.csv, predictions.csv, the sweep's merged Parquet and
    summary.csv label REF's and the pattern evaluation."""
    import pandas as pd

    from attnrules.pipeline import load_results
    from attnrules.pipeline.sweep import merge_sweep

    result = heads[1]
    folder = tmp_path / "shards" / "L0H1"
    result.write(folder)
    assert load_results(folder) == result
    metrics = pd.read_csv(folder / "metrics.csv")
    assert set(metrics["negatives"]) == {"random", "pattern"}
    assert set(metrics.loc[metrics["negatives"] == "random", "method"]) == {
        "weights", "importance", "exact", "weights+absence+counting", "importance+absence+counting",
        "exact+absence+counting"}
    assert set(metrics.loc[metrics["method"] == "importance", "aggregation"]) == {"kqv_max"}  # REF's default
    predictions = pd.read_csv(folder / "predictions.csv", dtype={"weights": str})
    feature = result.feature("L0H1.0")
    assert len(predictions) == sum(len(p.sequence) for p in feature.predictions)
    pattern = next(p for p in feature.predictions if p.negatives == "pattern")
    rows = predictions[predictions["negatives"] == "pattern"]
    assert rows["sequence"].tolist() == list(pattern.sequence)
    by_n = sorted((x.num_rules, x.predicted) for x in pattern.labels if x.method == "weights")
    assert rows["weights"].tolist() == ["".join(p[i] for _, p in by_n) for i in range(len(pattern.sequence))]
    (tmp_path / "manifest").mkdir()
    (tmp_path / "manifest" / "L0H1.json").write_text("{}")
    summary = merge_sweep(tmp_path, [(0, 1)])
    merged = pd.read_parquet(tmp_path / "merged" / "metrics.parquet")
    assert set(merged["negatives"]) == {"random", "pattern"}
    pattern_f1 = summary[(summary["negatives"] == "pattern") & (summary["method"] == "weights")]["f1"]
    combined_f1 = summary[(summary["negatives"] == "pattern") & (summary["method"] == "weights+absence+counting")]["f1"]
    assert pattern_f1.max() < 1.0 and set(combined_f1) == {1.0}
    assert (tmp_path / "summary.csv").exists()
