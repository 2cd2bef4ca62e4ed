"""Pattern negatives (hard negatives): positions where a feature's rule terms fire but the feature does not.

REF evaluates a rule on top-activating sequences and *random* sequences where the feature never fires;
those almost never hold the rule's pattern, so a skip-gram that fires too often (it ignores a
distractor, or one copy of a key where two are needed) still scores F1 = 1. Here the negatives are
sampled where the rule's own terms fire:

- :class:`PatternPool` — the input-SAE activations of a random sample of the corpus (``pool_size``
  sequences, one forward pass per head), kept sparse;
- :func:`sample_pattern_negatives` — among the pool's sequences where the feature never fires (the
  corpus scan says which) and that are none of the feature's own exemplars (train, val or test), the
  (sequence, position t ≥ 1) pairs where a term of the given rule sets fires, i.e. gives a match with
  predicted score above the threshold (query at t, key at t' ≤ t, offsets and windows respected, as the
  rule predicts); one random firing position per sequence, up to ``count`` sequences, split like REF's
  negatives (1/3 test, the rest halved into train and val). The evaluation uses the val part beside
  the val positives, so no sequence that chose or ranked the rules (the train split) is evaluated on.

Cost: the pool's pass (blocks 0..L and the input SAE over ``pool_size`` sequences, once per head; about
12 bytes per active input feature and position kept, ~80 MB for 2,048 GPT-2-small sequences) and, per
feature, the rule sets' matches at every position of the pool's silent sequences over the few input
features their terms use.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, TypeVar

import numpy as np
import torch

from attnrules.evaluation.grid_matches import grid_matches
from attnrules.evaluation.metrics import SweepPoint, sweep_point
from attnrules.exemplars import ConditionHit, ExemplarSplit, Exemplars, ExemplarView, TermMatch, split_bounds
from attnrules.rules.combined import COMBINED, CombinedRuleSet, Conditions, condition_masks, presence
from attnrules.rules.matches import default_aggregation
from attnrules.rules.skipgram import scale_for
from attnrules.sources.runner import hook_names, run_batches

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import InputSAE

T = TypeVar("T")


@dataclass(frozen=True)
class PatternPool:
    """Input-SAE activations of ``sequences`` (corpus rows), as coordinate lists: entry i is activation
    ``value[i]`` of input feature ``feature[i]`` at position ``position[i]`` of pool row ``row[i]``."""

    sequences: torch.Tensor  # [P] corpus rows, ascending
    seq_len: int
    n_inputs: int
    row: torch.Tensor
    position: torch.Tensor
    feature: torch.Tensor
    value: torch.Tensor
    act_scale: float  # the largest activation in the pool (what an exact rule's activation floor is relative to)

    @classmethod
    def build(cls, model: HookedTransformer, input_sae: InputSAE, tokens: torch.Tensor, size: int, *, seed: int = 0,
              batch_size: int = 8) -> "PatternPool":
        """Draw ``size`` corpus rows (all when the corpus is smaller) and encode them in a pass of their own
        (a corpus pass that runs the model anyway builds the same pool with a :class:`PoolObserver`)."""
        observer = PoolObserver(input_sae, tokens, size, seed=seed)
        resid = observer.hooks[0]
        for batch, cache in run_batches(model, tokens[observer.sequences], input_sae.layer, [resid],
                                        batch_size=batch_size, desc="pattern pool", progress=False):
            observer.add(observer.sequences[batch], input_sae.encode(cache[resid].to(input_sae.W_dec.dtype)))
        return observer.result()

    def dense(self, rows: torch.Tensor, features: Optional[torch.Tensor] = None, *,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Activations ``[len(rows), T, len(features)]`` of pool rows ``rows`` (indices into ``sequences``)
        over ``features`` (default: every input feature, ``[len(rows), T, n_in]``); written into ``out``
        (zeroed, of that shape) when given."""
        columns = torch.arange(self.n_inputs) if features is None else features
        col_of = torch.full((self.n_inputs,), -1, dtype=torch.long)
        col_of[columns] = torch.arange(columns.numel())
        row_of = torch.full((self.sequences.numel(),), -1, dtype=torch.long)
        row_of[rows] = torch.arange(rows.numel())
        keep = (col_of[self.feature] >= 0) & (row_of[self.row] >= 0)
        if out is None:
            out = torch.zeros(rows.numel(), self.seq_len, columns.numel(), dtype=self.value.dtype)
        out[row_of[self.row[keep]], self.position[keep], col_of[self.feature[keep]]] = self.value[keep].to(out.dtype)
        return out

    def rows_of(self, sequences: torch.Tensor) -> torch.Tensor:
        """Pool rows (indices into ``self.sequences``) of corpus rows ``sequences`` (all in the pool)."""
        return torch.searchsorted(self.sequences, sequences)


