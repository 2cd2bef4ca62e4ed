"""The glyph and rune planted models: transformer_lens's own forward pass fires every planted
output feature exactly where its rule says, and the models differ from attnrules.toy as intended."""
import dataclasses
import math

import pytest
import torch

from attnrules.circuit import HeadCircuit
from attnrules.scoring import value_scores
from attnrules.sources import check_processed
from planted import GLYPH_BOS, GLYPH_VOCAB, RUNE_BOS, build_glyph, build_rune

N = 2000


@pytest.fixture(scope="module")
def glyph():
    return build_glyph()


@pytest.fixture(scope="module")
def rune():
    return build_rune()


@pytest.fixture(scope="module", params=["glyph", "rune"])
def planted(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def run(planted):
    """(model, corpus, ground truth, output-SAE activations per head) on a 2000-sequence corpus."""
    tokens = planted.corpus(N, seed=0)
    return planted, tokens, planted.fires(tokens), {h: planted.acts(tokens, h) for h in planted.output_saes}


def test_models_are_processed(planted):
    check_processed(planted.model)
    assert not planted.model.training


def test_every_planted_feature_fires_exactly_where_its_rule_says(run):
    planted, tokens, truth, acts = run
    assert set(truth) == {f.name for f in planted.features if f.kind != "noise"}
    for f in planted.features:
        active = acts[f.head][..., f.index] > 0
        n_active = int(active.any(dim=1).sum())
        if f.kind == "noise":
            assert 150 <= n_active <= N - 150, f"{f.name}: noise fires in {n_active} sequences"
            continue
        wrong = int((active != truth[f.name]).sum())
        assert wrong == 0, f"{f.name} ({f.kind}): {wrong} of {active.numel()} positions differ from the rule"
        if f.kind == "dead":
            assert n_active == 0
        else:
            assert 150 <= n_active <= N - 150, f"{f.name}: active in {n_active} of {N} sequences"


def test_the_exactness_check_has_teeth(run):
    """A rule off by one detail (count ≥ 2, or the absence without its distractor) is caught."""
    planted, tokens, _, acts = run
    counting = next(f for f in planted.features if f.kind == "counting")
    absence = next(f for f in planted.features if f.kind == "absence")
    for wrong in (dataclasses.replace(counting, min_count=2), dataclasses.replace(absence, kind="skipgram")):
        truth = dataclasses.replace(planted, features=(wrong,)).fires(tokens)[wrong.name]
        assert not torch.equal(acts[wrong.head][..., wrong.index] > 0, truth), wrong


def test_real_attention_logits_are_the_planted_ones(planted):
    """hook_attn_scores (after LayerNorm/RMSNorm and the model's attn_scale) differ between the
    planted key and a filler key by the planted logit, for every planted (query, key)."""
    filler, other_filler = planted.fillers[:2]
    hook = f"blocks.{planted.layer}.attn.hook_attn_scores"
    for (head, query, key), logit in planted.logits.items():
        if query == "*":  # a b_Q logit: every query, here a filler
            query = other_filler
        else:  # a query's own logit adds to the key's b_Q logit, if any
            logit += planted.logits.get((head, "*", key), 0.0)
        if key == planted.bos:
            words, key_pos = [filler, query], 0
        elif key == query:
            words, key_pos = [filler, query], 2
        else:
            words, key_pos = [key, filler, query], 1
        tokens = torch.tensor([[planted.bos_id] + [planted.token_id(w) for w in words]])
        _, cache = planted.model.run_with_cache(tokens, names_filter=lambda n: n == hook)
        scores = cache[hook][0, head, -1]
        filler_pos = words.index(filler) + 1
        assert scores[key_pos] - scores[filler_pos] == pytest.approx(logit, abs=1e-3), (head, query, key)


def test_corpus_is_deterministic_and_starts_with_bos(planted):
    a, b = planted.corpus(40, seed=3), planted.corpus(40, seed=3)
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (40, planted.seq_len)
    assert 16 <= planted.seq_len <= 24
    assert (a[:, 0] == planted.bos_id).all() and not (a[:, 1:] == planted.bos_id).any()
    assert not torch.equal(a, planted.corpus(40, seed=4))


def test_tokenizer_round_trip(planted):
    words = [f.query for f in planted.features if f.query][:2] + [planted.fillers[0]]
    tokens = planted.model.to_tokens(" ".join(words))
    assert tokens[0, 0].item() == planted.bos_id
    assert planted.model.to_str_tokens(tokens[0]) == [planted.bos] + words


# --------------------------------------------------------------------------------------------------
# How the models are built


def test_glyph_is_built_unlike_the_toy(glyph):
    cfg, model = glyph.model.cfg, glyph.model
    assert glyph.bos == GLYPH_BOS and glyph.bos_id == len(glyph.vocab) - 1 == cfg.d_vocab - 1
    assert cfg.n_layers == 2 and cfg.attn_only and cfg.normalization_type == "LNPre"
    assert glyph.layer == 1 and {f.layer for f in glyph.features} == {1}
    assert model.blocks[1].attn.attn_scale == 2.0 != math.sqrt(cfg.d_head)
    assert bool((model.blocks[0].attn.W_O == 0).all()) and bool((model.blocks[0].attn.b_O == 0).all())
    assert bool((model.blocks[1].attn.b_Q != 0).any()) and bool((model.blocks[1].attn.b_K != 0).any())
    sae = glyph.input_sae
    assert sae.layer == 1 and sae.n_features < 100 and bool((sae.b_dec != 0).any())


def test_rune_is_built_unlike_the_toy_and_glyph(rune):
    cfg, model = rune.model.cfg, rune.model
    assert rune.bos == RUNE_BOS and rune.bos_id == 0 and rune.vocab[0] == "<bos>"
    assert cfg.n_layers == 3 and cfg.n_heads == 3 and cfg.d_head in (4, 6) and cfg.normalization_type == "RMSPre"
    assert not cfg.use_attn_scale and model.blocks[2].attn.attn_scale == 1.0
    assert {(f.layer, f.head) for f in rune.features} == {(2, 2)}
    for layer in (0, 1):
        assert bool((model.blocks[layer].attn.W_O == 0).all())
    sae = rune.input_sae
    assert sae.layer == 2 and sae.n_features < 100
    assert float(sae.W_dec.abs().max(dim=1).values.max()) < 0.9, "decoder rows should not be axis-aligned"
    assert not set(rune.vocab) & set(GLYPH_VOCAB)


# --------------------------------------------------------------------------------------------------
# Glyph's special features


def _insert_after_bos(tokens, word_id):
    return torch.cat([tokens[:, :1], torch.full_like(tokens[:, :1], word_id), tokens[:, 1:]], dim=1)


def test_glyph_false_distractor_changes_nothing_and_real_distractor_turns_off(glyph):
    tokens = glyph.corpus(N, seed=0)
    truth = glyph.fires(tokens)
    for name, word, keeps in (("L1H0.3", "snib", True), ("L1H0.2", "gleb", False)):
        rows = truth[name].any(dim=1)
        before = glyph.acts(tokens[rows], 0)[..., int(name[-1])]
        after = glyph.acts(_insert_after_bos(tokens[rows], glyph.token_id(word)), 0)[..., int(name[-1])][:, 1:]
        where = truth[name][rows]
        if keeps:
            assert bool((after[where] > 0).all()), f"inserting {word} switched {name} off"
            change = (after[where].mean() - before[where].mean()).abs() / before[where].mean()
            assert change < 0.1, f"{name}: mean activation changed by {float(change):.1%}"
        else:
            assert not bool((after > 0).any()), f"{name} still fires after inserting {word}"


def test_glyph_false_distractor_misleads_paper_mode(glyph):
    circuit = HeadCircuit.from_model(glyph.model, glyph.input_sae, glyph.output_saes[0])
    vosh, snib, krel = (glyph.token_id(w) for w in ("vosh", "snib", "krel"))
    attn = lambda q, k: float(circuit.query_proj[q] @ circuit.key_proj[k])  # noqa: E731
    v = value_scores(circuit, 3)
    assert attn(vosh, snib) > attn(vosh, krel)
    assert float(v[snib]) < 0 < float(v[krel])


def test_glyph_disjunction_top_sequences_all_contain_wug(glyph):
    tokens = glyph.corpus(N, seed=0)
    act = glyph.acts(tokens, 0)[..., 1]
    fep = tokens == glyph.token_id("fep")
    seen = lambda w: torch.cumsum((tokens == glyph.token_id(w)).long(), dim=1) > 0  # noqa: E731
    via_wug = (fep & seen("wug") & (act > 0)).any(dim=1)
    fires = (act > 0).any(dim=1)
    dax_only = fires & ~via_wug
    assert int(dax_only.sum()) >= 100, f"only {int(dax_only.sum())} sequences fire through dax alone"
    top = torch.sort(act.amax(dim=1), descending=True, stable=True).indices[:150]
    assert bool(via_wug[top].all()) and not bool(dax_only[top].any())
    # dax's activations are clearly lower than wug's (typically 0.38 against 0.97)
    dax_acts = act[fep & seen("dax") & ~seen("wug")]
    wug_acts = act[fep & seen("wug") & ~seen("dax")]
    assert float(dax_acts.max()) < float(wug_acts.min())
    assert float(dax_acts.median()) < 0.5 * float(wug_acts.median())


def test_rune_distractor_turns_absence_off(rune):
    tokens = rune.corpus(N, seed=0)
    rows = rune.fires(tokens)["L2H2.1"].any(dim=1)
    after = rune.acts(_insert_after_bos(tokens[rows], rune.token_id("skell")), 2)[..., 1]
    assert int(rows.sum()) > 0 and not bool((after > 0).any())
