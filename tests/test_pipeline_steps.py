"""One feature's failing step is recorded in its results and the run goes on; resume retries it."""
import json

import pytest

import attnrules.pipeline.extract as pipeline
from attnrules.pipeline import ExtractSettings, extract_head
from attnrules.pipeline.results import StepError


def test_a_failing_step_is_recorded_and_the_run_completes(toy, monkeypatch, tmp_path):
    real_counting, real_rules = pipeline.check_counting, pipeline.extract_feature

    def counting(model, output_sae, feature, *args, **kwargs):
        if feature == 2:
            raise RuntimeError("injected counting failure")
        return real_counting(model, output_sae, feature, *args, **kwargs)

    def rules(circuit, feature, *args, **kwargs):
        if feature == 3:
            raise ValueError("injected rules failure")
        return real_rules(circuit, feature, *args, **kwargs)

    monkeypatch.setattr(pipeline, "check_counting", counting)
    monkeypatch.setattr(pipeline, "extract_feature", rules)
    settings = ExtractSettings(features=(0, 1, 2, 3), max_rules=8, exhaustive_k=5, show_exemplars=1, exact=False)
    result = extract_head(toy.model, toy.input_sae, toy.output_saes[0], toy.corpus(1500), settings=settings,
                          out_dir=tmp_path, progress=False)
    by_name = {f.name: f for f in result.features}
    assert sorted(by_name) == ["L0H0.0", "L0H0.1", "L0H0.2", "L0H0.3"]
    assert by_name["L0H0.2"].errors == (StepError("counting", "RuntimeError: injected counting failure"),)
    assert by_name["L0H0.2"].rule_set("weights").terms and by_name["L0H0.2"].counting_check is None
    assert by_name["L0H0.3"].errors == (StepError("rules", "ValueError: injected rules failure"),)
    assert by_name["L0H0.3"].rules == () and by_name["L0H0.3"].sweep == ()
    assert not by_name["L0H0.1"].errors and by_name["L0H0.1"].absence  # the others are complete
    assert result.metadata["failed_steps"] == 2
    assert result.metadata["features_with_failures"] == ["L0H0.2", "L0H0.3"]
    assert "2 failed steps in 2 features" in result.summary()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {f["name"]: f["errors"] for f in saved["features"]}["L0H0.3"][0]["step"] == "rules"
    # only complete features are kept for resume: the failed ones are retried on the next run
    assert sorted(p.stem for p in (tmp_path / "features").glob("*.json")) == ["L0H0.0", "L0H0.1"]
    monkeypatch.setattr(pipeline, "check_counting", real_counting)
    monkeypatch.setattr(pipeline, "extract_feature", real_rules)
    again = extract_head(toy.model, toy.input_sae, toy.output_saes[0], toy.corpus(1500), settings=settings,
                         out_dir=tmp_path, progress=False)
    assert again.metadata["failed_steps"] == 0 and all(f.rules for f in again.features)
    assert again.run.computed == ("L0H0.2", "L0H0.3") and again.run.reused == ("L0H0.0", "L0H0.1")


def test_exhaustive_k_above_the_number_of_pairs_is_capped_with_a_note(toy):
    n_pairs = toy.input_sae.n_features ** 2
    settings = ExtractSettings(features=(0,), max_rules=4, exhaustive_k=n_pairs + 5, show_exemplars=0, exact=False,
                               counting=False)
    with pytest.warns(UserWarning, match=f"exhaustive_k={n_pairs + 5} capped to {n_pairs}"):
        result = extract_head(toy.model, toy.input_sae, toy.output_saes[0], toy.corpus(600), settings=settings,
                              progress=False)
    assert f"exhaustive_k={n_pairs + 5} capped to {n_pairs} (the number of (query, key) pairs)" in result.metadata["notes"]
    assert result.metadata["settings"]["exhaustive_k"] == n_pairs


def test_a_heads_exhaustive_weight_rankings_come_from_one_many_feature_pass(toy, monkeypatch):
    """On a head without rotary positions the A×V rankings of all its features are made in one pass
    (rank_all_pairs_many), none per feature, and they are each feature's own ranking."""
    from attnrules.scoring import rank_all_pairs

    calls = []
    real = pipeline.rank_all_pairs_many
    monkeypatch.setattr(pipeline, "rank_all_pairs", lambda *a, **k: pytest.fail("ranked per feature"))
    monkeypatch.setattr(pipeline, "rank_all_pairs_many", lambda c, fs, *a, **k: calls.append(list(fs)) or real(c, fs, *a, **k))
    settings = ExtractSettings(features=(0, 1), max_rules=4, exhaustive_k=7, counting=False, show_exemplars=0)
    result = extract_head(toy.model, toy.input_sae, toy.output_saes[0], toy.corpus(1500, seed=0), settings=settings,
                          progress=False)
    assert calls == [[0, 1]] and result.metadata["failed_steps"] == 0
    circuit = pipeline.head_circuit(toy.model, toy.input_sae, toy.output_saes[0], 32, settings, [])
    for f in result.features:
        own = rank_all_pairs(circuit, f.feature, 7)
        rows = [p for p in f.pairs if p.ranking == "weights_all_pairs"]
        assert [(p.query, p.key, p.score) for p in rows] == list(zip(own.queries.tolist(), own.keys.tolist(),
                                                                      own.score.tolist()))
