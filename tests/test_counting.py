"""The counting detector: finds the planted counting feature and nothing in plain skip-grams."""
import pytest
import torch

from attnrules.rules.counting import CountResponse, classify_counts, classify_difference
from attnrules.evaluation.counts import counterfactuals, check_counting, detect_counting, silent_base
from attnrules.exemplars import scan_output_features
from attnrules.toy import FEATURES


@pytest.fixture(scope="module")
def corpus(toy):
    return toy.corpus(1000, seed=7)


@pytest.mark.parametrize("feature", [f for f in FEATURES if f.kind != "dead"], ids=lambda f: f.name)
def test_detector_finds_exactly_the_planted_counting_feature(toy, corpus, feature):
    scan = scan_output_features(toy.model, toy.output_saes[feature.head], corpus)
    q, k = toy.token_id(feature.query), toy.token_id(feature.key)
    avoid = [q, k] + ([toy.token_id(feature.distractor)] if feature.distractor else [])
    base = silent_base(corpus, scan.act_max[:, feature.index], avoid, n=32)
    rule = detect_counting(toy.model, toy.output_saes[feature.head], feature.index, feature.name, base, q, k)
    if feature.kind == "counting":
        assert rule is not None and (rule.kind, rule.threshold) == ("threshold", feature.min_count)
        assert rule.render(lambda t: toy.model.tokenizer.convert_ids_to_tokens(t)) == "count([games]) ≥ 2 → L0H1.0"
        shares = dict(zip([c for c, _ in rule.evidence.counts], rule.evidence.active_share))
        assert shares[1] == 0.0 and all(shares[n] == 1.0 for n in range(2, 9))
    else:
        assert rule is None, rule


def test_counterfactuals_place_the_right_number_of_copies():
    base = torch.zeros(5, 12, dtype=torch.long)
    out = counterfactuals(base, 7, [(3, 4), (4, 2)], seed=1)
    assert (out[:, -1] == 7).all() and ((out == 3).sum(1) == 4).all() and ((out == 4).sum(1) == 2).all()
    assert (out[:, 0] == 0).all()
    with pytest.raises(ValueError, match="cannot place"):
        counterfactuals(base, 7, [(3, 11)])


def _response(grid):
    counts = tuple(c for c, _ in grid)
    return CountResponse(counts, tuple(s for _, s in grid), tuple(s for _, s in grid), 10)


def test_classification_of_responses():
    assert classify_counts(_response([((n, 0), 1.0 if n >= 3 else 0.0) for n in range(9)])) == ("threshold", 3)
    assert classify_counts(_response([((n, 0), 1.0 if n >= 1 else 0.0) for n in range(9)])) == (None, None)
    rising = CountResponse(tuple((n, 0) for n in range(6)), (0, 0.1, 0.2, 0.3, 0.4, 0.5), (0, 1, 1, 1, 1, 1), 10)
    assert classify_counts(rising) == ("monotone", None)
    grid = [((a, b), 1.0 if a - b >= 2 else 0.0) for a in range(5) for b in range(5)]
    assert classify_difference(_response(grid)) == 2
    assert classify_difference(_response([((a, b), 1.0 if a >= 2 else 0.0) for a in range(5) for b in range(5)])) is None


def test_silent_base_needs_clean_sequences():
    tokens = torch.tensor([[0, 1, 2], [0, 3, 3]])
    assert silent_base(tokens, torch.tensor([0.0, 0.0]), [1]).tolist() == [[0, 3, 3]]
    assert silent_base(tokens, torch.tensor([0.0, 1.0]), [1]).shape == (0, 3)


def test_check_counting_never_avoids_bos_and_builds_filler(toy, corpus):
    """Avoiding the query, key and a distractor that is BOS itself: BOS is not avoided (else no
    sequence qualifies); with too few clean corpus sequences, filler from frequent tokens fills in."""
    bos = toy.token_id("<|endoftext|>")
    games = toy.token_id("games")
    scan = scan_output_features(toy.model, toy.output_saes[1], corpus)
    check, rule = check_counting(toy.model, toy.output_saes[1], 0, "L0H1.0", corpus, scan.act_max[:, 0], games, games,
                                 avoid=[bos], bos=bos)
    assert check.status == "rule" and bos not in check.avoided and check.n_base == 64 and check.n_synthetic == 0
    assert (rule.kind, rule.threshold) == ("threshold", 2)
    few = corpus[:40]  # about 20 clean sequences: the rest is built from frequent corpus tokens
    check, rule = check_counting(toy.model, toy.output_saes[1], 0, "L0H1.0", few, scan.act_max[:40, 0], games, games,
                                 bos=bos)
    assert check.status == "rule" and check.n_base == 64 and 0 < check.n_synthetic < 64
    assert (rule.kind, rule.threshold) == ("threshold", 2)


def test_check_counting_is_undetermined_without_enough_bases(toy, corpus):
    """When every token of the corpus is to be avoided no base can be built: the result says why."""
    bos = toy.token_id("<|endoftext|>")
    games = toy.token_id("games")
    everything = [t for t in range(toy.model.cfg.d_vocab) if t != bos]
    scan = scan_output_features(toy.model, toy.output_saes[1], corpus)
    check, rule = check_counting(toy.model, toy.output_saes[1], 0, "L0H1.0", corpus, scan.act_max[:, 0], games, games,
                                 avoid=everything, bos=bos)
    assert rule is None and check.status == "undetermined" and check.n_base == 0
    assert "at least 16" in check.reason
    check, _ = check_counting(toy.model, toy.output_saes[1], 0, "L0H1.0", corpus, scan.act_max[:, 0], None, games, bos=bos)
    assert check.status == "undetermined" and "query" in check.reason
    check, _ = check_counting(toy.model, toy.output_saes[1], 0, "L0H1.0", corpus, scan.act_max[:, 0], games, bos, bos=bos)
    assert check.status == "undetermined" and "BOS" in check.reason
