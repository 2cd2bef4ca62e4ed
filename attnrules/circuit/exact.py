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

Modern attention, all exact (the decomposition equals transformer_lens's logits):

- rotary heads: every component is rotated at its own position, q_t → R_t q_t, k_i → R_i k_i (the
  model's own sin/cos tables, partial ``rotary_dim`` included), so the 16 group terms still sum to the
  logit R_t q_t · R_i k_i / attn_scale. The paper group becomes Σ f_tq f_ik A_{t−i}(q, k), A_δ of
  :class:`~attnrules.circuit.rotary.Rotary` (the circuit's ``rotary``, else the model's);
- grouped-query attention: query head h reads key/value head :func:`attnrules.sources.kv_head`
  (``W_K[h]`` is already expanded by transformer_lens; its ``hook_k``/``hook_v`` are not);
- QK-norm: the RMS ρ of each position's raw query (key) divides every query (key) component, as
  LayerNorm's σ does, and the norm's gains are folded into W̄_Q, b_Q (W̄_K, b_K): a per-position scale;
- attention-logit soft-capping: ``logits`` are the pre-cap logits (what the groups sum to);
  ``capped_logits`` = cap·tanh(logits/cap) are what ``hook_attn_scores`` holds;
- sliding windows: :attr:`LogitDecomposition.causal` holds only the keys within the layer's window;
- parallel attention + MLP, Gemma's norms after attention/MLP, split q/k/v inputs: the head still reads
  the layer's normalised ``hook_resid_pre``, so nothing changes.

Refused with a clear error: ALiBi, shortformer and relative position biases, log-n query scaling,
dynamic-NTK rotary, attention sinks, q/k/v clipping, OLMo-style QK-norm over all heads, post-norm
architectures, 4-bit weights and bidirectional attention.

Exact importances built on this decomposition live in :mod:`attnrules.importance.exact`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import Tensor

import attnrules.sources as sources
from attnrules.circuit.head import HeadCircuit
from attnrules.circuit.rotary import Rotary
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
    """One head's query/key weights as exact mode reads them (float64), and its normalisations.

    ``W_Q``/``b_Q`` are the weights before QK-norm (centred when LayerNorm centres); with QK-norm
    the query is w_q ⊙ (x̃ W̄_Q + b_Q) / ρ_q (ρ_q the RMS of the raw query), so the weights exact mode
    projects with are :attr:`query_weights` = W̄_Q ⊙ w_q, :attr:`query_bias` = b_Q ⊙ w_q.
    """

    layer: int
    head: int
    W_Q: Tensor  # [d_model, d_head], centred when LayerNorm centres
    W_K: Tensor
    b_Q: Tensor  # [d_head]
    b_K: Tensor
    attn_scale: float
    normalization: str | None
    eps: float
    kv_head: int | None = None  # the key/value head (index into hook_k / hook_v); None: ``head``
    query_gain: Tensor | None = None  # [d_head] QK-norm gains (None without QK-norm)
    key_gain: Tensor | None = None
    qk_eps: float = 0.0
    soft_cap: float | None = None  # attention-logit soft-cap (None without one)
    window: int | None = None  # sliding window: keys up to window − 1 tokens back (None: global)
    rotary_dim: int | None = None  # rotary heads: the rotated leading dimensions (None: not rotary)
    attn: object = field(default=None, repr=False, compare=False)  # the attention module (rotary tables)

    def scale(self, x: Tensor) -> Tensor:
        """σ ``[...]`` of residuals ``x [..., d_model]``: what LayerNorm divides by (1 without one)."""
        if self.normalization is None:
            return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
        if self.normalization == "LNPre":
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1) + self.eps).sqrt()

    @property
    def query_weights(self) -> Tensor:
        """W̄_Q with QK-norm's gains folded in ``[d_model, d_head]`` (W̄_Q without QK-norm)."""
        return self.W_Q if self.query_gain is None else self.W_Q * self.query_gain

    @property
    def key_weights(self) -> Tensor:
        return self.W_K if self.key_gain is None else self.W_K * self.key_gain

    @property
    def query_bias(self) -> Tensor:
        return self.b_Q if self.query_gain is None else self.b_Q * self.query_gain

    @property
    def key_bias(self) -> Tensor:
        return self.b_K if self.key_gain is None else self.b_K * self.key_gain

    @property
    def rotary(self) -> bool:
        return self.rotary_dim is not None

    def projections(self, decoder: Tensor) -> tuple[Tensor, Tensor]:
        """Exact (query, key) projections ``[n, d_head]`` of decoder rows: d_j W̄_Q, d_j W̄_K (QK-norm
        gains folded in)."""
        decoder = decoder.double()
        return decoder @ self.query_weights, decoder @ self.key_weights

    def norm_scales(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(ρ_q, ρ_k) ``[...]``: QK-norm's RMS of the raw query / key at each position of residuals
        ``x [..., d_model]`` (float64, σ their LayerNorm scale); ones without QK-norm."""
        if self.query_gain is None:
            ones = torch.ones_like(sigma)
            return ones, ones
        q = x @ self.W_Q / sigma[..., None] + self.b_Q
        k = x @ self.W_K / sigma[..., None] + self.b_K
        return (q.pow(2).mean(-1) + self.qk_eps).sqrt(), (k.pow(2).mean(-1) + self.qk_eps).sqrt()

    def rotation(self, n_positions: int, device=None) -> tuple[Tensor, Tensor] | None:
        """(cos, sin) ``[n_positions, rotary_dim]`` float64, the model's own tables; None if not rotary."""
        if not self.rotary:
            return None
        sin, cos = self.attn.calculate_sin_cos_rotary(
            self.rotary_dim, n_positions, base=self.attn._rotary_base(), dtype=torch.float64
        )
        return cos.to(device), sin.to(device)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x [..., d_head]`` rotated as transformer_lens's ``apply_rotary`` does, by ``cos``/``sin``
        broadcastable to ``[..., rotary_dim]`` (the rows of the positions x sits at)."""
        r = self.rotary_dim
        x_rot, x_pass = x[..., :r], x[..., r:]
        flip = torch.empty_like(x_rot)
        if self.attn.cfg.rotary_adjacent_pairs:
            flip[..., ::2], flip[..., 1::2] = -x_rot[..., 1::2], x_rot[..., ::2]
        else:
            h = r // 2
            flip[..., :h], flip[..., h:] = -x_rot[..., h:], x_rot[..., :h]
        return torch.cat([x_rot * cos + flip * sin, x_pass], -1)

    def allowed(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        """Bool: whether a query at ``query_pos`` attends to a key at ``key_pos`` (broadcast): causal
        and, for a sliding-window layer, within the window (transformer_lens's mask)."""
        ok = key_pos <= query_pos
        if self.window is not None:
            ok = ok & (key_pos > query_pos - self.window)
        return ok


def _check_supported(model: HookedTransformer) -> None:
    """Refuse architectures whose pre-cap logits are not R_t(x̃ W_Q + b_Q)/ρ_q · R_i(x̃ W_K + b_K)/ρ_k / attn_scale
    (rotations, QK-norm and per-position scales as in the module docstring)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    problems = []
    if cfg.normalization_type not in _NORMALIZATIONS:
        problems.append(f"normalization_type {cfg.normalization_type!r} (supported: {_NORMALIZATIONS})")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        problems.append(
            f"positional_embedding_type {cfg.positional_embedding_type!r} (supported: 'standard', 'rotary'; "
            "position biases added to the logits are not decomposed)"
        )
    if cfg.positional_embedding_type == "rotary" and not isinstance(cfg.rotary_dim, int):
        problems.append("positional_embedding_type 'rotary' without an int rotary_dim")
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        problems.append(f"post-norm architecture {cfg.original_architecture} (its heads read the unnormalised stream)")
    elif not cfg.use_qk_norm and getattr(model.blocks[0].attn, "q_norm", None) is not None:
        problems.append("QK-norm over all heads together (OLMo style): the norm mixes heads")
    for flag, bad in (
        ("use_logn_attn", cfg.use_logn_attn),
        ("use_dynamic_ntk_rope", getattr(cfg, "use_dynamic_ntk_rope", False)),
        ("use_attention_sinks", cfg.use_attention_sinks),
        ("clip_qkv", getattr(cfg, "clip_qkv", None) is not None),
        ("load_in_4bit", getattr(cfg, "load_in_4bit", False)),
        ("attention_dir", cfg.attention_dir != "causal"),
    ):
        if bad:
            problems.append(f"{flag}={getattr(cfg, flag)!r}")
    if problems:
        raise ValueError("exact mode does not support this model: " + "; ".join(problems))


def head_weights(model: HookedTransformer, input_sae: InputSAE, layer: int, head: int) -> HeadWeights:
    """Check the model and the input SAE for exact mode and read one head's weights."""
    from transformer_lens.utilities.activation_functions import softcap_enabled

    sources.check_head(model, layer, head)
    sources.check_processed(model)
    _check_supported(model)
    sources.check_compatible(model, input_sae)
    if input_sae.layer != layer:
        raise ValueError(f"input_sae reads layer {input_sae.layer} but the head is in layer {layer}")
    cfg = model.cfg
    attn = model.blocks[layer].attn
    centre = cfg.normalization_type == "LNPre"
    W_Q, W_K = (w[head].detach().double() for w in (attn.W_Q, attn.W_K))
    if centre:
        W_Q, W_K = W_Q - W_Q.mean(0), W_K - W_K.mean(0)
    gains = {}
    if cfg.use_qk_norm:
        gains = dict(query_gain=attn.q_norm.w.detach().double(), key_gain=attn.k_norm.w.detach().double(),
                     qk_eps=float(attn.q_norm.eps))
    return HeadWeights(
        layer, head, W_Q, W_K, attn.b_Q[head].detach().double(), attn.b_K[head].detach().double(),
        float(attn.attn_scale), cfg.normalization_type, float(cfg.eps),
        kv_head=sources.kv_head(model, head),
        soft_cap=float(cfg.attn_scores_soft_cap) if softcap_enabled(cfg.attn_scores_soft_cap) else None,
        window=sources.attention_window(model, layer),
        rotary_dim=int(cfg.rotary_dim) if cfg.positional_embedding_type == "rotary" else None,
        attn=attn, **gains,
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

    ``groups [B, T, T, len(group_names)]`` sum to ``logits [B, T, T]``, the pre-cap logits; with an
    attention-logit soft-cap, ``capped_logits`` = cap·tanh(logits / cap) (else the logits themselves)
    equal ``hook_attn_scores[:, head]`` at every entry of :attr:`causal` (the keys the head attends
    over: key ≤ query, within the layer's sliding window); elsewhere they are the scores the mask
    discards. The remaining fields are what :meth:`pair_terms` needs.
    """

    groups: Tensor  # [B, T, T, n_groups]
    logits: Tensor  # [B, T, T] pre-cap
    group_names: tuple[str, ...]
    acts: Tensor  # [B, T, n_in] input-SAE activations f
    scale: Tensor  # [B, T] LayerNorm σ (1 without LayerNorm)
    query_components: Tensor  # [B, T, 4, d_head] one vector per COMPONENTS entry (features summed), as the logit sees it
    key_components: Tensor  # [B, T, 4, d_head]  (scaled, QK-normed and rotated at its position)
    query_proj: Tensor  # [n_in, d_head] exact d_j W̄_Q (QK-norm gains folded in)
    key_proj: Tensor
    paper_query_proj: Tensor  # [n_in, d_head] paper-mode d_j W_Q
    paper_key_proj: Tensor
    attn_scale: float
    layer: int
    head: int
    capped_logits: Tensor | None = None  # [B, T, T] what hook_attn_scores holds (None: = logits)
    soft_cap: float | None = None
    window: int | None = None  # sliding window (keys up to window − 1 tokens back), None: global
    query_norm: Tensor | None = None  # [B, T] QK-norm's ρ_q (None without QK-norm)
    key_norm: Tensor | None = None
    paper_rotary: Rotary | None = None  # rotary heads: A_δ of the paper group
    weights: HeadWeights | None = field(default=None, repr=False)  # rotary heads: the rotation

    def __post_init__(self) -> None:
        if self.capped_logits is None:
            object.__setattr__(self, "capped_logits", self.logits)

    @property
    def causal(self) -> Tensor:
        """``[T, T]`` bool: the (query, key) entries the head attends over (causal, within the window)."""
        t = self.logits.shape[-1]
        pos = torch.arange(t, device=self.logits.device)
        ok = pos[None, :] <= pos[:, None]
        if self.window is not None:
            ok = ok & (pos[None, :] > pos[:, None] - self.window)
        return ok

    def group(self, name: str) -> Tensor:
        """The ``[B, T, T]`` terms of one group."""
        if name not in self.group_names:
            raise ValueError(f"name must be one of {self.group_names}, got {name!r}")
        return self.groups[..., self.group_names.index(name)]

    def _paper_scores(self, query_pos: int, key_pos: int, queries: Tensor, keys: Tensor) -> Tensor:
        """Paper-mode attn-scores ``[|queries|, |keys|]`` of projections at (query_pos, key_pos)."""
        if self.paper_rotary is None:
            return queries @ keys.T
        return _offset_cross(self.paper_rotary, queries, keys, query_pos - key_pos)

    def pair_terms(self, batch: int, query_pos: int, key_pos: int) -> pd.DataFrame:
        """Every term of one logit: (query component, key component) rows, largest |exact_term| first.

        Feature rows name the feature (active ones only); pseudo-feature rows (dec_bias, error, bias)
        have feature -1 and no activation. ``exact_term`` sums to the (pre-cap) logit; ``paper_term``
        (f·f·A for feature pairs, A = A_{query_pos − key_pos} on rotary heads; 0 otherwise) sums to
        the paper-mode group.
        """
        b, n_t = self.logits.shape[0], self.logits.shape[1]
        for name, value, size in (("batch", batch, b), ("query_pos", query_pos, n_t), ("key_pos", key_pos, n_t)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
                raise ValueError(f"{name} must be an int in [0, {size}), got {value!r}")

        def side(pos: int, proj: Tensor, components: Tensor, norm: Tensor | None):
            acts = self.acts[batch, pos]
            active = torch.nonzero(acts).flatten()
            divisor = self.scale[batch, pos] * (1.0 if norm is None else norm[batch, pos])
            features = acts[active, None] * proj[active] / divisor
            if self.weights is not None and self.weights.rotary:
                cos, sin = self.weights.rotation(pos + 1, device=features.device)
                features = self.weights.rotate(features, cos[pos], sin[pos])
            vectors = torch.cat([features, components[batch, pos, 1:]])
            names = ["feature"] * len(active) + list(COMPONENTS[1:])
            features = active.tolist() + [-1] * (len(COMPONENTS) - 1)
            values = acts[active].tolist() + [math.nan] * (len(COMPONENTS) - 1)
            return active, vectors, names, features, values

        qa, q_vec, q_names, q_feats, q_acts = side(query_pos, self.query_proj, self.query_components, self.query_norm)
        ka, k_vec, k_names, k_feats, k_acts = side(key_pos, self.key_proj, self.key_components, self.key_norm)
        exact = q_vec @ k_vec.T / self.attn_scale
        attn = torch.full_like(exact, math.nan)
        attn[: len(qa), : len(ka)] = self._paper_scores(
            query_pos, key_pos, self.paper_query_proj[qa], self.paper_key_proj[ka]
        )
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
        """Per group, over the entries the head attends over (:attr:`causal`): mean |term|, and its
        share of Σ|terms| over all groups."""
        terms = self.groups[:, self.causal]  # [B, n_causal, n_groups]
        mean_abs = terms.abs().mean((0, 1))
        share = mean_abs / mean_abs.sum()
        return pd.DataFrame(
            {"mean_abs": mean_abs.tolist(), "share": share.tolist()}, index=pd.Index(self.group_names, name="group")
        )


def _offset_cross(rotary: Rotary, queries: Tensor, keys: Tensor, offset: int) -> Tensor:
    """A_δ(q, k) ``[|queries|, |keys|]`` at one offset δ (negative δ: A_{−δ}(k, q), the same rotation)."""
    if offset >= 0:
        return rotary.rotate(queries, torch.full((len(queries),), offset, dtype=torch.long)) @ keys.T
    return queries @ rotary.rotate(keys, torch.full((len(keys),), -offset, dtype=torch.long)).T


def _paper_group(acts: Tensor, paper_q: Tensor, paper_k: Tensor, rotary: Rotary | None) -> Tensor:
    """``[B, T, T]`` Σ f_tq f_ik A(q, k); on a rotary head A = A_{t−i} (A_{i−t}(k, q) above the diagonal)."""
    pq, pk = acts @ paper_q, acts @ paper_k  # [B, T, d_head]
    if rotary is None:
        return torch.einsum("bqd,bkd->bqk", pq, pk)
    b, t, d = pq.shape
    out = torch.zeros(b, t, t, dtype=pq.dtype, device=pq.device)
    rows = torch.arange(t, device=pq.device)
    for delta in range(t):
        n = t - delta
        offsets = torch.full((b * n,), delta, dtype=torch.long)
        # below the diagonal: query t = i + δ rotated to δ, key i
        rq = rotary.rotate(pq[:, delta:].reshape(-1, d), offsets).view(b, n, d)
        out[:, rows[delta:], rows[:n]] = (rq * pk[:, :n]).sum(-1)
        if delta:  # above it: key i = t + δ rotated to δ, query t
            rk = rotary.rotate(pk[:, delta:].reshape(-1, d), offsets).view(b, n, d)
            out[:, rows[:n], rows[delta:]] = (rk * pq[:, :n]).sum(-1)
    return out


def _paper_rotary(model: HookedTransformer, layer: int, circuit: HeadCircuit | None, n_positions: int) -> Rotary | None:
    """The rotation of the paper group: the circuit's when it covers the offsets, else the model's."""
    if model.cfg.positional_embedding_type != "rotary":
        return None
    rotary = getattr(circuit, "rotary", None)
    if rotary is not None and rotary.max_offset >= n_positions - 1:
        return rotary
    return Rotary.from_model(model, layer, max_offset=max(n_positions - 1, 0))


def reconstruct(
    model: HookedTransformer, input_sae: InputSAE, head: int | HeadCircuit, tokens: Tensor
) -> LogitDecomposition:
    """Decompose head ``head`` (of ``input_sae.layer``, or a :class:`HeadCircuit`) on ``tokens [B, T]``.

    With a circuit, its paper-mode projections define the paper group (they must be this model's
    and this input SAE's), with its ``rotary`` on rotary heads. Computed in float64; never allocates
    [T, T, n_in, n_in].
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
    query_norm, key_norm = h.norm_scales(x, sigma)
    query_proj, key_proj = h.projections(D)
    rotation = h.rotation(tokens.shape[1], device=x.device)

    def components(W: Tensor, bias: Tensor, proj: Tensor, norm: Tensor) -> Tensor:
        """``[B, T, 4, d_head]``: features (summed), decoder bias, error (all / σ), then the bias; all
        / ρ (QK-norm) and rotated at their position."""
        features = acts @ proj
        dec_bias = (input_sae.b_dec.double() @ W).expand_as(features)
        scaled = torch.stack([features, dec_bias, error @ W], -2) / sigma[..., None, None]
        out = torch.cat([scaled, bias.expand(*sigma.shape, 1, -1)], -2)
        if h.query_gain is not None:
            out = out / norm[..., None, None]
        if rotation is not None:
            cos, sin = rotation
            out = h.rotate(out, cos[:, None], sin[:, None])
        return out

    qc = components(h.query_weights, h.query_bias, query_proj, query_norm)
    kc = components(h.key_weights, h.key_bias, key_proj, key_norm)
    by_pair = torch.einsum("bqad,bkcd->bqkac", qc, kc) / h.attn_scale  # [B, T, T, 4, 4]
    paper_rotary = _paper_rotary(model, layer, circuit, tokens.shape[1])
    paper = _paper_group(acts, paper_q, paper_k, paper_rotary)
    groups = torch.stack([paper, by_pair[..., 0, 0] - paper, *(by_pair[..., q, k] for q, k in _PAIRS)], -1)
    logits = groups.sum(-1)
    capped = None if h.soft_cap is None else h.soft_cap * torch.tanh(logits / h.soft_cap)
    qk_norm = h.query_gain is not None
    return LogitDecomposition(
        groups, logits, GROUPS, acts, sigma, qc, kc, query_proj, key_proj, paper_q, paper_k,
        h.attn_scale, layer, index, capped_logits=capped, soft_cap=h.soft_cap, window=h.window,
        query_norm=query_norm if qk_norm else None, key_norm=key_norm if qk_norm else None,
        paper_rotary=paper_rotary, weights=h if h.rotary else None,
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
    product (equal to paper mode's for a processed LNPre model, whose weights are already centred).
    QK-norm gains are folded in; on a rotary head these are the unrotated projections (A at offset 0)."""
    return head_weights(model, input_sae, input_sae.layer, head).projections(input_sae.W_dec.detach())
