"""Exact mode: the decomposition reproduces transformer_lens's logits, the closed-form importance
equals autograd through transformer_lens's own forward pass, and on the LayerNorm toy exact mode
finds the planted pair where paper mode does not."""
import copy
import dataclasses
import types

import pytest
import torch
from tiny_gpt2 import build_tiny_gpt2
from topk_oracle import assert_matches, score_matrix

from attnrules.circuit import GROUPS, PAPER_GROUP, SCALE_GROUP, HeadCircuit, exact_projections, reconstruct
from attnrules.importance import exact_factors_all_pairs, exact_importance, rank_all_pairs_by_exact_importance
from attnrules.exemplars import input_activations, sample_exemplars, scan_output_features
from attnrules.importance import paper_importance
from attnrules.pipeline.extract import _first_appearance
from attnrules.rules import rules_from_weights
from attnrules.scoring import candidate_table
from attnrules.sources import InputSAE, OutputSAE
from attnrules.toy import VOCAB
from attnrules.toy.layernorm import LOUD_WORD, build_toy_ln


def random_saes(model, layer, head, n_in=30, n_out=5, seed=0):
    """A random input SAE (so a large error term) with ~1/3 of features active, and an output SAE."""
    g = torch.Generator().manual_seed(seed)
    d, dh = model.cfg.d_model, model.cfg.d_head
    r = lambda *s: torch.randn(*s, generator=g)
    sae_in = InputSAE.from_tensors(r(d, n_in), r(n_in) - 2.0, r(n_in, d) / d**0.5, 0.3 * r(d), layer=layer)
    sae_out = OutputSAE.from_tensors(r(dh, n_out), 0.1 * r(n_out), r(n_out, dh), 0.3 * r(dh), layer=layer, head=head,
                                     n_heads=model.cfg.n_heads, d_head=dh)
    return sae_in, sae_out


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_gpt2()


@pytest.fixture(scope="module")
def toy_ln():
    return build_toy_ln()


def tokens_for(model, n=4, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (n, t), generator=g)
    tokens[:, 0] = 0
    return tokens