class PoolObserver:
    """Builds the :class:`PatternPool` of ``size`` random corpus rows (all when the corpus is smaller; the
    same rows for the same ``seed``) from their encoded activations, handed to :meth:`add` by a pass that
    encodes them anyway (the corpus pass, :class:`~attnrules.pipeline.corpus_stats.CorpusObservers`) or
    by :meth:`PatternPool.build`'s own pass."""

    def __init__(self, input_sae: InputSAE, tokens: torch.Tensor, size: int, *, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"size must be a positive number of sequences, got {size}")
        n = tokens.shape[0]
        rng = np.random.default_rng(seed)
        self.sequences = torch.from_numpy(np.sort(rng.choice(n, size=min(size, n), replace=False))).long()
        self.sae, self.seq_len = input_sae, tokens.shape[1]
        self.hooks = [hook_names(input_sae.layer)[0]]
        self.parts: list[tuple[torch.Tensor, ...]] = []
        self.scale = 0.0

    def wanted(self, rows: slice) -> torch.Tensor:
        """The pool's corpus rows among ``rows``."""
        lo, hi = (int(i) for i in torch.searchsorted(self.sequences, torch.tensor([rows.start, rows.stop])))
        return self.sequences[lo:hi]

    def add(self, sequences: torch.Tensor, acts: torch.Tensor) -> None:
        """Keep the activations ``acts [b, T, n_in]`` of corpus rows ``sequences [b]`` (all in the pool)."""
        acts = acts.cpu()
        if acts.numel():
            self.scale = max(self.scale, float(acts.max()))
        r, p, f = torch.nonzero(acts, as_tuple=True)
        self.parts.append((torch.searchsorted(self.sequences, sequences.cpu())[r], p, f, acts[r, p, f]))

    def result(self) -> PatternPool:
        if not self.parts:  # nothing observed: an empty pool over the rows
            self.parts.append((torch.zeros(0, dtype=torch.long),) * 3 + (torch.zeros(0),))
        row, position, feature, value = (torch.cat([p[i] for p in self.parts]) for i in range(4))
        return PatternPool(self.sequences, self.seq_len, self.sae.n_features, row, position, feature, value, self.scale)


@dataclass(frozen=True)
class PatternNegatives:
    """A feature's sampled pattern negatives, split as REF splits its negatives, and how many firing
    (sequence, position) candidates the search found."""

    splits: Exemplars
    n_candidates: int


