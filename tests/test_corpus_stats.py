"""The corpus statistics ride on the scan pass, are kept with the run, and are read back on resume."""
import pytest

import attnrules.pipeline.extract as extract_module
from attnrules import ExtractSettings, extract_head
from attnrules.pipeline.corpus_stats import STATS_FILE, measure_corpus
from attnrules.pipeline.resume import SCAN_FILE
from attnrules.toy import build_toy

SETTINGS = ExtractSettings(features=(0,), max_rules=8, exhaustive_k=0, exact=False, counting=False,
                           pattern_negatives=False)


@pytest.fixture(scope="module")
def toy():
    toy = build_toy()
    return toy, toy.corpus(600, seed=2)


def test_statistics_from_the_scan_equal_a_pass_of_their_own_and_resume_reads_them(toy, tmp_path, monkeypatch):
    toy, tokens = toy
    out = tmp_path / "L0H0"
    first = extract_head(toy.model, toy.input_sae, toy.output_saes[0], tokens, settings=SETTINGS, out_dir=out,
                         progress=False)
    assert (out / STATS_FILE).is_file() and first.metadata["head_metrics"]["head"] == 0
    # a separate pass (the fallback for a scan cached without them) measures the same
    own = measure_corpus(toy.model, toy.input_sae, tokens, batch_size=64)
    assert own.heads[0].to_json() == first.metadata["head_metrics"]
    # resumed with the scan and the statistics cached: no pass for them
    (out / "DONE.json").unlink()
    for f in (out / "features").glob("*.json"):
        f.unlink()

    def no_pass(*args, **kwargs):
        raise AssertionError("the statistics were measured again")

    monkeypatch.setattr(extract_module, "measure_corpus", no_pass)
    again = extract_head(toy.model, toy.input_sae, toy.output_saes[0], tokens, settings=SETTINGS, out_dir=out,
                         progress=False)
    assert again.run.scan == "cached" and again.metadata["input_features"] == first.metadata["input_features"]
    # a scan cached without them (an older run): one pass of their own, same result
    monkeypatch.undo()
    (out / STATS_FILE).unlink()
    (out / "DONE.json").unlink()
    assert (out / SCAN_FILE).is_file()
    third = extract_head(toy.model, toy.input_sae, toy.output_saes[0], tokens, settings=SETTINGS, out_dir=out,
                         progress=False)
    assert (out / STATS_FILE).is_file() and third.metadata["head_metrics"] == first.metadata["head_metrics"]
    assert third.metadata["input_features"] == first.metadata["input_features"]
