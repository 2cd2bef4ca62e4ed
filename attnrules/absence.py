"""Absence rules: distractor keys that draw a query's attention and suppress the feature.

A skip-gram term (q, k) of a feature has a distractor k' when A(q, k') > A(q, k) and V(k') < 0:
where both occur, q attends to k' instead of k and k' writes against the feature. Here:

- :func:`absence_rules` — every distractor of every term of a rule set, ranked by how strongly it
  pulls q's attention (a per-query top-k over all keys through the engine), rendered as
  ``[http] … [com] → L0H0.1 unless [twitter]``;
- :func:`paper_distractor` — REF's single check per feature (reference §6.1) and
  :func:`distractor_share` — the share of a head's features with a distractor key (paper Fig. 9);
- :func:`natural_prevalence` — over a corpus, how often the skip-gram comes with its distractor and
  the mean activation with and without it (§6.2, Figs. 6a–b);
- :func:`insertion_token` / :func:`counterfactual_insertion` — insert the distractor's token n times
  after BOS and measure the activation at the query (§6.3, Fig. 6c), at any layer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from attnrules import engine
from attnrules.circuit import HeadCircuit
from attnrules.exemplars import check_tokens, hook_names, run_batches
from attnrules.rules import SkipgramRuleSet
from attnrules.scoring import value_scores


@dataclass(frozen=True)
class AbsenceRule:
    """A skip-gram term and the distractor keys that suppress it, strongest pull first."""

    feature_name: str
    query: int
    key: int
    attn_score: float
    value_score: float
    distractors: tuple[int, ...]
    distractor_attn: tuple[float, ...]
    distractor_value: tuple[float, ...]

    def render(self, describe: Callable[[int], str], limit: int = 3) -> str:
        names = " or ".join(f"[{describe(d)}]" for d in self.distractors[:limit])
        more = f" (+{len(self.distractors) - limit} more)" if len(self.distractors) > limit else ""
        return f"[{describe(self.key)}] … [{describe(self.query)}] → {self.feature_name} unless {names}{more}"

    def to_dict(self, describe: Optional[Callable[[int], str]] = None) -> dict:
        data = asdict(self)
        if describe is not None:
            data["text"] = self.render(describe)
        return data


def absence_rules(
    circuit: HeadCircuit,
    feature: int,
    rules: SkipgramRuleSet,
    *,
    max_distractors: Optional[int] = None,
    backend: str = "auto",
) -> list[AbsenceRule]:
    """Distractors of every term of ``rules`` (terms without one are left out).

    All distractors of a term lie among the keys that q attends to more than k, so one per-query
    top-k over all keys (k = the largest such count, capped by ``max_distractors``) finds them.
    """
    v = value_scores(circuit, feature)
    queries = torch.unique(rules.queries)
    a_terms = (circuit.query_proj[rules.queries] * circuit.key_proj[rules.keys]).sum(-1)
    # how many keys outrank each term's key in its query's attention
    outranking = torch.stack(
        [((circuit.key_proj @ circuit.query_proj[q]) > a).sum() for q, a in zip(rules.queries, a_terms)]
    ) if len(rules) else torch.zeros(0, dtype=torch.long)
    depth = int(outranking.max()) if len(rules) else 0
    if max_distractors is not None:
        depth = min(depth, max_distractors)
    if depth == 0:
        return []
    best = engine.pair_topk(circuit.query_proj[queries], circuit.key_proj, depth, by="query", backend=backend)
    row_of = {int(q): i for i, q in enumerate(queries)}
    out = []
    for q, k, a in zip(rules.queries.tolist(), rules.keys.tolist(), a_terms.tolist()):
        row = row_of[q]
        keys, attn = best.key_idx[row], best.scores[row]
        keep = (attn > a) & (v[keys] < 0)
        if keep.any():
            d = keys[keep]
            out.append(AbsenceRule(rules.feature_name, q, k, a, float(v[k]), tuple(d.tolist()),
                                   tuple(attn[keep].tolist()), tuple(v[d].tolist())))
    return out


@dataclass(frozen=True)
class PaperDistractor:
    """REF's distractor check for one feature (reference §6.1); ``k_`` is None without a negative key."""

    feature: int
    k: int
    q: int
    attn_score: float
    value_score: float
    k_rank: int
    k_: Optional[int]
    attn_score_: Optional[float]
    value_score_: Optional[float]
    k_rank_: Optional[int]

    @property
    def has_distractor(self) -> bool:
        """REF: A(q, k') > A(q, k) and V(k') < 0, i.e. k' ranks above k in q's attention."""
        return self.k_rank_ is not None and self.k_rank > self.k_rank_

    def to_dict(self) -> dict:
        return {**asdict(self), "has_distractor": self.has_distractor}


