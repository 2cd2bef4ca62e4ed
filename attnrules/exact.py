"""Exact mode: one head's real attention logits split into input-SAE terms, and exact importances.

Paper mode scores a pair by A(q, k) = (d_q W_Q)·(d_k W_K) and drops everything else
(reference-behaviour §1.5). Exact mode keeps it all. With the residual stream entering the head's
layer written through the input SAE, x_i = Σ_j f_ij d_j + b_dec + e_i (e = the SAE's error term),
and the head's LayerNorm x̃ = P x / σ (P centres for LNPre; σ = sqrt(var + eps); no LayerNorm: P = 1,
σ = 1), the query and the key are sums of four kinds of component:

    q_t = Σ_j f_tj d_j W̄_Q / σ_t  +  b_dec W̄_Q / σ_t  +  e_t W̄_Q / σ_t  +  b_Q
            "feature"                  "dec_bias"          "error"          "bias"

(W̄ = P W, the weights as LayerNorm's centring sees them; W̄ = W for a processed model), and the real
logit q_t·k_i / attn_scale (transformer_lens ``hook_attn_scores``, 1/sqrt(d_head) by default) is the
sum of the 16 (query component × key component) group terms. The feature×feature group is split in
two: the paper-mode terms Σ f_tq f_ik A(q, k), and the "scale" correction (LayerNorm 1/σ_t σ_i and
1/attn_scale) that turns them into the real ones — so paper-mode terms + pseudo-terms = real logit.

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
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from attnrules import engine, sources
from attnrules.circuit import HeadCircuit
from attnrules.exemplars import check_tokens, run_batches

COMPONENTS = ("feature", "dec_bias", "error", "bias")
# The pseudo-features: every component but the input-SAE features, ranked as terms by exact_importance_terms.
PSEUDO = COMPONENTS[1:]
_PSEUDO_NAMES = {
    side: {"dec_bias": f"any {side}, via decoder bias", "error": f"any {side}, via SAE error",
           "bias": f"any {side}, via {b}"}
    for side, b in (("query", "b_Q"), ("key", "b_K"))
}
PAPER_GROUP = "feature×feature (paper)"
SCALE_GROUP = "feature×feature scale"
# (query component, key component) of every group after the two feature×feature ones.
_PAIRS = tuple((q, k) for q in range(len(COMPONENTS)) for k in range(len(COMPONENTS)) if (q, k) != (0, 0))
GROUPS = (PAPER_GROUP, SCALE_GROUP) + tuple(f"{COMPONENTS[q]}×{COMPONENTS[k]}" for q, k in _PAIRS)
_NORMALIZATIONS = (None, "LNPre", "RMSPre")


@dataclass(frozen=True)
class _Head:
    """One head's query/key weights as exact mode reads them (float64), and its LayerNorm."""

    layer: int
    head: int
    W_Q: Tensor  # [d_model, d_head], centred when LayerNorm centres
    W_K: Tensor
    b_Q: Tensor  # [d_head]
    b_K: Tensor
    attn_scale: float
    normalization: str | None
    eps: float

    def scale(self, x: Tensor) -> Tensor:
        """σ ``[...]`` of residuals ``x [..., d_model]``: what LayerNorm divides by (1 without one)."""
        if self.normalization is None:
            return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
        if self.normalization == "LNPre":
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1) + self.eps).sqrt()

    def projections(self, decoder: Tensor) -> tuple[Tensor, Tensor]:
        """Exact (query, key) projections ``[n, d_head]`` of decoder rows: d_j W̄_Q, d_j W̄_K."""
        decoder = decoder.double()
        return decoder @ self.W_Q, decoder @ self.W_K


