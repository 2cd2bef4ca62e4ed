"""A sweep's matches at every N from one evaluation of the largest set (attnrules.evaluation.grid_matches):
every N gets exactly the rows its own set's ``matches`` gives — bit for bit, in order — for every
ordering the pipeline builds (weights, paper importance with its value rows, exact with pseudo terms
and an activation floor, the unigram baseline), on the planted toy and on a rotary, GQA model with
offsets; the fast path is taken where the sets are prefixes, and a set that is not one is evaluated
on its own (on the rotary head some N are: their A_δ profiles, computed for N terms at once, may
round differently from the largest set's)."""
import dataclasses

import pytest
import torch
from families import build_family, family_saes, family_tokens

from attnrules.evaluation.grid_matches import _bits, grid_matches, prefix_lengths
from attnrules.exemplars import input_activations
from attnrules.importance import exact_importance_terms
from attnrules.pipeline import ExtractSettings
from attnrules.pipeline.extract import head_circuit, rule_builders
from attnrules.rules import SkipgramRuleSet
from attnrules.rules.skipgram import scale_for

GRID = [4, 8, 16, 32, 64]
FIELDS = ("exemplar", "kq", "term", "key_position", "score", "kv_score")


def same_rows(a, b) -> bool:
    return (a.kinds == b.kinds and a.n == b.n and torch.equal(a.positions, b.positions)
            and all(torch.equal(_bits(getattr(a, f)), _bits(getattr(b, f))) for f in FIELDS))


def _builders(model, sae_in, sae_out, tokens, feature):
    """Every ordering's builder for one feature, from random exemplars of ``tokens``."""
    g = torch.Generator().manual_seed(feature)
    positions = torch.randint(1, tokens.shape[1], (tokens.shape[0],), generator=g)
    acts = input_activations(model, sae_in, tokens)
    train, val = slice(0, tokens.shape[0] // 2), slice(tokens.shape[0] // 2, None)
    settings = ExtractSettings(num_values=20, num_queries=20, max_rules=max(GRID), unigram=True, backend="torch")
    circuit = head_circuit(model, sae_in, sae_out, tokens.shape[1], settings, [])

    def exact(queries, keys):
        return exact_importance_terms(model, sae_in, sae_out, feature, queries, keys, tokens=tokens[train],
                                      positions=positions[train])

    builders, _ = rule_builders(circuit, feature, (acts[train], positions[train]), settings, exact)
    return builders, acts[val], positions[val]


def _cases():
    from attnrules.toy import build_toy

    toy = build_toy()
    yield "toy", toy.model, toy.input_sae, toy.output_saes[0], toy.corpus(120, seed=3), 0
    model = build_family("llama")  # rotary, GQA: terms carry offsets and NaN-holed A_δ profiles
    sae_in, sae_out = family_saes(model, 1, 3, seed=2)
    yield "llama", model, sae_in, sae_out, family_tokens(model, n=40, t=12, seed=4), 1


@pytest.mark.parametrize("case", list(range(2)))
def test_every_n_gets_the_rows_of_its_own_set(case):
    name, model, sae_in, sae_out, tokens, feature = list(_cases())[case]
    builders, acts, positions = _builders(model, sae_in, sae_out, tokens, feature)
    assert set(builders) == {"weights", "importance", "exact", "unigram"}
    scale = scale_for(acts)
    for method, build in builders.items():
        got = list(grid_matches(build, GRID, acts, positions, scale))
        assert [n for n, _, _ in got] == GRID
        for n, rules, rows in got:
            assert rules is build(n)
            assert same_rows(rows, rules.matches(acts, positions, act_scale=scale(rules))), (name, method, n)
        if method != "unigram":  # the fast path is taken (on the rotary head, A_δ profiles computed for
            # N terms at once may round differently from the largest set's: those N are evaluated on their own)
            prefixes = [prefix_lengths(build(n), build(max(GRID))) is not None for n in GRID]
            assert all(prefixes) if name == "toy" else sum(prefixes) >= len(GRID) - 1, (name, method, prefixes)
            assert len(got[-1][2]) > 0 or method == "exact", (name, method)  # rows to select from
    offsets = builders["exact"](max(GRID)).offset_attn  # pseudo terms' rows are NaN
    assert (offsets is not None and bool(offsets.isnan().any())) == (name == "llama")


def _set(n: int, **changes) -> SkipgramRuleSet:
    g = torch.Generator().manual_seed(0)
    full = SkipgramRuleSet("f", torch.randint(0, 6, (8,), generator=g), torch.randint(0, 6, (8,), generator=g),
                           torch.rand(8, generator=g), torch.rand(8, generator=g) - 0.3, 1, "importance",
                           value_features=torch.arange(5), value_feature_scores=torch.rand(5, generator=g) - 0.3)
    part = dataclasses.replace(full, queries=full.queries[:n], keys=full.keys[:n], attn_score=full.attn_score[:n],
                               value_score=full.value_score[:n], value_features=full.value_features[: min(n, 5)],
                               value_feature_scores=full.value_feature_scores[: min(n, 5)])
    return dataclasses.replace(part, **changes)


def test_a_set_that_is_not_a_prefix_is_evaluated_on_its_own():
    largest = _set(8)
    assert prefix_lengths(_set(3), largest) == (3, 3)
    changed = {
        "other order": dict(queries=_set(2).queries.flip(0) + 1),
        "another score": dict(attn_score=_set(2).attn_score + 1e-3),
        "another setting": dict(min_weight=0.5),
        "no value rows": dict(value_features=None, value_feature_scores=None),
        "other values": dict(value_features=torch.tensor([4, 3])),
    }
    acts = torch.rand(6, 7, 6) * (torch.rand(6, 7, 6) > 0.5)
    positions = torch.randint(1, 7, (6,), generator=torch.Generator().manual_seed(1))
    scale = scale_for(acts)
    for why, change in changed.items():
        sets = {8: largest, 4: _set(4), 2: _set(2, **change)}
        assert prefix_lengths(sets[2], largest) is None, why
        got = {n: rows for n, _, rows in grid_matches(sets.__getitem__, [2, 4, 8], acts, positions, scale)}
        for n, rules in sets.items():
            assert same_rows(got[n], rules.matches(acts, positions)), (why, n)
    # a signed zero or a NaN is compared by its bits
    with_nan = _set(8, attn_score=torch.tensor([float("nan")] * 8))
    assert prefix_lengths(_set(2, attn_score=torch.tensor([float("nan")] * 2)), with_nan) == (2, 2)
    assert prefix_lengths(_set(2, attn_score=torch.tensor([0.0, 1.0])), _set(8, attn_score=torch.tensor([-0.0] + [1.0] * 7))) is None
    assert list(grid_matches(_set, [], acts, positions, scale)) == []  # an empty grid: nothing, nothing built
