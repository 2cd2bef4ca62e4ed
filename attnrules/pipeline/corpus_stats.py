"""What the corpus pass measures beside the output-feature scan, and its cache in a head folder.

The scan (:func:`attnrules.exemplars.scan_heads`) runs the model to the head's layer over the whole
corpus; two observers ride on it (no forward pass of their own): the input-feature statistics the rule
text is written from (:class:`~attnrules.rules.descriptions.InputStatsObserver`) and every head's
attention metrics (:class:`~attnrules.evaluation.head_metrics.HeadMetricsObserver`). A head folder keeps
them in ``corpus_stats.pt``, keyed by the content hashes of the model, input SAE and corpus, so a
resumed run reads them back; a folder whose scan was cached without them (an older run) gets them from
one pass of their own (:func:`measure_corpus`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from attnrules.evaluation.head_metrics import HeadMetrics, HeadMetricsObserver
from attnrules.files import write_torch
from attnrules.rules.descriptions import InputFeatureStats, InputStatsObserver
from attnrules.sources.runner import run_batches

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import InputSAE

STATS_FILE = "corpus_stats.pt"


@dataclass(frozen=True)
class CorpusStats:
    """One layer's corpus statistics: its input features' and its heads' attention metrics."""

    inputs: InputFeatureStats
    heads: dict[int, HeadMetrics]


class CorpusObservers:
    """The observers of one layer's corpus pass; :meth:`result` once the pass is over."""

    def __init__(self, input_sae: InputSAE, tokens: torch.Tensor) -> None:
        self.inputs = InputStatsObserver(input_sae)
        self.heads = HeadMetricsObserver(input_sae.layer, tokens)
        self.observers = [self.inputs, self.heads]

    def result(self) -> CorpusStats:
        return CorpusStats(self.inputs.result(), self.heads.result())


def measure_corpus(model: HookedTransformer, input_sae: InputSAE, tokens: torch.Tensor, *, batch_size: int = 64,
                   progress: bool = False) -> CorpusStats:
    """The statistics from a pass of their own (blocks 0..layer over the corpus)."""
    observers = CorpusObservers(input_sae, tokens)
    names = [h for o in observers.observers for h in o.hooks]
    for rows, cache in run_batches(model, tokens, input_sae.layer, names, batch_size=batch_size,
                                   desc="corpus statistics", progress=progress):
        for observer in observers.observers:
            observer.observe(rows, cache)
    return observers.result()


def stats_key(inputs) -> dict:
    """What the statistics depend on: model, input SAE and corpus (from an :class:`InputHashes`)."""
    return {"model": inputs.model, "input_sae": inputs.input_sae, "corpus": inputs.corpus}


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