def _check_supported(model: Any) -> None:
    """Refuse architectures whose logits are not (x̃ W_Q + b_Q)·(x̃ W_K + b_K) / attn_scale."""
    cfg = model.cfg
    problems = []
    if cfg.normalization_type not in _NORMALIZATIONS:
        problems.append(f"normalization_type {cfg.normalization_type!r} (supported: {_NORMALIZATIONS})")
    if cfg.positional_embedding_type != "standard":
        problems.append(f"positional_embedding_type {cfg.positional_embedding_type!r} (supported: 'standard')")
    from transformer_lens.utilities.activation_functions import softcap_enabled

    for flag, bad in (
        ("n_key_value_heads", cfg.n_key_value_heads is not None),
        ("use_qk_norm", cfg.use_qk_norm),
        ("use_logn_attn", cfg.use_logn_attn),
        ("use_attention_sinks", cfg.use_attention_sinks),
        ("attn_scores_soft_cap", softcap_enabled(cfg.attn_scores_soft_cap)),
        ("attention_dir", cfg.attention_dir != "causal"),
    ):
        if bad:
            problems.append(f"{flag}={getattr(cfg, flag)!r}")
    if problems:
        raise ValueError("exact mode does not support this model: " + "; ".join(problems))


def _head(model: Any, input_sae: sources.InputSAE, layer: int, head: int) -> _Head:
    """Check the model and the input SAE for exact mode and read one head's weights."""
    sources.check_head(model, layer, head)
    sources.check_processed(model)
    _check_supported(model)
    sources.check_compatible(model, input_sae)
    if input_sae.layer != layer:
        raise ValueError(f"input_sae reads layer {input_sae.layer} but the head is in layer {layer}")
    attn = model.blocks[layer].attn
    centre = model.cfg.normalization_type == "LNPre"
    W_Q, W_K = (w[head].detach().double() for w in (attn.W_Q, attn.W_K))
    if centre:
        W_Q, W_K = W_Q - W_Q.mean(0), W_K - W_K.mean(0)
    return _Head(
        layer, head, W_Q, W_K, attn.b_Q[head].detach().double(), attn.b_K[head].detach().double(),
        float(attn.attn_scale), model.cfg.normalization_type, float(model.cfg.eps),
    )


def _tokens(tokens: Tensor, model: Any) -> Tensor:
    """``[N, T]`` token ids (a single ``[T]`` sequence is accepted)."""
    if isinstance(tokens, Tensor) and tokens.dim() == 1:
        tokens = tokens[None]
    return check_tokens(tokens, model)


# --------------------------------------------------------------------------------------------------
# The decomposition


