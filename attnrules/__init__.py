"""attnrules: explain the features of transformer attention heads as human-readable rules.

The main objects of every box of the design, at the top level::

    import attnrules
    model = attnrules.load_model("gpt2-small")
    sae_in = attnrules.load_input_sae("gpt2-small-res-jb", layer=5)
    sae_out = attnrules.load_head_sae("checkpoints/", layer=5, head=1)
    result = attnrules.extract_head(model, sae_in, sae_out, tokens, out_dir="out/L5H1")
    again = attnrules.load_results("out/L5H1")

Packages, in the order data flows: :mod:`attnrules.sources` (load and check; the model runner),
:mod:`attnrules.circuit` (one head through SAEs; the exact logit decomposition),
:mod:`attnrules.scoring`, :mod:`attnrules.importance`, :mod:`attnrules.engine` (all-pairs top-k),
:mod:`attnrules.rules`, :mod:`attnrules.exemplars`, :mod:`attnrules.evaluation`,
:mod:`attnrules.pipeline`, :mod:`attnrules.report`, :mod:`attnrules.cli`, :mod:`attnrules.toy`.
"""
from __future__ import annotations

from attnrules.circuit import HeadCircuit, LogitDecomposition, Rotary, reconstruct
from attnrules.engine import OffsetTopK, TopK, dual_topk, offset_topk, pair_topk
from attnrules.evaluation import Metrics, SweepPoint
from attnrules.exemplars import ExemplarView
from attnrules.importance import ExactTerms
from attnrules.pipeline import (
    ExtractSettings,
    FeatureResult,
    HeadResult,
    IncompleteResultsError,
    RunMismatchError,
    extract_head,
    load_results,
    train_head_saes,
)
from attnrules.rules import AbsenceRule, CountingRule, DistractorCheck, SkipgramRuleSet
from attnrules.sources import (
    InputSAE,
    OutputSAE,
    SourceUnavailableError,
    load_head_sae,
    load_input_sae,
    load_layer_z_sae,
    load_model,
    load_output_sae,
    load_sae,
    process_model,
)

__version__ = "0.1.0"

__all__ = [
    "AbsenceRule", "CountingRule", "DistractorCheck", "ExactTerms", "ExemplarView", "ExtractSettings",
    "FeatureResult", "HeadCircuit", "HeadResult", "IncompleteResultsError", "InputSAE", "LogitDecomposition", "Metrics", "OffsetTopK",
    "OutputSAE", "Rotary", "RunMismatchError", "SkipgramRuleSet", "SourceUnavailableError", "SweepPoint", "TopK", "dual_topk", "extract_head",
    "load_head_sae", "load_input_sae", "load_layer_z_sae", "load_model", "load_output_sae", "load_results", "load_sae",
    "offset_topk", "pair_topk", "process_model", "train_head_saes",
    "reconstruct",
]
