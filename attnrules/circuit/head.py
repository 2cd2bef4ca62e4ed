"""One attention head seen through SAEs: the projections every score is built from.

For input-SAE decoder rows D ``[n_in, d_model]`` and the head's processed weights (transformer_lens
row-vector convention, ``q = x @ W_Q``):

- ``query_proj = D @ W_Q``, ``key_proj = D @ W_K``, ``value_proj = D @ W_V`` — ``[n_in, d_head]``
- ``out_encoder`` — the output SAE's encoder restricted to this head, ``[d_head, n_out]``; column g
  is output feature g's encoder vector u (REF uses the encoder, not the decoder row).

attn-score(q, k) = query_proj[q] · key_proj[k] and value-score(k) = value_proj[k] · u, with no
biases, no LayerNorm scale and no 1/sqrt(d_head): the paper's ("paper" mode) definitions.

Modern attention, as paper mode reads it:

- rotary heads (``rotary``, a :class:`~attnrules.circuit.rotary.Rotary`): the attn-score of a pair
  depends on the query-key offset δ, A_δ(q, k) = (d_q W_Q) R_δ (d_k W_K)ᵀ; ``offsets`` are the offsets
  a pair is scored over (rankings take each pair's best offset among them; default 0 … n_ctx − 1, the
  pipeline uses 0 … seq_len − 1) and predictions use the offset present in each exemplar;
- sliding-window heads (``window``): a key more than ``window − 1`` tokens back is not attended, so
  larger offsets are never candidates and never match;
- QK-norm: its gains are folded into W_Q / W_K and its per-position scale ignored, as LayerNorm's is;
- grouped-query attention: query head h reads key/value head h // (n_heads / n_kv_heads)
  (transformer_lens's expanded ``W_K[h]``, ``W_V[h]``);
- attention-logit soft-capping: scores are the pre-cap logits (the cap is monotone, rankings agree).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, TYPE_CHECKING

import torch

import attnrules.sources as sources
from attnrules.circuit.rotary import Rotary

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import InputSAE, OutputSAE


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


@dataclass(frozen=True)
class HeadCircuit:
    """Projections of one head (layer ``layer``, head ``head``) onto input-SAE features."""

    query_proj: torch.Tensor  # [n_in, d_head]
    key_proj: torch.Tensor  # [n_in, d_head]
    value_proj: torch.Tensor  # [n_in, d_head]
    out_encoder: torch.Tensor  # [d_head, n_out]
    out_bias: torch.Tensor  # [n_out]
    layer: int = 0
    head: int = 0
    rotary: Optional[Rotary] = None  # rotary heads: the rotation (A depends on the offset)
    offsets: Optional[torch.Tensor] = None  # rotary heads: the offsets pairs are scored over (sorted)
    window: Optional[int] = None  # sliding-window heads: keys up to window − 1 tokens back

    def __post_init__(self) -> None:
        n_in, d_head = self.query_proj.shape if self.query_proj.dim() == 2 else (None, None)
        if n_in is None:
            raise ValueError(f"query_proj must be [n_in, d_head], got shape {tuple(self.query_proj.shape)}")
        for name in ("key_proj", "value_proj"):
            x = getattr(self, name)
            if tuple(x.shape) != (n_in, d_head):
                raise ValueError(f"{name} must have shape [{n_in}, {d_head}] like query_proj, got {tuple(x.shape)}")
        if self.out_encoder.dim() != 2 or self.out_encoder.shape[0] != d_head:
            raise ValueError(f"out_encoder must be [d_head={d_head}, n_out], got shape {tuple(self.out_encoder.shape)}")
        if tuple(self.out_bias.shape) != (self.out_encoder.shape[1],):
            raise ValueError(
                f"out_bias must have shape [{self.out_encoder.shape[1]}] (one per output feature), "
                f"got {tuple(self.out_bias.shape)}"
            )
        for name in ("query_proj", "key_proj", "value_proj", "out_encoder", "out_bias"):
            _check_finite(name, getattr(self, name))
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise ValueError(f"window must be a positive int (keys up to window − 1 tokens back), got {self.window!r}")
        if self.rotary is None:
            if self.offsets is not None:
                raise ValueError("offsets apply to rotary heads only (rotary is None)")
            return
        if self.rotary.d_head != d_head:
            raise ValueError(f"rotary is for d_head={self.rotary.d_head}, the projections have d_head={d_head}")
        if self.offsets is None:
            raise ValueError("a rotary circuit needs offsets (the query-key offsets its pairs are scored over)")
        offsets = self.rotary.check_offsets(self.offsets)
        if not bool((offsets[1:] > offsets[:-1]).all()):
            raise ValueError("offsets must be sorted ascending")
        if self.window is not None and int(offsets.max()) >= self.window:
            raise ValueError(f"offsets must be below the sliding window ({self.window}), got up to {int(offsets.max())}")

    @property
    def n_inputs(self) -> int:
        return self.query_proj.shape[0]

    @property
    def n_outputs(self) -> int:
        return self.out_encoder.shape[1]

    @property
    def d_head(self) -> int:
        return self.query_proj.shape[1]

    def to(self, device: str | torch.device) -> "HeadCircuit":
        """The same circuit with its tensors on ``device``."""
        fields = ("query_proj", "key_proj", "value_proj", "out_encoder", "out_bias")
        moved = {f: getattr(self, f).to(device) for f in fields}
        if self.rotary is not None:
            moved["rotary"] = Rotary(*(getattr(self.rotary, f).to(device) for f in ("first", "second", "rest", "cos", "sin")))
            moved["offsets"] = self.offsets.to(device)
        return dataclasses.replace(self, **moved)

    def with_offsets(self, offsets: Sequence[int] | torch.Tensor) -> "HeadCircuit":
        """A rotary circuit scored over ``offsets`` instead (e.g. ``range(seq_len)``; offsets at or beyond
        the sliding window are dropped)."""
        if self.rotary is None:
            raise ValueError("with_offsets applies to rotary circuits only (this head has absolute positions)")
        offsets = torch.unique(torch.as_tensor(offsets, dtype=torch.long).flatten())
        if self.window is not None:
            offsets = offsets[offsets < self.window]
        return dataclasses.replace(self, offsets=offsets)

    def offset_blind(self) -> "HeadCircuit":
        """This circuit scored as if positions did not rotate queries and keys (A = A_0, the scoring of
        attnrules before rotary support): for comparison only, it is wrong for a rotary head."""
        return dataclasses.replace(self, rotary=None, offsets=None)

    @property
    def max_offset(self) -> Optional[int]:
        """The largest offset a key can be from its query here (None: no limit)."""
        if self.rotary is not None:
            return int(self.offsets.max())
        return None if self.window is None else self.window - 1

    def attn(self, queries: torch.Tensor, keys: torch.Tensor, offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """attn-score of matching index rows (``queries``, ``keys`` broadcast), at ``offsets`` on a rotary
        head (required there; ignored otherwise)."""
        queries, keys = torch.broadcast_tensors(torch.as_tensor(queries), torch.as_tensor(keys))
        q, k = self.query_proj[queries.flatten()], self.key_proj[keys.flatten()]
        if self.rotary is None:
            return (q * k).sum(-1).reshape(queries.shape)
        if offsets is None:
            raise ValueError("offsets are required on a rotary head: the attn-score of a pair depends on them")
        offsets = torch.broadcast_to(torch.as_tensor(offsets), queries.shape).flatten()
        return self.rotary.scores(q, k, offsets).to(self.query_proj.dtype).reshape(queries.shape)

    def attn_profile(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``[n, max_offset + 1]`` attn-score of each (query, key) row pair at every offset 0 … max_offset,
        NaN at offsets that are not candidates (rotary heads only)."""
        if self.rotary is None:
            raise ValueError("attn_profile applies to rotary circuits only")
        profile = torch.full((len(queries), self.max_offset + 1), float("nan"), dtype=torch.float64)
        profile[:, self.offsets] = self.rotary.offset_scores(self.query_proj[queries], self.key_proj[keys], self.offsets)
        return profile

    def best_attn(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(attn-score, offset) of each row pair at its best offset (largest A, lowest offset among equals);
        offset None on heads with absolute positions."""
        if self.rotary is None:
            return self.attn(queries, keys), None
        profile = self.attn_profile(queries, keys)
        best = profile.nan_to_num(nan=float("-inf")).max(dim=-1)
        return best.values.to(self.query_proj.dtype), best.indices

    def check_feature(self, feature: int) -> int:
        """``feature`` as an int, or a ValueError naming the valid range."""
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < self.n_outputs:
            raise ValueError(f"feature must be an output-feature index in [0, {self.n_outputs}), got {feature!r}")
        return feature

    def feature_name(self, feature: int) -> str:
        """Output features are named ``L{layer}H{head}.{index}``."""
        return f"L{self.layer}H{self.head}.{self.check_feature(feature)}"

    def encoder_vector(self, feature: int) -> torch.Tensor:
        """u: output feature ``feature``'s encoder column ``[d_head]``."""
        return self.out_encoder[:, self.check_feature(feature)]

    @classmethod
    def from_tensors(
        cls,
        decoder: torch.Tensor,
        W_Q: torch.Tensor,
        W_K: torch.Tensor,
        W_V: torch.Tensor,
        out_encoder: torch.Tensor,
        out_bias: Optional[torch.Tensor] = None,
        *,
        layer: int = 0,
        head: int = 0,
        rotary: Optional[Rotary] = None,
        offsets: Optional[Sequence[int] | torch.Tensor] = None,
        window: Optional[int] = None,
    ) -> "HeadCircuit":
        """From input-SAE decoder rows ``[n_in, d_model]`` and one head's ``W_Q/W_K/W_V [d_model, d_head]``."""
        if decoder.dim() != 2:
            raise ValueError(f"decoder must be [n_in, d_model], got shape {tuple(decoder.shape)}")
        for name, w in (("W_Q", W_Q), ("W_K", W_K), ("W_V", W_V)):
            if w.dim() != 2 or w.shape[0] != decoder.shape[1]:
                raise ValueError(
                    f"{name} must be [d_model={decoder.shape[1]}, d_head] (row-vector convention), "
                    f"got shape {tuple(w.shape)}"
                )
        _check_finite("decoder", decoder)
        if out_bias is None:
            out_bias = torch.zeros(out_encoder.shape[-1], dtype=out_encoder.dtype, device=out_encoder.device)
        if rotary is not None and offsets is None:
            offsets = range(rotary.max_offset + 1 if window is None else min(window, rotary.max_offset + 1))
        if offsets is not None:
            offsets = torch.as_tensor(offsets, dtype=torch.long)
        return cls(decoder @ W_Q, decoder @ W_K, decoder @ W_V, out_encoder, out_bias, layer, head, rotary, offsets,
                   window)

    @classmethod
    def from_model(
        cls, model: HookedTransformer, input_sae: InputSAE, output_sae: OutputSAE, *, layer: Optional[int] = None,
        head: Optional[int] = None, offsets: Optional[Sequence[int] | torch.Tensor] = None,
    ) -> "HeadCircuit":
        """From a processed HookedTransformer, an :class:`~attnrules.sources.InputSAE` and an
        :class:`~attnrules.sources.OutputSAE` — or sae_lens SAEs of matching shapes — (layer and head
        default to the output SAE's). On a rotary model, ``offsets`` (default 0 … n_ctx − 1, below the
        layer's sliding window) are the offsets pairs are scored over."""
        input_sae, output_sae = sources.as_sources(model, input_sae, output_sae, layer=layer, head=head)
        layer = output_sae.layer if layer is None else layer
        head = output_sae.head if head is None else head
        sources.check_head(model, layer, head)
        sources.check_processed(model)
        if (output_sae.layer, output_sae.head) != (layer, head):
            raise ValueError(f"output_sae is for L{output_sae.layer}H{output_sae.head}, not L{layer}H{head}")
        sources.check_compatible(model, input_sae, output_sae)
        attn = model.blocks[layer].attn
        dtype = input_sae.W_dec.dtype
        W_Q, W_K = attn.W_Q[head].detach(), attn.W_K[head].detach()
        if model.cfg.use_qk_norm or getattr(attn, "q_norm", None) is not None:
            W_Q, W_K = W_Q * _norm_gain(attn.q_norm.w, head, model.cfg.d_head), W_K * _norm_gain(
                attn.k_norm.w, sources.kv_head(model, head), model.cfg.d_head)
        rotary = Rotary.from_model(model, layer) if model.cfg.positional_embedding_type == "rotary" else None
        with torch.no_grad():
            return cls.from_tensors(
                input_sae.W_dec.detach(),
                W_Q.to(dtype),
                W_K.to(dtype),
                attn.W_V[head].detach().to(dtype),
                output_sae.head_encoder.detach().to(dtype),
                output_sae.b_enc.detach().to(dtype),
                layer=layer,
                head=head,
                rotary=rotary,
                offsets=offsets,
                window=sources.attention_window(model, layer),
            )


def _norm_gain(w: torch.Tensor, head: int, d_head: int) -> torch.Tensor:
    """The QK-norm gain ``[d_head]`` of one head: per-head norms share one gain, full-width norms
    (OLMo 2) have one slice per head."""
    w = w.detach()
    return w if w.numel() == d_head else w.reshape(-1, d_head)[head]