@dataclass(frozen=True, eq=False)
class LogitDecomposition:
    """One head's real attention logits over ``tokens``, split into (query × key component) groups.

    ``groups [B, T, T, len(group_names)]`` sum to ``logits [B, T, T]``, which equal
    ``hook_attn_scores[:, head]`` at every causal entry (key ≤ query); above the diagonal they are
    the scores the causal mask discards. The remaining fields are what :meth:`pair_terms` needs.
    """

    groups: Tensor  # [B, T, T, n_groups]
    logits: Tensor  # [B, T, T]
    group_names: tuple[str, ...]
    acts: Tensor  # [B, T, n_in] input-SAE activations f
    scale: Tensor  # [B, T] LayerNorm σ (1 without LayerNorm)
    query_components: Tensor  # [B, T, 4, d_head] one vector per COMPONENTS entry (features summed)
    key_components: Tensor  # [B, T, 4, d_head]
    query_proj: Tensor  # [n_in, d_head] exact d_j W̄_Q
    key_proj: Tensor
    paper_query_proj: Tensor  # [n_in, d_head] paper-mode d_j W_Q
    paper_key_proj: Tensor
    attn_scale: float
    layer: int
    head: int

    @property
    def causal(self) -> Tensor:
        """``[T, T]`` bool: the (query, key) entries the head attends over."""
        t = self.logits.shape[-1]
        return torch.ones(t, t, dtype=torch.bool, device=self.logits.device).tril()

    def group(self, name: str) -> Tensor:
        """The ``[B, T, T]`` terms of one group."""
        if name not in self.group_names:
            raise ValueError(f"name must be one of {self.group_names}, got {name!r}")
        return self.groups[..., self.group_names.index(name)]

    def pair_terms(self, batch: int, query_pos: int, key_pos: int) -> pd.DataFrame:
        """Every term of one logit: (query component, key component) rows, largest |exact_term| first.

        Feature rows name the feature (active ones only); pseudo-feature rows (dec_bias, error, bias)
        have feature -1 and no activation. ``exact_term`` sums to the logit; ``paper_term``
        (f·f·A for feature pairs, 0 otherwise) sums to the paper-mode group.
        """
        b, n_t = self.logits.shape[0], self.logits.shape[1]
        for name, value, size in (("batch", batch, b), ("query_pos", query_pos, n_t), ("key_pos", key_pos, n_t)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
                raise ValueError(f"{name} must be an int in [0, {size}), got {value!r}")

        def side(pos: int, proj: Tensor, components: Tensor):
            acts = self.acts[batch, pos]
            active = torch.nonzero(acts).flatten()
            vectors = torch.cat([acts[active, None] * proj[active] / self.scale[batch, pos], components[batch, pos, 1:]])
            names = ["feature"] * len(active) + list(COMPONENTS[1:])
            features = active.tolist() + [-1] * (len(COMPONENTS) - 1)
            values = acts[active].tolist() + [math.nan] * (len(COMPONENTS) - 1)
            return active, vectors, names, features, values

        qa, q_vec, q_names, q_feats, q_acts = side(query_pos, self.query_proj, self.query_components)
        ka, k_vec, k_names, k_feats, k_acts = side(key_pos, self.key_proj, self.key_components)
        exact = q_vec @ k_vec.T / self.attn_scale
        attn = torch.full_like(exact, math.nan)
        attn[: len(qa), : len(ka)] = self.paper_query_proj[qa] @ self.paper_key_proj[ka].T
        paper = torch.zeros_like(exact)
        paper[: len(qa), : len(ka)] = (
            self.acts[batch, query_pos, qa, None] * self.acts[batch, key_pos, None, ka] * attn[: len(qa), : len(ka)]
        )
        nq, nk = exact.shape
        frame = pd.DataFrame({
            "query_component": [n for n in q_names for _ in range(nk)],
            "query_feature": [f for f in q_feats for _ in range(nk)],
            "query_act": [a for a in q_acts for _ in range(nk)],
            "key_component": k_names * nq,
            "key_feature": k_feats * nq,
            "key_act": k_acts * nq,
            "attn_score": attn.flatten().tolist(),
            "paper_term": paper.flatten().tolist(),
            "exact_term": exact.flatten().tolist(),
        })
        order = frame["exact_term"].abs().sort_values(ascending=False, kind="stable").index
        return frame.loc[order].reset_index(drop=True)

    def summary(self) -> pd.DataFrame:
        """Per group, over causal entries: mean |term|, and its share of Σ|terms| over all groups."""
        terms = self.groups[:, self.causal]  # [B, n_causal, n_groups]
        mean_abs = terms.abs().mean((0, 1))
        share = mean_abs / mean_abs.sum()
        return pd.DataFrame(
            {"mean_abs": mean_abs.tolist(), "share": share.tolist()}, index=pd.Index(self.group_names, name="group")
        )


def reconstruct(
    model: Any, input_sae: sources.InputSAE, head: int | HeadCircuit, tokens: Tensor
) -> LogitDecomposition:
    """Decompose head ``head`` (of ``input_sae.layer``, or a :class:`HeadCircuit`) on ``tokens [B, T]``.

    With a circuit, its paper-mode projections define the paper group (they must be this model's
    and this input SAE's). Computed in float64; never allocates [T, T, n_in, n_in].
    """
    if isinstance(head, HeadCircuit):
        layer, index, circuit = head.layer, head.head, head
    elif isinstance(head, int) and not isinstance(head, bool):
        layer, index, circuit = input_sae.layer, head, None
    else:
        raise TypeError(f"head must be a head index (int) or a HeadCircuit, got {type(head).__name__}")
    h = _head(model, input_sae, layer, index)
    D = input_sae.W_dec.detach().double()
    attn = model.blocks[layer].attn
    paper_q, paper_k = D @ attn.W_Q[index].detach().double(), D @ attn.W_K[index].detach().double()
    if circuit is not None:
        if circuit.n_inputs != input_sae.n_features:
            raise ValueError(f"circuit has {circuit.n_inputs} input features but input_sae has {input_sae.n_features}")
        for name, mine, want in (("query_proj", circuit.query_proj, paper_q), ("key_proj", circuit.key_proj, paper_k)):
            if not torch.allclose(mine.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
                raise ValueError(
                    f"circuit.{name} is not input_sae.W_dec @ W_{name[0].upper()} of this model's head L{layer}H{index}"
                )
        paper_q, paper_k = circuit.query_proj.detach().double(), circuit.key_proj.detach().double()
    tokens = _tokens(tokens, model)
    resid = f"blocks.{layer}.hook_resid_pre"
    ((_, cache),) = run_batches(model, tokens, layer, [resid], batch_size=len(tokens), desc="", progress=False)
    x = cache[resid]
    with torch.no_grad():
        acts = input_sae.encode(x.to(input_sae.W_dec.dtype)).double()
    x = x.double()
    error = x - acts @ D - input_sae.b_dec.double()
    sigma = h.scale(x)
    query_proj, key_proj = h.projections(D)

    def components(W: Tensor, bias: Tensor, proj: Tensor) -> Tensor:
        """``[B, T, 4, d_head]``: features (summed), decoder bias, error (all / σ), then the bias."""
        features = acts @ proj
        dec_bias = (input_sae.b_dec.double() @ W).expand_as(features)
        scaled = torch.stack([features, dec_bias, error @ W], -2) / sigma[..., None, None]
        return torch.cat([scaled, bias.expand(*sigma.shape, 1, -1)], -2)

    qc, kc = components(h.W_Q, h.b_Q, query_proj), components(h.W_K, h.b_K, key_proj)
    by_pair = torch.einsum("bqad,bkcd->bqkac", qc, kc) / h.attn_scale  # [B, T, T, 4, 4]
    paper = torch.einsum("bqd,bkd->bqk", acts @ paper_q, acts @ paper_k)
    groups = torch.stack([paper, by_pair[..., 0, 0] - paper, *(by_pair[..., q, k] for q, k in _PAIRS)], -1)
    return LogitDecomposition(
        groups, groups.sum(-1), GROUPS, acts, sigma, qc, kc, query_proj, key_proj, paper_q, paper_k,
        h.attn_scale, layer, index,
    )


# --------------------------------------------------------------------------------------------------
# Exact importance


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
    model: Any,
    input_sae: sources.InputSAE,
    output_sae: sources.OutputSAE,
    feature: int,
    tokens: Tensor,
    positions: Tensor,
    queries: Tensor | None,
    keys: Tensor | None,
    batch_size: int,
    *,
    pseudo: bool = False,
) -> tuple[_Head, Tensor, Tensor, _PseudoSums | None]:
    """The one pass over the exemplars behind every exact importance: (head, query_acts ``[|Q|, N]``,
    key_acts ``[|K|, N]``, and with ``pseudo`` the :class:`_PseudoSums`, else None), float64."""
    layer, index = output_sae.layer, output_sae.head
    sources.check_compatible(model, input_sae, output_sae)
    h = _head(model, input_sae, layer, index)
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < output_sae.n_features:
        raise ValueError(f"feature must be an output-feature index in [0, {output_sae.n_features}), got {feature!r}")
    tokens = _tokens(tokens, model)
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
    model: Any,
    input_sae: sources.InputSAE,
    output_sae: sources.OutputSAE,
    feature: int,
    tokens: Tensor,
    positions: Tensor,
    queries: Tensor | None,
    keys: Tensor | None,
    batch_size: int,
) -> tuple[_Head, Tensor, Tensor]:
    """(head, query_acts ``[|Q|, N]``, key_acts ``[|K|, N]``) in float64 (all features when None)."""
    h, query_acts, key_acts, _ = _exact_pass(
        model, input_sae, output_sae, feature, tokens, positions, queries, keys, batch_size
    )
    return h, query_acts, key_acts


