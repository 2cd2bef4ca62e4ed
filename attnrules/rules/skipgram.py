"""Skip-gram rule sets and their predictions (REF §4).

A rule set is a disjunction of N terms ``[k] … [q] → feature``: input feature q active at the
current position t and input feature k active at some position t' ≤ t (t itself and BOS included).
Each match scores ``F[t,q] · F[t',k]^p · A(q,k) · V(k)`` — REF's weight rules square the key
activation (p = 2), its importance rules do not (p = 1) — and an exemplar's predicted score is the
maximum over matches, 0 when nothing matches (importance rules, paper or exact, count only matches
with A ≠ 0, as REF's do). With threshold 0 the feature is predicted active iff
some match has A·V > 0 (REF also fires when both are negative).

Exact-mode rule sets (:func:`rules_from_exact`) differ where REF's convention would fire on float
noise: a term's weight is its exact importance (the gradient of the real activation), a term
fires only when that weight exceeds ``EXACT_REL_TOL`` × the largest |importance| of the feature's
candidates, and an input feature counts as present only where its activation exceeds
``EXACT_ACT_FLOOR`` × the largest activation in the exemplars (an SAE whose encoder leaves ±1e-8 on
every feature does not make every key present everywhere). Their terms may be pseudo-features of the exact decomposition (negative ids, see
:data:`PSEUDO_IDS`): a pseudo query is present at every position, a pseudo key at every position
up to the query, so ``[plon] … [any query, via b_Q]`` fires wherever plon occurs before the query.

On a rotary head a term's attn-score depends on the offset δ between its query and key
(:class:`~attnrules.circuit.HeadCircuit`): each term keeps its best offset and its score at every
offset (``offset_attn``), a match at offset δ scores with A_δ, and a term fires only at offsets where
it promotes the feature (A_δ·V > 0; exact-mode feature terms likewise gate their importance weight). A
term that promotes at some offsets only is rendered with them, ``[Harry] …(δ=1)… [Potter]``; one that
promotes at every candidate offset as ``[k] … [q]``. On a sliding-window head keys beyond the window
never match (``max_offset``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Callable, Optional

import pandas as pd
import torch

from attnrules.circuit import HeadCircuit
from attnrules.circuit import PSEUDO, pseudo_name
from attnrules.importance import ExactTerms
from attnrules.importance import select_terms
from attnrules.files import plain
from attnrules.rules.matches import Matches, concat_matches, default_aggregation, no_matches
from attnrules.scoring import PairTable, attn_scores, value_scores


EXACT_REL_TOL = 1e-3  # exact-mode terms weaker than this share of the strongest never fire
EXACT_ACT_FLOOR = 1e-4  # exact mode: activations up to this share of the exemplars' largest are absent
# Pseudo-features as rule terms, by id. The decoder bias and the SAE error enter as one, "residual"
# (b_dec + e: what the active features do not write): where the features reconstruct the input,
# e = −b_dec and their terms cancel one by one, so apart each would be a large, meaningless term.
PSEUDO_IDS = {-1: "residual", -2: "bias"}
_RESIDUAL_NAMES = {"query": "any query, via SAE residual", "key": "any key, via SAE residual"}


def describe_term_side(describe: Callable[[int], str], feature: int, side: str) -> str:
    """A term's query or key (``side``) as text: the input feature's description, or for a pseudo-feature
    id its readable name (e.g. "any query, via b_Q")."""
    if feature >= 0:
        return describe(feature)
    component = PSEUDO_IDS[feature]
    return _RESIDUAL_NAMES[side] if component == "residual" else pseudo_name(component, side)


def activation_scale(acts: torch.Tensor) -> Optional[float]:
    """The largest activation in ``acts``, what an exact rule's ``act_floor`` is relative to (None when
    ``acts`` is empty)."""
    return float(acts.max()) if acts.numel() else None


def scale_for(acts: torch.Tensor) -> Callable[[object], Optional[float]]:
    """``rules -> act_scale`` for evaluating many rule sets on the same exemplars: :func:`activation_scale`
    of ``acts``, computed once when a set with an activation floor first needs it (None for the others)."""
    found: list[Optional[float]] = []

    def get(rules: object) -> Optional[float]:
        if getattr(rules, "act_floor", 0.0) <= 0:
            return None
        if not found:
            found.append(activation_scale(acts))
        return found[0]

    return get


def _rule_pseudo(rows: torch.Tensor) -> torch.Tensor:
    """``[len(PSEUDO), n]`` per decomposition component → ``[len(PSEUDO_IDS), n]`` per rule pseudo-feature."""
    residual = rows[PSEUDO.index("dec_bias")] + rows[PSEUDO.index("error")]
    return torch.stack([residual, rows[PSEUDO.index("bias")]])


@dataclass(frozen=True)
class SkipgramRuleSet:
    """N skip-gram terms for one output feature, in rank order."""

    feature_name: str
    queries: torch.Tensor  # [n] input-feature index of each term's query
    keys: torch.Tensor  # [n]
    attn_score: torch.Tensor  # [n]
    value_score: torch.Tensor  # [n]
    key_power: int = 2
    method: str = "weights"
    weight: Optional[torch.Tensor] = None  # [n] per-term weight (exact importance); None: A·V
    min_weight: float = float("-inf")  # terms whose weight is not above this never fire
    act_floor: float = 0.0  # activations up to act_floor × the largest in the exemplars count as absent
    offsets: Optional[torch.Tensor] = None  # [n] rotary heads: each term's best offset (-1: a pseudo term)
    offset_attn: Optional[torch.Tensor] = None  # [n, max_offset + 1] rotary: A_δ per term (NaN: no candidate)
    max_offset: Optional[int] = None  # the farthest a key may be from its query (window or offsets); None: any
    value_features: Optional[torch.Tensor] = None  # [m] REF's importance rule: value features whose own rows count
    value_feature_scores: Optional[torch.Tensor] = None  # [m] their value scores

    def __len__(self) -> int:
        return self.queries.numel()

    def on_columns(self, features: torch.Tensor) -> "SkipgramRuleSet":
        """This set reading activations restricted to ``features`` (column j is input feature
        ``features[j]``, which must hold every query, key and value feature; pseudo ids stay as they are)."""
        col_of = torch.full((int(features.max()) + 1 if features.numel() else 1,), -1, dtype=torch.long)
        col_of[features] = torch.arange(features.numel())

        def remap(ids: torch.Tensor) -> torch.Tensor:
            return torch.where(ids < 0, ids, col_of[ids.clamp(0, col_of.numel() - 1)])

        return replace(self, queries=remap(self.queries), keys=remap(self.keys),
                       value_features=None if self.value_features is None else remap(self.value_features))

    def predict(self, acts: torch.Tensor, positions: torch.Tensor, *, aggregation: Optional[str] = None,
                act_scale: Optional[float] = None) -> torch.Tensor:
        """Predicted score ``[N]`` of each exemplar (input-SAE acts ``[N, T, n_in]``, scored position ``[N]``):
        its matches reduced by ``aggregation`` (REF's types, :mod:`attnrules.rules.matches`; default REF's for
        the method: "kqv_max" for importance, "max" otherwise). ``act_scale``: see :meth:`matches`."""
        return self.matches(acts, positions, act_scale=act_scale).aggregate(aggregation or default_aggregation(self.method))

    def matches(self, acts: torch.Tensor, positions: torch.Tensor, *, act_scale: Optional[float] = None) -> Matches:
        """REF's evaluation rows of this rule set on the exemplars (:class:`~attnrules.rules.matches.Matches`):
        a kq row per firing match (term, key position t' ≤ t) and, when the set has ``value_features``
        (REF's importance rule), a value row per active value feature at t' ≤ t. ``act_scale``: the largest
        activation that ``act_floor`` is relative to (default: the largest in ``acts``)."""
        if acts.dim() != 3:
            raise ValueError(f"acts must be [n_exemplars, seq_len, n_inputs], got shape {tuple(acts.shape)}")
        if positions.shape != (acts.shape[0],):
            raise ValueError(f"positions must be [n_exemplars={acts.shape[0]}], got shape {tuple(positions.shape)}")
        n, t_len, _ = acts.shape
        kinds = ("kq",) if self.value_features is None else ("kq", "value")
        rows = [no_matches(n, t_len, positions, kinds, False, acts.dtype)]
        weight = (self.attn_score * self.value_score if self.weight is None else self.weight).to(acts.dtype)
        # pseudo-features (negative ids) are present everywhere: activation 1
        q_act = acts[torch.arange(n), positions][:, self.queries.clamp(min=0)]  # [N, terms]
        q_act = torch.where(self.queries < 0, torch.ones_like(q_act), q_act)
        live = weight > self.min_weight
        floor = 0.0
        if self.act_floor > 0:
            floor = self.act_floor * (activation_scale(acts) if act_scale is None else act_scale)
        # only (exemplar, term) pairs whose query feature is active at t can match
        ex, term = torch.nonzero((q_act > floor) & live, as_tuple=True)
        if ex.numel():
            keys = self.keys[term]
            k_act = acts[ex, :, keys.clamp(min=0)]  # [P, T]
            k_act = torch.where(keys[:, None] < 0, torch.ones_like(k_act), k_act)
            match = (torch.arange(t_len)[None, :] <= positions[ex][:, None]) & (k_act > floor)
            per_match = weight[term][:, None].expand_as(k_act)
            attn = self.attn_score[term][:, None].expand_as(k_act)
            delta = positions[ex][:, None] - torch.arange(t_len)[None, :]  # [P, T] offset of each key position
            if self.max_offset is not None:
                match &= delta <= self.max_offset
            if self.offset_attn is not None:
                per_match, attn, gate = self._at_offsets(term, delta.clamp(0, self.offset_attn.shape[1] - 1), acts.dtype)
                match &= gate
            if self.method == "importance":  # REF's importance rules list only the nonzero F[t,q]·F[t',k]·A terms
                match &= attn != 0
            q = q_act[ex, term][:, None]
            kv = q * k_act**self.key_power * per_match
            score = q * k_act * attn.to(acts.dtype) if self.method == "importance" else kv
            pair, key_pos = torch.nonzero(match, as_tuple=True)
            rows.append(replace(rows[0], exemplar=ex[pair], kq=torch.ones_like(pair, dtype=torch.bool), term=term[pair],
                                key_position=key_pos, score=score[pair, key_pos], kv_score=kv[pair, key_pos]))
        if self.value_features is not None and self.value_features.numel():
            v_act = acts[:, :, self.value_features]  # [N, T, values]
            upto = torch.arange(t_len)[None, :] <= positions[:, None]
            if self.max_offset is not None:
                upto &= positions[:, None] - torch.arange(t_len)[None, :] <= self.max_offset
            e, key_pos, v = torch.nonzero((v_act > 0) & upto[:, :, None], as_tuple=True)
            value = v_act[e, key_pos, v] * self.value_feature_scores.to(acts.dtype)[v]
            rows.append(replace(rows[0], exemplar=e, kq=torch.zeros_like(e, dtype=torch.bool), term=v,
                                key_position=torch.full_like(e, -1), score=value, kv_score=value))
        return concat_matches(rows)

    def _at_offsets(self, term: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype):
        """Per match (``term [P]`` × key positions at offsets ``delta [P, T]``): its weight, its A_δ and
        whether it may fire (its offset is a candidate and, for a feature term, A_δ·V > 0)."""
        attn = self.offset_attn[term[:, None], delta].to(dtype)  # [P, T]
        value = self.value_score[term].to(dtype)[:, None]
        pseudo = ((self.queries[term] < 0) | (self.keys[term] < 0))[:, None]
        promotes = torch.isfinite(attn) & (attn * value > 0)
        if self.weight is None:  # A_δ·V at the offset present
            return (attn * value).nan_to_num(0.0), attn.nan_to_num(0.0), torch.isfinite(attn)
        gate = pseudo | promotes
        return self.weight[term].to(dtype)[:, None].expand_as(attn), attn.nan_to_num(0.0), gate

    def firing_offsets(self) -> list[str]:
        """Per term, the offsets where it can fire as text ("δ=1", "δ=2–5", "δ≥3", "δ∈{1, 7–9}", "none"; "any"
        when every candidate offset); "any" everywhere on heads with absolute positions."""
        if self.offset_attn is None:
            return ["any"] * len(self)
        candidate = torch.isfinite(self.offset_attn)
        fires = candidate & (self.offset_attn * self.value_score.double()[:, None] > 0)
        pseudo = (self.queries < 0) | (self.keys < 0)
        fires[pseudo] = candidate[pseudo]
        return [offset_text(f, c) for f, c in zip(fires, candidate)]

    def render(self, describe: Callable[[int], str], limit: Optional[int] = None) -> list[str]:
        """Terms as text, e.g. ``[If] … [then] → L0H0.94`` (A and V in brackets; on a rotary head
        ``[Harry] …(δ=1)… [Potter]`` for a term that fires at offset 1 only, and A at the best offset δ*)."""
        lines = []
        where = self.firing_offsets()
        best = self.offsets.tolist() if self.offsets is not None else [None] * len(self)
        for q, k, a, v, at, d in list(zip(self.queries.tolist(), self.keys.tolist(), self.attn_score.tolist(),
                                          self.value_score.tolist(), where, best))[:limit]:
            key, query = describe_term_side(describe, k, "key"), describe_term_side(describe, q, "query")
            gap = {"any": "…", "none": "…(never)…"}.get(at, f"…({at})…")
            at_best = f", δ*={d}" if d is not None and d >= 0 and at not in ("any", "none") else ""
            lines.append(f"[{key}] {gap} [{query}] → {self.feature_name}   (A={a:.3g}, V={v:.3g}{at_best})")
        return lines

    def to_frame(self, describe: Optional[Callable[[int], str]] = None) -> pd.DataFrame:
        frame = pd.DataFrame(
            {
                "feature": self.feature_name,
                "method": self.method,
                "rank": range(len(self)),
                "query": plain(self.queries),
                "key": plain(self.keys),
                "attn_score": plain(self.attn_score),
                "value_score": plain(self.value_score),
            }
        )
        if self.weight is not None:
            frame["weight"] = plain(self.weight)
        if self.offsets is not None:
            frame["offset"] = plain(self.offsets)
            frame["offsets"] = self.firing_offsets()
        if describe is not None:
            frame["query_desc"] = [describe_term_side(describe, q, "query") for q in plain(self.queries)]
            frame["key_desc"] = [describe_term_side(describe, k, "key") for k in plain(self.keys)]
        return frame


def offset_text(fires: torch.Tensor, candidate: torch.Tensor) -> str:
    """Offsets ``fires [n_offsets]`` (bool over 0 … n − 1) as text, relative to the ``candidate`` ones:
    "any" when it is all of them, "none" when empty, else "δ=1", "δ=2–5", "δ≥3" or "δ∈{1, 7–9}"."""
    if bool((fires == candidate).all()):
        return "any"
    on = torch.nonzero(fires).flatten().tolist()
    if not on:
        return "none"
    runs, start = [], on[0]
    for prev, cur in zip(on, on[1:] + [None]):
        if cur != prev + 1:
            runs.append((start, prev))
            start = cur
    last = int(torch.nonzero(candidate).max())
    if len(runs) == 1:
        lo, hi = runs[0]
        if hi == last and lo > 0 and hi > lo:
            return f"δ≥{lo}"
        return f"δ={lo}" if lo == hi else f"δ={lo}–{hi}"
    return "δ∈{" + ", ".join(str(lo) if lo == hi else f"{lo}–{hi}" for lo, hi in runs) + "}"


def positioned(rules: SkipgramRuleSet, circuit: HeadCircuit) -> SkipgramRuleSet:
    """``rules`` with the circuit's positions: its sliding window and, on a rotary head, each feature
    term's A at every candidate offset and its best offset (the largest A, the lowest offset among equals)."""
    rules = dataclasses.replace(rules, max_offset=circuit.max_offset)
    if circuit.rotary is None:
        return rules
    feature = (rules.queries >= 0) & (rules.keys >= 0)
    profile = torch.full((len(rules), circuit.max_offset + 1), float("nan"), dtype=torch.float64)
    profile[feature] = circuit.attn_profile(rules.queries[feature], rules.keys[feature])
    best = torch.full((len(rules),), -1, dtype=torch.long)
    if bool(feature.any()):
        best[feature] = profile[feature].nan_to_num(nan=float("-inf")).max(dim=-1).indices
    return dataclasses.replace(rules, offsets=best, offset_attn=profile)


def rules_from_weights(table: PairTable, n: int, circuit: Optional[HeadCircuit] = None) -> SkipgramRuleSet:
    """REF's weight-based rule: the top-N rows of the candidate table by exp(A)·V (the table's circuit
    is required for a rotary head's table, whose scores are at each pair's best offset)."""
    top = table.top(min(n, len(table)))
    rules = SkipgramRuleSet(table.feature_name, top.queries, top.keys, top.attn_score, top.value_score, 2, "weights")
    if circuit is None:
        if table.offsets is not None:
            raise ValueError("circuit is required for a rotary head's candidate table (its terms have offsets)")
        return rules
    return positioned(rules, circuit)


def _selected_cells(importance: torch.Tensor, n: int, absolute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the N cells REF selects (:func:`attnrules.importance.select_terms`), strongest
    first, ties in row-major order."""
    selected = select_terms(importance, n, absolute=absolute)
    ranking = importance.abs() if absolute else importance
    rows, cols = torch.nonzero(selected, as_tuple=True)
    order = torch.sort(ranking[rows, cols], descending=True, stable=True).indices
    return rows[order], cols[order]


def rules_from_importance(
    circuit: HeadCircuit,
    feature: int,
    queries: torch.Tensor,
    keys: torch.Tensor,
    importance: torch.Tensor,
    n: int,
    *,
    absolute: bool = True,
    method: str = "importance",
) -> SkipgramRuleSet:
    """REF's gradient-based rule: the pairs of the Q × K cross product selected from the importance
    matrix ``[len(queries), len(keys)]`` (:func:`attnrules.importance.select_terms`), ranked by it
    (ties by the lower (query, key) position). ``method`` labels where the importances came from
    ("importance": paper mode, "exact": exact mode)."""
    rows, cols = _selected_cells(importance, n, absolute)
    q, k = queries[rows], keys[cols]
    v = value_scores(circuit, feature)
    return positioned(SkipgramRuleSet(
        circuit.feature_name(feature), q, k, attn_scores(circuit, q, k), v[k], 1, method,
        value_features=keys[:n], value_feature_scores=v[keys[:n]],  # REF: the first N value features' own rows
    ), circuit)


def rules_from_exact(
    circuit: HeadCircuit,
    feature: int,
    queries: torch.Tensor,
    keys: torch.Tensor,
    terms: ExactTerms,
    n: int,
    *,
    absolute: bool = True,
    rel_tol: float = EXACT_REL_TOL,
    attn: Optional[torch.Tensor] = None,
) -> SkipgramRuleSet:
    """Exact-mode rule: N terms chosen as REF chooses (:func:`attnrules.importance.select_terms`) among
    the feature pairs of the Q × K cross product and the pseudo-feature terms (pseudo query × key
    feature, query feature × pseudo key; pseudo-features per :data:`PSEUDO_IDS`), ranked by exact
    importance. A pseudo term's ``attn_score``
    is its mean real-logit contribution and its ``value_score`` the key's (NaN for a pseudo key).
    ``attn``: the Q × K pairs' attn-scores when already computed (a sweep builds sets of many N from them)."""
    n_q, n_k, n_p = len(queries), len(keys), len(PSEUDO_IDS)
    ids = torch.tensor(list(PSEUDO_IDS), dtype=torch.long)
    # rows: the queries, then the pseudo queries; columns: the keys, then the pseudo keys
    importance = torch.zeros(n_q + n_p, n_k + n_p, dtype=torch.float64)
    score = torch.zeros_like(importance)
    importance[:n_q, :n_k] = terms.features
    importance[n_q:, :n_k] = _rule_pseudo(terms.query_pseudo)
    importance[:n_q, n_k:] = _rule_pseudo(terms.key_pseudo).T
    score[:n_q, :n_k] = (attn_scores(circuit, queries[:, None], keys[None, :]) if attn is None else attn).double()
    score[n_q:, :n_k] = _rule_pseudo(terms.query_pseudo_score)
    score[:n_q, n_k:] = _rule_pseudo(terms.key_pseudo_score).T
    rows, cols = _selected_cells(importance, n, absolute)
    q, k = torch.cat([queries, ids])[rows], torch.cat([keys, ids])[cols]
    values = value_scores(circuit, feature).double()[k.clamp(min=0)]
    values = torch.where(k < 0, torch.full_like(values, float("nan")), values)
    return positioned(SkipgramRuleSet(
        circuit.feature_name(feature), q, k, score[rows, cols], values, 1, "exact",
        weight=importance[rows, cols], min_weight=rel_tol * float(importance.abs().max()), act_floor=EXACT_ACT_FLOOR,
    ), circuit)
