"""Rotary positions seen from one head: the attention score of a feature pair at each offset.

A rotary head rotates its query at position t by t·θ_i and its key at position s by s·θ_i in each
frequency pair i (transformer_lens ``apply_rotary``), so their product depends on the offset δ = t − s
only. With the pair's coordinates (a, b) of a query q and a key k,

    A_δ(q, k) = Σ_i cos_δi (q_a k_a + q_b k_b) + sin_δi (q_a k_b − q_b k_a)  +  q_rest · k_rest

(``rest``: the dimensions beyond ``rotary_dim``, which are not rotated). That is the query rotated to
position δ dotted with the key at position 0, which is how the tables are built: from the model's own
``calculate_sin_cos_rotary`` (its base, the layer's local base, its pairing, NTK-by-parts or YaRN
scaling), in float64, so A_δ equals what the forward pass computes for any t − s = δ.

:meth:`Rotary.canonical` reorders a head's dimensions as [first coordinates | second coordinates |
rest]: the layout ``engine.offset_topk`` takes with the ``cos``/``sin`` tables of :meth:`tables`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True, eq=False)
class Rotary:
    """One head's rotation: frequency pairs (``first[i]``, ``second[i]``), the unrotated ``rest``, and
    cos/sin of every offset 0 … ``max_offset`` ``[max_offset + 1, n_pairs]`` (float64)."""

    first: Tensor  # [n_pairs] long
    second: Tensor  # [n_pairs] long
    rest: Tensor  # [d_head - 2 n_pairs] long
    cos: Tensor  # [max_offset + 1, n_pairs]
    sin: Tensor

    def __post_init__(self) -> None:
        p = self.first.numel()
        if self.second.numel() != p or tuple(self.cos.shape) != tuple(self.sin.shape) or self.cos.shape[1] != p:
            raise ValueError(
                f"Rotary needs first/second of one length p and cos/sin of shape [n_offsets, p]; got p={p}, "
                f"second {tuple(self.second.shape)}, cos {tuple(self.cos.shape)}, sin {tuple(self.sin.shape)}"
            )
        dims = torch.cat([self.first, self.second, self.rest]).sort().values
        if not torch.equal(dims, torch.arange(dims.numel(), device=dims.device)):
            raise ValueError("first, second and rest must together name every head dimension once")

    @property
    def d_head(self) -> int:
        return self.first.numel() * 2 + self.rest.numel()

    @property
    def n_pairs(self) -> int:
        return self.first.numel()

    @property
    def max_offset(self) -> int:
        return self.cos.shape[0] - 1

    def canonical(self, x: Tensor) -> Tensor:
        """``x [..., d_head]`` reordered as [first coordinates | second coordinates | rest]."""
        if x.shape[-1] != self.d_head:
            raise ValueError(f"expected last dimension d_head={self.d_head}, got shape {tuple(x.shape)}")
        order = torch.cat([self.first, self.second, self.rest]).to(x.device)
        return x[..., order]

    def check_offsets(self, offsets: Tensor | Sequence[int]) -> Tensor:
        """``offsets`` as a 1-D long tensor of distinct offsets in [0, max_offset], or a ValueError."""
        offsets = torch.as_tensor(offsets, dtype=torch.long).flatten()
        if offsets.numel() == 0:
            raise ValueError("offsets must name at least one query-key offset")
        if int(offsets.min()) < 0 or int(offsets.max()) > self.max_offset:
            raise ValueError(
                f"offsets must lie in [0, {self.max_offset}] (the offsets this head's tables cover), "
                f"got {int(offsets.min())}..{int(offsets.max())}"
            )
        if offsets.unique().numel() != offsets.numel():
            raise ValueError("offsets must be distinct")
        return offsets

    def tables(self, offsets: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """(cos, sin) ``[len(offsets), n_pairs]`` float64 of the listed offsets."""
        offsets = self.check_offsets(offsets).to(self.cos.device)
        return self.cos[offsets], self.sin[offsets]

    def _pair_terms(self, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(C ``[n, p]``, S ``[n, p]``, rest ``[n]``) of matching rows, float64."""
        q, k = queries.double(), keys.double()
        qa, qb, ka, kb = q[:, self.first], q[:, self.second], k[:, self.first], k[:, self.second]
        return qa * ka + qb * kb, qa * kb - qb * ka, (q[:, self.rest] * k[:, self.rest]).sum(-1)

    def scores(self, queries: Tensor, keys: Tensor, offsets: Tensor) -> Tensor:
        """A_δ of matching rows, float64: queries, keys ``[n, d_head]``, offsets ``[n]`` → ``[n]``."""
        offsets = torch.as_tensor(offsets, dtype=torch.long, device=self.cos.device)
        if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) > self.max_offset):
            raise ValueError(f"offsets must lie in [0, {self.max_offset}], got {int(offsets.min())}..{int(offsets.max())}")
        c, s, rest = self._pair_terms(queries, keys)
        return (c * self.cos[offsets]).sum(-1) + (s * self.sin[offsets]).sum(-1) + rest

    def offset_scores(self, queries: Tensor, keys: Tensor, offsets: Tensor | Sequence[int]) -> Tensor:
        """A_δ of matching rows at every listed offset, float64: ``[n, len(offsets)]``."""
        cos, sin = self.tables(offsets)
        c, s, rest = self._pair_terms(queries, keys)
        return c @ cos.T + s @ sin.T + rest[:, None]

    def rotate(self, x: Tensor, offsets: Tensor) -> Tensor:
        """``x [n, d_head]`` rotated to ``offsets [n]``: rotate(q, δ) · k = A_δ(q, k) for any key k."""
        c, s = self.cos[offsets].to(x.dtype), self.sin[offsets].to(x.dtype)
        out = x.clone()
        a, b = x[:, self.first], x[:, self.second]
        out[:, self.first] = a * c - b * s
        out[:, self.second] = b * c + a * s
        return out

    @classmethod
    def from_model(cls, model: HookedTransformer, layer: int, max_offset: int | None = None) -> "Rotary":
        """The rotation of layer ``layer``'s heads in ``model`` (None unless the model is rotary), with
        tables for offsets 0 … ``max_offset`` (default: the model's context length − 1)."""
        cfg = model.cfg
        if cfg.positional_embedding_type != "rotary":
            raise ValueError(f"model is not rotary (positional_embedding_type={cfg.positional_embedding_type!r})")
        attn = model.blocks[layer].attn
        r = int(cfg.rotary_dim)
        n = (cfg.n_ctx if max_offset is None else max_offset + 1)
        sin, cos = attn.calculate_sin_cos_rotary(r, n, base=attn._rotary_base(), dtype=torch.float64)
        p = r // 2
        if cfg.rotary_adjacent_pairs:
            first, second = torch.arange(0, r, 2), torch.arange(1, r, 2)
        else:
            first, second = torch.arange(p), torch.arange(p, r)
        # A_δ is the query rotated to δ times the key at position 0 (whose rotation is cos[0]: 1, or YaRN's factor).
        key_scale = cos[0, first]
        return cls(first, second, torch.arange(r, cfg.d_head), cos[:, first] * key_scale, sin[:, first] * key_scale)
