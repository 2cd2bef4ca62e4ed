"""The planted model: its heads do what they were built to do, and the pipeline finds the rules."""
import pytest
import torch

from attnrules.evaluation import binary_metrics
from attnrules.exemplars import input_activations, sample_exemplars, scan_output_features
from attnrules.importance import paper_importance
from attnrules.pipeline import ExtractSettings, extract_feature
from attnrules.pipeline.extract import _first_appearance
from attnrules.rules import rules_from_importance, rules_from_weights
from attnrules.scoring import candidate_table, rank_all_pairs
from attnrules.toy import VOCAB, generate_corpus


@pytest.fixture(scope="module")
def corpus(toy):
    return toy.corpus(3000, seed=0)


def planted_truth(tokens, feature):
    """Where a planted feature must fire, from the tokens alone: [N, T] bool."""
    ids = {w: VOCAB.index(w) for w in VOCAB}
    n, t_len = tokens.shape
    seen = lambda w: torch.cumsum(tokens == ids[w], dim=1) > 0  # noqa: E731  w at a position <= t
    count = lambda w: torch.cumsum(tokens == ids[w], dim=1)  # noqa: E731
    at = lambda w: tokens == ids[w]  # noqa: E731
    if feature.kind in ("skipgram", "unrelated"):
        return at(feature.query) & seen(feature.key)
    if feature.kind == "absence":
        return at(feature.query) & seen(feature.key) & ~seen(feature.distractor)
    if feature.kind == "counting":
        return at(feature.query) & (count(feature.key) >= feature.min_count)
    return torch.zeros(n, t_len, dtype=torch.bool)


def feature_acts(toy, tokens, feature):
    _, cache = toy.model.run_with_cache(tokens, names_filter=lambda n: n == "blocks.0.attn.hook_z")
    return toy.output_saes[feature.head].encode(cache["blocks.0.attn.hook_z"])[..., feature.index]


def test_planted_heads_fire_exactly_where_the_rules_say(toy, corpus):
    for feature in toy.features:
        active = feature_acts(toy, corpus, feature) > 0
        truth = planted_truth(corpus, feature)
        assert torch.equal(active, truth), f"{feature.name}: {int((active != truth).sum())} positions differ"
        if feature.kind != "dead":
            assert truth.any(dim=1).sum() >= 150, f"{feature.name} fires in too few sequences for REF's sampling"


def test_corpus_is_deterministic_and_well_formed():
    a, b = generate_corpus(50, seed=3), generate_corpus(50, seed=3)
    assert torch.equal(a, b) and a.shape == (50, 32)
    assert (a[:, 0] == VOCAB.index("<|endoftext|>")).all()
    assert not torch.equal(a, generate_corpus(50, seed=4))
    with pytest.raises(ValueError, match="n_sequences"):
        generate_corpus(0)


def test_tokenizer_round_trip(toy):
    tokens = toy.model.to_tokens("If the day then")
    assert toy.model.to_str_tokens(tokens[0]) == ["<|endoftext|>", "If", "the", "day", "then"]


@pytest.fixture(scope="module")
def extracted(toy, corpus):
    """Both orderings for every planted feature, on REF-style exemplars."""
    scan_by_head = {h: scan_output_features(toy.model, sae, corpus) for h, sae in toy.output_saes.items()}
    out = {}
    for feature in toy.features:
        if feature.kind == "dead":
            continue
        circuit = toy.circuit(feature.head)
        ex = sample_exemplars(scan_by_head[feature.head], feature.index, seq_len=corpus.shape[1])
        acts = {s: input_activations(toy.model, toy.input_sae, corpus[getattr(ex, s).sequence]) for s in ("train", "val")}
        table = candidate_table(circuit, feature.index, num_values=circuit.n_inputs, num_queries=circuit.n_inputs)
        keys, queries = _first_appearance(table.keys), _first_appearance(table.queries)
        imp = paper_importance(circuit, feature.index, queries, keys, acts["train"], ex.train.position)
        out[feature.name] = dict(circuit=circuit, ex=ex, acts=acts, table=table, keys=keys, queries=queries, imp=imp)
    return out


def _pair(toy, feature):
    return toy.token_id(feature.query), toy.token_id(feature.key)


