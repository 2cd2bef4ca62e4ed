"""The whole pipeline for one head: scores → candidates → importances → rules → evaluation.

Besides REF's candidate-based rules, every feature also gets the exhaustive top pairs over all
n_in × n_in (query, key) pairs, by A×V and by importance (``exhaustive_k``; through the engine).

:func:`extract_head` runs REF's procedure (reference-behaviour §3–5) for the sampled features of one
head and returns a :class:`HeadResult`; with ``out_dir`` every finished feature is written at once
(atomically) and a rerun with the same inputs skips it, so long runs can be resumed; the folder is
bound to the content hashes of model, SAEs, corpus and settings, and a rerun with other inputs stops
with an error unless ``overwrite=True`` (see :mod:`attnrules.pipeline.resume`).
Where a requested number exceeds what exists (REF's top-100 keys on an SAE with fewer input
features), it is capped, with a warning kept in the result's metadata.
"""
from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import pandas as pd
import torch

from attnrules.circuit import HeadCircuit, reconstruct
from attnrules.evaluation import SweepPoint, n_terms_grid, sweep
from attnrules.evaluation.counts import CountingCheck, check_counting
from attnrules.evaluation.negatives import (
    Conditions,
    EvaluationSet,
    PatternPool,
    annotated,
    evaluate_beyond_random,
    memoized,
)
from attnrules.evaluation.insertion import (
    check_distractors,
    counterfactual_insertion,
    feature_tokens,
    insertion_token,
    natural_prevalence,
)
from attnrules.exemplars import Exemplars, FeatureColumn, FeatureScan, decile_sequences, exemplar_views, input_activations, sample_exemplars, sample_features, scan_output_features
from attnrules.files import plain
from attnrules.importance import ExactTerms, exact_importance_terms, paper_importance, rank_all_pairs_by_importance
from attnrules.pipeline import activations
from attnrules.pipeline.activations import SharedPasses, group_features
from attnrules.pipeline.corpus_stats import CorpusObservers, CorpusStats, load_stats, measure_corpus, save_stats, stats_key
from attnrules.pipeline.resume import HeadFolder, InputHashes
from attnrules.resid_store import ResidStore
from attnrules.sparse_acts import SparseActs
from attnrules.pipeline.results import (
    ActivationHistogram,
    DistractorEvidence,
    FeatureResult,
    HeadResult,
    KeptActs,
    PairRecord,
    Predictions,
    RuleSetView,
    RunInfo,
    StepError,
    SweepRecord,
    UnseenKey,
)
from attnrules.pipeline.settings import ExtractSettings
from attnrules.rules import SkipgramRuleSet, rules_from_exact, rules_from_importance, rules_from_weights
from attnrules.rules.unigram import rules_from_values
from attnrules.rules.absence import absence_rules, paper_distractor, significant_values
from attnrules.rules.descriptions import InputDescriptions, describe_input_features, token_strings
from attnrules.scoring import PairTable, attn_scores, candidate_table, rank_all_pairs, rank_all_pairs_many, value_scores
from attnrules.sources import as_sources

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import InputSAE, OutputSAE


def _capped(name: str, asked: int, available: int, notes: list[str], what: str = "the number of input features") -> int:
    """``asked``, or ``available`` when it is larger, with a warning and a note saying so."""
    if asked <= available:
        return asked
    message = f"{name}={asked} capped to {available} ({what})"
    warnings.warn(message, stacklevel=3)
    notes.append(message)
    return available


def _first_appearance(index: torch.Tensor) -> torch.Tensor:
    """Unique values in order of first appearance (REF's ``Series.unique()``)."""
    return torch.tensor(pd.unique(index.numpy()), dtype=torch.int64)


def extract_feature(
    circuit: HeadCircuit,
    feature: int,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    settings: ExtractSettings,
    exact: Optional[Callable[[torch.Tensor, torch.Tensor], ExactTerms]] = None,
    *,
    gate: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    prediction_threshold: Optional[float] = None,
    builders: Optional[tuple[dict[str, Callable[[int], object]], PairTable]] = None,
) -> tuple[dict[str, SkipgramRuleSet], list[SweepPoint], PairTable]:
    """Rules of each ordering for one feature (the top ``show_terms`` terms), their sweep over N
    on the validation exemplars, and the candidate table.

    ``train`` = (acts ``[N, T, n_in]``, positions); ``val`` = (acts, positions, act_max). With
    ``exact`` (queries, keys → :class:`~attnrules.importance.ExactTerms`) a third ordering, "exact", ranks
    the same candidate cross product and the pseudo-feature terms by the gradient through the real head.
    ``gate``: the output SAE's own gate for the "post_activation" loss (default REF's relu(pred + b_enc));
    ``prediction_threshold``: where predictions fire (default ``settings.threshold``, REF).
    With ``settings.unigram`` REF's unigram baseline is swept too (it has no rule set to show).
    ``builders``: :func:`rule_builders`' result when already made (its rule sets are then reused).
    """
    made, table = builders or rule_builders(circuit, feature, train, settings, exact, gate=gate)
    points, rules = [], {}
    for method, build in made.items():
        points += sweep(build, *val, n_terms_grid(settings.max_rules), threshold=settings.threshold,
                        prediction_threshold=prediction_threshold, aggregation=aggregation_of(settings))
        if method != "unigram":
            rules[method] = build(settings.show_terms)
    return rules, points, table


