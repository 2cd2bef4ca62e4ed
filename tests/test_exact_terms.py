"""Exact mode's pseudo-feature terms: the closed forms of exact_importance_terms equal autograd
through transformer_lens's own forward pass, with a mask on every (pseudo query component × key
feature) and (query feature × pseudo key component) term of the head's real logit."""
import dataclasses
import math

import pytest
import torch
from test_exact import activation_with_logit_delta, autograd_exact_importance, random_saes, rms_model, tiny, tokens_for, toy_ln  # noqa: F401

from attnrules.circuit import PSEUDO, pseudo_name
from attnrules.importance import ExactTerms, exact_importance, exact_importance_terms
from attnrules.toy import BOS, VOCAB


def components(model, sae_in, head, tokens):
    """From transformer_lens's cache: input-SAE activations / σ ``[B, T, n_in]`` and the pseudo
    query and key component vectors ``[B, T, len(PSEUDO), d_head]`` (b_dec, error through LayerNorm; bias)."""
    layer = sae_in.layer
    att = model.blocks[layer].attn
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.ln1.hook_scale"]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    x = cache[names[0]].double()
    sigma = cache[names[1]].double() if names[1] in cache else torch.ones(*tokens.shape, 1, dtype=torch.float64)
    f = sae_in.encode(cache[names[0]]).detach().double()
    b_dec, W_dec = sae_in.b_dec.double(), sae_in.W_dec.double()
    error = x - f @ W_dec - b_dec
    centre = (lambda v: v - v.mean(-1, keepdim=True)) if model.cfg.normalization_type in ("LN", "LNPre") else (lambda v: v)

    def side(W, bias):
        W = W[head].detach().double()
        return torch.stack([(centre(b_dec) @ W / sigma), centre(error) @ W / sigma,
                            bias[head].detach().double().expand(*tokens.shape, -1)], -2)

    dQ, dK = centre(W_dec) @ att.W_Q[head].double(), centre(W_dec) @ att.W_K[head].double()
    return f / sigma, side(att.W_Q, att.b_Q), side(att.W_K, att.b_K), dQ.detach(), dK.detach(), f


def autograd_pseudo_importance(model, sae_in, sae_out, feature, tokens, positions):
    """The oracle: masks m_q[c, k] on (query component c) × (key feature k) and m_k[q, c] on (query
    feature q) × (key component c), added on hook_attn_scores at every causal entry (in float64,
    then cast), the real output-SAE activation read from hook_z at ``positions``."""
    head = sae_out.head
    att = model.blocks[sae_out.layer].attn
    f_scaled, qc, kc, dQ, dK, _ = components(model, sae_in, head, tokens)
    mask_q = torch.ones(len(PSEUDO), sae_in.n_features, dtype=torch.float64, requires_grad=True)
    mask_k = torch.ones(sae_in.n_features, len(PSEUDO), dtype=torch.float64, requires_grad=True)
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.float64).tril()

    def delta():
        by_query = torch.einsum("btcd,bik,kd,ck->bti", qc, f_scaled, dK, mask_q - 1)
        by_key = torch.einsum("btq,qd,bicd,qc->bti", f_scaled, dQ, kc, mask_k - 1)
        return (by_query + by_key) * causal / att.attn_scale

    acts = activation_with_logit_delta(model, sae_out, feature, tokens, positions, delta)
    acts.sum().backward()
    return mask_q.grad, mask_k.grad.T, acts.detach()  # [P, keys], [P, queries]


