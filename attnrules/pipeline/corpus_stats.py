"""What the corpus pass measures beside the output-feature scan, and its cache in a head folder.

The scan (:func:`attnrules.exemplars.scan_heads`) runs the model to the head's layer over the whole
corpus; what rides on it needs no forward pass of its own: the input-feature statistics the rule text
is written from (:class:`~attnrules.rules.descriptions.InputStatsObserver`), every head's attention
metrics (:class:`~attnrules.evaluation.head_metrics.HeadMetricsObserver`), the pattern-negative pool
(:class:`~attnrules.evaluation.negatives.PoolObserver`) and the corpus's input activations kept sparse
(:class:`~attnrules.sparse_acts.SparseActs`), the last three from one input-SAE encode of each row
(:class:`CorpusObservers`). A head folder keeps the statistics and metrics in ``corpus_stats.pt``,
keyed by the content hashes of the model, input SAE and corpus and the rows read, so a resumed run
reads them back (the pool and the kept activations are not cached: a resumed run builds its pool with
a pass and runs its exemplar passes); a folder whose scan was cached without them (an older run) gets
them from one pass of their own (:func:`measure_corpus`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from attnrules.evaluation.head_metrics import HeadMetrics, HeadMetricsObserver
from attnrules.files import write_torch
from attnrules.evaluation.negatives import PatternPool, PoolObserver
from attnrules.resid_store import ResidStore
from attnrules.sparse_acts import SparseActs
from attnrules.rules.descriptions import InputFeatureStats, InputStatsObserver, encoded_chunks
from attnrules.sources.runner import run_batches

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import InputSAE

STATS_FILE = "corpus_stats.pt"


@dataclass(frozen=True)
class CorpusStats:
    """One layer's corpus statistics: its input features' and its heads' attention metrics, and the
    pattern-negative pool and the corpus's input-SAE activations when the pass kept them (neither is
    cached: a resumed run builds its pool again and runs its exemplar passes)."""

    inputs: InputFeatureStats
    heads: dict[int, HeadMetrics]
    pool: Optional[PatternPool] = None
    acts: Optional[SparseActs] = None  # the corpus rows' input-SAE activations, when kept (not cached either)
    resid: Optional[ResidStore] = None  # the corpus rows' hook_resid_pre of the layer, when kept (not cached)


class CorpusObservers:
    """The observers of one layer's corpus pass; :meth:`result` once the pass is over.

    The input-feature statistics read the first ``stats_sequences`` corpus rows (None: all), the
    pattern pool (``pool_size`` random rows, drawn with ``pool_seed``; None: no pool) its rows, and with
    ``acts_max_bytes`` every row's activations are kept sparse (:class:`SparseActs` in a temporary file,
    up to that many bytes; rows past the bound are left to the exemplar passes); the input SAE encodes each row once
    for all of them. With ``resid_max_bytes`` every row's ``hook_resid_pre`` is kept too (:class:`ResidStore`,
    likewise bounded), so that exact-mode exemplar passes start at the layer."""

    def __init__(self, input_sae: InputSAE, tokens: torch.Tensor, *, stats_sequences: Optional[int] = None,
                 pool_size: Optional[int] = None, pool_seed: int = 0, acts_max_bytes: Optional[int] = None,
                 resid_max_bytes: Optional[int] = None) -> None:
        self.sae = input_sae
        self.inputs = InputStatsObserver(input_sae)
        self.heads = HeadMetricsObserver(input_sae.layer, tokens)
        self.pool = PoolObserver(input_sae, tokens, pool_size, seed=pool_seed) if pool_size is not None else None
        self.acts = (SparseActs(tokens.shape[1], input_sae.n_features, max_bytes=acts_max_bytes, on_disk=True)
                     if acts_max_bytes else None)
        self.resid = ResidStore(resid_max_bytes) if resid_max_bytes else None
        self.stats_rows = tokens.shape[0] if stats_sequences is None else min(stats_sequences, tokens.shape[0])
        self.hooks = self.inputs.hooks
        self.observers = [self, self.heads]

    def observe(self, rows: slice, cache: dict) -> None:
        """Encode the batch's rows that the statistics, the pool or the kept activations read, once,
        and hand them over."""
        batch = torch.arange(rows.start, rows.stop)
        if self.resid is not None:
            self.resid.add(batch, cache[self.hooks[0]])
        pooled = self.pool.wanted(rows) if self.pool is not None else batch[:0]
        keeping = self.acts is not None and not self.acts.full
        needed = batch if keeping else torch.unique(torch.cat([batch[batch < self.stats_rows], pooled]))  # sorted
        if not needed.numel():
            return
        resid = cache[self.hooks[0]]
        resid = resid if needed.numel() == batch.numel() else resid[(needed - rows.start).to(resid.device)]
        for start, acts in encoded_chunks(self.sae, resid):
            sequences = needed[start:start + acts.shape[0]]
            if keeping:
                self.acts.add(sequences, acts)
            stats = sequences < self.stats_rows
            if bool(stats.all()):
                self.inputs.add(sequences, acts)
            elif bool(stats.any()):
                self.inputs.add(sequences[stats], acts[stats.to(acts.device)])
            if self.pool is not None:
                pool = torch.isin(sequences, pooled)
                if bool(pool.any()):
                    self.pool.add(sequences[pool], acts if bool(pool.all()) else acts[pool.to(acts.device)])

    def result(self) -> CorpusStats:
        return CorpusStats(self.inputs.result(), self.heads.result(), self.pool.result() if self.pool is not None else None,
                           self.acts, self.resid)


def measure_corpus(model: HookedTransformer, input_sae: InputSAE, tokens: torch.Tensor, *, batch_size: int = 64,
                   progress: bool = False, stats_sequences: Optional[int] = None) -> CorpusStats:
    """The statistics from a pass of their own (blocks 0..layer over the corpus)."""
    observers = CorpusObservers(input_sae, tokens, stats_sequences=stats_sequences)
    names = [h for o in observers.observers for h in o.hooks]
    for rows, cache in run_batches(model, tokens, input_sae.layer, names, batch_size=batch_size,
                                   desc="corpus statistics", progress=progress):
        for observer in observers.observers:
            observer.observe(rows, cache)
    return observers.result()


def stats_key(inputs, stats_sequences: Optional[int]) -> dict:
    """What the statistics depend on: model, input SAE and corpus (from an :class:`InputHashes`) and how
    many of its sequences they read."""
    return {"model": inputs.model, "input_sae": inputs.input_sae, "corpus": inputs.corpus,
            "stats_sequences": stats_sequences}


def save_stats(folder: Path | str, key: dict, stats: CorpusStats) -> Path:
    """``corpus_stats.pt`` in ``folder``, written atomically."""
    return write_torch(Path(folder) / STATS_FILE, {"key": key, "inputs": stats.inputs.to_dict(),
                                                   "heads": {h: m.to_json() for h, m in stats.heads.items()}})


def load_stats(folder: Path | str, key: dict) -> Optional[CorpusStats]:
    """The statistics cached in ``folder`` for these inputs, if any (unreadable or other inputs: None)."""
    path = Path(folder) / STATS_FILE
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("key") != key:
            return None
        return CorpusStats(InputFeatureStats.from_dict(data["inputs"]),
                           {int(h): HeadMetrics.from_json(m) for h, m in data["heads"].items()})
    except Exception:  # noqa: BLE001 - unreadable: measured again
        return None