def rms_model():
    """A random 1-layer RMSPre model with query/key biases (transformer_lens initialises them to 0)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=24, n_ctx=16, d_head=6, n_heads=2, d_vocab=50, attn_only=True,
                                  normalization_type="RMSPre", act_fn="relu", seed=0)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        for bias in (model.blocks[0].attn.b_Q, model.blocks[0].attn.b_K):
            bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return model


def cases(tiny, toy, toy_ln):
    """(name, model, input SAE, output SAE, tokens): LN + biases + SAE error; the plain toy; the LN toy; RMSPre."""
    out = []
    for layer in (0, 1):
        sae_in, sae_out = random_saes(tiny, layer, 2, seed=layer)
        out.append((f"tiny L{layer}", tiny, sae_in, sae_out, tokens_for(tiny)))
    out.append(("toy H0", toy.model, toy.input_sae, toy.output_saes[0], toy.corpus(4, seed=1)))
    out.append(("toy H1", toy.model, toy.input_sae, toy.output_saes[1], toy.corpus(4, seed=2)))
    out.append(("toy_ln", toy_ln.model, toy_ln.input_sae, toy_ln.output_saes[0], toy_ln.corpus(4, seed=3)))
    rms = rms_model()
    out.append(("rms", rms, *random_saes(rms, 0, 1), tokens_for(rms)))
    return out


def real_run(model, layer, head, tokens):
    names = [f"blocks.{layer}.attn.hook_{x}" for x in ("attn_scores", "q", "k")]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return (cache[names[0]][:, head].double(), cache[names[1]][:, :, head].double(),
            cache[names[2]][:, :, head].double())


def side_sum(dec, side, component):
    """Σ of the groups whose query (side 0) or key (side 1) component is ``component``."""
    return sum(dec.group(g) for g in GROUPS if g.replace(" scale", "").replace(" (paper)", "").split("×")[side] == component)


def test_decomposition_sums_to_transformer_lens_attention_scores(tiny, toy, toy_ln):
    for name, model, sae_in, sae_out, tokens in cases(tiny, toy, toy_ln):
        dec = reconstruct(model, sae_in, sae_out.head, tokens)
        real, q, k = real_run(model, sae_in.layer, sae_out.head, tokens)
        causal = dec.causal
        assert dec.groups.shape == (*tokens.shape, tokens.shape[1], len(GROUPS)), name
        scale = float(real[:, causal].abs().max())
        torch.testing.assert_close(dec.logits[:, causal], real[:, causal], rtol=1e-5, atol=1e-5 * scale, msg=name)
        torch.testing.assert_close(dec.groups.sum(-1), dec.logits, msg=name)
        # the groups are (query component × key component) partitions: summing the key side of the
        # groups whose query component is the bias gives b_Q · k, and so on
        att = model.blocks[sae_in.layer].attn
        s, b_q, b_k = att.attn_scale, att.b_Q[sae_out.head].double(), att.b_K[sae_out.head].double()
        torch.testing.assert_close(side_sum(dec, 0, "bias"), torch.einsum("d,bkd->bk", b_q, k)[:, None, :].expand_as(real) / s,
                                   atol=1e-5 * scale, rtol=1e-5, msg=name)
        torch.testing.assert_close(side_sum(dec, 1, "bias"), torch.einsum("bqd,d->bq", q, b_k)[:, :, None].expand_as(real) / s,
                                   atol=1e-5 * scale, rtol=1e-5, msg=name)


def test_paper_group_is_the_paper_formula_and_pair_terms_list_every_term(tiny, toy_ln):
    for model, sae_in, sae_out, tokens in ((tiny, *random_saes(tiny, 1, 2), tokens_for(tiny)),
                                           (toy_ln.model, toy_ln.input_sae, toy_ln.output_saes[0], toy_ln.corpus(2))):
        circuit = HeadCircuit.from_model(model, sae_in, sae_out)
        dec = reconstruct(model, sae_in, circuit, tokens)
        f = input_activations(model, sae_in, tokens).double()
        paper = torch.einsum("bqd,bkd->bqk", f @ circuit.query_proj.double(), f @ circuit.key_proj.double())
        torch.testing.assert_close(dec.group(PAPER_GROUP), paper, rtol=1e-6, atol=1e-9)
        frame = dec.pair_terms(1, 7, 3)
        assert frame["exact_term"].sum() == pytest.approx(float(dec.logits[1, 7, 3]), rel=1e-9, abs=1e-12)
        assert frame["paper_term"].sum() == pytest.approx(float(dec.group(PAPER_GROUP)[1, 7, 3]), rel=1e-9, abs=1e-12)
        pairs = frame[(frame.query_component == "feature") & (frame.key_component == "feature")]
        ff = dec.group(PAPER_GROUP)[1, 7, 3] + dec.group(SCALE_GROUP)[1, 7, 3]
        assert pairs["exact_term"].sum() == pytest.approx(float(ff), rel=1e-9, abs=1e-12)
        assert len(pairs) == int((f[1, 7] != 0).sum() * (f[1, 3] != 0).sum())
        assert frame["exact_term"].abs().is_monotonic_decreasing


def activation_with_logit_delta(model, sae_out, feature, tokens, positions, delta):
    """The real output-feature activation at ``positions``, from transformer_lens's forward pass with
    ``delta()`` ``[B, T, T]`` added to the head's attention logits on hook_attn_scores."""
    layer, head = sae_out.layer, sae_out.head
    z = {}

    def add_delta(scores, hook):
        extra = torch.zeros_like(scores)
        extra[:, head] = delta().to(scores.dtype)
        return scores + extra

    def keep_z(value, hook):
        z["z"] = value

    model.run_with_hooks(tokens, stop_at_layer=layer + 1, fwd_hooks=[
        (f"blocks.{layer}.attn.hook_attn_scores", add_delta), (f"blocks.{layer}.attn.hook_z", keep_z)])
    return sae_out.encode(z["z"])[torch.arange(len(tokens)), positions, feature]


def autograd_exact_importance(model, sae_in, sae_out, feature, tokens, positions):
    """The oracle: transformer_lens's forward pass with every feature-pair term of the head's logit
    scaled by a mask (added on hook_attn_scores), the real output-SAE activation read from hook_z."""
    layer, head = sae_out.layer, sae_out.head
    att = model.blocks[layer].attn
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.ln1.hook_scale"]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    f = sae_in.encode(cache[names[0]]).detach()
    sigma = cache[names[1]] if names[1] in cache else torch.ones(*tokens.shape, 1)
    f_scaled = f / sigma
    A = (sae_in.W_dec @ att.W_Q[head]) @ (sae_in.W_dec @ att.W_K[head]).T  # [queries, keys]
    mask = torch.ones_like(A, requires_grad=True)
    causal = torch.ones(tokens.shape[1], tokens.shape[1]).tril()
    delta = lambda: torch.einsum("btq,bik,qk->bti", f_scaled, f_scaled, (mask - 1) * A.detach()) / att.attn_scale  # noqa: E731
    acts = activation_with_logit_delta(model, sae_out, feature, tokens, positions, lambda: delta() * causal)
    acts.sum().backward()
    return mask.grad.double(), acts.detach()  # [queries, keys]