def paper_distractor(circuit: HeadCircuit, feature: int) -> PaperDistractor:
    """k = the top value key, q = its best query, and the first key by q's attention with V < 0."""
    v = value_scores(circuit, feature)
    k = int(torch.argmax(v))
    a_q = circuit.query_proj @ circuit.key_proj[k]
    q = int(torch.argmax(a_q))
    kq = circuit.key_proj @ circuit.query_proj[q]
    order = torch.sort(kq, descending=True, stable=True).indices
    k_rank = int(torch.nonzero(order == k)[0])
    negative = torch.nonzero(v[order] < 0).flatten()
    if negative.numel() == 0:
        return PaperDistractor(feature, k, q, float(a_q[q]), float(v[k]), k_rank, None, None, None, None)
    k_rank_ = int(negative[0])
    k_ = int(order[k_rank_])
    return PaperDistractor(feature, k, q, float(a_q[q]), float(v[k]), k_rank, k_, float(kq[k_]), float(v[k_]), k_rank_)


def distractor_share(circuit: HeadCircuit, features: Sequence[int]) -> float:
    """Share of ``features`` whose paper-mode check finds a distractor key (paper Fig. 9, per head)."""
    if len(features) == 0:
        raise ValueError("features is empty")
    return sum(paper_distractor(circuit, f).has_distractor for f in features) / len(features)


@dataclass(frozen=True)
class Prevalence:
    """Natural co-occurrence of a skip-gram (k … q) with its distractor k' over a corpus."""

    feature: int
    key: int
    distractor: int
    query: int
    kq_count: int  # sequences with k … q and no k' before q
    kkq_count: int  # sequences with k … q and k' before q
    mean_act_without: float  # mean output activation at q (NaN when no such sequence)
    mean_act_with: float
    examples: tuple  # dicts: idx, kind, k1_pos, k2_pos, q_pos, act_out (first max_examples of each kind)

    @property
    def share_with_distractor(self) -> float:
        total = self.kq_count + self.kkq_count
        return self.kkq_count / total if total else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "share_with_distractor": self.share_with_distractor}


def _first_kkq(k1: np.ndarray, k2: np.ndarray, q: np.ndarray) -> Optional[dict]:
    """REF's state machine over one sequence's positions (first occurrences; k' after q ignored)."""
    state, found = "", {}
    for i in range(len(q)):
        if state in ("", "k2") and k1[i]:
            state += "k1"
            found["k1_pos"] = i
        elif state in ("", "k1") and k2[i]:
            state += "k2"
            found["k2_pos"] = i
        if state in ("k1", "k1k2", "k2k1") and q[i]:
            found["q_pos"] = i
            found["kind"] = "has_distractor" if "k2" in state else "no_distractor"
            return found
    return None


def natural_prevalence(
    model,
    input_sae,
    output_sae,
    tokens: torch.Tensor,
    checks: Sequence[tuple[int, int, int, int]],
    *,
    batch_size: int = 64,
    max_examples: int = 100,
    progress: bool = False,
) -> list[Prevalence]:
    """For each (feature, key, distractor, query) in ``checks``, one shared pass over the corpus."""
    resid, z = hook_names(input_sae.layer)
    cols = torch.tensor([c for _, k, d, q in checks for c in (k, d, q)], dtype=torch.long)
    feats = torch.tensor([f for f, _, _, _ in checks], dtype=torch.long)
    found: list[list[dict]] = [[] for _ in checks]
    for rows, acts in run_batches(model, tokens, input_sae.layer, [resid, z], batch_size=batch_size,
                                  desc="prevalence", progress=progress):
        f_in = input_sae.encode(acts[resid].to(input_sae.W_dec.dtype))[:, :, cols].cpu().numpy() > 0
        out = output_sae.encode(acts[z].to(output_sae.W_enc.dtype))[:, :, feats].cpu().numpy()
        for b in range(f_in.shape[0]):
            for c in range(len(checks)):
                hit = _first_kkq(f_in[b, :, 3 * c], f_in[b, :, 3 * c + 1], f_in[b, :, 3 * c + 2])
                if hit is not None:
                    found[c].append({"idx": rows.start + b, **hit, "act_out": float(out[b, hit["q_pos"], c])})
    results = []
    for (g, k, d, q), hits in zip(checks, found):
        acts_by = {kind: [h["act_out"] for h in hits if h["kind"] == kind] for kind in ("no_distractor", "has_distractor")}
        mean = {kind: float(np.mean(a)) if a else float("nan") for kind, a in acts_by.items()}
        examples = [h for kind in acts_by for h in [x for x in hits if x["kind"] == kind][:max_examples]]
        results.append(Prevalence(g, k, d, q, len(acts_by["no_distractor"]), len(acts_by["has_distractor"]),
                                  mean["no_distractor"], mean["has_distractor"], tuple(examples)))
    return results


