"""Exact mode on every model family of tests/families.py: the decomposition equals transformer_lens's
logits (pre-cap, and capped = hook_attn_scores) at every entry the head attends to; GQA heads read
the right key/value head; exact importances equal autograd through transformer_lens's own forward
pass; unsupported configurations are refused clearly; processing is checked and applied per family."""
import copy
import dataclasses
import types

import numpy as np
import pytest
import torch
from families import FAMILIES, HF_MODELS, LOCAL_LAYERS, build_family, family_saes, family_tokens
from topk_oracle import assert_matches

from attnrules.circuit import GROUPS, PAPER_GROUP, reconstruct
from attnrules.circuit.rotary import Rotary
from attnrules.importance.exact import (
    exact_importance,
    exact_importance_terms,
    exact_vectors_all_pairs,
    rank_all_pairs_by_exact_importance,
)
from attnrules.sources import check_processed, kv_head, process_model

HEAD = 3  # with 4 query heads on 2 key/value heads: the second head of the second group
CASES = [(name, layer) for name in FAMILIES for layer in (0, 1)]


def _cache(model, tokens, layer):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(f"blocks.{layer}.attn."))
    return {k.split(".")[-1]: v for k, v in cache.items()}


@pytest.mark.parametrize("name,layer", CASES)
def test_decomposition_equals_transformer_lens(name, layer):
    model = build_family(name)
    sae_in, _ = family_saes(model, layer, HEAD, seed=layer)
    tokens = family_tokens(model, n=3, t=12, seed=layer)
    dec = reconstruct(model, sae_in, HEAD, tokens)
    cache = _cache(model, tokens, layer)
    real = cache["hook_attn_scores"][:, HEAD].double()
    causal = dec.causal
    # the entries the head attends over are exactly the unmasked ones: the window is honoured
    assert torch.equal(torch.isfinite(real), causal.expand_as(real)), name
    if layer in LOCAL_LAYERS.get(name, ()):
        assert not causal[11, 0] and causal[11, 11 - model.cfg.window_size + 1]
    else:
        assert torch.equal(causal, torch.ones(12, 12, dtype=torch.bool).tril())
    scale = float(real[:, causal].abs().max())
    torch.testing.assert_close(dec.capped_logits[:, causal], real[:, causal], rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(dec.groups.sum(-1), dec.logits)
    assert dec.groups.shape == (3, 12, 12, len(GROUPS))
    if model.cfg.attn_scores_soft_cap > 0:  # the groups sum to the pre-cap logit, which the cap bends
        pre = dec.logits[:, causal]
        cap = model.cfg.attn_scores_soft_cap
        torch.testing.assert_close(dec.capped_logits, cap * torch.tanh(dec.logits / cap))
        assert float((pre - real[:, causal]).abs().max()) > 1e-2 * scale
    else:
        assert dec.capped_logits is dec.logits
    # the components, summed, are the query and key as the logit sees them: rotated (hook_rot_q /
    # hook_rot_k), the key from this query head's key/value head
    kv = HEAD // (model.cfg.n_heads // model.cfg.n_key_value_heads) if model.cfg.n_key_value_heads else HEAD
    assert kv == kv_head(model, HEAD)
    q_name, k_name = ("hook_rot_q", "hook_rot_k") if "hook_rot_q" in cache else ("hook_q", "hook_k")
    q_real, k_real = cache[q_name][:, :, HEAD].double(), cache[k_name][:, :, kv].double()
    if model.cfg.use_qk_norm and q_name == "hook_q":  # no rotary: the normed query is not hooked
        pytest.skip("no rotary hook to compare with")
    torch.testing.assert_close(dec.query_components.sum(-2), q_real, rtol=1e-5, atol=1e-5 * float(q_real.abs().max()))
    torch.testing.assert_close(dec.key_components.sum(-2), k_real, rtol=1e-5, atol=1e-5 * float(k_real.abs().max()))
    if model.cfg.n_key_value_heads:  # another kv head's keys would not match
        other = cache[k_name][:, :, 1 - kv].double()
        assert float((dec.key_components.sum(-2) - other).abs().max()) > 1e-2 * float(other.abs().max())


@pytest.mark.parametrize("name", ["llama", "gemma3", "neox"])
def test_rotary_paper_group_and_pair_terms(name):
    """Paper group = Σ f_tq f_ik A_{t−i}(q, k); a pair's terms sum to its logit."""
    model = build_family(name)
    layer = 1
    sae_in, _ = family_saes(model, layer, HEAD, seed=1)
    tokens = family_tokens(model, n=2, t=10, seed=5)
    dec = reconstruct(model, sae_in, HEAD, tokens)
    rotary = Rotary.from_model(model, layer)
    f = dec.acts
    for b, t, i in ((0, 7, 3), (1, 9, 9), (1, 5, 1)):
        qa, ka = torch.nonzero(f[b, t]).flatten(), torch.nonzero(f[b, i]).flatten()
        qq = dec.paper_query_proj[qa].repeat_interleave(len(ka), 0)
        kk = dec.paper_key_proj[ka].repeat(len(qa), 1)
        A = rotary.scores(qq, kk, torch.full((len(qq),), t - i)).view(len(qa), len(ka))
        want = (f[b, t, qa, None] * f[b, i, None, ka] * A).sum()
        assert float(dec.group(PAPER_GROUP)[b, t, i]) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
        frame = dec.pair_terms(b, t, i)
        assert frame["exact_term"].sum() == pytest.approx(float(dec.logits[b, t, i]), rel=1e-9, abs=1e-12)
        assert frame["paper_term"].sum() == pytest.approx(float(want), rel=1e-9, abs=1e-12)
    summary = dec.summary()
    assert summary["share"].sum() == pytest.approx(1.0)


def test_split_qkv_input_reads_the_same_stream():
    model = copy.deepcopy(build_family("llama"))
    model.cfg.use_split_qkv_input = True
    sae_in, _ = family_saes(model, 1, HEAD)
    tokens = family_tokens(model, n=2, t=8)
    dec = reconstruct(model, sae_in, HEAD, tokens)
    real = _cache(model, tokens, 1)["hook_attn_scores"][:, HEAD].double()
    c = dec.causal
    torch.testing.assert_close(dec.logits[:, c], real[:, c], rtol=1e-5, atol=1e-5 * float(real[:, c].abs().max()))


# --------------------------------------------------------------------------------------------------
# Exact importance == autograd through transformer_lens's forward pass


def _open_half(model, sae_out, feature, tokens, positions):
    """The output SAE with b_enc shifted so that about half the scored ReLUs are open."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    acts = sae_out.encode(cache[f"blocks.{sae_out.layer}.attn.hook_z"])
    shift = torch.zeros_like(sae_out.b_enc)
    shift[feature] = acts[torch.arange(len(tokens)), positions, feature].median()
    return dataclasses.replace(sae_out, b_enc=sae_out.b_enc - shift)


def autograd_importance(model, sae_in, sae_out, feature, tokens, positions):
    """The oracle: transformer_lens's forward pass with every feature-pair term of the head's pre-cap
    logit scaled by a mask, added through the model's own soft-cap on hook_attn_scores; each term is
    built from the model's own pieces: hook_resid_pre, ln1.hook_scale (σ), the raw hook_q/hook_k (QK-norm's
    RMS ρ), q_norm/k_norm gains, W_Q[h]/W_K[h] (expanded by transformer_lens) and its apply_rotary."""
    layer, head = sae_out.layer, sae_out.head
    cfg, att = model.cfg, model.blocks[layer].attn
    kv = head // (cfg.n_heads // cfg.n_key_value_heads) if cfg.n_key_value_heads else head
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.attn.hook_q",
             f"blocks.{layer}.attn.hook_k"]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    f = sae_in.encode(cache[names[0]]).detach()
    sigma = cache[names[1]]  # [B, T, 1]
    a, b = f / sigma, f / sigma
    PQ, PK = sae_in.W_dec @ att.W_Q[head], sae_in.W_dec @ att.W_K[head]
    if cfg.use_qk_norm:
        rms = lambda x: (x.pow(2).mean(-1, keepdim=True) + att.q_norm.eps).sqrt()  # noqa: E731
        a, b = a / rms(cache[names[2]][:, :, head]), b / rms(cache[names[3]][:, :, kv])
        PQ, PK = PQ * att.q_norm.w, PK * att.k_norm.w
    t_len = tokens.shape[1]
    if cfg.positional_embedding_type == "rotary":
        RQ = att.apply_rotary(PQ.detach()[None, None].expand(1, t_len, -1, -1).contiguous())[0]  # [T, n_in, d]
        RK = att.apply_rotary(PK.detach()[None, None].expand(1, t_len, -1, -1).contiguous())[0]
    else:
        RQ, RK = PQ.detach().expand(t_len, -1, -1), PK.detach().expand(t_len, -1, -1)
    mask = torch.ones(sae_in.n_features, sae_in.n_features, requires_grad=True)
    cap = cfg.attn_scores_soft_cap
    z = {}

    def add_delta(scores, hook):
        x = torch.einsum("btq,qk,tqd->btkd", a, mask - 1, RQ)
        delta = torch.einsum("btkd,bik,ikd->bti", x, b, RK) / att.attn_scale
        ok = torch.isfinite(scores[:, head])
        s = torch.where(ok, scores[:, head], 0.0)
        if cap > 0:  # the delta goes in before the model's cap: cap·tanh(pre/cap), pre = cap·atanh(s/cap)
            new = cap * torch.tanh(torch.atanh(s / cap) + delta / cap)
        else:
            new = s + delta
        out = scores.clone()
        out[:, head] = torch.where(ok, new, scores[:, head])
        return out

    def keep_z(value, hook):
        z["z"] = value

    model.run_with_hooks(tokens, stop_at_layer=layer + 1, fwd_hooks=[
        (f"blocks.{layer}.attn.hook_attn_scores", add_delta), (f"blocks.{layer}.attn.hook_z", keep_z)])
    acts = sae_out.encode(z["z"])[torch.arange(len(tokens)), positions, feature]
    acts.sum().backward()
    return mask.grad.double(), acts.detach()


IMPORTANCE_CASES = [("llama", 1), ("qwen3", 1), ("gemma2", 0), ("gemma3", 1), ("neox", 1), ("mistral", 1)]


@pytest.mark.parametrize("name,layer", IMPORTANCE_CASES)
def test_exact_importance_equals_autograd(name, layer):
    model = build_family(name)
    sae_in, sae_out = family_saes(model, layer, HEAD, seed=layer)
    tokens = family_tokens(model, n=16, t=12, seed=11)
    positions = torch.randint(0, 12, (16,), generator=torch.Generator().manual_seed(3))
    feature = 0
    sae_out = _open_half(model, sae_out, feature, tokens, positions)
    want, acts = autograd_importance(model, sae_in, sae_out, feature, tokens, positions)
    assert 0 < int((acts > 0).sum()) < len(acts), "the oracle must see both open and closed ReLUs"
    assert want.abs().max() > 0
    everything = torch.arange(sae_in.n_features)
    got = exact_importance(model, sae_in, sae_out, feature, everything, everything, tokens, positions, batch_size=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    some_queries, some_keys = torch.tensor([2, 9]), torch.tensor([4, 0, 11])
    torch.testing.assert_close(
        exact_importance(model, sae_in, sae_out, feature, some_queries, some_keys, tokens, positions),
        got[some_queries][:, some_keys], rtol=1e-9, atol=1e-12)
    terms = exact_importance_terms(model, sae_in, sae_out, feature, some_queries, some_keys, tokens, positions)
    torch.testing.assert_close(terms.features, got[some_queries][:, some_keys], rtol=1e-9, atol=1e-12)
    for x in (terms.query_pseudo, terms.key_pseudo):
        assert bool(torch.isfinite(x).all())
    if model.cfg.positional_embedding_type == "rotary":
        qv, kv = exact_vectors_all_pairs(model, sae_in, sae_out, feature, tokens, positions)
        assert qv.shape == (sae_in.n_features, 16 * model.cfg.d_head)
        torch.testing.assert_close(qv @ kv.T, got, rtol=1e-9, atol=1e-12)
        s = got.numpy()
        for score in ("signed", "absolute"):
            res = rank_all_pairs_by_exact_importance(model, sae_in, sae_out, feature, tokens, positions, 25,
                                                     score=score, backend="torch")
            assert_matches(res, np.abs(s) if score == "absolute" else s, 25, "global", tol=1e-4 * float(abs(s).max()))


def autograd_pseudo(model, sae_in, sae_out, feature, tokens, positions, keys):
    """Oracle for query_pseudo: mask m_ck on the terms (query component c at t) × (key feature k at i),
    with the components as the logit sees them (reconstruct's, whose sum is checked against hook_rot_q)."""
    layer, head = sae_out.layer, sae_out.head
    dec = reconstruct(model, sae_in, head, tokens)
    att = model.blocks[layer].attn
    # key feature k at i, as the logit sees it: Σ over its components is key_components[..., 0]
    f = dec.acts  # [B, T, n_in]
    per_feature = f[..., keys, None] * dec.key_proj[keys] / dec.scale[..., None, None]
    if dec.key_norm is not None:
        per_feature = per_feature / dec.key_norm[..., None, None]
    if dec.weights is not None:
        cos, sin = dec.weights.rotation(tokens.shape[1])
        per_feature = dec.weights.rotate(per_feature, cos[None, :, None], sin[None, :, None])
    qc = dec.query_components[:, :, 1:]  # [B, T, P, d]
    mask = torch.ones(qc.shape[2], len(keys), dtype=torch.float64, requires_grad=True)
    cap = model.cfg.attn_scores_soft_cap
    z = {}

    def add_delta(scores, hook):
        delta = torch.einsum("btpd,pk,bikd->bti", qc, mask - 1, per_feature) / att.attn_scale
        ok = torch.isfinite(scores[:, head])
        s = torch.where(ok, scores[:, head], 0.0).double()
        new = cap * torch.tanh(torch.atanh(s / cap) + delta / cap) if cap > 0 else s + delta
        out = scores.clone()
        out[:, head] = torch.where(ok, new.float(), scores[:, head])
        return out

    model.run_with_hooks(tokens, stop_at_layer=layer + 1, fwd_hooks=[
        (f"blocks.{layer}.attn.hook_attn_scores", add_delta),
        (f"blocks.{layer}.attn.hook_z", lambda v, hook: z.__setitem__("z", v))])
    sae_out.encode(z["z"])[torch.arange(len(tokens)), positions, feature].sum().backward()
    return mask.grad


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3"])
def test_pseudo_terms_equal_autograd(name):
    model = build_family(name)
    layer = 1 if name != "gemma2" else 0
    sae_in, sae_out = family_saes(model, layer, HEAD, seed=layer)
    tokens = family_tokens(model, n=16, t=12, seed=11)
    positions = torch.randint(0, 12, (16,), generator=torch.Generator().manual_seed(3))
    sae_out = _open_half(model, sae_out, 0, tokens, positions)
    keys = torch.tensor([4, 0, 11, 7])
    want = autograd_pseudo(model, sae_in, sae_out, 0, tokens, positions, keys)
    got = exact_importance_terms(model, sae_in, sae_out, 0, torch.tensor([1]), keys, tokens, positions)
    torch.testing.assert_close(got.query_pseudo, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


# --------------------------------------------------------------------------------------------------
# Processing and refusals


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_models_compute_what_the_transformers_models_do(name):
    """The test bed itself: each converted, processed model gives its HF source's logits (up to the
    per-position constant that centring W_U removes), sliding windows and soft-caps included."""
    model = build_family(name)
    tokens = family_tokens(model, n=2, t=16)
    with torch.no_grad():
        ours, theirs = model(tokens).double(), HF_MODELS[id(model)](tokens).logits.double()
    ours, theirs = ours - ours.mean(-1, keepdim=True), theirs - theirs.mean(-1, keepdim=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_processing_is_checked_and_applied_per_family(name):
    model = build_family(name)
    check_processed(model)
    raw = copy.deepcopy(build_family(name, processed=False))
    with pytest.raises(ValueError, match="not processed"):
        check_processed(raw)
    process_model(raw)
    check_processed(raw)
    for (key, want), got in zip(model.state_dict().items(), raw.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def _variant(model, **changes):
    cfg = copy.copy(model.cfg)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return types.SimpleNamespace(cfg=cfg, blocks=model.blocks, embed=model.embed)


@pytest.mark.parametrize("changes,match", [
    ({"use_logn_attn": True}, "use_logn_attn"),
    ({"use_attention_sinks": True}, "use_attention_sinks"),
    ({"positional_embedding_type": "alibi"}, "alibi"),
    ({"use_dynamic_ntk_rope": True}, "use_dynamic_ntk_rope"),
    ({"clip_qkv": 8.0}, "clip_qkv"),
    ({"attention_dir": "bidirectional"}, "attention_dir"),
])
def test_unsupported_attention_is_refused(changes, match):
    model = build_family("llama")
    sae_in, _ = family_saes(model, 1, HEAD)
    with pytest.raises(ValueError, match=f"exact mode does not support this model: .*{match}"):
        reconstruct(_variant(model, **changes), sae_in, HEAD, family_tokens(model))


def test_post_norm_and_shortformer_processing_is_refused():
    model = build_family("llama")
    with pytest.raises(ValueError, match="cannot check .*post-norm"):
        check_processed(_variant(model, original_architecture="Olmo2ForCausalLM"))
    with pytest.raises(ValueError, match="cannot check .*shortformer"):
        process_model(_variant(model, positional_embedding_type="shortformer"))


def test_exemplar_views_and_insertion_read_the_kv_head_under_gqa():
    """DFA (exemplar_views) and the insertion probe's values read hook_v of the query head's kv head."""
    from attnrules.evaluation.insertion import _probe
    from attnrules.exemplars import exemplar_views

    model = build_family("llama")
    _, sae_out = family_saes(model, 1, HEAD)
    tokens = family_tokens(model, n=3, t=10, seed=2)
    positions = torch.tensor([9, 4, 7])
    u = sae_out.head_encoder[:, 0]
    _, cache = model.run_with_cache(tokens)
    kv = HEAD // (model.cfg.n_heads // model.cfg.n_key_value_heads)
    value = cache["blocks.1.attn.hook_v"][:, :, kv] @ u  # [B, T]
    pattern = cache["blocks.1.attn.hook_pattern"][:, HEAD]
    views = exemplar_views(model, sae_out, 0, tokens, torch.arange(3), positions)
    for i, view in enumerate(views):
        want = pattern[i, positions[i]] * value[i]
        np.testing.assert_allclose(view.dfa, want.tolist(), rtol=1e-5, atol=1e-6)
    (probe,) = _probe(model, sae_out, 0, tokens, positions, [(torch.arange(3), torch.tensor([2, 3, 5]), None)], 8)
    torch.testing.assert_close(probe["value_key"], value[torch.arange(3), torch.tensor([2, 3, 5])].double())
