"""One head end to end (:mod:`~attnrules.pipeline.extract`), its settings and typed results
(:mod:`~attnrules.pipeline.results`), resuming and reading results back
(:mod:`~attnrules.pipeline.resume`), the workloads the CLI runs, and whole-model sweeps
(:mod:`~attnrules.pipeline.sweep`)."""
from attnrules.pipeline.extract import exhaustive_pairs, extract_feature, extract_head
from attnrules.pipeline.results import FeatureResult, HeadResult, RunInfo
from attnrules.pipeline.resume import IncompleteResultsError, InputHashes, RunMismatchError, load_results
from attnrules.pipeline.settings import ExtractSettings

__all__ = ["ExtractSettings", "FeatureResult", "HeadResult", "IncompleteResultsError", "InputHashes", "RunInfo",
           "RunMismatchError", "exhaustive_pairs", "extract_feature", "extract_head", "load_results"]
