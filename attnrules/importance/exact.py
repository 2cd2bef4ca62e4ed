"""Exact importance: the masked gradient of the *real* output-feature activation through the *real* head.

Exact importance is the masked gradient of the *real* output-feature activation
act(t) = ReLU((z_t − b_dec_out)·u + b_enc) through the *real* attention pattern, with a mask m_qk on
every feature-pair term of the real logit, at m = 1, summed over exemplars. In closed form it is
A(q, k) × (query_acts[q] · key_acts[k]), summed over exemplars n (scored at position t_n):

    query_acts[q, n] = f_{n,t,q} / σ_{n,t}
    key_acts[k, n]   = gate_n · Σ_{i ≤ t} c_{n,i} f_{n,i,k} / (σ_{n,i} · attn_scale)
    c_i = α_ti (s_i − ŝ),  s_i = v_i·u,  ŝ = Σ_i α_ti s_i = z_t·u,  gate = 1[act(t) > 0]

(α is read from the model's own ``hook_pattern``, so its mask is honoured whatever it is), the dual
form that ``engine.dual_topk`` ranks over all pairs without materialising them.

The pseudo-features (:data:`PSEUDO`: dec_bias, error, bias) are terms too: a head whose key
preference comes from b_Q · k involves no query feature. :func:`exact_importance_terms` gives, from
the same pass, the importance of (pseudo query component × key feature k), Σ_n key_acts[k, n]
(qc_{n,t}·d_k W̄_K), and of (query feature q × pseudo key component), Σ_n query_acts[q, n]
(d_q W̄_Q·Σ_i g_{n,i} kc_{n,i}) with g_{n,i} = gate_n c_{n,i} / attn_scale; the key bias one is 0
(Σ_i g_{n,i} = 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

import attnrules.engine as engine
import attnrules.sources as sources
from attnrules.circuit.exact import HeadWeights, as_token_batch, exact_projections, head_weights
from attnrules.sources.runner import run_batches

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import InputSAE, OutputSAE


def _check_index(name: str, index: Tensor, size: int) -> Tensor:
    if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point() or index.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D integer tensor of input-feature indices")
    if int(index.min()) < 0 or int(index.max()) >= size:
        raise ValueError(f"{name} must lie in [0, {size}), got {int(index.min())}..{int(index.max())}")
    return index.long()


@dataclass(frozen=True)
class _PseudoSums:
    """Per-exemplar sums over key positions that the pseudo-feature terms need, float64.

    ``query_components[n, c]`` is qc_{n,t} (component ``PSEUDO[c]`` of the query at t_n);
    ``key_gradient[n, c]`` is Σ_i g_{n,i} kc_{n,i}, with g recentred so that Σ_i g_{n,i} = 0 holds in
    float64 (α, read in the model's dtype, sums to 1 only to its rounding: uncorrected, the key-bias
    row would keep ŝ (1 − Σ_i α_i), ~1e-8 relative; the recentring is the same g at that level);
    ``key_sum[n, c]`` is Σ_{i ≤ t} kc_{n,i};
    ``key_feature_sum[k, n]`` is Σ_{i ≤ t} f_{n,i,k} / σ_{n,i} over present (f > 0) entries; and
    ``key_present[k]`` counts the (n, i ≤ t_n) with f_{n,i,k} > 0.
    """

    query_components: Tensor  # [N, len(PSEUDO), d_head]
    key_gradient: Tensor  # [N, len(PSEUDO), d_head]
    key_sum: Tensor  # [N, len(PSEUDO), d_head]
    key_feature_sum: Tensor  # [|K|, N]
    key_present: Tensor  # [|K|]


def _pseudo_components(W: Tensor, bias: Tensor, b_dec: Tensor, error: Tensor, sigma: Tensor) -> Tensor:
    """``[..., len(PSEUDO), d_head]``: b_dec W̄ / σ, e W̄ / σ, then the bias (``error [..., d_model]``)."""
    scaled = torch.stack([(b_dec @ W).expand(*sigma.shape, -1), error @ W], -2) / sigma[..., None, None]
    return torch.cat([scaled, bias.expand(*sigma.shape, 1, -1)], -2)


def _exact_pass(
    model: HookedTransformer,
    input_sae: InputSAE,
    output_sae: OutputSAE,
    feature: int,
    tokens: Tensor,
    positions: Tensor,
    queries: Tensor | None,
    keys: Tensor | None,
    batch_size: int,
    *,
    pseudo: bool = False,
) -> tuple[HeadWeights, Tensor, Tensor, _PseudoSums | None]:
    """The one pass over the exemplars behind every exact importance: (head, query_acts ``[|Q|, N]``,
    key_acts ``[|K|, N]``, and with ``pseudo`` the :class:`_PseudoSums`, else None), float64."""
    layer, index = output_sae.layer, output_sae.head
    sources.check_compatible(model, input_sae, output_sae)
    h = head_weights(model, input_sae, layer, index)
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < output_sae.n_features:
        raise ValueError(f"feature must be an output-feature index in [0, {output_sae.n_features}), got {feature!r}")
    tokens = as_token_batch(tokens, model)
    n, t_len = tokens.shape
    if not isinstance(positions, Tensor) or positions.shape != (n,):
        raise ValueError(f"positions must be [n_exemplars={n}], got {getattr(positions, 'shape', type(positions))}")
    if int(positions.min()) < 0 or int(positions.max()) >= t_len:
        raise ValueError(f"positions must lie in [0, {t_len}), got {int(positions.min())}..{int(positions.max())}")
    queries = slice(None) if queries is None else _check_index("queries", queries, input_sae.n_features)
    keys = slice(None) if keys is None else _check_index("keys", keys, input_sae.n_features)
    u = output_sae.head_encoder[:, feature].detach().double()
    D, b_dec = input_sae.W_dec.detach().double(), input_sae.b_dec.detach().double()
    names = [f"blocks.{layer}.hook_resid_pre"] + [f"blocks.{layer}.attn.hook_{x}" for x in ("v", "pattern", "z")]
    query_acts, key_acts, sums = [], [], []
    for rows, cache in run_batches(model, tokens, layer, names, batch_size=batch_size, desc="", progress=False):
        x, v, pattern, z = (cache[name] for name in names)
        t = positions[rows].to(x.device)
        b = torch.arange(len(t), device=x.device)
        acts = input_sae.encode(x.to(input_sae.W_dec.dtype)).double()
        sigma = h.scale(x.double())
        scaled = acts / sigma[..., None]
        alpha = pattern[b, index, t].double()  # [b, T] the real attention from t_n
        s = v[:, :, index].double() @ u
        s_hat = (alpha * s).sum(-1, keepdim=True)
        gate = output_sae.encode(z)[b, t, feature] > 0
        causal = torch.arange(t_len, device=x.device)[None, :] <= t[:, None]
        c = alpha * (s - s_hat) * (causal & gate[:, None]) / h.attn_scale
        query_acts.append(scaled[b, t][:, queries].T)
        key_acts.append(torch.einsum("btj,bt->jb", scaled[:, :, keys], c))
        if pseudo:
            error = x.double() - acts @ D - b_dec
            qc = _pseudo_components(h.W_Q, h.b_Q, b_dec, error[b, t], sigma[b, t])  # [b, P, d_head]
            kc = _pseudo_components(h.W_K, h.b_K, b_dec, error, sigma)  # [b, T, P, d_head]
            within = causal.double()
            present = acts[:, :, keys] > 0
            sums.append((
                qc,
                torch.einsum("bi,bipd->bpd", c - alpha * c.sum(-1, keepdim=True) / alpha.sum(-1, keepdim=True), kc),
                torch.einsum("bi,bipd->bpd", within, kc),
                torch.einsum("btj,bt->jb", scaled[:, :, keys] * present, within),
                torch.einsum("btj,bt->j", present.double(), within),
            ))
    pseudo_sums = None
    if pseudo:
        qc, kg, ks, kfs, kp = zip(*sums)
        pseudo_sums = _PseudoSums(torch.cat(qc), torch.cat(kg), torch.cat(ks), torch.cat(kfs, 1), sum(kp))
    return h, torch.cat(query_acts, 1), torch.cat(key_acts, 1), pseudo_sums


def _exact_factors(
    model: HookedTransformer,
    input_sae: InputSAE,
    output_sae: OutputSAE,
    feature: int,
    tokens: Tensor,
    positions: Tensor,
    queries: Tensor | None,
    keys: Tensor | None,
    batch_size: int,
) -> tuple[HeadWeights, Tensor, Tensor]:
    """(head, query_acts ``[|Q|, N]``, key_acts ``[|K|, N]``) in float64 (all features when None)."""
    h, query_acts, key_acts, _ = _exact_pass(
        model, input_sae, output_sae, feature, tokens, positions, queries, keys, batch_size
    )
    return h, query_acts, key_acts


def exact_importance(
    model: HookedTransformer,
    input_sae: InputSAE,
    output_sae: OutputSAE,
    feature: int,
    queries: Tensor,
    keys: Tensor,
    tokens: Tensor,
    positions: Tensor,
    *,
    batch_size: int = 8,
) -> Tensor:
    """Exact importance ``[len(queries), len(keys)]`` (rows queries, as everywhere), float64.

    Σ_n ∂act_n/∂m_qk at m = 1 for the real activation of output feature ``feature`` at
    ``positions[n]`` of ``tokens[n]``, with m_qk scaling the (q, k) feature-pair terms of the
    head's real logits (module docstring). The head is ``output_sae``'s.
    """
    h, query_acts, key_acts = _exact_factors(
        model, input_sae, output_sae, feature, tokens, positions, queries, keys, batch_size
    )
    return _pair_importance(h, input_sae, queries, keys, query_acts, key_acts)[0]


def _pair_importance(
    h: HeadWeights, input_sae: InputSAE, queries: Tensor, keys: Tensor, query_acts: Tensor, key_acts: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(importance ``[|Q|, |K|]`` = A × (query_acts · key_acts), query projections, key projections)."""
    query_proj, _ = h.projections(input_sae.W_dec[queries])
    _, key_proj = h.projections(input_sae.W_dec[keys])
    return (query_proj @ key_proj.T) * (query_acts @ key_acts.T), query_proj, key_proj