def exact_importance(
    model: Any,
    input_sae: sources.InputSAE,
    output_sae: sources.OutputSAE,
    feature: int,
    keys: Tensor,
    queries: Tensor,
    tokens: Tensor,
    positions: Tensor,
    *,
    batch_size: int = 8,
) -> Tensor:
    """Exact importance ``[len(keys), len(queries)]`` (rows keys, like paper mode), float64.

    Σ_n ∂act_n/∂m_qk at m = 1 for the real activation of output feature ``feature`` at
    ``positions[n]`` of ``tokens[n]``, with m_qk scaling the (q, k) feature-pair terms of the
    head's real logits (module docstring). The head is ``output_sae``'s.
    """
    h, query_acts, key_acts = _exact_factors(
        model, input_sae, output_sae, feature, tokens, positions, queries, keys, batch_size
    )
    return _pair_importance(h, input_sae, keys, queries, key_acts, query_acts)[0]


def _pair_importance(
    h: _Head, input_sae: sources.InputSAE, keys: Tensor, queries: Tensor, key_acts: Tensor, query_acts: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(importance ``[|K|, |Q|]`` = A × (key_acts · query_acts), query projections, key projections)."""
    query_proj, _ = h.projections(input_sae.W_dec[queries])
    _, key_proj = h.projections(input_sae.W_dec[keys])
    return (key_proj @ query_proj.T) * (key_acts @ query_acts.T), query_proj, key_proj


def pseudo_name(component: str, side: str) -> str:
    """Readable name of a pseudo-feature for rule text, e.g. ``pseudo_name("bias", "query")`` is
    ``"any query, via b_Q"``; ``component`` one of :data:`PSEUDO`, ``side`` "query" or "key"."""
    if side not in _PSEUDO_NAMES:
        raise ValueError(f"side must be 'query' or 'key', got {side!r}")
    if component not in PSEUDO:
        raise ValueError(f"component must be one of {PSEUDO}, got {component!r}")
    return _PSEUDO_NAMES[side][component]


@dataclass(frozen=True)
class ExactTerms:
    """Exact importances of every term kind over candidate keys and queries (float64).

    Rows of the pseudo fields follow :data:`PSEUDO` (dec_bias, error, bias). With
    g_{n,i} = gate_n α_{t i} (s_i − ŝ) / attn_scale (i ≤ t_n, t = t_n), qc / kc the query / key
    component vectors (b_dec W̄/σ, e W̄/σ, b) and P_Q, P_K = d W̄_Q, d W̄_K:

    - ``features[k, q]`` = Σ_n Σ_i g_{n,i} (f_{n,t,q} P_Q[q]/σ_{n,t})·(f_{n,i,k} P_K[k]/σ_{n,i}),
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

    features: Tensor  # [|K|, |Q|]
    query_pseudo: Tensor  # [len(PSEUDO), |K|]
    key_pseudo: Tensor  # [len(PSEUDO), |Q|]
    query_pseudo_score: Tensor  # [len(PSEUDO), |K|]
    key_pseudo_score: Tensor  # [len(PSEUDO), |Q|]


def exact_importance_terms(
    model: Any,
    input_sae: sources.InputSAE,
    output_sae: sources.OutputSAE,
    feature: int,
    keys: Tensor,
    queries: Tensor,
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
    features, query_proj, key_proj = _pair_importance(h, input_sae, keys, queries, key_acts, query_acts)

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
    model: Any,
    input_sae: sources.InputSAE,
    output_sae: sources.OutputSAE,
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


def exact_projections(model: Any, input_sae: sources.InputSAE, head: int) -> tuple[Tensor, Tensor]:
    """(d_j W̄_Q, d_j W̄_K) ``[n_in, d_head]`` float64 for head ``head`` of ``input_sae.layer``: A = their
    product (equal to paper mode's for a processed LNPre model, whose weights are already centred)."""
    return _head(model, input_sae, input_sae.layer, head).projections(input_sae.W_dec.detach())


def rank_all_pairs_by_exact_importance(
    model: Any,
    input_sae: sources.InputSAE,
    output_sae: sources.OutputSAE,
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