def firing_positions(rule_sets: Sequence, acts: torch.Tensor, *, threshold: float = 0.0,
                     act_scale: Optional[float] = None, max_elements: int = 2**24) -> torch.Tensor:
    """``[N, T]`` bool: where some term of ``rule_sets`` fires (a kq match with predicted score above
    ``threshold``) with the query at that position (position 0, BOS, never). Every position of a
    sequence is scored at once, on copies of its activations, at most ``max_elements`` at a time."""
    n, t_len, n_cols = acts.shape
    fires = torch.zeros(n, t_len, dtype=torch.bool)
    if t_len < 2:
        return fires
    per_chunk = max(1, max_elements // ((t_len - 1) * t_len * max(n_cols, 1)))
    for start in range(0, n, per_chunk):
        chunk = acts[start:start + per_chunk]
        copies = chunk.repeat_interleave(t_len - 1, dim=0)  # [c·(T−1), T, F]: copy j of a row is scored at 1 + j
        positions = torch.arange(1, t_len).repeat(chunk.shape[0])
        for rules in rule_sets:
            rows = rules.matches(copies, positions, act_scale=act_scale)
            hit = rows.exemplar[rows.kq & (rows.kv_score > threshold)]
            fires[start + hit // (t_len - 1), 1 + hit % (t_len - 1)] = True
    return fires


def sample_pattern_negatives(
    pool: PatternPool,
    feature: int,
    act_max: torch.Tensor,
    rule_sets: Sequence,
    exclude: torch.Tensor,
    *,
    count: int,
    seed: int = 0,
    threshold: float = 0.0,
    fire_above: Optional[float] = None,
) -> PatternNegatives:
    """Pattern negatives of one output feature (module docstring). ``act_max [n_sequences]``: the
    feature's max activation in each corpus sequence (the scan; silent: at most ``threshold``);
    ``rule_sets``: the skip-gram rule sets whose terms define the pattern (a term fires where its match
    scores above ``fire_above``, default ``threshold``); ``exclude``: corpus rows never to use (the
    feature's own exemplars)."""
    if count < 1:
        raise ValueError(f"count must be a positive number of negatives, got {count}")
    silent = (act_max[pool.sequences] <= threshold) & ~torch.isin(pool.sequences, exclude)
    candidates = torch.nonzero(silent).flatten()
    features = torch.unique(torch.cat([torch.cat([r.queries, r.keys]) for r in rule_sets] or [torch.zeros(0, dtype=torch.long)]))
    features = features[features >= 0]
    fires = torch.zeros(candidates.numel(), pool.seq_len, dtype=torch.bool)
    if candidates.numel() and features.numel():
        acts = pool.dense(candidates, features)
        kq_only = [dataclasses.replace(r, value_features=None, value_feature_scores=None) for r in rule_sets]
        fires = firing_positions([r.on_columns(features) for r in kq_only], acts,
                                 threshold=threshold if fire_above is None else fire_above, act_scale=pool.act_scale)
    rng = np.random.default_rng(seed)
    hit_rows = torch.nonzero(fires.any(dim=1)).flatten().numpy()
    chosen = rng.permutation(hit_rows)[:count]
    positions = torch.tensor([int(rng.choice(torch.nonzero(fires[r]).flatten().numpy())) for r in chosen],
                             dtype=torch.long)
    sequences = pool.sequences[candidates[torch.from_numpy(chosen).long()]] if len(chosen) else torch.zeros(0, dtype=torch.long)
    splits = {}
    for name, (a, b) in split_bounds(len(chosen)).items():
        splits[name] = ExemplarSplit(feature, sequences[a:b], positions[a:b], act_max[sequences[a:b]],
                                     torch.zeros(b - a, dtype=torch.bool))
    return PatternNegatives(Exemplars(**splits), int(fires.sum()))


# ----------------------------------------------------------------------------------------------------------
# One feature's evaluations beyond REF's


def memoized(build: Callable[[int], T]) -> Callable[[int], T]:
    """``build(n)`` computed once per n (a rule set is evaluated on several exemplar sets)."""
    built: dict[int, T] = {}

    def get(n: int) -> T:
        if n not in built:
            built[n] = build(n)
        return built[n]

    return get


@dataclass(frozen=True)
class EvaluationSet:
    """Exemplars a sweep is evaluated on: corpus rows, scored positions, true max activations and the
    input-SAE activations ``[N, T, n_in]``."""

    negatives: str
    sequence: torch.Tensor
    position: torch.Tensor
    act_max: torch.Tensor
    acts: torch.Tensor


def pattern_evaluation_set(val: EvaluationSet, positive: torch.Tensor, negatives: ExemplarSplit,
                           pool: PatternPool) -> EvaluationSet:
    """The val positives (``positive [N]`` marks them in ``val``) and the pattern negatives' val part."""
    n_pos = int(positive.sum())
    acts = val.acts.new_zeros((n_pos + negatives.sequence.numel(), *val.acts.shape[1:]))  # filled in place
    for i, j in enumerate(torch.nonzero(positive).flatten().tolist()):  # row by row: no copy of them all
        acts[i] = val.acts[j]
    pool.dense(pool.rows_of(negatives.sequence), out=acts[n_pos:])
    return EvaluationSet("pattern", torch.cat([val.sequence[positive], negatives.sequence]),
                         torch.cat([val.position[positive], negatives.position]),
                         torch.cat([val.act_max[positive], negatives.act_max.to(val.act_max.dtype)]), acts)


def sweep_with_conditions(builders: dict, conditions: Conditions, data: EvaluationSet, grid: list[int], *,
                          plain: bool = True, threshold: float = 0.0, prediction_threshold: Optional[float] = None,
                          aggregation: Optional[str] = None) -> list[SweepPoint]:
    """For every builder (ordering) and N in ``grid``, on ``data``: the combined set's point (method
    ``"{ordering}+absence+counting"``; not for the unigram baseline) and, with ``plain``, the plain set's,
    both from one computation of the set's matches. Points come ordering by ordering, plain ones first."""
    points: dict[str, list[SweepPoint]] = {}
    scale = scale_for(data.acts)  # acts.max() once for every set (an exact rule's floor is relative to it)
    masks: dict = {}  # max_offset -> the conditions' exemplar masks on data, made once
    for method, build in builders.items():
        for n, rules, rows in grid_matches(build, grid, data.acts, data.position, scale):
            how = aggregation or default_aggregation(method)
            evaluated = [(method, rows)] if plain else []
            if method != "unigram":
                if rules.max_offset not in masks:
                    masks[rules.max_offset] = condition_masks(conditions, data.acts, data.position, rules.max_offset)
                combined = CombinedRuleSet(rules, conditions)
                silenced = combined.silenced(data.acts, data.position, rows, masks[rules.max_offset])
                evaluated.append((combined.method, rows.select(~silenced)))
            for name, r in evaluated:
                points.setdefault(name, []).append(sweep_point(
                    name, n, len(rules), r.aggregate(how), data.act_max, threshold=threshold,
                    prediction_threshold=prediction_threshold, negatives=data.negatives, aggregation=how))
    order = [m for m in points if COMBINED not in m] + [m for m in points if COMBINED in m]
    return [p for m in order for p in points[m]]


def term_matches(rule_sets: dict, acts: torch.Tensor, position: int, *, threshold: float = 0.0) -> list[TermMatch]:
    """The terms of ``rule_sets`` (method → rule set, in rank order) that fire in one exemplar (acts
    ``[T, n_in]``, scored at ``position``), one per key position; pseudo-feature terms left out."""
    out = []
    for method, rules in rule_sets.items():
        rows = rules.matches(acts[None], torch.tensor([position]))
        for term, key_pos in zip(*(rows.term[rows.kq & (rows.kv_score > threshold)].tolist(),
                                   rows.key_position[rows.kq & (rows.kv_score > threshold)].tolist())):
            q, k = int(rules.queries[term]), int(rules.keys[term])
            if q >= 0 and k >= 0:
                out.append(TermMatch(method, term, q, k, key_pos))
    return out


def condition_hits(conditions: Conditions, matched: Sequence[TermMatch], acts: torch.Tensor, position: int,
                   max_offset: Optional[int] = None) -> list[ConditionHit]:
    """The conditions of matched terms that hold in one exemplar: a distractor present at or before the
    query, or fewer copies of the key than the threshold."""
    present = presence(acts[None], torch.tensor([position]), max_offset)
    terms = {(m.query, m.key) for m in matched}
    hits = []
    for q, k, distractors in conditions.distractors:
        if (q, k) in terms:
            for d in distractors:
                where = torch.nonzero(present(d)[0]).flatten().tolist()
                if where:
                    hits.append(ConditionHit("distractor", q, k, d, tuple(where)))
    for q, k, c in conditions.min_counts:
        where = torch.nonzero(present(k)[0]).flatten().tolist()
        if (q, k) in terms and len(where) < c:
            hits.append(ConditionHit("count", q, k, k, tuple(where), c))
    return hits


@dataclass(frozen=True)
class BeyondRandom:
    """What :func:`evaluate_beyond_random` adds to REF's sweep: the combined sets on REF's exemplars, every
    set on pattern negatives, the pattern evaluation set and the sample it came from (None when none)."""

    points: list[SweepPoint]
    pattern_set: Optional[EvaluationSet]
    pattern: Optional[PatternNegatives]


def evaluate_beyond_random(
    builders: dict,
    conditions: Conditions,
    shown: Sequence,
    val: EvaluationSet,
    positive: torch.Tensor,
    grid: list[int],
    *,
    pool: Optional[PatternPool] = None,
    feature: int = 0,
    act_max: Optional[torch.Tensor] = None,
    exclude: Optional[torch.Tensor] = None,
    count: int = 150,
    seed: int = 0,
    threshold: float = 0.0,
    prediction_threshold: Optional[float] = None,
    aggregation: Optional[str] = None,
) -> BeyondRandom:
    """The combined rule sets (``builders``' orderings with ``conditions``) swept on REF's val exemplars
    ``val``, and — with a ``pool`` — every ordering and combined set swept on the val positives
    (``positive``) and pattern negatives: positions where a term of the ``shown`` rule sets fires, sampled
    (:func:`sample_pattern_negatives`) for output ``feature`` with its corpus maxima ``act_max``, never
    from ``exclude``. The other arguments are :func:`~attnrules.evaluation.metrics.sweep`'s and the sampler's."""
    options = dict(threshold=threshold, prediction_threshold=prediction_threshold, aggregation=aggregation)
    points = sweep_with_conditions(builders, conditions, val, grid, plain=False, **options)
    if pool is None:
        return BeyondRandom(points, None, None)
    pattern = sample_pattern_negatives(pool, feature, act_max, list(shown), exclude, count=count, seed=seed,
                                       threshold=threshold, fire_above=prediction_threshold)
    pattern_set = pattern_evaluation_set(val, positive, pattern.splits.val, pool)
    points += sweep_with_conditions(builders, conditions, pattern_set, grid, **options)
    return BeyondRandom(points, pattern_set, pattern)


def annotated(view: ExemplarView, acts: torch.Tensor, shown: dict, conditions: Conditions, *, threshold: float = 0.0,
              max_offset: Optional[int] = None) -> ExemplarView:
    """``view`` with the terms of the ``shown`` rule sets (method → rule set) that fire in it and the
    conditions that hold there (``acts [T, n_in]``: the exemplar's input-SAE activations)."""
    matched = term_matches(shown, acts, view.position, threshold=threshold)
    hits = condition_hits(conditions, matched, acts, view.position, max_offset)
    return dataclasses.replace(view, matches=tuple(matched), conditions=tuple(hits))
