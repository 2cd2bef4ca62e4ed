"""What kind of head it is, from its attention over the corpus: previous-token score, induction score
and attention entropy, measured on the corpus pass the pipeline already makes.

For each sequence and each query position t ≥ 1 (position 0, BOS, attends only to itself):

- **previous-token score**: the attention on position t − 1;
- **induction score**: over the query positions whose token occurred earlier at some s < t − 1, the
  attention on the positions s + 1 that followed those earlier occurrences (summed over them); a
  head that copies what came after the last time this token appeared scores 1 (on repeated random
  tokens as on natural text). Positions with no earlier occurrence do not count;
- **attention entropy**: −Σ p log p over the keys 0 … t, in nats, and normalised by log(t + 1) (1:
  uniform over the visible keys, 0: all on one key).

Each score is the mean over the positions that count, over the whole corpus (None when none count).
:func:`pattern_scores` computes them from attention patterns ``[batch, head, query, key]``;
:class:`HeadMetricsObserver` accumulates them over a corpus pass that stores ``hook_pattern``
(:func:`attnrules.exemplars.scan_heads`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from attnrules.records import Record

METRICS = ("prev_token", "induction", "entropy", "entropy_norm")


@dataclass(frozen=True)
class HeadMetrics(Record):
    """One head's attention metrics over a corpus (module docstring); ``n_positions``: query positions
    averaged over (t ≥ 1), ``n_induction``: those with an earlier occurrence of their token."""

    layer: int
    head: int
    prev_token: Optional[float]
    induction: Optional[float]
    entropy: Optional[float]
    entropy_norm: Optional[float]
    n_positions: int
    n_induction: int


def pattern_sums(pattern: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per head, the sums and counts behind the scores of one batch: ``pattern [B, H, T, T]`` (rows sum to
    1 over keys ≤ query), ``tokens [B, T]``. Values ``[H]`` (float64), keys as :data:`METRICS` plus
    ``n_positions`` and ``n_induction``."""
    if pattern.dim() != 4 or pattern.shape[-1] != pattern.shape[-2]:
        raise ValueError(f"pattern must be [batch, head, query, key] with query = key length, got {tuple(pattern.shape)}")
    b, h, t, _ = pattern.shape
    if tokens.shape != (b, t):
        raise ValueError(f"tokens must be [batch={b}, seq_len={t}], got {tuple(tokens.shape)}")
    # per query position in the pattern's precision (float32 at least), summed over positions in float64
    p = pattern if pattern.dtype in (torch.float32, torch.float64) else pattern.float()
    tokens = tokens.to(p.device)
    prev = p.diagonal(offset=-1, dim1=-2, dim2=-1).double()  # [B, H, T-1]: query t attends to t-1, t = 1 … T-1
    # induction: key j (= s + 1) counts for query t when tokens[s] == tokens[t] and s + 1 < t
    same = tokens[:, :, None] == tokens[:, None, :]  # [B, t, s]
    target = torch.zeros(b, t, t, dtype=torch.bool, device=p.device)
    target[:, :, 1:] = same[:, :, :-1]
    target &= torch.ones(t, t, dtype=torch.bool, device=p.device).tril(-1)  # j < t
    has = target.any(dim=-1)  # [B, T]
    induction = torch.einsum("bhqk,bqk->bhq", p, target.to(p.dtype)).double()  # [B, H, T]
    ent = -torch.special.xlogy(p, p).sum(dim=-1)[:, :, 1:].double()  # [B, H, T-1], 0·log 0 = 0
    norm = torch.log(torch.arange(2, t + 1, dtype=torch.float64, device=p.device))  # log(t + 1), t = 1 … T-1
    return {"prev_token": prev.sum(dim=(0, 2)), "induction": (induction * has[:, None]).sum(dim=(0, 2)),
            "entropy": ent.sum(dim=(0, 2)), "entropy_norm": (ent / norm).sum(dim=(0, 2)),
            "n_positions": torch.full((h,), b * (t - 1), dtype=torch.float64),
            "n_induction": torch.full((h,), float(has.sum()), dtype=torch.float64)}


def _scores(sums: dict[str, torch.Tensor], layer: int, heads: list[int]) -> list[HeadMetrics]:
    out = []
    for i, head in enumerate(heads):
        n, n_ind = int(sums["n_positions"][i]), int(sums["n_induction"][i])
        mean = {m: (float(sums[m][i]) / (n_ind if m == "induction" else n)) if (n_ind if m == "induction" else n) else None
                for m in METRICS}
        out.append(HeadMetrics(layer, head, **mean, n_positions=n, n_induction=n_ind))
    return out


def pattern_scores(pattern: torch.Tensor, tokens: torch.Tensor, layer: int = 0) -> list[HeadMetrics]:
    """The metrics of every head from ``pattern [B, H, T, T]`` and ``tokens [B, T]`` (module docstring)."""
    return _scores({k: v.cpu() for k, v in pattern_sums(pattern, tokens).items()}, layer, list(range(pattern.shape[1])))


class HeadMetricsObserver:
    """Accumulates every head's metrics of one layer over a corpus pass (reads ``hook_pattern``; the
    batch's tokens are looked up in ``tokens`` by the rows the pass gives)."""

    def __init__(self, layer: int, tokens: torch.Tensor) -> None:
        self.layer, self.tokens = layer, tokens
        self.hooks = [f"blocks.{layer}.attn.hook_pattern"]
        self.sums: Optional[dict[str, torch.Tensor]] = None

    def observe(self, rows: slice, cache: dict) -> None:
        sums = {k: v.cpu() for k, v in pattern_sums(cache[self.hooks[0]], self.tokens[rows]).items()}
        self.sums = sums if self.sums is None else {k: self.sums[k] + v for k, v in sums.items()}

    def result(self) -> dict[int, HeadMetrics]:
        """Head index → its metrics (empty before any batch)."""
        if self.sums is None:
            return {}
        heads = list(range(self.sums["prev_token"].shape[0]))
        return {m.head: m for m in _scores(self.sums, self.layer, heads)}
