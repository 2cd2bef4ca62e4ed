"""Exact importance: the masked gradient of the *real* output-feature activation through the *real* head.

Exact importance is the masked gradient of the *real* output-feature activation
act(t) = ReLU((z_t − b_dec_out)·u + b_enc) through the *real* attention pattern, with a mask m_qk on
every feature-pair term of the real logit, at m = 1, summed over exemplars. For any architecture an
active feature's activation is (z_t − b_dec_out)·u + b_enc with u the effective encoder
(:attr:`~attnrules.sources.OutputSAE.head_encoder`: a gated SAE's magnitude encoder; no b_dec_out
when the SAE does not subtract it), and whether it is active is the SAE's own decision (``gate``
below = ``output_sae.encode(z) > 0``: JumpReLU's threshold, TopK's k, the gated SAE's gate), so
the gradient is exact whatever the activation. In closed form it is
A(q, k) × (query_acts[q] · key_acts[k]), summed over exemplars n (scored at position t_n):

    query_acts[q, n] = f_{n,t,q} / σ_{n,t}
    key_acts[k, n]   = gate_n · Σ_{i ≤ t} c_{n,i} f_{n,i,k} / (σ_{n,i} · attn_scale)
    c_i = α_ti (s_i − ŝ),  s_i = v_i·u,  ŝ = Σ_i α_ti s_i = z_t·u,  gate = 1[act(t) > 0] (the SAE's encode)

(α is read from the model's own ``hook_pattern``, so its mask is honoured whatever it is), the dual
form that ``engine.dual_topk`` ranks over all pairs without materialising them.

The pseudo-features (:data:`PSEUDO`: dec_bias, error, bias) are terms too: a head whose key
preference comes from b_Q · k involves no query feature. :func:`exact_importance_terms` gives, from
the same pass, the importance of (pseudo query component × key feature k), Σ_n key_acts[k, n]
(qc_{n,t}·d_k W̄_K), and of (query feature q × pseudo key component), Σ_n query_acts[q, n]
(d_q W̄_Q·Σ_i g_{n,i} kc_{n,i}) with g_{n,i} = gate_n c_{n,i} / attn_scale; the key bias one is 0
(Σ_i g_{n,i} = 0) on a plain head.

Modern attention (the decomposition of :mod:`attnrules.circuit.exact`):

- sliding windows: "i ≤ t" is "i attended from t" (causal and within the window);
- QK-norm: σ becomes σ·ρ_q on the query side and σ·ρ_k on the key side (ρ the norm's RMS at that
  position, held fixed like σ), the gains folded into the projections;
- soft-capping: the mask scales pre-cap terms, so c_{n,i} gains the cap's derivative
  1 − tanh²(l/cap) = 1 − (capped/cap)², read from ``hook_attn_scores``;
- grouped-query attention: s_i reads the key/value head of the query head;
- rotary heads: the logit of a feature pair depends on the offset, so the importance no longer
  factors as A(q, k) × (query_acts · key_acts). It is Σ_n Σ_i g_{n,i} a_{n,q} b_{n,i,k} A_{t_n−i}(q, k),
  computed exactly as ONE inner product per pair over (exemplar, d_head): query_vectors[q, n] =
  a_{n,q} R_{t_n} P_Q[q], key_vectors[k, n] = Σ_i g_{n,i} b_{n,i,k} R_i P_K[k] (R_i the model's rotation
  at i; the sum over i folds into cos/sin-weighted sums because rotation is linear). Candidate sets
  use it directly; the all-pairs ranking passes the vectors to ``engine.dual_topk`` as exemplar
  factors with unit queries and keys (:func:`exact_vectors_all_pairs`: memory 2·n_in·N·d_head
  numbers, time n_in²·N·d_head, i.e. N·d_head/(N + d_head) times the non-rotary form).
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
from attnrules.sources.runner import INPUT_ACTS, run_batches
from attnrules.sparse_acts import sparse_times

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
    float64 before any soft-cap factor (α, read in the model's dtype, sums to 1 only to its rounding:
    uncorrected, the key-bias row would keep ŝ (1 − Σ_i α_i), ~1e-8 relative; the recentring is the
    same g at that level);
    ``key_sum[n, c]`` is Σ_{i attended} kc_{n,i};
    ``key_feature_sum`` is Σ_{i attended} f_{n,i,k} / σ_{n,i} over present (f > 0) entries: ``[|K|, N]``,
    or on rotary heads the vectors Σ_i f_{n,i,k} R_i P_K[k] / σ_{n,i} ``[|K|, N, d_head]``; and
    ``key_present[k]`` counts the (n, i attended from t_n) with f_{n,i,k} > 0.
    (qc, kc: as the logit sees them: / σ, / ρ with QK-norm, rotated at their position on rotary heads.)
    """

    query_components: Tensor  # [N, len(PSEUDO), d_head]
    key_gradient: Tensor  # [N, len(PSEUDO), d_head]
    key_sum: Tensor  # [N, len(PSEUDO), d_head]
    key_feature_sum: Tensor  # [|K|, N] (rotary: [|K|, N, d_head])
    key_present: Tensor  # [|K|]


