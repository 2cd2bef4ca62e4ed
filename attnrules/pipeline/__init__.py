"""One head end to end (:mod:`~attnrules.pipeline.extract`), its settings and results, the workloads
the CLI runs, and whole-model sweeps (:mod:`~attnrules.pipeline.sweep`)."""
from attnrules.pipeline.extract import exhaustive_pairs, extract_feature, extract_head
from attnrules.pipeline.results import FeatureResult, HeadResult
from attnrules.pipeline.settings import ExtractSettings

__all__ = ["ExtractSettings", "FeatureResult", "HeadResult", "exhaustive_pairs", "extract_feature", "extract_head"]
