"""The counting detector: counterfactual inputs with n copies of a key before a query, the feature's
response, and its classification (:mod:`attnrules.rules.counting`).

Base sequences are sequences in which the feature is silent; the query token goes at the last
position and n copies of the key token before it (n = 0 … 8; when query and key are the same token
the query itself is one copy). :func:`check_counting` chooses the bases (corpus first, then filler
built from the corpus's frequent tokens; BOS never avoided) and says what it did.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, TYPE_CHECKING

import numpy as np
import torch

from attnrules.rules.counting import CountingRule, CountResponse, classify_counts, classify_difference
from attnrules.sources.runner import check_tokens, hook_names, run_batches
from attnrules.records import Record

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import OutputSAE


def counterfactuals(
    base: torch.Tensor, query_token: int, placements: Sequence[tuple[int, int]], *, seed: int = 0
) -> torch.Tensor:
    """``[len(placements) * N, T]``: each base sequence with the query token at the last position and
    (token, count) copies placed at random distinct positions 1..T−2 (seeded, the same for every count)."""
    n, t_len = base.shape
    total = sum(c for _, c in placements)
    if total > t_len - 2:
        raise ValueError(f"cannot place {total} copies in sequences of length {t_len}")
    rng = np.random.default_rng(seed)
    slots = torch.from_numpy(np.stack([rng.permutation(np.arange(1, t_len - 1))[:total] for _ in range(n)]))
    out = base.clone()
    out[:, -1] = query_token
    start = 0
    for token, count in placements:
        out[torch.arange(n)[:, None], slots[:, start:start + count]] = token
        start += count
    return out


def count_response(
    model: HookedTransformer,
    output_sae: OutputSAE,
    feature: int,
    base: torch.Tensor,
    query_token: int,
    key_token: int,
    *,
    counts: Sequence[int] = tuple(range(9)),
    other_token: Optional[int] = None,
    other_counts: Sequence[int] = (0,),
    batch_size: int = 64,
    seed: int = 0,
) -> CountResponse:
    """Mean activation and active share at the last position for every (count, other count).

    Counts are totals up to and including the query position, so when ``query_token == key_token``
    the query is one of the copies and counts start at 1.
    """
    base = check_tokens(base, model)
    _, z = hook_names(output_sae.layer)
    own = int(query_token == key_token)
    tried, means, shares = [], [], []
    for n1 in counts:
        for n2 in other_counts if other_token is not None else (0,):
            if n1 < own:
                continue
            placements = [(key_token, n1 - own)] + ([(other_token, n2)] if other_token is not None else [])
            inputs = counterfactuals(base, query_token, placements, seed=seed)
            acts = []
            for _, cache in run_batches(model, inputs, output_sae.layer, [z], batch_size=batch_size,
                                        desc="counting", progress=False):
                acts.append(output_sae.encode(cache[z].to(output_sae.W_enc.dtype))[:, -1, feature].cpu())
            a = torch.cat(acts)
            tried.append((n1, n2))
            means.append(float(a.mean()))
            shares.append(float((a > 0).float().mean()))
    return CountResponse(tuple(tried), tuple(means), tuple(shares), base.shape[0])


def detect_counting(
    model: HookedTransformer,
    output_sae: OutputSAE,
    feature: int,
    feature_name: str,
    base: torch.Tensor,
    query_token: int,
    key_token: int,
    *,
    other_token: Optional[int] = None,
    max_count: int = 8,
    growth: float = 2.0,
    seed: int = 0,
) -> Optional[CountingRule]:
    """A counting rule for (query token, key token[, competing other token]) or None."""
    if other_token is None:
        response = count_response(model, output_sae, feature, base, query_token, key_token,
                                  counts=range(max_count + 1), seed=seed)
        kind, c = classify_counts(response, growth=growth)
    else:
        half = max_count // 2
        response = count_response(model, output_sae, feature, base, query_token, key_token,
                                  counts=range(half + 1), other_token=other_token, other_counts=range(half + 1), seed=seed)
        c = classify_difference(response)
        kind = "difference" if c is not None and c >= 1 and any(n2 > 0 for _, n2 in response.counts) else None
    if kind is None:
        return None
    return CountingRule(feature_name, kind, query_token, key_token, other_token, c, response)


MIN_BASE = 16  # fewer base sequences than this cannot support a counting claim


@dataclass(frozen=True)
class CountingCheck(Record):
    """What the counting detector did for one feature: ``status`` is "rule", "no rule",
    "undetermined" (with the reason) or "not run"; ``n_base`` base sequences were used
    (``n_synthetic`` of them built from frequent tokens), at least ``min_base`` were required."""

    status: str
    reason: str = ""
    n_base: int = 0
    n_synthetic: int = 0
    min_base: int = MIN_BASE
    query_token: Optional[int] = None
    key_token: Optional[int] = None
    avoided: tuple[int, ...] = ()


def silent_base(tokens: torch.Tensor, act_max: torch.Tensor, avoid: Sequence[int], n: int = 64) -> torch.Tensor:
    """Up to ``n`` corpus sequences where the feature never fires and none of ``avoid`` occurs
    (possibly none: ``[0, T]``)."""
    ok = act_max == 0
    for token in avoid:
        ok &= ~(tokens == token).any(dim=1)
    return tokens[torch.nonzero(ok).flatten()[:n]]


def filler_base(
    model: HookedTransformer, output_sae: OutputSAE, feature: int, tokens: torch.Tensor, avoid: Sequence[int], n: int, *, bos: int,
    seed: int = 0, batch_size: int = 64,
) -> torch.Tensor:
    """Up to ``n`` built base sequences: BOS, then tokens drawn by their corpus frequency (BOS and
    ``avoid`` excluded), kept only where the feature stays silent at every position."""
    counts = torch.bincount(tokens[:, 1:].flatten(), minlength=model.cfg.d_vocab).double()
    counts[[bos, *avoid]] = 0
    if counts.sum() == 0:
        return tokens[:0]
    rng = np.random.default_rng(seed)
    p = (counts / counts.sum()).numpy()
    draws = rng.choice(len(p), size=(2 * n, tokens.shape[1] - 1), p=p)
    built = torch.cat([torch.full((2 * n, 1), bos), torch.from_numpy(draws)], dim=1).long()
    _, z = hook_names(output_sae.layer)
    silent = []
    for _, cache in run_batches(model, built, output_sae.layer, [z], batch_size=batch_size, desc="filler", progress=False):
        silent.append((output_sae.encode(cache[z].to(output_sae.W_enc.dtype))[..., feature] <= 0).all(dim=1).cpu())
    return built[torch.cat(silent)][:n]


def check_counting(
    model: HookedTransformer,
    output_sae: OutputSAE,
    feature: int,
    feature_name: str,
    tokens: torch.Tensor,
    act_max: torch.Tensor,
    query_token: Optional[int],
    key_token: Optional[int],
    *,
    avoid: Sequence[int] = (),
    bos: int,
    n_base: int = 64,
    min_base: int = MIN_BASE,
    max_count: int = 8,
    seed: int = 0,
) -> tuple[CountingCheck, Optional[CountingRule]]:
    """Run :func:`detect_counting` for one (query token, key token) term and say what was done.

    Base sequences: corpus sequences where the feature is silent and none of the query token, the
    key token and ``avoid`` (e.g. the term's distractors) occurs — BOS is never avoided; when fewer
    than ``n_base`` exist, filler sequences built from the corpus's frequent tokens make up the rest
    (:func:`filler_base`). With fewer than ``min_base`` the result is "undetermined".
    """
    if query_token is None or key_token is None:
        side = "query" if query_token is None else "key"
        return CountingCheck("undetermined", f"the term's {side} feature has no token to place", min_base=min_base), None
    if bos in (query_token, key_token):
        return CountingCheck("undetermined", "the term's query or key token is BOS, which every sequence holds",
                             min_base=min_base, query_token=query_token, key_token=key_token), None
    avoided = tuple(dict.fromkeys(t for t in (query_token, key_token, *avoid) if t is not None and t != bos))
    base = silent_base(tokens, act_max, avoided, n=n_base)
    n_corpus = base.shape[0]
    if n_corpus < n_base:
        base = torch.cat([base, filler_base(model, output_sae, feature, tokens, avoided, n_base - n_corpus, bos=bos,
                                            seed=seed)])
    check = CountingCheck("no rule", n_base=base.shape[0], n_synthetic=base.shape[0] - n_corpus, min_base=min_base,
                          query_token=query_token, key_token=key_token, avoided=avoided)
    if base.shape[0] < min_base:
        reason = (f"only {base.shape[0]} base sequences where the feature is silent and none of the tokens "
                  f"{list(avoided)} occurs (corpus and filler); at least {min_base} are needed")
        return dataclasses.replace(check, status="undetermined", reason=reason), None
    rule = detect_counting(model, output_sae, feature, feature_name, base, query_token, key_token,
                           max_count=min(max_count, tokens.shape[1] - 3), seed=seed)
    return (dataclasses.replace(check, status="rule") if rule is not None else check), rule
