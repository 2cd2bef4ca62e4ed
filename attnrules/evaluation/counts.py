"""The counting detector: counterfactual inputs with n copies of a key before a query, the feature's
response, and its classification (:mod:`attnrules.rules.counting`).

Base sequences are sequences in which the feature is silent; the query token goes at the last
position and n copies of the key token before it (n = 0 … 8; when query and key are the same token
the query itself is one copy). :func:`check_counting` chooses the bases (corpus first, then filler
built from the corpus's frequent tokens; BOS never avoided) and says what it did.

The full sweep costs (counting_max + 1) × 64 counterfactual sequences per feature, so
:func:`check_counting` first runs a cheap screen (:func:`screen_counts`): the first
``SCREEN_BASES`` base sequences (the very counterfactuals the sweep would build for them) with the
lowest count, 1, 2 and ``max_count`` copies of the key. The sweep runs only when the response could
hold a counting rule — some base is silent at n ≥ 1 copies and active at more, or the mean activation
at ``max_count`` copies exceeds (1 + tolerance) × the mean at fewer copies where the feature was
active — or when the screen is inconclusive (non-finite activations); otherwise the check is
"screened out" with the screen's numbers as the reason. A threshold rule (share ≤ 0.1 below c ≥ 2,
≥ 0.9 from c on, over ≥ 16 bases of which the screen's are a subset) leaves at most 10 % of the
bases active at one copy and silent at ``max_count``, so the screen sees it unless its few bases
are all exceptions; a monotone rule needs the mean to double, and the screen's default tolerance
(60 %) leaves it a margin.
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


def last_acts(
    model: HookedTransformer, output_sae: OutputSAE, feature: int, inputs: torch.Tensor, *, batch_size: int = 64,
) -> torch.Tensor:
    """``[N]``: the feature's activation at the last position of each input sequence."""
    _, z = hook_names(output_sae.layer)
    acts = []
    for _, cache in run_batches(model, inputs, output_sae.layer, [z], batch_size=batch_size,
                                desc="counting", progress=False):
        acts.append(output_sae.encode(cache[z].to(output_sae.W_enc.dtype))[:, -1, feature].cpu())
    return torch.cat(acts)


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
    own = int(query_token == key_token)
    tried, means, shares = [], [], []
    for n1 in counts:
        for n2 in other_counts if other_token is not None else (0,):
            if n1 < own:
                continue
            placements = [(key_token, n1 - own)] + ([(other_token, n2)] if other_token is not None else [])
            inputs = counterfactuals(base, query_token, placements, seed=seed)
            a = last_acts(model, output_sae, feature, inputs, batch_size=batch_size)
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
    "undetermined" (with the reason), "screened out" (the cheap screen saw no count dependence: the
    reason gives its numbers, ``screen`` its response; no full sweep ran) or "not run"; ``n_base``
    base sequences were used (``n_synthetic`` of them built from frequent tokens), at least
    ``min_base`` were required; ``n_sequences`` counterfactual sequences were run, screen included."""

    status: str
    reason: str = ""
    n_base: int = 0
    n_synthetic: int = 0
    min_base: int = MIN_BASE
    query_token: Optional[int] = None
    key_token: Optional[int] = None
    avoided: tuple[int, ...] = ()
    n_sequences: int = 0
    screen: Optional[CountResponse] = None


SCREEN_BASES = 8  # base sequences the screen runs
SCREEN_TOLERANCE = 0.6  # growth of the mean activation the screen ignores: a monotone rule needs 1.0 (the
# detector's 2×); the planted models' plain skip-grams grow by 38–53 % from 1 to 8 copies


def screen_counts(
    model: HookedTransformer,
    output_sae: OutputSAE,
    feature: int,
    base: torch.Tensor,
    query_token: int,
    key_token: int,
    *,
    max_count: int = 8,
    n_base: int = SCREEN_BASES,
    tolerance: float = SCREEN_TOLERANCE,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[bool, str, CountResponse]:
    """(whether the full sweep must run, why, the screen's response) from the first ``n_base`` bases
    at the lowest count, 1, 2 and ``max_count`` copies of the key — the same counterfactuals the
    sweep builds for those bases (same seed, same slots).

    The sweep must run when some base is silent at n ≥ 1 copies and active at more (a threshold's
    sign), when the mean at ``max_count`` exceeds (1 + ``tolerance``) × the mean at a smaller tried
    count where some base was active (a monotone rule's sign), or when an activation is not finite.
    """
    base = check_tokens(base, model)[:n_base]
    own = int(query_token == key_token)
    counts = sorted({n for n in (own, 1, 2, max_count) if own <= n <= max_count})
    acts = torch.stack([last_acts(model, output_sae, feature,
                                  counterfactuals(base, query_token, [(key_token, n - own)], seed=seed),
                                  batch_size=batch_size).double() for n in counts])  # [counts, N]
    means = acts.mean(dim=1)
    shares = (acts > 0).double().mean(dim=1)
    response = CountResponse(tuple((n, 0) for n in counts), tuple(means.tolist()), tuple(shares.tolist()),
                             base.shape[0])
    if not bool(torch.isfinite(acts).all()):
        return True, "inconclusive: an activation is not finite", response
    for i, n in enumerate(counts):
        for j in range(i + 1, len(counts)):
            switched = (acts[i] <= 0) & (acts[j] > 0)
            if n >= 1 and bool(switched.any()):
                b = int(torch.nonzero(switched)[0])
                return True, f"base {b} is silent at {n} copies and active at {counts[j]}", response
    top = float(means[-1])
    for i, n in enumerate(counts[:-1]):
        if shares[i] > 0 and top > (1 + tolerance) * float(means[i]):
            return True, f"the mean activation grows from {float(means[i]):.4g} at {n} copies to {top:.4g} at " \
                         f"{counts[-1]}", response
    shown = ", ".join(f"{n}: {float(m):.4g} (active {float(a):.0%})" for n, m, a in zip(counts, means, shares))
    return False, (f"screened on {base.shape[0]} base sequences at {counts} copies of the key — {shown}: no base "
                   f"switches on with more copies and the mean at {counts[-1]} copies grows by at most "
                   f"{tolerance:.0%} over fewer copies"), response


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
    screen: bool = True,
    screen_bases: int = SCREEN_BASES,
    screen_tolerance: float = SCREEN_TOLERANCE,
) -> tuple[CountingCheck, Optional[CountingRule]]:
    """Run :func:`detect_counting` for one (query token, key token) term and say what was done.

    Base sequences: corpus sequences where the feature is silent and none of the query token, the
    key token and ``avoid`` (e.g. the term's distractors) occurs — BOS is never avoided; when fewer
    than ``n_base`` exist, filler sequences built from the corpus's frequent tokens make up the rest
    (:func:`filler_base`). With fewer than ``min_base`` the result is "undetermined". With ``screen``
    the cheap :func:`screen_counts` runs first and, when it sees no count dependence, the result is
    "screened out" without the full sweep (skipped when it would not be cheaper than the sweep).
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
    max_count = min(max_count, tokens.shape[1] - 3)
    own = int(query_token == key_token)
    full = (max_count + 1 - own) * base.shape[0]  # the sweep's counterfactual sequences
    screened = len({n for n in (own, 1, 2, max_count) if own <= n <= max_count}) * min(screen_bases, base.shape[0])
    n_sequences = 0
    if screen and screened < full:
        run_full, why, response = screen_counts(model, output_sae, feature, base, query_token, key_token,
                                                max_count=max_count, n_base=screen_bases,
                                                tolerance=screen_tolerance, seed=seed)
        n_sequences = len(response.counts) * response.n_base
        check = dataclasses.replace(check, screen=response, reason=f"the screen let the full sweep run: {why}")
        if not run_full:
            return dataclasses.replace(check, status="screened out", reason=why, n_sequences=n_sequences), None
    rule = detect_counting(model, output_sae, feature, feature_name, base, query_token, key_token,
                           max_count=max_count, seed=seed)
    check = dataclasses.replace(check, n_sequences=n_sequences + full)
    return (dataclasses.replace(check, status="rule") if rule is not None else check), rule