def _pseudo_components(W: Tensor, bias: Tensor, b_dec: Tensor, error: Tensor, sigma: Tensor) -> Tensor:
    """``[..., len(PSEUDO), d_head]``: b_dec W̄ / σ, e W̄ / σ, then the bias (``error [..., d_model]``)."""
    scaled = torch.stack([(b_dec @ W).expand(*sigma.shape, -1), error @ W], -2) / sigma[..., None, None]
    return torch.cat([scaled, bias.expand(*sigma.shape, 1, -1)], -2)


def _rotated_sum(h: HeadWeights, weights: Tensor, proj: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``[K, n, d_head]``: Σ_i weights[n, i, k] R_i proj[k] (R_i the rotation at position i), without a
    [n, T, K, d_head] intermediate: the rotation is linear, so Σ_i w R_i p = (Σ_i w cos_i) ⊙ p + (Σ_i w sin_i) ⊙ flip(p)
    on the rotated dimensions and (Σ_i w) p on the others."""
    r = h.rotary_dim
    flip = h.rotate(proj, torch.zeros_like(cos[0]), torch.ones_like(sin[0]))[:, :r]  # cos 0, sin 1: the flip
    c = torch.einsum("nik,ir->knr", weights, cos)
    s = torch.einsum("nik,ir->knr", weights, sin)
    total = weights.sum(1).T  # [K, n]
    return torch.cat([c * proj[:, None, :r] + s * flip[:, None], total[..., None] * proj[:, None, r:]], -1)


@dataclass(frozen=True)
class _Pass:
    """What one pass over the exemplars gives (float64 unless asked otherwise).

    Non-rotary heads: the importance of (q, k) is A(q, k) × (query_acts[q] · key_acts[k]).
    Rotary heads: it is query_vectors[q] · key_vectors[k] over (exemplar, d_head), with
    query_vectors[q, n] = a_{n,q} R_{t_n} P_Q[q] and key_vectors[k, n] = Σ_i g_{n,i} b_{n,i,k} R_i P_K[k].
    """

    h: HeadWeights
    query_acts: Tensor  # [|Q|, N] a_{n,q} = f_{n,t,q} / (σ_{n,t} ρ_q)
    key_acts: Tensor | None  # [|K|, N] Σ_i g_{n,i} f_{n,i,k} / (σ_{n,i} ρ_k); None on rotary heads
    query_vectors: Tensor | None  # [|Q|, N, d_head] rotary heads only
    key_vectors: Tensor | None  # [|K|, N, d_head]
    query_proj: Tensor  # [|Q|, d_head] exact d_q W̄_Q (QK-norm gains folded in)
    key_proj: Tensor
    pseudo: _PseudoSums | None


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
    dtype: torch.dtype = torch.float64,
    runner=None,
) -> _Pass:
    """The one pass over the exemplars behind every exact importance (see :class:`_Pass`); the
    rotary vectors are stored in ``dtype`` (float32 for the all-pairs ranking halves their memory).
    ``runner``: a drop-in for :func:`~attnrules.sources.runner.run_batches` (e.g. hooks already computed,
    :meth:`attnrules.pipeline.activations.SharedPasses.runner`); default run_batches. A runner whose
    batches also hold :data:`~attnrules.sources.runner.INPUT_ACTS` (the input-SAE activations of
    ``hook_resid_pre``, already encoded) spares the pass its encode."""
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
    query_proj, _ = h.projections(D[queries])
    _, key_proj = h.projections(D[keys])
    kv = index if h.kv_head is None else h.kv_head
    names = [f"blocks.{layer}.hook_resid_pre"] + [f"blocks.{layer}.attn.hook_{x}" for x in ("v", "pattern", "z")]
    if h.soft_cap is not None:
        names.append(f"blocks.{layer}.attn.hook_attn_scores")
    qk_norm = h.query_gain is not None
    rotation = h.rotation(t_len, device=input_sae.W_dec.device)
    query_acts, key_acts, query_vectors, key_vectors, sums = [], [], [], [], []
    for rows, cache in (runner or run_batches)(model, tokens, layer, names, batch_size=batch_size, desc="", progress=False):
        x, v, pattern, z = (cache[name] for name in names[:4])
        t = positions[rows].to(x.device)
        b = torch.arange(len(t), device=x.device)
        # float64 after selecting (the conversion is exact): the columns and positions read, not [b, T, n_in]
        acts = cache[INPUT_ACTS] if INPUT_ACTS in cache else input_sae.encode(x.to(input_sae.W_dec.dtype))
        sigma = h.scale(x.double())
        # only the query features at t and the key features are scaled (elementwise: the same values as
        # scaling every feature and selecting them after)
        acts_q, acts_k = acts[b, t][:, queries].double(), acts[:, :, keys].double()  # [b, |Q|], [b, T, |K|]
        if qk_norm:  # QK-norm's ρ is a per-position scale like σ, one per side
            rho_q, rho_k = h.norm_scales(x.double(), sigma)
            q_scaled, k_scaled = acts_q / (sigma * rho_q)[b, t][:, None], acts_k / (sigma * rho_k)[..., None]
        else:
            q_scaled, k_scaled = acts_q / sigma[b, t][:, None], acts_k / sigma[..., None]
        alpha = pattern[b, index, t].double()  # [b, T] the real attention from t_n
        s = v[:, :, kv].double() @ u
        s_hat = (alpha * s).sum(-1, keepdim=True)
        gate = output_sae.encode(z)[b, t, feature] > 0
        causal = h.allowed(t[:, None], torch.arange(t_len, device=x.device)[None, :])  # attended keys
        c = alpha * (s - s_hat) * (causal & gate[:, None]) / h.attn_scale
        capped = 1.0
        if h.soft_cap is not None:  # d cap·tanh(l / cap) / dl = 1 − tanh², read from the capped scores
            scores = cache[names[4]][b, index, t].double()
            capped = torch.where(causal, 1 - (torch.where(causal, scores, 0.0) / h.soft_cap) ** 2, 0.0)
        g = c * capped
        if rotation is None:
            query_acts.append(q_scaled.T)
            key_acts.append(torch.einsum("btj,bt->jb", k_scaled, g))
        else:
            cos, sin = rotation
            a = q_scaled.T  # [|Q|, b]
            query_acts.append(a)
            rotated = h.rotate(query_proj[:, None, :].expand(-1, len(t), -1), cos[t][None], sin[t][None])  # [|Q|, b, d_head]
            query_vectors.append((a[..., None] * rotated).to(dtype))
            key_vectors.append(_rotated_sum(h, g[:, :, None] * k_scaled, key_proj, cos, sin).to(dtype))
        if pseudo:
            # the SAE error term only where a key is attended from t_n: elsewhere its components meet a zero
            # weight (c, α and `within` vanish there), so they are left 0; the decoded part sums each row's
            # active features only (sparse_times: fused multiply-adds in feature order, the same for a row
            # whatever its batch; it may differ from MKL's dense matmul in the last bit; the old-path fixtures hold)
            error = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
            error[causal] = x[causal].double() - sparse_times(acts[causal], D) - b_dec
            W_Q, W_K, b_Q, b_K = h.query_weights, h.key_weights, h.query_bias, h.key_bias
            qc = _pseudo_components(W_Q, b_Q, b_dec, error[b, t], sigma[b, t])  # [b, P, d_head]
            kc = _pseudo_components(W_K, b_K, b_dec, error, sigma)  # [b, T, P, d_head]
            if qk_norm:
                qc, kc = qc / rho_q[b, t][:, None, None], kc / rho_k[..., None, None]
            if rotation is not None:
                qc = h.rotate(qc, cos[t][:, None], sin[t][:, None])
                kc = h.rotate(kc, cos[None, :, None], sin[None, :, None])
            within = causal.double()
            present = acts_k > 0
            recentred = (c - alpha * c.sum(-1, keepdim=True) / alpha.sum(-1, keepdim=True)) * capped
            if rotation is None:
                feature_sum = torch.einsum("btj,bt->jb", k_scaled * present, within)
            else:
                feature_sum = _rotated_sum(h, within[:, :, None] * k_scaled * present, key_proj, cos, sin)
            sums.append((
                qc,
                torch.einsum("bi,bipd->bpd", recentred, kc),
                torch.einsum("bi,bipd->bpd", within, kc),
                feature_sum,
                torch.einsum("btj,bt->j", present.double(), within),
            ))
    pseudo_sums = None
    if pseudo:
        qc, kg, ks, kfs, kp = zip(*sums)
        pseudo_sums = _PseudoSums(torch.cat(qc), torch.cat(kg), torch.cat(ks), torch.cat(kfs, 1), sum(kp))
    if rotation is None:
        return _Pass(h, torch.cat(query_acts, 1), torch.cat(key_acts, 1), None, None, query_proj, key_proj, pseudo_sums)
    return _Pass(h, torch.cat(query_acts, 1), None, torch.cat(query_vectors, 1), torch.cat(key_vectors, 1),
                 query_proj, key_proj, pseudo_sums)


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
    """(head, query_acts ``[|Q|, N]``, key_acts ``[|K|, N]``) in float64 (all features when None);
    non-rotary heads only."""
    run = _exact_pass(model, input_sae, output_sae, feature, tokens, positions, queries, keys, batch_size)
    if run.key_acts is None:
        raise ValueError(
            "on a rotary head the exact importance does not factor as A(q, k) × (query_acts · key_acts): "
            "use exact_vectors_all_pairs (one inner product over exemplars × d_head per pair)"
        )
    return run.h, run.query_acts, run.key_acts


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
    head's real (pre-cap) logits (module docstring). The head is ``output_sae``'s. On a rotary head
    every exemplar contributes at the offsets present in it: I(q, k) = Σ_n Σ_i g_{n,i} a_{n,q} b_{n,i,k}
    A_{t_n − i}(q, k), computed as one inner product per pair over (exemplar, d_head).
    """
    run = _exact_pass(model, input_sae, output_sae, feature, tokens, positions, queries, keys, batch_size)
    return _pair_importance(run)


def _pair_importance(run: _Pass) -> Tensor:
    """Importance ``[|Q|, |K|]``: A × (query_acts · key_acts), or the rotary inner products."""
    if run.key_acts is None:
        return run.query_vectors.flatten(1) @ run.key_vectors.flatten(1).T
    return (run.query_proj @ run.key_proj.T) * (run.query_acts @ run.key_acts.T)


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
    runner=None,
) -> ExactTerms:
    """:func:`exact_importance` of the (query, key) feature pairs and of every pseudo-feature term:
    (pseudo query component × key feature) and (query feature × pseudo key component); see
    :class:`ExactTerms`. One pass over the exemplars, float64, never [T, T, n_in, n_in].

    Each factors over exemplars like the pairs do: query_pseudo[c, k] = Σ_n key_acts[k, n]
    (qc_{n,t}·P_K[k]) and key_pseudo[c, q] = Σ_n query_acts[q, n] (P_Q[q]·Σ_i g_{n,i} kc_{n,i}).
    ``runner``: where the hooks come from (see :func:`_exact_pass`; default a forward pass).
    """
    run = _exact_pass(model, input_sae, output_sae, feature, tokens, positions, queries, keys, batch_size, pseudo=True,
                      runner=runner)
    h, query_acts, sums = run.h, run.query_acts, run.pseudo
    features = _pair_importance(run)

    def against(weights: Tensor, vectors: Tensor, proj: Tensor) -> Tensor:
        """``[P, F]``: Σ_n weights[f, n] (vectors[n, p]·proj[f]), without an [N, P, F] intermediate."""
        summed = (weights @ vectors.flatten(1)).view(len(weights), *vectors.shape[1:])  # [F, P, d_head]
        return torch.einsum("fpd,fd->pf", summed, proj)

    def mean(total: Tensor, count: Tensor) -> Tensor:
        return torch.where(count > 0, total / (h.attn_scale * count.clamp(min=1)), math.nan)

    t_count = positions.to(query_acts.device).double() + 1  # keys i ≤ t_n (within the window)
    if h.window is not None:
        t_count = t_count.clamp(max=h.window)
    query_count = (query_acts > 0).double() @ t_count
    if run.key_acts is None:  # rotary: the feature side is a vector per exemplar, rotated where it sits
        present = (query_acts > 0).to(run.query_vectors.dtype)[..., None]
        return ExactTerms(
            features,
            torch.einsum("npd,knd->pk", sums.query_components, run.key_vectors.double()),
            torch.einsum("qnd,npd->pq", run.query_vectors.double(), sums.key_gradient),
            mean(torch.einsum("npd,knd->pk", sums.query_components, sums.key_feature_sum), sums.key_present),
            mean(torch.einsum("qnd,npd->pq", (run.query_vectors * present).double(), sums.key_sum), query_count),
        )
    return ExactTerms(
        features,
        against(run.key_acts, sums.query_components, run.key_proj),
        against(query_acts, sums.key_gradient, run.query_proj),
        mean(against(sums.key_feature_sum, sums.query_components, run.key_proj), sums.key_present),
        mean(against(query_acts * (query_acts > 0), sums.key_sum, run.query_proj), query_count),
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
    pair is A(q, k) × (query_acts[q] · key_acts[k]) with A from :func:`exact_projections`.
    Non-rotary heads only (a rotary head's importance does not factor: :func:`exact_vectors_all_pairs`)."""
    _, query_acts, key_acts = _exact_factors(
        model, input_sae, output_sae, feature, tokens, positions, None, None, batch_size
    )
    return query_acts, key_acts


# Above this many bytes of per-pair vectors, the rotary all-pairs ranking refuses (use fewer exemplars).
ROTARY_ALL_PAIRS_MAX_BYTES = 8 * 2**30


def exact_vectors_all_pairs(
    model: HookedTransformer,
    input_sae: InputSAE,
    output_sae: OutputSAE,
    feature: int,
    tokens: Tensor,
    positions: Tensor,
    *,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """(query_vectors, key_vectors) ``[n_in, N · d_head]`` of a rotary head: the exact importance of
    every pair is their inner product,

        I(q, k) = Σ_n a_{n,q} (R_{t_n} P_Q[q]) · (Σ_i g_{n,i} b_{n,i,k} R_i P_K[k]) = Σ_n Σ_i g_{n,i} a_{n,q} b_{n,i,k} A_{t_n − i}(q, k)

    (R_i the model's rotation at position i, P = d W̄ with QK-norm gains, a and b the scaled
    activations, g the softmax-gradient weights of the module docstring). Exact at every offset present
    in the exemplars, with no table over offsets; it costs 2 · n_in · N · d_head numbers of memory
    (``dtype``) and n_in² · N · d_head multiply-adds to rank all pairs (N · d_head / (N + d_head) times
    the non-rotary factorised form)."""
    n = as_token_batch(tokens, model).shape[0]
    need = 2 * input_sae.n_features * n * model.cfg.d_head * torch.finfo(dtype).bits // 8
    if need > ROTARY_ALL_PAIRS_MAX_BYTES:
        raise ValueError(
            f"the rotary all-pairs vectors would take {need / 2**30:.1f} GiB ({input_sae.n_features} features × "
            f"{n} exemplars × d_head {model.cfg.d_head} × 2) > ROTARY_ALL_PAIRS_MAX_BYTES: use fewer exemplars, or "
            "rank a candidate set with exact_importance"
        )
    run = _exact_pass(model, input_sae, output_sae, feature, tokens, positions, None, None, batch_size, dtype=dtype)
    if run.query_vectors is None:
        raise ValueError("exact_vectors_all_pairs is for rotary heads; use exact_factors_all_pairs")
    return run.query_vectors.flatten(1), run.key_vectors.flatten(1)


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
    (float32, like every engine call); ``score="absolute"`` ranks by |I| as REF does by default.

    Non-rotary heads: (A(q, k)) × (query_acts · key_acts), inner products of size d_head and N.
    Rotary heads: the pair's inner product over (exemplar, d_head) of :func:`exact_vectors_all_pairs`,
    passed as the exemplar factors with unit (1-dimensional, all-ones) queries and keys: exact at the
    offsets present in each exemplar, at N · d_head / (N + d_head) times the cost."""
    if model.cfg.positional_embedding_type == "rotary":
        query_vectors, key_vectors = exact_vectors_all_pairs(
            model, input_sae, output_sae, feature, tokens, positions, batch_size=batch_size, dtype=torch.float32
        )
        ones = torch.ones(len(query_vectors), 1, dtype=torch.float32, device=query_vectors.device)
        return engine.dual_topk(ones, ones.clone(), query_vectors.contiguous(), key_vectors.contiguous(), k,
                                score=score, backend=backend, **engine_options)
    query_acts, key_acts = exact_factors_all_pairs(
        model, input_sae, output_sae, feature, tokens, positions, batch_size=batch_size
    )
    query_proj, key_proj = exact_projections(model, input_sae, output_sae.head)
    f32 = [x.float().contiguous() for x in (query_proj, key_proj, query_acts, key_acts)]
    return engine.dual_topk(*f32, k, score=score, backend=backend, **engine_options)