def case(name, tiny, toy_ln, feature=0, n=16, seed=0):
    """(model, input SAE, output SAE, tokens, positions): the output feature's ReLU open in some
    exemplars and closed in others."""
    positions = torch.randint(1, 12, (n,), generator=torch.Generator().manual_seed(seed))
    if name == "toy_ln":  # the planted [If] … [then] feature, where it fires and where it does not
        tokens = toy_ln.corpus(n, seed=7 + seed)
        tokens[: n // 2, 3], tokens[: n // 2, 9] = VOCAB.index("If"), VOCAB.index("then")
        positions[: n // 2] = 9
        return toy_ln.model, toy_ln.input_sae, toy_ln.output_saes[0], tokens, positions
    if name == "rms":
        model = rms_model()
        sae_in, sae_out = random_saes(model, 0, 1)
    else:
        model, layer = tiny, int(name[-1])
        sae_in, sae_out = random_saes(tiny, layer, 2, seed=layer)
    tokens = tokens_for(model, n=n, t=12, seed=seed)
    _, cache = model.run_with_cache(tokens, names_filter=lambda h: h.endswith("hook_z"))
    z = cache[f"blocks.{sae_out.layer}.attn.hook_z"][torch.arange(n), positions, sae_out.head]
    pre = (z - sae_out.head_decoder_bias) @ sae_out.head_encoder[:, feature] + sae_out.b_enc[feature]
    shift = torch.zeros_like(sae_out.b_enc)
    shift[feature] = pre.median()  # about half the ReLUs open
    return model, sae_in, dataclasses.replace(sae_out, b_enc=sae_out.b_enc - shift), tokens, positions


@pytest.mark.parametrize("name", ["tiny L0", "tiny L1", "toy_ln", "rms"])
def test_pseudo_terms_equal_autograd_through_transformer_lens(tiny, toy_ln, name):  # noqa: F811
    model, sae_in, sae_out, tokens, positions = case(name, tiny, toy_ln)
    want_q, want_k, acts = autograd_pseudo_importance(model, sae_in, sae_out, 0, tokens, positions)
    assert 0 < int((acts > 0).sum()) < len(acts), "the oracle must see both open and closed ReLUs"
    everything = torch.arange(sae_in.n_features)
    got = exact_importance_terms(model, sae_in, sae_out, 0, everything, everything, tokens, positions, batch_size=5)
    assert isinstance(got, ExactTerms)
    n = sae_in.n_features
    shapes = {"features": (n, n), "query_pseudo": (3, n), "key_pseudo": (3, n), "query_pseudo_score": (3, n),
              "key_pseudo_score": (3, n)}
    for field, shape in shapes.items():
        assert getattr(got, field).shape == shape and getattr(got, field).dtype == torch.float64, field
    # every pseudo query component and every non-bias pseudo key component, to rtol 1e-5
    scale = max(float(want_q.abs().max()), float(want_k.abs().max()))
    for c, component in enumerate(PSEUDO):
        assert want_q[c].abs().max() > 1e-3 * scale, f"query {component} is not exercised"
        torch.testing.assert_close(got.query_pseudo[c], want_q[c], rtol=1e-5, atol=1e-5 * scale,
                                   msg=f"{name} query {component}")
        torch.testing.assert_close(got.key_pseudo[c], want_k[c], rtol=1e-5, atol=1e-5 * scale,
                                   msg=f"{name} key {component}")
    for c in range(2):
        assert want_k[c].abs().max() > 1e-3 * scale, f"key {PSEUDO[c]} is not exercised"
    # the key bias adds the same constant to every key of a query: softmax ignores it
    biggest = max(float(got.features.abs().max()), float(got.query_pseudo.abs().max()),
                  float(got.key_pseudo.abs().max()))
    assert float(got.key_pseudo[PSEUDO.index("bias")].abs().max()) <= 1e-9 * biggest
    # the feature pairs are exact_importance's, from the same pass
    torch.testing.assert_close(
        got.features, exact_importance(model, sae_in, sae_out, 0, everything, everything, tokens, positions),
        rtol=1e-12, atol=0)
    if name != "rms":  # and the autograd oracle of tests/test_exact.py agrees
        want, _ = autograd_exact_importance(model, sae_in, sae_out, 0, tokens, positions)
        torch.testing.assert_close(got.features, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # a subset of candidates is the same rows, in the given order
    some_queries, some_keys = torch.tensor([2, 9]), torch.tensor([4, 0, 11])
    sub = exact_importance_terms(model, sae_in, sae_out, 0, some_queries, some_keys, tokens, positions)
    for field, index in (("query_pseudo", some_keys), ("key_pseudo", some_queries),
                         ("query_pseudo_score", some_keys), ("key_pseudo_score", some_queries)):
        torch.testing.assert_close(getattr(sub, field), getattr(got, field)[:, index], rtol=1e-9, atol=1e-12,
                                   equal_nan=True, msg=field)
    torch.testing.assert_close(sub.features, got.features[some_queries][:, some_keys], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["tiny L1", "toy_ln"])
def test_scores_are_mean_logit_contributions_where_the_feature_is_present(tiny, toy_ln, name):  # noqa: F811
    model, sae_in, sae_out, tokens, positions = case(name, tiny, toy_ln, n=6, seed=1)
    f_scaled, qc, kc, dQ, dK, f = components(model, sae_in, sae_out.head, tokens)
    scale = model.blocks[sae_in.layer].attn.attn_scale
    everything = torch.arange(sae_in.n_features)
    got = exact_importance_terms(model, sae_in, sae_out, 0, everything, everything, tokens, positions)
    n_in = sae_in.n_features
    want_q = torch.full((3, n_in), math.nan, dtype=torch.float64)
    want_k = torch.full((3, n_in), math.nan, dtype=torch.float64)
    for j in range(n_in):  # plain loops over the definition: mean over (n, i ≤ t_n) where the feature is present
        q_terms, k_terms = [], []
        for n, t in enumerate(positions.tolist()):
            for i in range(t + 1):
                if f[n, i, j] > 0:
                    q_terms.append(qc[n, t] @ (f_scaled[n, i, j] * dK[j]) / scale)
                if f[n, t, j] > 0:
                    k_terms.append(kc[n, i] @ (f_scaled[n, t, j] * dQ[j]) / scale)
        if q_terms:
            want_q[:, j] = torch.stack(q_terms).mean(0)
        if k_terms:
            want_k[:, j] = torch.stack(k_terms).mean(0)
    if name == "toy_ln":
        assert want_q.isnan().any() and want_k.isnan().any(), "some token features should be absent"
    assert not want_q.isnan().all() and not want_k.isnan().all()
    tol = 1e-5 * float(torch.cat([want_q, want_k]).nan_to_num().abs().max())
    torch.testing.assert_close(got.query_pseudo_score, want_q, rtol=1e-5, atol=tol, equal_nan=True)
    torch.testing.assert_close(got.key_pseudo_score, want_k, rtol=1e-5, atol=tol, equal_nan=True)


def test_ln_toy_bos_sink_through_b_q_gets_a_term(toy_ln):  # noqa: F811
    """toy_ln's BOS sink comes from b_Q alone (no query feature): exact mode must see it as a term."""
    model, sae_in, sae_out = toy_ln.model, toy_ln.input_sae, toy_ln.output_saes[0]
    tokens = toy_ln.corpus(40, seed=11)
    tokens[:20, 4], tokens[:20, 10] = VOCAB.index("If"), VOCAB.index("then")
    positions = torch.full((40,), 10)
    everything = torch.arange(sae_in.n_features)
    got = exact_importance_terms(model, sae_in, sae_out, 0, everything, everything, tokens, positions)
    bos, bias = VOCAB.index(BOS), PSEUDO.index("bias")
    term = float(got.query_pseudo[bias, bos])
    biggest = float(got.features.abs().max())
    # attention to the sink is attention taken from [If]: a negative term of the feature's own size
    assert term < 0 and abs(term) > 0.1 * biggest, (term, biggest)
    assert abs(term) >= 0.5 * float(got.query_pseudo.abs().max())
    # and its score is the sink's real logit, 4 (b_Q reads the BOS direction only through it)
    assert float(got.query_pseudo_score[bias, bos]) == pytest.approx(4.0, rel=1e-4)
    assert float(got.key_pseudo[bias].abs().max()) <= 1e-9 * biggest


def test_pseudo_names():
    assert [pseudo_name(c, "query") for c in PSEUDO] == [
        "any query, via decoder bias", "any query, via SAE error", "any query, via b_Q"]
    assert [pseudo_name(c, "key") for c in PSEUDO] == [
        "any key, via decoder bias", "any key, via SAE error", "any key, via b_K"]
    with pytest.raises(ValueError, match="side must be"):
        pseudo_name("bias", "value")
    with pytest.raises(ValueError, match="component must be one of"):
        pseudo_name("feature", "query")


def test_bad_inputs_are_refused(tiny):  # noqa: F811
    from tiny_gpt2 import build_tiny_gpt2

    sae_in, sae_out = random_saes(tiny, 1, 2)
    tokens = tokens_for(tiny)
    positions = torch.zeros(4, dtype=torch.long)
    keys = torch.arange(3)

    def call(*, model=tiny, sae_in=sae_in, feature=0, keys=keys, queries=keys, tokens=tokens, positions=positions):
        return exact_importance_terms(model, sae_in, sae_out, feature, queries, keys, tokens, positions)

    with pytest.raises(ValueError, match="(?i)layernorm|value bias"):
        call(model=build_tiny_gpt2(processed=False))
    with pytest.raises(ValueError, match="same layer"):
        call(sae_in=random_saes(tiny, 0, 2)[0])
    with pytest.raises(ValueError, match="positions must be"):
        call(positions=positions[:2])
    with pytest.raises(ValueError, match="positions must lie in"):
        call(positions=positions + 50)
    with pytest.raises(ValueError, match="keys must lie in"):
        call(keys=keys + 100)
    with pytest.raises(ValueError, match="keys must be"):
        call(keys=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="queries must be"):
        call(queries=keys.float())
    with pytest.raises(ValueError, match="feature must be"):
        call(feature=9)
    with pytest.raises(ValueError, match="tokens must be"):
        call(tokens=tokens[None])


def test_error_term_rows_equal_the_full_float64_matmul_at_gpt2_widths():
    """What exact importance's error term rests on: computed only at the attended positions (key i ≤ t_n),
    its rows are bit for bit those of the matmul over every position, at GPT-2-small widths (24,576
    input features, d_model 768, 12 × 64 positions) and at a tiny model's."""
    g = torch.Generator().manual_seed(0)
    for b, t_len, n_in, d in ((12, 64, 24_576, 768), (3, 10, 40, 32)):
        acts = torch.relu(torch.randn(b, t_len, n_in, generator=g) - 2.0).double()
        D = torch.randn(n_in, d, generator=g).double()
        attended = torch.arange(t_len)[None, :] <= torch.randint(0, t_len, (b,), generator=g)[:, None]
        assert torch.equal((acts @ D)[attended], acts[attended] @ D)