@pytest.mark.parametrize("case", [0, 1, 2, 4, 5])
def test_exact_importance_equals_autograd_through_transformer_lens(tiny, toy, toy_ln, case):
    name, model, sae_in, sae_out, _ = cases(tiny, toy, toy_ln)[case]
    positions = torch.randint(0, 12, (16,), generator=torch.Generator().manual_seed(case))
    feature = 0
    if name.startswith(("tiny", "rms")):
        tokens = tokens_for(model, n=16, seed=case)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
        acts = sae_out.encode(cache[f"blocks.{sae_out.layer}.attn.hook_z"])  # shift b_enc: about half the ReLUs open
        shift = torch.zeros_like(sae_out.b_enc)
        shift[feature] = acts[torch.arange(16), positions, feature].median()
        sae_out = dataclasses.replace(sae_out, b_enc=sae_out.b_enc - shift)
    else:  # score the planted [If] … [then] feature where it fires and where it does not
        tokens = (toy if name == "toy H0" else toy_ln).corpus(16, seed=7)
        tokens[:8, 3], tokens[:8, 9] = VOCAB.index("If"), VOCAB.index("then")
        positions[:8] = 9
    want, acts = autograd_exact_importance(model, sae_in, sae_out, feature, tokens, positions)
    assert 0 < int((acts > 0).sum()) < len(acts), "the oracle must see both open and closed ReLUs"
    everything = torch.arange(sae_in.n_features)
    got = exact_importance(model, sae_in, sae_out, feature, everything, everything, tokens, positions, batch_size=5)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    some_queries, some_keys = torch.tensor([2, 9]), torch.tensor([4, 0, 11])
    torch.testing.assert_close(
        exact_importance(model, sae_in, sae_out, feature, some_queries, some_keys, tokens, positions),
        got[some_queries][:, some_keys], rtol=1e-9, atol=1e-12)


def test_all_pairs_factors_and_engine_ranking(tiny):
    sae_in, sae_out = random_saes(tiny, 1, 2)
    tokens = tokens_for(tiny, n=10, seed=3)
    positions = torch.arange(10) + 1
    everything = torch.arange(sae_in.n_features)
    full = exact_importance(tiny, sae_in, sae_out, 1, everything, everything, tokens, positions)
    qa, ka = exact_factors_all_pairs(tiny, sae_in, sae_out, 1, tokens, positions)
    qp, kp = exact_projections(tiny, sae_in, 2)
    s = score_matrix(qp, kp, query_acts=qa, key_acts=ka)  # [queries, keys]
    torch.testing.assert_close(torch.from_numpy(s), full, rtol=1e-9, atol=1e-12)
    for score in ("signed", "absolute"):
        res = rank_all_pairs_by_exact_importance(tiny, sae_in, sae_out, 1, tokens, positions, 40, score=score,
                                                 backend="torch")
        s = score_matrix(qp, kp, query_acts=qa, key_acts=ka, score=score)
        assert_matches(res, s, 40, "global", tol=1e-4 * float(abs(s).max()))


# --------------------------------------------------------------------------------------------------
# The LayerNorm toy


@pytest.fixture(scope="module")
def ln_corpus(toy_ln):
    return toy_ln.corpus(3000, seed=0)


def test_ln_toy_features_fire_exactly_where_the_rules_say(toy_ln, ln_corpus):
    _, cache = toy_ln.model.run_with_cache(ln_corpus, names_filter=lambda n: n == "blocks.0.attn.hook_z")
    acts = toy_ln.output_saes[0].encode(cache["blocks.0.attn.hook_z"])
    ids = {w: VOCAB.index(w) for w in VOCAB}
    for feature in toy_ln.features:
        truth = (ln_corpus == ids[feature.query]) & (torch.cumsum(ln_corpus == ids[feature.key], 1) > 0)
        assert torch.equal(acts[..., feature.index] > 0, truth), feature.name
        assert truth.any(1).sum() >= 150


