"""Exact mode: one head's real attention logits split into input-SAE terms and pseudo-terms.

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

Exact importances built on this decomposition live in :mod:`attnrules.importance.exact`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import Tensor

import attnrules.sources as sources
from attnrules.circuit.head import HeadCircuit
from attnrules.sources.runner import check_tokens, run_batches

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import InputSAE


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
class HeadWeights:
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


def _check_supported(model: HookedTransformer) -> None:
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


def head_weights(model: HookedTransformer, input_sae: InputSAE, layer: int, head: int) -> HeadWeights:
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
    return HeadWeights(
        layer, head, W_Q, W_K, attn.b_Q[head].detach().double(), attn.b_K[head].detach().double(),
        float(attn.attn_scale), model.cfg.normalization_type, float(model.cfg.eps),
    )


def as_token_batch(tokens: Tensor, model: HookedTransformer) -> Tensor:
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
    model: HookedTransformer, input_sae: InputSAE, head: int | HeadCircuit, tokens: Tensor
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
    h = head_weights(model, input_sae, layer, index)
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
    tokens = as_token_batch(tokens, model)
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


def pseudo_name(component: str, side: str) -> str:
    """Readable name of a pseudo-feature for rule text, e.g. ``pseudo_name("bias", "query")`` is
    ``"any query, via b_Q"``; ``component`` one of :data:`PSEUDO`, ``side`` "query" or "key"."""
    if side not in _PSEUDO_NAMES:
        raise ValueError(f"side must be 'query' or 'key', got {side!r}")
    if component not in PSEUDO:
        raise ValueError(f"component must be one of {PSEUDO}, got {component!r}")
    return _PSEUDO_NAMES[side][component]


def exact_projections(model: HookedTransformer, input_sae: InputSAE, head: int) -> tuple[Tensor, Tensor]:
    """(d_j W̄_Q, d_j W̄_K) ``[n_in, d_head]`` float64 for head ``head`` of ``input_sae.layer``: A = their
    product (equal to paper mode's for a processed LNPre model, whose weights are already centred)."""
    return head_weights(model, input_sae, input_sae.layer, head).projections(input_sae.W_dec.detach())
