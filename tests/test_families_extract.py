"""extract_head end to end on one tiny model of every family (rotary, GQA, QK-norm, soft-capping,
sliding windows, parallel attention): no failed step, rules with offsets, results the report renders."""
import html
import warnings

import pytest
import torch
from families import FAMILIES, LOCAL_LAYERS, WINDOW, build_family, family_saes

from attnrules import ExtractSettings, extract_head
from attnrules.report import load_results, render_report

SETTINGS = ExtractSettings(features=(0, 1, 2, 3, 4), examples_per_bin=6, num_values=8, num_queries=8, max_rules=8,
                           exhaustive_k=10, counting_bases=8, counting_min_bases=4, counting_max=3)
SEQ_LEN = 12


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_extract_head_runs_on_every_family(name, tmp_path):
    model = build_family(name)
    layer = LOCAL_LAYERS.get(name, (1,))[0]  # a sliding-window layer where the family has one
    head = model.cfg.n_heads - 1  # a head of the last key/value group under GQA
    sae_in, sae_out = family_saes(model, layer, head, seed=1)
    tokens = torch.randint(0, model.cfg.d_vocab, (160, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # caps of num_values etc. to the small SAEs
        result = extract_head(model, sae_in, sae_out, tokens, settings=SETTINGS, out_dir=tmp_path / "L", progress=False)
    assert result.metadata["failed_steps"] == 0, [e for f in result.features for e in f.errors]
    names = [f.name for f in result.features]  # features too rarely or too often active are skipped, with a note
    assert len(names) >= 1 and set(names) <= {f"L{layer}H{head}.{g}" for g in SETTINGS.features}
    assert result.metadata["exact_logit_groups"]
    rotary = model.cfg.positional_embedding_type == "rotary"
    window = WINDOW if layer in LOCAL_LAYERS.get(name, ()) else None
    for feature in result.features:
        assert {r.method for r in feature.rules} == {"weights", "importance", "exact"}
        for rules in feature.rules:
            for term in rules.terms:
                assert (term.offset is not None) == rotary
                if rotary and term.query >= 0 and term.key >= 0:
                    assert 0 <= term.offset < (window or SEQ_LEN)
    page = html.unescape(render_report(load_results(tmp_path)))
    assert names[0] in page