def aggregation_of(settings: ExtractSettings) -> Optional[str]:
    """The aggregation the settings ask for (None: REF's default of each ordering)."""
    return None if settings.aggregation == "ref" else settings.aggregation


def rule_builders(
    circuit: HeadCircuit,
    feature: int,
    train: tuple[torch.Tensor, torch.Tensor],
    settings: ExtractSettings,
    exact: Optional[Callable[[torch.Tensor, torch.Tensor], ExactTerms]] = None,
    *,
    gate: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> tuple[dict[str, Callable[[int], object]], PairTable]:
    """For each ordering, the function that builds its N-term rule set (each built once per N), and the
    candidate table (arguments as :func:`extract_feature`'s)."""
    table = candidate_table(circuit, feature, num_values=settings.num_values, num_queries=settings.num_queries,
                            negative_values=settings.negative_values, backend=settings.backend)
    queries, keys = _first_appearance(table.queries), _first_appearance(table.keys)
    importance = paper_importance(circuit, feature, queries, keys, *train, loss_type=settings.loss_type, gate=gate)
    builders = {
        "weights": lambda n: rules_from_weights(table, n, circuit),
        "importance": lambda n: rules_from_importance(circuit, feature, queries, keys, importance, n,
                                                      absolute=settings.absolute),
    }
    if exact is not None:
        terms = exact(queries, keys)
        attn = attn_scores(circuit, queries[:, None], keys[None, :])  # once for every N
        builders["exact"] = lambda n: rules_from_exact(circuit, feature, queries, keys, terms, n,
                                                       absolute=settings.absolute, attn=attn)
    if settings.unigram:
        builders["unigram"] = lambda n: rules_from_values(table, n, circuit.max_offset)
    return {m: memoized(b) for m, b in builders.items()}, table


@dataclass(frozen=True)
class TrainExemplars:
    """A feature's train split as the beyond-skip-gram steps need it: corpus rows, scored positions,
    input-SAE activations ``[N, T, n_in]`` (None once a feature's steps have released them) and whether
    each was sampled as a positive."""

    tokens: torch.Tensor
    positions: torch.Tensor
    acts: Optional[torch.Tensor]
    positive: torch.Tensor


class TokenLookup:
    """The token that stands for each input feature (to insert or place), computed once per feature
    for a run: REF's embedding argmax at layer 0, the feature's real activation on [BOS, t] above it
    (:func:`attnrules.evaluation.insertion.feature_tokens`)."""

    def __init__(self, model: HookedTransformer, input_sae: InputSAE, bos: int) -> None:
        self.model, self.input_sae, self.bos = model, input_sae, bos
        self.mode = "paper" if input_sae.layer == 0 else "activation"
        self.known: dict[int, Optional[int]] = {}

    def prepare(self, features) -> None:
        """Look up ``features`` (above layer 0: every feature at once, since each lookup is one pass
        over the whole vocabulary through the model and the SAE)."""
        missing = sorted({int(f) for f in features if f >= 0} - set(self.known))
        if missing and self.mode == "activation":
            missing = range(self.input_sae.n_features)
        if missing:
            self.known.update(feature_tokens(self.model, self.input_sae, missing, mode=self.mode, bos=self.bos))

    def __call__(self, feature: int) -> Optional[int]:
        if feature < 0:
            return None
        self.prepare([feature])
        return self.known[feature]


def bos_token(model: HookedTransformer, tokens: torch.Tensor) -> int:
    """The BOS id: the tokenizer's, else the most common first token of the corpus."""
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    return int(bos) if bos is not None else int(torch.mode(tokens[:, 0]).values)


def beyond_skipgrams(
    model: HookedTransformer, input_sae: InputSAE, output_sae: OutputSAE, circuit: HeadCircuit, feature: int,
    rule_sets: dict[str, SkipgramRuleSet],
    tokens: torch.Tensor, act_max: torch.Tensor, train: TrainExemplars, settings: ExtractSettings,
    describe: InputDescriptions, token_of: TokenLookup, steps: "FeatureSteps",
) -> dict:
    """Absence rules of the feature's top terms (tested by insertion; exact mode clears those the real
    logits reject), REF's distractor check, and the counting detector on the top term: the
    :class:`FeatureResult` fields absence, absence_dropped, paper_distractor, counting, counting_check."""
    name = circuit.feature_name(feature)
    significant = significant_values(circuit, feature)
    out = {"absence": (), "absence_dropped": (), "paper_distractor": None, "counting": None, "counting_check": None}
    paper = steps.run("paper_distractor", lambda: paper_distractor(circuit, feature))
    out["paper_distractor"] = paper
    if not bool(significant.any()):
        steps.notes.append("no key's value score rises above float noise (|V| ≤ 1e-4·|value vector|·|u|): "
                           "no absence or counting rule is sought")
        out["counting_check"] = CountingCheck("not run", "value scores are float noise")
        return out
    firing = [(q, k) for r in rule_sets.values() for q, k, a, v in zip(r.queries.tolist(), r.keys.tolist(),
                                                                    r.attn_score.tolist(), r.value_score.tolist())
              if q >= 0 and k >= 0 and a * v > 0 and bool(significant[k])]
    terms = sorted(set(firing))
    top = SkipgramRuleSet(name, torch.tensor([q for q, _ in terms], dtype=torch.long),
                          torch.tensor([k for _, k in terms], dtype=torch.long), torch.zeros(len(terms)),
                          torch.zeros(len(terms)))

    def absences():
        found = absence_rules(circuit, feature, top, max_distractors=settings.max_distractors, backend=settings.backend)
        token_of.prepare([j for a in found for j in a.distractors[: settings.distractor_checks]])
        return check_distractors(model, output_sae, feature, found, train.tokens, train.positions, train.acts, token_of,
                                 per_term=settings.distractor_checks, exact=settings.exact,
                                 batch_size=settings.batch_size)

    rules = steps.run("absence", absences) or []
    out["absence"] = tuple(a.with_text(describe) for a in rules if a.kept)
    out["absence_dropped"] = tuple(a.with_text(describe) for a in rules if not a.kept)
    if settings.counting and firing:
        q, k = firing[0]  # the top firing term of the first ordering (weights)
        kept = next((a.kept for a in rules if (a.query, a.key) == (q, k)), ())

        def counting():
            token_of.prepare([q, k, *kept[:3]])
            return check_counting(
                model, output_sae, feature, name, tokens, act_max, token_of(q), token_of(k),
                avoid=[t for t in map(token_of, kept[:3]) if t is not None], bos=token_of.bos,
                n_base=settings.counting_bases, min_base=settings.counting_min_bases,
                max_count=settings.counting_max, seed=settings.seed, screen=settings.counting_screen)

        check, rule = steps.run("counting", counting) or (None, None)
        words = token_strings(model)
        out["counting"] = dataclasses.replace(rule, query=q, key=k).with_text(words.__getitem__) if rule is not None else None
        out["counting_check"] = check
    elif settings.counting:
        out["counting_check"] = CountingCheck("not run", "no top term promotes the feature")
    return out


def unseen_keys(circuit: HeadCircuit, feature: int, table: PairTable, train: TrainExemplars,
                describe: InputDescriptions) -> list[UnseenKey]:
    """Candidate keys with a significant positive value that no train positive holds at or before its
    scored position: their pairs get no importance, whatever their weight (e.g. the weaker key of a
    disjunction under REF's top-activating positives)."""
    v = value_scores(circuit, feature)
    significant = significant_values(circuit, feature)
    keys = _first_appearance(table.keys)
    keys = keys[(v[keys] > 0) & significant[keys]]
    acts = train.acts[:, :, keys][train.positive]  # the keys' columns first: no copy of every column
    upto = torch.arange(acts.shape[1])[None, :] <= train.positions[train.positive][:, None]
    seen = ((acts > 0) & upto[:, :, None]).any(dim=(0, 1))
    return [UnseenKey(int(k), describe(int(k)), float(v[k])) for k in keys[~seen].tolist()]


class FeatureSteps:
    """Runs one feature's steps: a step that raises is recorded as a :class:`StepError` and gives None,
    so one feature's failure never aborts the head."""

    def __init__(self) -> None:
        self.errors: list[StepError] = []
        self.notes: list[str] = []

    def run(self, step: str, fn: Callable[[], object]):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - recorded in the feature's results, the run goes on
            self.errors.append(StepError(step, f"{type(error).__name__}: {error}"))
            return None


def exhaustive_pairs(
    circuit: HeadCircuit, feature: int, train: tuple[torch.Tensor, torch.Tensor], k: int, backend: str,
    describe: InputDescriptions, by_weight: Optional[PairTable] = None,
) -> list[PairRecord]:
    """The k best of all n_in × n_in pairs by A×V and by |importance| (surrogate over all features);
    ``by_weight``: the A×V ranking when already made (:func:`pairs_by_weight`, for a head's features at once)."""
    k = min(k, circuit.n_inputs**2)
    if by_weight is None:
        by_weight = rank_all_pairs(circuit, feature, k, backend=backend)
    by_importance = rank_all_pairs_by_importance(circuit, feature, *train, k, backend=backend)
    rows = []
    no_offsets = [None] * k
    for ranking, q, kk, score, offsets in (
        ("weights_all_pairs", by_weight.queries, by_weight.keys, by_weight.score,
         no_offsets if by_weight.offsets is None else by_weight.offsets.tolist()),
        ("importance_all_pairs", by_importance.query_idx, by_importance.key_idx, by_importance.scores, no_offsets),
    ):
        for rank, (qi, ki, si, oi) in enumerate(zip(q.tolist(), kk.tolist(), score.tolist(), offsets)):
            rows.append(PairRecord(ranking, rank, qi, ki, si, describe(qi), describe(ki), oi))
    return rows


def pairs_by_weight(circuit: HeadCircuit, features: list[int], settings: ExtractSettings) -> dict[int, PairTable]:
    """The exhaustive A×V ranking of every feature in ``features`` from one many-feature pass
    (:func:`~attnrules.scoring.rank_all_pairs_many`: the attn-score table made once for the head; each
    ranking is ``rank_all_pairs``'s bit for bit). Empty on a rotary head (ranked per feature, at each pair's
    best offset) or when no exhaustive ranking is asked."""
    if not features or settings.exhaustive_k <= 0 or circuit.rotary is not None:
        return {}
    k = min(settings.exhaustive_k, circuit.n_inputs**2)
    return {t.feature: t for t in rank_all_pairs_many(circuit, features, k, backend=settings.backend)}


def head_circuit(model: HookedTransformer, input_sae: InputSAE, output_sae: OutputSAE, seq_len: int,
                 settings: ExtractSettings, notes: list[str]) -> HeadCircuit:
    """The head's circuit as the settings ask: on a rotary head, scored over ``settings.offsets`` (default:
    every offset the corpus shows, 0 … seq_len − 1) up to ``settings.max_offset``, within the head's
    sliding window; or offset-blind (``settings.offset_blind``, for comparison)."""
    circuit = HeadCircuit.from_model(model, input_sae, output_sae)
    if circuit.rotary is None:
        if settings.offsets is not None or settings.max_offset is not None or settings.offset_blind:
            notes.append("offsets, max_offset and offset_blind apply to rotary heads only: not used (absolute positions)")
        return circuit
    if settings.offset_blind:
        notes.append("offset_blind: pairs scored without offsets (A = A_0), wrong for this rotary head (comparison only)")
        return circuit.offset_blind()
    wanted = torch.tensor(settings.offsets if settings.offsets is not None else range(seq_len))
    if settings.max_offset is not None:
        wanted = wanted[wanted <= settings.max_offset]
    if wanted.numel() == 0:
        raise ValueError(f"no offset is left to score: offsets {settings.offsets} above max_offset {settings.max_offset}")
    return circuit.with_offsets(wanted)


def sae_metadata(sae: InputSAE | OutputSAE) -> dict:
    """What the results record of an SAE: architecture, release, id, normalisation (None when unknown)."""
    return {key: getattr(sae, key, None) for key in ("architecture", "release", "sae_id", "normalization",
                                                      "scaling_factor", "apply_b_dec_to_input")}


def _corpus_stats(model: HookedTransformer, input_sae: InputSAE, tokens: torch.Tensor, folder: Optional[HeadFolder],
                  stats: Optional[CorpusStats], settings: ExtractSettings, progress: bool) -> CorpusStats:
    """The layer's corpus statistics: as given (measured on the scan pass), else cached in the folder, else
    from a pass of their own (a scan cached by an older run); saved to the folder when not read from it."""
    key = stats_key(folder.inputs, settings.corpus_stats_sequences) if folder is not None else None
    if stats is None and folder is not None:
        cached = load_stats(folder.path, key)
        if cached is not None:
            return cached
    if stats is None:
        stats = measure_corpus(model, input_sae, tokens, batch_size=settings.batch_size, progress=progress,
                               stats_sequences=settings.corpus_stats_sequences)
    if folder is not None:
        save_stats(folder.path, key, stats)
    return stats


def corpus_observers(input_sae: InputSAE, tokens: torch.Tensor, settings: ExtractSettings) -> CorpusObservers:
    """What a corpus pass measures for these settings besides the scan: input-feature statistics on the
    first ``corpus_stats_sequences`` rows, head metrics, the pattern pool when pattern negatives are on,
    and the corpus's input-SAE activations (up to ``corpus_acts_mib``) and, in exact mode, its
    ``hook_resid_pre`` of the layer (up to ``corpus_resid_mib``)."""
    return CorpusObservers(input_sae, tokens, stats_sequences=settings.corpus_stats_sequences,
                           pool_size=settings.pattern_pool if settings.pattern_negatives else None,
                           pool_seed=settings.seed, acts_max_bytes=settings.corpus_acts_mib * 2**20,
                           resid_max_bytes=resid_bytes(settings))


def resid_bytes(settings: ExtractSettings) -> int:
    """The bound of the corpus pass's kept ``hook_resid_pre`` (0: none kept): only exact mode reads it."""
    return settings.corpus_resid_mib * 2**20 if settings.exact else 0


def pattern_pool(model: HookedTransformer, input_sae: InputSAE, tokens: torch.Tensor, stats: CorpusStats,
                 settings: ExtractSettings) -> PatternPool:
    """The head's pattern-negative pool: the one the corpus pass built, else one from a pass of its own."""
    if stats.pool is not None:
        return stats.pool
    return PatternPool.build(model, input_sae, tokens, settings.pattern_pool, seed=settings.seed,
                             batch_size=settings.batch_size)


def kept_summary(store: Optional[SparseActs]) -> Optional[KeptActs]:
    """What the corpus pass kept of the input activations, for :class:`RunInfo` (None: nothing)."""
    return None if store is None else KeptActs(len(store.rows), store.nbytes, store.full)


def used_inputs(results: list[FeatureResult]) -> list[int]:
    """The input features the head's rules name (stored rule terms, absence rules as rendered, REF's
    distractor check, unseen keys), sorted; pseudo-features (negative ids) left out. The exhaustive pairs
    are not counted: on a large SAE they name thousands of features (their rows carry their labels)."""
    used: set[int] = set()
    for f in results:
        used.update(j for r in f.rules for t in r.terms for j in (t.query, t.key))
        used.update(j for a in f.absence for j in (a.query, a.key, *a.kept[:3]))  # as rendered
        used.update(u.key for u in f.unseen_keys)
        if f.paper_distractor is not None:
            d = f.paper_distractor
            used.update(j for j in (d.q, d.k, d.k_) if j is not None)
    return sorted(j for j in used if j >= 0)


def extract_head(
    model: HookedTransformer,
    input_sae: InputSAE,
    output_sae: OutputSAE,
    tokens: torch.Tensor,
    *,
    settings: ExtractSettings = ExtractSettings(),
    out_dir: Optional[Path | str] = None,
    progress: bool = True,
    scan: Optional[FeatureScan] = None,
    overwrite: bool = False,
    inputs: Optional[InputHashes] = None,
    corpus_stats: Optional[CorpusStats] = None,
    token_lookup: Optional[TokenLookup] = None,
    defer_evidence: bool = False,
) -> HeadResult:
    """Run the pipeline on one head (the output SAE's layer and head) over a token corpus. The SAEs
    may be attnrules' containers or sae_lens SAEs (see :func:`attnrules.sources.as_sources`).

    ``out_dir``: the head folder to write (see :mod:`attnrules.pipeline.resume`). It is bound to the
    content hashes of the model, both SAEs, the corpus and the settings: every finished feature is
    saved there at once and the corpus scan is cached, so a rerun with the same inputs resumes (a
    complete folder without failed steps is read back, not recomputed); a folder holding another run's results raises
    :class:`~attnrules.pipeline.resume.RunMismatchError` naming what differs, unless ``overwrite``
    (its run files are removed and the run starts afresh). ``result.run`` says what this call
    computed and what it reused.

    ``scan``: this head's :func:`~attnrules.exemplars.scan_output_features` of ``tokens`` when already
    computed (a sweep scans all heads of a layer in one pass). ``inputs``: the inputs' hashes when
    already computed (a sweep hashes the model and the corpus once). ``corpus_stats``: the layer's
    input-feature statistics and head metrics when already measured on the scan pass (a sweep's);
    otherwise they ride on this head's scan, or are read from the folder (:mod:`attnrules.pipeline.corpus_stats`);
    with them, the pattern-negative pool the pass built. ``token_lookup``: the layer's
    :class:`TokenLookup` (a sweep shares one among the heads of a layer: one vocabulary pass a layer).
    ``defer_evidence``: return the result without its distractor evidence and do not write it (a sweep
    gathers the evidence of a layer's heads in one corpus pass, then completes each with :func:`with_evidence`)."""
    input_sae, output_sae = as_sources(model, input_sae, output_sae)
    if inputs is None:
        inputs = InputHashes.of(model, input_sae, output_sae, tokens, settings)
    folder = HeadFolder(out_dir, inputs) if out_dir is not None else None
    if folder is not None:
        folder.prepare(overwrite=overwrite)
        done = folder.complete()
        if done is not None and not done.metadata.get("failed_steps"):  # failed steps are retried
            return dataclasses.replace(done, run=RunInfo("none", (), tuple(f.name for f in done.features)))
    # The model runs where it lives (e.g. CUDA); the circuit, exemplar activations, rules and
    # evaluation live on the CPU, where the exemplar activations are gathered.
    notes: list[str] = []
    circuit = head_circuit(model, input_sae, output_sae, tokens.shape[1], settings, notes).to("cpu")
    settings = dataclasses.replace(
        settings,
        num_values=_capped("num_values", settings.num_values, circuit.n_inputs, notes),
        num_queries=_capped("num_queries", settings.num_queries, circuit.n_inputs, notes),
        exhaustive_k=_capped("exhaustive_k", settings.exhaustive_k, circuit.n_inputs**2, notes,
                             "the number of (query, key) pairs"),
    )
    scan_state = "given"
    if scan is None:
        scan, scan_state = (folder.load_scan() if folder is not None else None), "cached"
    if scan is None:
        observers = corpus_observers(input_sae, tokens, settings)
        scan = scan_output_features(model, output_sae, tokens, batch_size=settings.batch_size, progress=progress,
                                    observers=observers.observers)
        scan_state, corpus_stats = "computed", observers.result()
    if folder is not None and scan_state != "cached":
        folder.save_scan(scan)
    corpus_stats = _corpus_stats(model, input_sae, tokens, folder, corpus_stats, settings, progress)
    if settings.features is not None:
        features = [circuit.check_feature(f) for f in settings.features]
    else:
        features = sample_features(scan.counts, scan.n_sequences, num_features=settings.num_features,
                                   min_count=settings.min_count, max_count=settings.max_count, seed=settings.seed)
        if not features:
            notes.append(f"no output feature is active in at least {settings.min_count} and at most "
                         f"{settings.max_count or scan.n_sequences - settings.min_count} of the {scan.n_sequences} sequences")
    describe = describe_input_features(model, input_sae, backend=settings.backend, stats=corpus_stats.inputs,
                                       tokens=tokens, labels=settings.input_labels)
    token_of = token_lookup if token_lookup is not None else TokenLookup(model, input_sae, bos_token(model, tokens))
    results: list[FeatureResult] = []
    computed: list[str] = []
    reused: list[str] = []
    # each feature: its result read back, None (skipped), or its exemplars to compute
    todo: list = []
    for g in features:
        name = circuit.feature_name(g)
        cached = folder.load_feature(name) if folder is not None else None
        if cached is not None:
            todo.append(cached)
            continue
        ex = sample_exemplars(scan, g, seq_len=tokens.shape[1], examples_per_bin=settings.examples_per_bin,
                              seed=settings.seed + g, positives=settings.positives)
        if ex is None:
            notes.append(f"{name} skipped: too few active or inactive sequences")
        todo.append(ex)
    # the features' columns of the scan, not the scan (0.57 GiB at 50,000 GPT-2-small sequences), from here on
    columns = {g: scan.column(g) for g, ex in zip(features, todo) if isinstance(ex, Exemplars)}
    n_sequences, scan = scan.n_sequences, None
    shared = shared_groups(model, input_sae, output_sae, tokens, todo, settings, known=corpus_stats.acts,
                           resid=corpus_stats.resid)
    head_steps = FeatureSteps()  # head-level steps: failures recorded in metadata["head_errors"]
    pool = None
    if settings.pattern_negatives and any(isinstance(ex, Exemplars) for ex in todo):
        pool = head_steps.run("pattern_pool", lambda: pattern_pool(model, input_sae, tokens, corpus_stats, settings))
    ranked = head_steps.run("pairs_by_weight", lambda: pairs_by_weight(
        circuit, [g for g, ex in zip(features, todo) if isinstance(ex, Exemplars)], settings)) or {}
    started = time.time()
    for i, (g, ex) in enumerate(zip(features, todo)):
        name = circuit.feature_name(g)
        if isinstance(ex, FeatureResult):
            results.append(ex)
            reused.append(name)
            continue
        if ex is None:
            continue
        if progress:  # with the time so far and, from the features computed, an estimate of the time left
            took, left = time.time() - started, sum(isinstance(x, Exemplars) for x in todo[i:])
            eta = f", about {took / len(computed) * left:.0f}s left" if computed else ""
            print(f"[{i + 1}/{len(features)}] {name} ({took:.0f}s{eta})", file=sys.stderr)
        result = extract_one(model, input_sae, output_sae, circuit, g, tokens, columns[g], ex, settings, describe, token_of,
                             shared=shared(i), pool=pool, by_weight=ranked.get(g), resid=corpus_stats.resid)
        computed.append(name)
        if folder is not None and not result.errors:  # a feature with a failed step is retried on resume
            folder.save_feature(result)
        results.append(result)
    flagged = sum(f.paper_distractor is not None and f.paper_distractor.has_distractor for f in results)
    metadata = {"settings": plain(dataclasses.asdict(settings)), "notes": notes, "n_sequences": n_sequences,
                "seq_len": tokens.shape[1], "n_inputs": circuit.n_inputs, "n_outputs": circuit.n_outputs,
                "distractor_share": flagged / len(results) if results else None,
                "features_with_failures": [f.name for f in results if f.errors], "inputs": inputs.to_json()}
    metadata["saes"] = {role: sae_metadata(sae) for role, sae in (("input", input_sae), ("output", output_sae))}
    head_metrics = corpus_stats.heads.get(circuit.head)
    metadata["head_metrics"] = head_metrics.to_json() if head_metrics is not None else None
    metadata["input_features"] = {str(j): describe.record(j) for j in used_inputs(results)}
    if settings.exact:
        groups = head_steps.run("exact_logit_groups", lambda: reconstruct(model, input_sae, circuit.head, tokens[:16]).summary())
        if groups is not None:
            metadata["exact_logit_groups"] = groups.reset_index().to_dict(orient="records")
    metadata["head_errors"] = [e.to_json() for e in head_steps.errors]
    metadata["failed_steps"] = sum(len(f.errors) for f in results) + len(head_steps.errors)
    result = HeadResult(circuit.layer, circuit.head, tuple(results), metadata, (),
                        RunInfo(scan_state, tuple(computed), tuple(reused), kept_summary(corpus_stats.acts)))
    if defer_evidence:
        return result
    evidence = head_steps.run("distractor_evidence", lambda: distractor_evidence(
        model, input_sae, [(output_sae, result)], tokens, settings, progress, corpus_stats.acts)[0])
    return with_evidence(result, evidence, head_steps.errors[len(metadata["head_errors"]):], out_dir)


def with_evidence(result: HeadResult, evidence: Optional[list[DistractorEvidence]], errors: list[StepError],
                  out_dir: Optional[Path | str]) -> HeadResult:
    """``result`` completed with its distractor evidence (None: the step failed, with ``errors`` saying
    why), written to ``out_dir`` (when given) with its completion marker."""
    metadata = {**result.metadata, "head_errors": result.metadata["head_errors"] + [e.to_json() for e in errors],
                "failed_steps": result.metadata["failed_steps"] + len(errors)}
    result = dataclasses.replace(result, metadata=metadata, distractors=tuple(evidence or ()))
    if out_dir is not None:
        result.write(out_dir)
    return result


def extract_one(
    model: HookedTransformer, input_sae: InputSAE, output_sae: OutputSAE, circuit: HeadCircuit, g: int,
    tokens: torch.Tensor, column: FeatureColumn, ex,
    settings: ExtractSettings, describe: InputDescriptions, token_of: TokenLookup,
    shared: Optional[SharedPasses] = None, pool: Optional[PatternPool] = None, by_weight: Optional[PairTable] = None,
    resid: Optional[ResidStore] = None,
) -> FeatureResult:
    """Every step for one output feature; a step that fails is recorded in the result (step, error).
    ``shared``: the head's hooks of this feature's exemplars, already computed (:mod:`attnrules.pipeline.activations`);
    None: the steps run their own forward passes. ``pool``: the head's sample for pattern negatives
    (:mod:`attnrules.evaluation.negatives`; None: REF's evaluation only, no combined sets or pattern negatives).
    ``by_weight``: its exhaustive A×V ranking, made for the head (:func:`pairs_by_weight`; None: made here).
    ``column``: the feature's column of the head's scan. ``resid``: the layer input the corpus pass kept
    (the exemplar views run the head's block alone from it)."""
    steps = FeatureSteps()
    name = circuit.feature_name(g)
    batch = max(1, settings.batch_size // 8)

    def acts_of(s: str) -> torch.Tensor:
        rows = getattr(ex, s).sequence
        if shared is not None and shared.covers(rows):
            return shared.input_activations(rows)
        return input_activations(model, input_sae, tokens[rows], batch_size=batch)

    acts = steps.run("input_activations", lambda: {s: acts_of(s) for s in ("train", "val")})
    if acts is None:
        return FeatureResult(g, name, len(ex.train), len(ex.val), errors=tuple(steps.errors))
    train = TrainExemplars(tokens[ex.train.sequence], ex.train.position, acts["train"], ex.train.positive)
    runner = shared.runner(ex.train.sequence) if shared is not None and shared.covers(ex.train.sequence, exact=True) else None

    def exact_terms(queries: torch.Tensor, keys: torch.Tensor) -> ExactTerms:
        return exact_importance_terms(model, input_sae, output_sae, g, queries, keys, tokens=train.tokens,
                                      positions=train.positions, batch_size=batch, runner=runner)

    firing = float(output_sae.firing_threshold[g]) if settings.prediction_threshold == "sae" else None
    def rules_step():
        made = rule_builders(circuit, g, (train.acts, train.positions), settings,
                             exact_terms if settings.exact else None, gate=output_sae.surrogate_gate(g))
        return (*extract_feature(circuit, g, (train.acts, train.positions), (acts["val"], ex.val.position, ex.val.act_max),
                                 settings, prediction_threshold=firing, builders=made), made[0])

    found = steps.run("rules", rules_step)
    if found is None:
        return FeatureResult(g, name, len(ex.train), len(ex.val), errors=tuple(steps.errors))
    rule_sets, points, table, builders = found
    rules = tuple(RuleSetView.from_rules(r, describe) for r in rule_sets.values())
    extra = beyond_skipgrams(model, input_sae, output_sae, circuit, g, rule_sets, tokens, column.act_max, train,
                             settings, describe, token_of, steps)
    conditions = Conditions.of(extra["absence"], extra["counting"])
    pairs = []
    if settings.exhaustive_k > 0:
        pairs = steps.run("exhaustive_pairs", lambda: exhaustive_pairs(
            circuit, g, (train.acts, train.positions), settings.exhaustive_k, settings.backend, describe,
            by_weight)) or []
    unseen = steps.run("unseen_keys", lambda: unseen_keys(circuit, g, table, train, describe)) or []
    # the last use of the train activations: released before the pattern negatives' are built, so a
    # feature holds at most two [N, T, n_in] tensors at a time (0.59 GiB each on GPT-2-small shapes)
    train = dataclasses.replace(train, acts=None)
    del acts["train"]
    val_set = EvaluationSet("random", ex.val.sequence, ex.val.position, ex.val.act_max, acts["val"])
    beyond = None if pool is None else steps.run("hard_negatives", lambda: evaluate_beyond_random(
        builders, conditions, list(rule_sets.values()), val_set, ex.val.positive, n_terms_grid(settings.max_rules),
        pool=pool, feature=g, act_max=column.act_max,
        exclude=torch.cat([ex.train.sequence, ex.val.sequence, ex.test.sequence]), count=settings.examples_per_bin,
        seed=settings.seed + g, threshold=settings.threshold, prediction_threshold=firing,
        aggregation=aggregation_of(settings)))
    points = points + (beyond.points if beyond is not None else [])
    predictions = [Predictions.from_points("random", ex.val.sequence, ex.val.position, ex.val.act_max, points)]
    pattern_views = []
    fire_above = settings.threshold if firing is None else firing
    if beyond is not None and beyond.pattern_set is not None:
        p = beyond.pattern_set
        predictions.append(Predictions.from_points("pattern", p.sequence, p.position, p.act_max, points,
                                                   beyond.pattern.n_candidates))
        first = int(ex.val.positive.sum())  # the pattern negatives follow the val positives
        shown_negatives = torch.arange(first, len(p.sequence))[: settings.show_exemplars]
        if shown_negatives.numel():
            pattern_views = steps.run("pattern_views", lambda: [
                annotated(v, p.acts[i], rule_sets, conditions, threshold=fire_above, max_offset=circuit.max_offset)
                for v, i in zip(exemplar_views(model, output_sae, g, tokens, p.sequence[shown_negatives],
                                               p.position[shown_negatives], resid=resid), shown_negatives.tolist())]) or []
    top = torch.sort(ex.val.act_max, descending=True, stable=True).indices[: settings.show_exemplars]
    views = steps.run("exemplar_views", lambda: [
        annotated(v, acts["val"][i], rule_sets, conditions, threshold=fire_above, max_offset=circuit.max_offset)
        for v, i in zip(exemplar_views(model, output_sae, g, tokens, ex.val.sequence[top], ex.val.position[top],
                                       resid=resid), top.tolist())]) or [] if top.numel() else []  # show_exemplars=0: none
    deciles = decile_sequences(column.act_max) if settings.show_exemplars else torch.zeros(0, dtype=torch.long)

    def decile_views() -> list:  # one small pass (input activations) and the views' own, over ≤ 10 sequences
        positions = column.act_argmax[deciles].long()
        decile_acts = shared.input_activations(deciles) if shared is not None and shared.covers(deciles) else \
            input_activations(model, input_sae, tokens[deciles], batch_size=batch)
        return [annotated(v, decile_acts[i], rule_sets, conditions, threshold=fire_above, max_offset=circuit.max_offset)
                for i, v in enumerate(exemplar_views(model, output_sae, g, tokens, deciles, positions, resid=resid))]

    decile = steps.run("decile_exemplars", decile_views) or [] if deciles.numel() else []
    return FeatureResult(g, name, len(ex.train), len(ex.val), rules, tuple(SweepRecord.from_point(p) for p in points),
                         tuple(pairs), exemplars=tuple(views),
                         unseen_keys=tuple(unseen), notes=tuple(steps.notes), errors=tuple(steps.errors),
                         pattern_negatives=tuple(pattern_views), predictions=tuple(predictions),
                         histogram=ActivationHistogram.of(column.act_max), decile_exemplars=tuple(decile), **extra)


def shared_groups(
    model: HookedTransformer, input_sae: InputSAE, output_sae: OutputSAE, tokens: torch.Tensor,
    todo: list, settings: ExtractSettings, known: Optional[SparseActs] = None, resid: Optional[ResidStore] = None,
) -> Callable[[int], Optional[SharedPasses]]:
    """For the i-th feature, the shared pass of its group (:mod:`attnrules.pipeline.activations`), built
    when its group is first asked for and dropped when the next group is; None for a feature outside any
    group, or when the group's pass fails or passes the memory bound (the feature then runs its own passes).
    ``known``: the corpus rows' input-SAE activations the corpus pass kept (looked up, not recomputed);
    ``resid``: their ``hook_resid_pre`` of the layer (exact rows run block L alone from it)."""
    index = [i for i, ex in enumerate(todo) if isinstance(ex, Exemplars)]
    groups = group_features([(todo[i].train.sequence, todo[i].val.sequence) for i in index],
                            activations.SHARED_MAX_SEQUENCES)
    group_of = {index[j]: n for n, group in enumerate(groups) for j in group}
    held: dict[int, Optional[SharedPasses]] = {}

    def get(i: int) -> Optional[SharedPasses]:
        n = group_of.get(i)
        if n is None:
            return None
        if n not in held:
            held.clear()  # one group's hooks in memory at a time
            members = [todo[index[j]] for j in groups[n]]
            rows = torch.cat([torch.cat([ex.train.sequence, ex.val.sequence]) for ex in members])
            exact_rows = torch.cat([ex.train.sequence for ex in members]) if settings.exact else None
            try:
                held[n] = SharedPasses(model, input_sae, output_sae, tokens, rows.tolist(),
                                       None if exact_rows is None else exact_rows.tolist(),
                                       batch_size=max(1, settings.batch_size // 8),
                                       max_bytes=activations.SHARED_MAX_BYTES, known=known, resid=resid)
            except Exception:  # noqa: BLE001 - each feature then runs (and records) its own passes
                held[n] = None
        return held[n]

    return get


def distractor_evidence(
    model: HookedTransformer, input_sae: InputSAE, heads: list[tuple[OutputSAE, HeadResult]], tokens: torch.Tensor,
    settings: ExtractSettings, progress: bool, known: Optional[SparseActs] = None,
) -> list[list[DistractorEvidence]]:
    """For each head of the input SAE's layer (its output SAE and results), the evidence of its features
    with a REF distractor key: natural prevalence over the corpus (one pass shared by all the heads; with
    ``known``, the corpus's kept input activations, over the sequences with a hit only) and
    counterfactual insertion of the distractor's token into its no-distractor examples (§6.2–6.3)."""
    flagged = [(i, sae, f) for i, (sae, result) in enumerate(heads) for f in result.features
               if f.paper_distractor is not None and f.paper_distractor.has_distractor]
    # natural_prevalence takes (feature, key, distractor, query)
    checks = [(f.feature, f.paper_distractor.k, f.paper_distractor.k_, f.paper_distractor.q) for _, _, f in flagged]
    prevalences = natural_prevalence(model, input_sae, [sae for _, sae, _ in flagged], tokens, checks,
                                     batch_size=settings.batch_size, progress=progress, known=known)
    evidence: list[list[DistractorEvidence]] = [[] for _ in heads]
    for (i, output_sae, f), prevalence in zip(flagged, prevalences):
        insertion = None
        token = insertion_token(model, input_sae, prevalence.distractor)
        clean = [e for e in prevalence.examples if e["kind"] == "no_distractor" and e["act_out"] > 0]
        if token is not None and clean:
            rows = torch.tensor([e["idx"] for e in clean])
            positions = torch.tensor([e["q_pos"] for e in clean])
            insertion = counterfactual_insertion(model, output_sae, f.feature, tokens[rows], positions, token,
                                                 counts=settings.insertion_counts)
        evidence[i].append(DistractorEvidence.from_json({**prevalence.to_dict(), "feature": f.name,
                                                         "insertion": insertion}))
    return evidence
