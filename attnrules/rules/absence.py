"""Absence rules: distractor keys that draw a query's attention and suppress the feature.

A skip-gram term (q, k) of a feature has a distractor k' when k' pulls q's attention harder and
writes against the feature (stated, scale-free criteria in :func:`absence_rules`): where both occur,
q attends to k' instead of k. Here:

- :func:`absence_rules` — every distractor of every term of a rule set, ranked by how strongly it
  pulls q's attention (a per-query top-k over all keys through the engine), rendered as
  ``[http] … [com] → L0H0.1 unless [twitter]``; :class:`DistractorCheck` holds the insertion
  evidence (:func:`attnrules.evaluation.insertion.check_distractors`) that keeps or drops each one;
- :func:`paper_distractor` — REF's single check per feature (reference §6.1) and
  :func:`distractor_share` — the share of a head's features with a distractor key (paper Fig. 9).

On a rotary head every attn-score here is the pair's best-offset one (:mod:`attnrules.scoring`): a
distractor pulls the query harder than the term's key does at its best offset.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from attnrules.circuit import HeadCircuit
from attnrules.records import Record
from attnrules.rules.skipgram import SkipgramRuleSet
from attnrules.scoring import attn_column, attn_row, attn_scores, top_keys, value_scores


# A distractor must matter (scale-free criteria, relative to its own term):
VALUE_RATIO = 0.1  # |V(k')| ≥ VALUE_RATIO · |V(k)|
PULL_RATIO = 0.01  # A(q, k') ≥ A(q, k) + PULL_RATIO · (spread of q's attn-scores over all keys)
NOISE_LEVEL = 1e-4  # |V(k)| ≤ NOISE_LEVEL · max_j |value_proj[j]| · |u| is float noise, never a rule's value
MIN_DROP = 0.1  # inserting a confirmed distractor lowers the mean activation by at least this share


def significant_values(circuit: HeadCircuit, feature: int) -> torch.Tensor:
    """``[n_in]`` bool: value scores above float noise, |V(k)| > NOISE_LEVEL·max_j |value_proj[j]|·|u|
    (scale-free: relative to the largest value any input feature of the head could write on u)."""
    v = value_scores(circuit, feature)
    scale = circuit.value_proj.norm(dim=-1).max() * circuit.encoder_vector(feature).norm()
    return v.abs() > NOISE_LEVEL * scale


@dataclass(frozen=True)
class DistractorCheck(Record):
    """Insertion evidence for one distractor of a term: the distractor's token inserted once after
    BOS into the exemplars where the term matches and the feature fires, read at the moved query.

    ``logit_*`` are the head's real attention logits (``hook_attn_scores``) from the query to the
    term's key and to the inserted distractor; ``value_*`` the real value vectors projected on u.
    ``status``: "confirmed" (the mean activation drops by ≥ MIN_DROP), "unconfirmed" (it does not),
    "cleared" (exact mode: the real logits do not prefer the distractor or its real value is not
    significantly negative), "untested" (no token for the distractor, or no exemplar to insert into).
    """

    distractor: int
    token: Optional[int]
    n_examples: int
    mean_act_without: Optional[float]  # None when untested
    mean_act_with: Optional[float]
    logit_key: Optional[float]
    logit_distractor: Optional[float]
    value_key: Optional[float]
    value_distractor: Optional[float]
    status: str

    @property
    def kept(self) -> bool:
        return self.status in ("confirmed", "untested")


@dataclass(frozen=True)
class AbsenceRule(Record):
    """A skip-gram term and the distractor keys that suppress it, strongest pull first.

    ``checks`` (one per tested distractor, from
    :func:`~attnrules.evaluation.insertion.check_distractors`) decide which distractors the rule keeps:
    untested ones stay, unconfirmed and cleared ones are reported but not rendered. ``text`` is the
    rule as read (:meth:`with_text`; "" when no distractor is kept)."""

    feature_name: str
    query: int
    key: int
    attn_score: float
    value_score: float
    distractors: tuple[int, ...]
    distractor_attn: tuple[float, ...]
    distractor_value: tuple[float, ...]
    checks: tuple[DistractorCheck, ...] = ()
    text: str = ""

    def status(self, distractor: int) -> str:
        return next((c.status for c in self.checks if c.distractor == distractor), "untested")

    @property
    def statuses(self) -> tuple[str, ...]:
        """The status of each distractor, in order."""
        return tuple(self.status(d) for d in self.distractors)

    @property
    def kept(self) -> tuple[int, ...]:
        """The distractors this rule claims: those not unconfirmed or cleared by the evidence."""
        return tuple(d for d, s in zip(self.distractors, self.statuses) if s in ("confirmed", "untested"))

    def render(self, describe: Callable[[int], str], limit: int = 3) -> str:
        kept = self.kept
        names = " or ".join(f"[{describe(d)}]" for d in kept[:limit])
        more = f" (+{len(kept) - limit} more)" if len(kept) > limit else ""
        return f"[{describe(self.key)}] … [{describe(self.query)}] → {self.feature_name} unless {names}{more}"

    def with_text(self, describe: Callable[[int], str]) -> "AbsenceRule":
        """The rule with ``text`` rendered (empty when no distractor is kept)."""
        return dataclasses.replace(self, text=self.render(describe) if self.kept else "")

    def _derived(self) -> dict:
        return {"kept": list(self.kept), "status": list(self.statuses)}


def absence_rules(
    circuit: HeadCircuit,
    feature: int,
    rules: SkipgramRuleSet,
    *,
    max_distractors: Optional[int] = None,
    value_ratio: float = VALUE_RATIO,
    pull_ratio: float = PULL_RATIO,
    backend: str = "auto",
) -> list[AbsenceRule]:
    """Distractors of every term of ``rules`` that promotes the feature (terms without one are left out).

    k' is a distractor of (q, k) when it pulls q's attention harder by a margin that matters,
    A(q, k') > A(q, k) + ``pull_ratio``·std_j A(q, j) (the spread of q's scores over all keys: scale-
    and shift-free), and writes against the feature with a value that matters, V(k') < 0 and |V(k')| ≥ ``value_ratio``·|V(k)|, above float noise
    (:func:`significant_values`). Terms whose own value is float noise, or with A·V ≤ 0, get none.
    All distractors of a term lie among the keys that q attends to more than k, so one per-query
    top-k over all keys (k = the largest such count, capped by ``max_distractors``) finds them.
    """
    v = value_scores(circuit, feature)
    significant = significant_values(circuit, feature)
    a_all = attn_scores(circuit, rules.queries, rules.keys)
    live = [i for i, (k, a) in enumerate(zip(rules.keys.tolist(), a_all.tolist()))
            if bool(significant[k]) and a * float(v[k]) > 0]
    if not live:
        return []
    terms = [(int(rules.queries[i]), int(rules.keys[i]), float(a_all[i])) for i in live]
    row = {q: attn_row(circuit, q) for q, _, _ in terms}  # q's scores over all keys
    floor = {i: a + pull_ratio * float(row[q].std()) for i, (q, _, a) in enumerate(terms)}
    # how many keys pull each term's query harder than that
    depth = max(int((row[q] > floor[i]).sum()) for i, (q, _, _) in enumerate(terms))
    if max_distractors is not None:
        depth = min(depth, max_distractors)
    if depth == 0:
        return []
    queries = torch.unique(torch.tensor([q for q, _, _ in terms]))
    best = top_keys(circuit, queries, depth, backend=backend)
    row_of = {int(q): i for i, q in enumerate(queries)}
    out = []
    for i, (q, k, a) in enumerate(terms):
        keys, attn = best.key_idx[row_of[q]], best.scores[row_of[q]]
        keep = (attn > floor[i]) & (v[keys] < 0) & (v[keys].abs() >= value_ratio * abs(float(v[k]))) & significant[keys]
        if keep.any():
            d = keys[keep]
            out.append(AbsenceRule(rules.feature_name, q, k, a, float(v[k]), tuple(d.tolist()),
                                   tuple(attn[keep].tolist()), tuple(v[d].tolist())))
    return out


@dataclass(frozen=True)
class PaperDistractor(Record):
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

    def _derived(self) -> dict:
        return {"has_distractor": self.has_distractor}


def paper_distractor(circuit: HeadCircuit, feature: int) -> PaperDistractor:
    """k = the top value key, q = its best query, and the first key by q's attention with V < 0."""
    v = value_scores(circuit, feature)
    k = int(torch.argmax(v))
    a_q = attn_column(circuit, k)
    q = int(torch.argmax(a_q))
    kq = attn_row(circuit, q)
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
