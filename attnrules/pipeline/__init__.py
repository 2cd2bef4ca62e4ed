"""One head end to end (:mod:`~attnrules.pipeline.extract`), its settings and typed results
(:mod:`~attnrules.pipeline.results`), resuming and reading results back
(:mod:`~attnrules.pipeline.resume`), the workloads the CLI runs, whole-model sweeps
(:mod:`~attnrules.pipeline.sweep`) and per-head output SAEs trained on demand (:mod:`~attnrules.pipeline.train`)."""
from attnrules.pipeline.extract import exhaustive_pairs, extract_feature, extract_head
from attnrules.pipeline.results import FeatureResult, HeadResult, RunInfo
from attnrules.pipeline.resume import IncompleteResultsError, InputHashes, RunMismatchError, load_results
from attnrules.pipeline.settings import ExtractSettings
from attnrules.pipeline.train import HeadSAETrainSettings, TrainingMismatchError, train_head_saes

__all__ = ["ExtractSettings", "FeatureResult", "HeadResult", "HeadSAETrainSettings", "IncompleteResultsError",
           "InputHashes", "RunInfo", "RunMismatchError", "TrainingMismatchError", "exhaustive_pairs", "extract_feature",
           "extract_head", "load_results", "train_head_saes"]