@pytest.mark.parametrize("name", ["L0H0.0", "L0H0.1", "L0H0.2", "L0H1.0"])
def test_planted_pair_is_a_top_term_under_both_orderings(toy, extracted, name):
    feature, e = toy.feature(name), extracted[name]
    pair = _pair(toy, feature)
    weights = rules_from_weights(e["table"], 4)
    importance = rules_from_importance(e["circuit"], feature.index, e["queries"], e["keys"], e["imp"], 4)
    for rules in (weights, importance):
        terms = list(zip(rules.queries.tolist(), rules.keys.tolist()))
        assert terms[0] == pair, f"{rules.method}: top term {terms[0]} is not the planted {pair}"
    exhaustive = rank_all_pairs(e["circuit"], feature.index, 3, backend="torch")
    assert (exhaustive.queries[0].item(), exhaustive.keys[0].item()) == pair


@pytest.mark.parametrize("name", ["L0H0.0", "L0H0.2"])
def test_plain_skipgram_rules_reach_f1_one_with_at_most_8_terms(toy, extracted, name):
    e = extracted[name]
    feature = toy.feature(name)
    for n in (4, 8):
        for rules in (rules_from_weights(e["table"], n),
                      rules_from_importance(e["circuit"], feature.index, e["queries"], e["keys"], e["imp"], n)):
            m = binary_metrics(e["ex"].val.act_max, rules.predict(e["acts"]["val"], e["ex"].val.position))
            assert (m.precision, m.recall, m.f1) == (1.0, 1.0, 1.0), (rules.method, n, m)


@pytest.mark.parametrize("name", ["L0H0.3", "L0H1.1"])
def test_unrelated_features_do_not_get_the_planted_rules(toy, extracted, name):
    e = extracted[name]
    feature = toy.feature(name)
    planted = {_pair(toy, f) for f in toy.features if f.kind in ("skipgram", "absence", "counting")}
    for rules in (rules_from_weights(e["table"], 8),
                  rules_from_importance(e["circuit"], feature.index, e["queries"], e["keys"], e["imp"], 8)):
        firing = {(q, k) for q, k, a, v in zip(rules.queries.tolist(), rules.keys.tolist(),
                                               rules.attn_score.tolist(), rules.value_score.tolist()) if a * v > 0}
        assert firing == {_pair(toy, feature)}, (rules.method, firing)
        assert not firing & planted


def _exemplar(toy, words, position_word_index=-1):
    """One exemplar from a word list (BOS prepended, padded with 'the'), scored at the last given word."""
    tokens = torch.full((1, toy.seq_len), toy.token_id("the"))
    tokens[0, 0] = toy.token_id("<|endoftext|>")
    for i, w in enumerate(words):
        tokens[0, 1 + i] = toy.token_id(w)
    return tokens, torch.tensor([len(words) if position_word_index == -1 else 1 + position_word_index])


@pytest.mark.parametrize(
    "name,counterexample",
    [("L0H0.1", ["http", "the", "twitter", "com"]), ("L0H1.0", ["the", "games"])],
)
def test_skipgram_rules_fall_short_on_absence_and_counting(toy, extracted, name, counterexample):
    """The paper's point: a skip-gram rule set predicts these features active where they are not."""
    e, feature = extracted[name], toy.feature(name)
    tokens, position = _exemplar(toy, counterexample)
    truth = feature_acts(toy, tokens, feature)[0, position]
    assert truth.item() == 0.0
    acts = input_activations(toy.model, toy.input_sae, tokens)
    for rules in (rules_from_weights(e["table"], 8),
                  rules_from_importance(e["circuit"], feature.index, e["queries"], e["keys"], e["imp"], 8)):
        assert rules.predict(acts, position).item() > 0, f"{rules.method}: expected a false positive"


def test_extract_feature_runs_both_methods(toy, extracted):
    e = extracted["L0H0.0"]
    from attnrules.rules.descriptions import describe_input_features

    settings = ExtractSettings(num_values=e["circuit"].n_inputs, num_queries=e["circuit"].n_inputs, max_rules=16)
    describe = describe_input_features(toy.model, toy.input_sae)
    rules, points, _ = extract_feature(
        e["circuit"], 0, (e["acts"]["train"], e["ex"].train.position),
        (e["acts"]["val"], e["ex"].val.position, e["ex"].val.act_max), settings,
    )
    assert rules["weights"].render(describe)[0].startswith("[If] … [then] → L0H0.0")
    assert rules["importance"].render(describe)[0].startswith("[If] … [then] → L0H0.0")
    assert [(p.method, p.n_terms) for p in points] == [(m, n) for m in ("weights", "importance") for n in (4, 8, 16)]