@dataclass(frozen=True)
class ExactTerms:
    """Exact importances of every term kind over candidate keys and queries (float64).

    Rows of the pseudo fields follow :data:`PSEUDO` (dec_bias, error, bias). With
    g_{n,i} = gate_n α_{t i} (s_i − ŝ) / attn_scale (i ≤ t_n, t = t_n), qc / kc the query / key
    component vectors (b_dec W̄/σ, e W̄/σ, b) and P_Q, P_K = d W̄_Q, d W̄_K:

    - ``features[q, k]`` = Σ_n Σ_i g_{n,i} (f_{n,t,q} P_Q[q]/σ_{n,t})·(f_{n,i,k} P_K[k]/σ_{n,i}),
      the same as :func:`exact_importance`;
    - ``query_pseudo[c, k]`` = Σ_n Σ_i g_{n,i} qc_{n,t}·(f_{n,i,k} P_K[k]/σ_{n,i}): the importance
      of (query component c at t_n) × (key feature k at every i ≤ t_n);
    - ``key_pseudo[c, q]`` = Σ_n Σ_i g_{n,i} (f_{n,t,q} P_Q[q]/σ_{n,t})·kc_{n,i}: (query feature q)
      × (key component c). For the key bias kc_{n,i} = b_K for every i and Σ_i g_{n,i} = 0 (softmax
      ignores a constant per query), so that row is 0 up to rounding.

    The scores are a readable strength, the mean real logit contribution of the term where its
    feature side is present, over the scored exemplars (whatever their activation):

    - ``query_pseudo_score[c, k]`` = mean over (n, i ≤ t_n) with f_{n,i,k} > 0 of
      qc_{n,t}·(f_{n,i,k} P_K[k]/σ_{n,i}) / attn_scale;
    - ``key_pseudo_score[c, q]`` = mean over (n, i ≤ t_n) with f_{n,t,q} > 0 of
      (f_{n,t,q} P_Q[q]/σ_{n,t})·kc_{n,i} / attn_scale;

    NaN where the feature is never present.
    """

    features: Tensor  # [|Q|, |K|]
    query_pseudo: Tensor  # [len(PSEUDO), |K|]
    key_pseudo: Tensor  # [len(PSEUDO), |Q|]
    query_pseudo_score: Tensor  # [len(PSEUDO), |K|]
    key_pseudo_score: Tensor  # [len(PSEUDO), |Q|]


