"""Masked-gradient importance of (query, key) feature pairs, in closed form.

Paper mode reproduces REF (reference-behaviour §3.3): a surrogate of the head built from input-SAE
features only, with one mask m_kq on every pair's attention-logit term,

    logit_i = Σ_{k,q} F[i,k] · F[t,q] · A(q,k) · m_kq          (positions i ≤ t, no 1/sqrt(d_head))
    pred    = Σ_i softmax(logit)_i · Σ_k F[i,k] · V(k)          (V = value score; "activation" loss)

and I_kq = Σ_n ∂pred_n/∂m_kq at m = 1, summed over exemplars (one position t_n per sequence).
The gradient has the closed form I = A ⊙ (R^T · QA) with, per exemplar, QA_n = F_n[t, Q] and
R_n = F_n[:t+1, K]^T · (α ⊙ (s − ŝ)), where s_i = Σ_k F[i,k] V(k) and ŝ = Σ_i α_i s_i: a product of
the attention score and an inner product over exemplars, which is what ``engine.dual_topk`` scores
for all pairs without materialising them. Autograd is used only by the tests, as the oracle.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

import attnrules.engine as engine
from attnrules.circuit import HeadCircuit
from attnrules.scoring import value_scores

LossType = Literal["activation", "post_activation"]


def _check_exemplars(acts: torch.Tensor, positions: torch.Tensor, n_inputs: int) -> None:
    if acts.dim() != 3 or acts.shape[2] != n_inputs:
        raise ValueError(f"acts must be [n_exemplars, seq_len, n_inputs={n_inputs}], got shape {tuple(acts.shape)}")
    if positions.dim() != 1 or positions.shape[0] != acts.shape[0]:
        raise ValueError(f"positions must be [n_exemplars={acts.shape[0]}], got shape {tuple(positions.shape)}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= acts.shape[1]):
        raise ValueError(f"positions must lie in [0, {acts.shape[1]}), got {positions.min()}..{positions.max()}")
    if not bool(torch.isfinite(acts).all()):
        raise ValueError("acts contains NaN or infinite values")


def _exemplar_factors(
    key_acts: torch.Tensor,
    key_vals: torch.Tensor,
    logits: torch.Tensor,
    positions: torch.Tensor,
    relu_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """R: ``[n_exemplars, n_keys]``, the per-exemplar key factor of the closed-form gradient.

    key_acts ``[N, T, n_keys]`` (acts of the key features at every position), key_vals ``[n_keys]``
    (their value scores), logits ``[N, T]`` (surrogate attention logits from position t_n). With
    ``relu_bias`` (REF's "post_activation" loss, relu(pred + b)) an exemplar contributes only where
    the ReLU is open.
    """
    causal = torch.arange(logits.shape[1], device=logits.device)[None, :] <= positions[:, None]
    alpha = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)  # [N, T]
    s = key_acts @ key_vals  # [N, T]
    s_hat = (alpha * s).sum(-1, keepdim=True)
    c = alpha * (s - s_hat)
    if relu_bias is not None:
        c = c * (s_hat + relu_bias > 0).to(c.dtype)
    return torch.einsum("ntk,nt->nk", key_acts, c)


def paper_importance(
    circuit: HeadCircuit,
    feature: int,
    queries: torch.Tensor,
    keys: torch.Tensor,
    acts: torch.Tensor,
    positions: torch.Tensor,
    *,
    loss_type: LossType = "activation",
) -> torch.Tensor:
    """REF's importance matrix, as ``[len(queries), len(keys)]`` (rows queries: the one order of every
    attnrules function; REF's own matrix is its transpose).

    ``keys``/``queries`` are the candidate input features (REF: the unique keys and queries of the
    candidate table; the importance is over their cross product); the value features are ``keys``.
    ``acts [N, T, n_in]`` are input-SAE activations of the training exemplars and ``positions [N]``
    the position scored in each. Gradients are summed over exemplars (REF), not averaged.
    """
    circuit.check_feature(feature)
    _check_exemplars(acts, positions, circuit.n_inputs)
    if loss_type not in ("activation", "post_activation"):
        raise ValueError(f"loss_type must be 'activation' or 'post_activation', got {loss_type!r}")
    acts = acts.to(circuit.key_proj.dtype)
    kq = circuit.key_proj[keys] @ circuit.query_proj[queries].T  # [|K|, |Q|]
    rows = torch.arange(acts.shape[0], device=acts.device)
    query_acts = acts[rows, positions][:, queries]  # [N, |Q|]
    key_acts = acts[:, :, keys]  # [N, T, |K|]
    key_vals = value_scores(circuit, feature)[keys]
    logits = torch.einsum("ntk,nk->nt", key_acts, query_acts @ kq.T)  # [N, T]
    relu_bias = circuit.out_bias[feature] if loss_type == "post_activation" else None
    r = _exemplar_factors(key_acts, key_vals, logits, positions, relu_bias)
    return (kq * (r.T @ query_acts)).T


def exemplar_factors_all_pairs(
    circuit: HeadCircuit, feature: int, acts: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query_acts ``[n_in, N]``, key_acts ``[n_in, N]``) such that the importance of every pair is
    attn-score(q, k) × (query_acts[q] · key_acts[k]) — the surrogate over all input features."""
    circuit.check_feature(feature)
    _check_exemplars(acts, positions, circuit.n_inputs)
    acts = acts.to(circuit.key_proj.dtype)
    rows = torch.arange(acts.shape[0], device=acts.device)
    query_acts = acts[rows, positions]  # [N, n_in]
    q_vec = query_acts @ circuit.query_proj  # [N, d_head]
    logits = torch.einsum("ntd,nd->nt", acts @ circuit.key_proj, q_vec)
    r = _exemplar_factors(acts, value_scores(circuit, feature), logits, positions)
    return query_acts.T.contiguous(), r.T.contiguous()


def rank_all_pairs_by_importance(
    circuit: HeadCircuit,
    feature: int,
    acts: torch.Tensor,
    positions: torch.Tensor,
    k: int,
    *,
    score: Literal["signed", "absolute"] = "absolute",
    backend: str = "auto",
    **engine_options,
) -> engine.TopK:
    """The k most important of all n_in × n_in pairs (paper-mode surrogate over every input feature),
    through ``engine.dual_topk``; ``score="absolute"`` ranks by |I| as REF does by default."""
    query_acts, key_acts = exemplar_factors_all_pairs(circuit, feature, acts, positions)
    return engine.dual_topk(
        circuit.query_proj, circuit.key_proj, query_acts, key_acts, k, score=score, backend=backend, **engine_options
    )


def select_terms(importance: torch.Tensor, n: int, *, absolute: bool = True) -> torch.Tensor:
    """REF's choice of N terms from an importance matrix (§3.4): a boolean mask of the same shape.

    Entries strictly above the (N+1)-th largest of |I| (or relu(I) when ``absolute=False``); all
    entries when N ≥ the number of entries. So ties and zero importances give fewer than N terms.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of terms, got {n}")
    s = importance.abs() if absolute else torch.relu(importance)
    if n >= s.numel():
        return torch.ones_like(s, dtype=torch.bool)
    threshold = torch.topk(s.flatten(), n + 1).values.min()
    return s > threshold