def test_exact_mode_recovers_the_planted_pair_where_paper_mode_is_misled(toy_ln, ln_corpus):
    """L0H0.0 = [If] … [then]; the loud token 'music' inflates paper-mode scores of (then, music)."""
    planted, loud = (VOCAB.index("then"), VOCAB.index("If")), (VOCAB.index("then"), VOCAB.index(LOUD_WORD))
    model, sae_in, sae_out = toy_ln.model, toy_ln.input_sae, toy_ln.output_saes[0]
    circuit = toy_ln.circuit(0)
    table = candidate_table(circuit, 0, num_values=circuit.n_inputs, num_queries=circuit.n_inputs)
    weights = rules_from_weights(table, 4)
    assert (weights.queries[0].item(), weights.keys[0].item()) == loud

    scan = scan_output_features(model, sae_out, ln_corpus, batch_size=len(ln_corpus))
    ex = sample_exemplars(scan, 0, seq_len=ln_corpus.shape[1])
    tokens, positions = ln_corpus[ex.train.sequence], ex.train.position
    keys, queries = _first_appearance(table.keys), _first_appearance(table.queries)

    def best(importance):  # [queries, keys]
        q, k = divmod(int(importance.abs().argmax()), importance.shape[1])
        return (queries[q].item(), keys[k].item())

    paper = paper_importance(circuit, 0, queries, keys, input_activations(model, sae_in, tokens), positions)
    exact = exact_importance(model, sae_in, sae_out, 0, queries, keys, tokens, positions)
    assert best(paper) == loud and best(exact) == planted
    ranked = rank_all_pairs_by_exact_importance(model, sae_in, sae_out, 0, tokens, positions, 2, backend="torch")
    assert [(q, k) for q, k, _ in ranked.pairs()] == [planted, loud]


# --------------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_are_refused(tiny, toy):
    sae_in, sae_out = random_saes(tiny, 1, 2)
    tokens = tokens_for(tiny)
    positions = torch.zeros(4, dtype=torch.long)
    keys = torch.arange(3)
    raw = build_tiny_gpt2(processed=False)
    with pytest.raises(ValueError, match="(?i)layernorm|value bias"):
        reconstruct(raw, sae_in, 2, tokens)
    with pytest.raises(ValueError, match="(?i)layernorm|value bias"):
        exact_importance(raw, sae_in, sae_out, 0, keys, keys, tokens, positions)
    sae_in_0, _ = random_saes(tiny, 0, 2)
    with pytest.raises(ValueError, match="d_model"):
        reconstruct(toy.model, sae_in_0, 0, toy.corpus(2))
    with pytest.raises(ValueError, match="same layer"):
        exact_importance(tiny, sae_in_0, sae_out, 0, keys, keys, tokens, positions)
    circuit_0 = HeadCircuit.from_model(tiny, *random_saes(tiny, 0, 2))
    with pytest.raises(ValueError, match="reads layer 1 but the head is in layer 0"):
        reconstruct(tiny, sae_in, circuit_0, tokens)
    other = HeadCircuit.from_model(tiny, *random_saes(tiny, 1, 2, seed=5))
    with pytest.raises(ValueError, match="circuit.query_proj is not"):
        reconstruct(tiny, sae_in, other, tokens)
    with pytest.raises(TypeError, match="head must be"):
        reconstruct(tiny, sae_in, "2", tokens)
    with pytest.raises(ValueError, match="head=5 is out of range"):
        reconstruct(tiny, sae_in, 5, tokens)
    with pytest.raises(ValueError, match="positions must be"):
        exact_importance(tiny, sae_in, sae_out, 0, keys, keys, tokens, positions[:2])
    with pytest.raises(ValueError, match="positions must lie in"):
        exact_importance(tiny, sae_in, sae_out, 0, keys, keys, tokens, positions + 50)
    with pytest.raises(ValueError, match="keys must lie in"):
        exact_importance(tiny, sae_in, sae_out, 0, keys, keys + 100, tokens, positions)
    with pytest.raises(ValueError, match="queries must be"):
        exact_importance(tiny, sae_in, sae_out, 0, keys.float(), keys, tokens, positions)
    with pytest.raises(ValueError, match="feature must be"):
        exact_importance(tiny, sae_in, sae_out, 9, keys, keys, tokens, positions)
    with pytest.raises(ValueError, match="tokens must be"):
        reconstruct(tiny, sae_in, 2, tokens.float()[None])
    dec = reconstruct(tiny, sae_in, 2, tokens)
    with pytest.raises(ValueError, match="query_pos must be"):
        dec.pair_terms(0, 99, 0)
    with pytest.raises(ValueError, match="name must be one of"):
        dec.group("nope")
    alibi = copy.copy(tiny.cfg)  # position biases added to the logits are not decomposed
    alibi.positional_embedding_type = "alibi"
    fake = types.SimpleNamespace(cfg=alibi, blocks=tiny.blocks, embed=tiny.embed, pos_embed=tiny.pos_embed)
    with pytest.raises(ValueError, match="exact mode does not support.*alibi"):
        reconstruct(fake, sae_in, 2, tokens)