def exact_importance_terms(
    model: HookedTransformer,
    input_sae: InputSAE,
    output_sae: OutputSAE,
    feature: int,
    queries: Tensor,
    keys: Tensor,
    tokens: Tensor,
    positions: Tensor,
    *,
    batch_size: int = 8,
) -> ExactTerms:
    """:func:`exact_importance` of the (query, key) feature pairs and of every pseudo-feature term:
    (pseudo query component × key feature) and (query feature × pseudo key component); see
    :class:`ExactTerms`. One pass over the exemplars, float64, never [T, T, n_in, n_in].

    Each factors over exemplars like the pairs do: query_pseudo[c, k] = Σ_n key_acts[k, n]
    (qc_{n,t}·P_K[k]) and key_pseudo[c, q] = Σ_n query_acts[q, n] (P_Q[q]·Σ_i g_{n,i} kc_{n,i}).
    """
    h, query_acts, key_acts, sums = _exact_pass(
        model, input_sae, output_sae, feature, tokens, positions, queries, keys, batch_size, pseudo=True
    )
    features, query_proj, key_proj = _pair_importance(h, input_sae, queries, keys, query_acts, key_acts)

    def against(weights: Tensor, vectors: Tensor, proj: Tensor) -> Tensor:
        """``[P, F]``: Σ_n weights[f, n] (vectors[n, p]·proj[f]), without an [N, P, F] intermediate."""
        summed = (weights @ vectors.flatten(1)).view(len(weights), *vectors.shape[1:])  # [F, P, d_head]
        return torch.einsum("fpd,fd->pf", summed, proj)

    def mean(total: Tensor, count: Tensor) -> Tensor:
        return torch.where(count > 0, total / (h.attn_scale * count.clamp(min=1)), math.nan)

    t_count = positions.to(query_acts.device).double() + 1  # keys i ≤ t_n
    query_count = (query_acts > 0).double() @ t_count
    return ExactTerms(
        features,
        against(key_acts, sums.query_components, key_proj),
        against(query_acts, sums.key_gradient, query_proj),
        mean(against(sums.key_feature_sum, sums.query_components, key_proj), sums.key_present),
        mean(against(query_acts * (query_acts > 0), sums.key_sum, query_proj), query_count),
    )