def insertion_token(model, input_sae, feature: int, *, mode: str = "paper", max_pos: int = 64,
                    batch_size: int = 512) -> Optional[int]:
    """The token to insert for input feature ``feature``; None when REF's choice is a position.

    ``mode="paper"`` (REF): argmax over the raw rows of ``concat(W_E, W_pos[:max_pos]) @ W_enc[:, feature]``.
    ``mode="activation"``: the token t maximising the feature's real activation at position 1 of
    [BOS, t] (meaningful at any layer).
    """
    if mode == "paper":
        rows = torch.cat([model.W_E.detach(), model.W_pos.detach()[:max_pos]]).to(input_sae.W_enc.dtype)
        best = int(torch.argmax(rows @ input_sae.W_enc[:, feature]))
        return best if best < model.cfg.d_vocab else None
    if mode != "activation":
        raise ValueError(f"mode must be 'paper' or 'activation', got {mode!r}")
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else 0
    vocab = torch.arange(model.cfg.d_vocab)
    pairs = torch.stack([torch.full_like(vocab, bos), vocab], dim=1)
    resid, _ = hook_names(input_sae.layer)
    best_act, best_tok = -float("inf"), None
    for rows, acts in run_batches(model, pairs, input_sae.layer, [resid], batch_size=batch_size,
                                  desc="insertion token", progress=False):
        a = input_sae.encode(acts[resid][:, 1].to(input_sae.W_dec.dtype))[:, feature]
        i = int(torch.argmax(a))
        if float(a[i]) > best_act:
            best_act, best_tok = float(a[i]), rows.start + i
    return best_tok


def insert_copies(tokens: torch.Tensor, positions: torch.Tensor, token_id: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """REF's insertion: ``n`` copies of ``token_id`` right after BOS, the scored position moves by n,
    sequences whose position falls off the end are dropped, the rest truncated to the length.

    Returns (tokens [M, T], positions [M], kept row indices [M])."""
    t_len = tokens.shape[1]
    keep = torch.nonzero(positions + n < t_len).flatten()
    inserted = torch.full((keep.numel(), n), token_id, dtype=tokens.dtype)
    new = torch.cat([tokens[keep, :1], inserted, tokens[keep, 1:]], dim=1)[:, :t_len]
    return new, positions[keep] + n, keep


@dataclass(frozen=True)
class InsertionResult:
    """Mean output activation at the query after inserting the distractor n times (Fig. 6c)."""

    feature: int
    token_id: int
    counts: tuple[int, ...]
    mean_act: tuple[float, ...]
    n_examples: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def counterfactual_insertion(
    model,
    output_sae,
    feature: int,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    token_id: int,
    *,
    counts: Sequence[int] = (0, 1, 2, 3),
    batch_size: int = 64,
) -> InsertionResult:
    """Insert ``token_id`` n times (n in ``counts``; REF: 0..3) and read the feature at the moved position."""
    tokens = check_tokens(tokens, model)
    _, z = hook_names(output_sae.layer)
    means, sizes = [], []
    for n in counts:
        new, pos, _ = insert_copies(tokens, positions, token_id, n)
        if new.shape[0] == 0:  # every scored position fell off the end
            means.append(float("nan"))
            sizes.append(0)
            continue
        acts = []
        for rows, cache in run_batches(model, new, output_sae.layer, [z], batch_size=batch_size,
                                       desc=f"insert x{n}", progress=False):
            out = output_sae.encode(cache[z].to(output_sae.W_enc.dtype))[..., feature]
            acts.append(out[torch.arange(out.shape[0]), pos[rows]].cpu())
        values = torch.cat(acts) if acts else torch.zeros(0)
        means.append(float(values.mean()) if values.numel() else float("nan"))
        sizes.append(int(values.numel()))
    return InsertionResult(feature, token_id, tuple(counts), tuple(means), tuple(sizes))
