"""One attention head seen through SAEs: the projections every score is built from.

For input-SAE decoder rows D ``[n_in, d_model]`` and the head's processed weights (transformer_lens
row-vector convention, ``q = x @ W_Q``):

- ``query_proj = D @ W_Q``, ``key_proj = D @ W_K``, ``value_proj = D @ W_V`` — ``[n_in, d_head]``
- ``out_encoder`` — the output SAE's encoder restricted to this head, ``[d_head, n_out]``; column g
  is output feature g's encoder vector u (REF uses the encoder, not the decoder row).

attn-score(q, k) = query_proj[q] · key_proj[k] and value-score(k) = value_proj[k] · u, with no
biases, no LayerNorm scale and no 1/sqrt(d_head): the paper's ("paper" mode) definitions.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, TYPE_CHECKING

import torch

import attnrules.sources as sources

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
        return dataclasses.replace(self, **{f: getattr(self, f).to(device) for f in fields})

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
        return cls(decoder @ W_Q, decoder @ W_K, decoder @ W_V, out_encoder, out_bias, layer, head)

    @classmethod
    def from_model(
        cls, model: HookedTransformer, input_sae: InputSAE, output_sae: OutputSAE, *, layer: Optional[int] = None,
        head: Optional[int] = None,
    ) -> "HeadCircuit":
        """From a processed HookedTransformer, an :class:`~attnrules.sources.InputSAE` and an
        :class:`~attnrules.sources.OutputSAE` — or sae_lens SAEs of matching shapes — (layer and head
        default to the output SAE's).

        Rotary models are refused: there the attention score of a feature pair depends on the
        query-key offset (A_δ = d_q W_Q R_δ (d_k W_K)ᵀ), so paper mode's offset-free score would be
        wrong, not just approximate; offset-aware scoring is not built yet."""
        if getattr(model.cfg, "positional_embedding_type", "standard") == "rotary":
            raise ValueError(
                "model uses rotary positions (cfg.positional_embedding_type='rotary'): a feature pair's attention "
                "score depends on the query-key offset there, and attnrules scores pairs without offsets, which "
                "would be wrong for this model; rotary heads are not supported yet"
            )
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
        with torch.no_grad():
            return cls.from_tensors(
                input_sae.W_dec.detach(),
                attn.W_Q[head].detach().to(dtype),
                attn.W_K[head].detach().to(dtype),
                attn.W_V[head].detach().to(dtype),
                output_sae.head_encoder.detach().to(dtype),
                output_sae.b_enc.detach().to(dtype),
                layer=layer,
                head=head,
            )