def exact_factors_all_pairs(
    model: HookedTransformer,
    input_sae: InputSAE,
    output_sae: OutputSAE,
    feature: int,
    tokens: Tensor,
    positions: Tensor,
    *,
    batch_size: int = 8,
) -> tuple[Tensor, Tensor]:
    """(query_acts ``[n_in, N]``, key_acts ``[n_in, N]``), float64: the exact importance of every
    pair is A(q, k) × (query_acts[q] · key_acts[k]) with A from :func:`exact_projections`."""
    _, query_acts, key_acts = _exact_factors(
        model, input_sae, output_sae, feature, tokens, positions, None, None, batch_size
    )
    return query_acts, key_acts


def rank_all_pairs_by_exact_importance(
    model: HookedTransformer,
    input_sae: InputSAE,
    output_sae: OutputSAE,
    feature: int,
    tokens: Tensor,
    positions: Tensor,
    k: int,
    *,
    score: Literal["signed", "absolute"] = "absolute",
    backend: str = "auto",
    batch_size: int = 8,
    **engine_options,
) -> engine.TopK:
    """The k pairs of highest exact importance among all n_in × n_in, through ``engine.dual_topk``
    (float32, like every engine call); ``score="absolute"`` ranks by |I| as REF does by default."""
    query_acts, key_acts = exact_factors_all_pairs(
        model, input_sae, output_sae, feature, tokens, positions, batch_size=batch_size
    )
    query_proj, key_proj = exact_projections(model, input_sae, output_sae.head)
    f32 = [x.float().contiguous() for x in (query_proj, key_proj, query_acts, key_acts)]
    return engine.dual_topk(*f32, k, score=score, backend=backend, **engine_options)
