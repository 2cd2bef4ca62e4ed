"""Typed results: every record round-trips through JSON, a head folder reads back into the very
HeadResult the run returned, and the (queries, keys) order of the pipeline's own functions."""
import dataclasses
import json
import math

import pandas as pd
import pytest
import torch

import attnrules.pipeline.extract as pipeline
from attnrules.pipeline import ExtractSettings, extract_feature, extract_head, load_results
from attnrules.pipeline.results import (
    FeatureResult,
    HeadResult,
    RuleSetView,
    RuleTerm,
    StepError,
    SweepRecord,
)
from attnrules.records import Record
from attnrules.rules.absence import AbsenceRule, DistractorCheck
from attnrules.rules.counting import CountingRule, CountResponse

SETTINGS = ExtractSettings(features=(0, 1), max_rules=8, exhaustive_k=4, show_exemplars=2, show_terms=4)


@pytest.fixture(scope="module")
def extracted(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("extract") / "L0H0"
    result = extract_head(toy.model, toy.input_sae, toy.output_saes[0], toy.corpus(1500), settings=SETTINGS,
                          out_dir=out, progress=False)
    return result, out


def _records(value):
    """Every Record inside ``value``."""
    if isinstance(value, Record):
        yield value
        for f in dataclasses.fields(value):
            yield from _records(getattr(value, f.name))
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _records(v)


def test_load_results_gives_back_the_returned_result(extracted):
    result, out = extracted
    assert load_results(out) == result
    assert load_results(out.parent) == {(0, 0): result}  # a folder of head folders
    back = load_results(out)
    assert back.run == result.run and back.run.computed == ("L0H0.0", "L0H0.1")
    assert [f.name for f in back.features] == ["L0H0.0", "L0H0.1"]


def test_every_record_round_trips_and_is_typed(extracted):
    result, _ = extracted
    text = json.dumps(result.to_json(), allow_nan=False)  # JSON-ready: no NaN, no tensors
    assert HeadResult.from_json(json.loads(text)) == result
    kinds = set()
    for record in _records(result):
        kinds.add(type(record).__name__)
        assert type(record).from_json(json.loads(json.dumps(record.to_json()))) == record
        assert isinstance(record.to_frame(), pd.DataFrame)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, dataclasses.fields(record)[0].name, None)
        for f in dataclasses.fields(record):
            value = getattr(record, f.name)
            assert not isinstance(value, (list, torch.Tensor)), (type(record).__name__, f.name)
            if isinstance(value, dict):
                assert type(record) is HeadResult and f.name == "metadata"
    assert {"FeatureResult", "RuleSetView", "RuleTerm", "SweepRecord", "PairRecord", "AbsenceRule",
            "DistractorCheck", "PaperDistractor", "ExemplarView", "DistractorEvidence",
            "InsertionResult", "PrevalenceExample", "CountingCheck"} <= kinds
    f = result.feature("L0H0.1")
    assert f.rule_set("weights").text[0].startswith("[http] … [com] → L0H0.1")
    top = f.rule_set("weights").terms[0]
    assert (top.query_desc, top.key_desc) == ("com", "http")
    assert isinstance(f.absence[0], AbsenceRule) and f.absence[0].text.endswith("unless [twitter]")
    assert f.paper_distractor.has_distractor and result.distractors[0].feature == "L0H0.1"
    with pytest.raises(KeyError, match="no 'nope' rules"):
        f.rule_set("nope")


def test_results_json_keeps_its_content(extracted):
    result, out = extracted
    saved = json.loads((out / "results.json").read_text())
    assert saved == result.to_json()
    feature = saved["features"][1]
    assert set(feature["rules"]) == {"weights", "importance", "exact"}
    assert set(feature["rules"]["weights"]) == {"method", "key_power", "terms", "text"}
    assert {"query", "key", "query_desc", "key_desc", "rank"} <= set(feature["rules"]["weights"]["terms"][0])
    assert "weight" in feature["rules"]["exact"]["terms"][0] and "weight" not in feature["rules"]["weights"]["terms"][0]
    assert {"method", "num_rules", "num_terms", "f1", "spearman"} <= set(feature["sweep"][0])
    absence = feature["absence"][0]
    assert {"kept", "status", "text", "checks", "distractors"} <= set(absence)
    assert feature["paper_distractor"]["has_distractor"] is True
    assert "share_with_distractor" in saved["distractors"][0]
    assert saved["metadata"]["inputs"].keys() == {"model", "input_sae", "output_sae", "corpus", "settings"}
    summary = result.summary()
    assert "[http] … [com] → L0H0.1 unless [twitter]" in summary and "Mean precision / recall / F1" in summary


def test_nan_is_none_and_equality_holds():
    point = SweepRecord("weights", 4, 4, 1, 0, 0, 1, 1.0, 1.0, 1.0, math.nan, float("nan"))
    assert point.spearman is None and point.pvalue is None
    assert point.to_json()["spearman"] is None
    assert SweepRecord.from_json(json.loads(json.dumps(point.to_json()))) == point
    check = DistractorCheck(5, None, 0, *(float("nan"),) * 6, "untested")
    assert check.mean_act_with is None and check.kept
    term = RuleTerm(0, -2, 3, 1.5, float("nan"), "any query, via b_Q", "x")
    assert term.value_score is None and "weight" not in term.to_json()
    # lists and numpy / torch scalars are stored as tuples and plain numbers
    evidence = CountResponse([[1, 0], [2, 0]], [torch.tensor(0.5).item(), 1], (1.0, 1.0), 64)
    assert evidence.counts == ((1, 0), (2, 0)) and evidence.mean_act == (0.5, 1.0)
    rule = CountingRule("L0H1.0", "threshold", 3, 4, None, 2, evidence.to_json(), "count([games]) ≥ 2 → L0H1.0")
    assert rule.evidence == evidence
    feature = FeatureResult(0, "L0H0.0", 1, 1, errors=[{"step": "rules", "error": "boom"}])
    assert feature.errors == (StepError("rules", "boom"),)
    assert FeatureResult.from_json(feature.to_json()) == feature


def test_counting_frame_cells_are_json_lists():
    evidence = CountResponse(((1, 0), (2, 0)), (0.0, 0.5), (0.0, 1.0), 64)
    rule = CountingRule("L0H1.0", "threshold", 3, 4, None, 2, evidence, "count([games]) ≥ 2 → L0H1.0")
    head = HeadResult(0, 1, (FeatureResult(0, "L0H1.0", 10, 10, counting=rule),))
    frame = pd.read_csv(pd.io.common.StringIO(head.counting_frame().to_csv(index=False)))
    assert json.loads(frame.loc[0, "counts"]) == [[1, 0], [2, 0]] and json.loads(frame.loc[0, "mean_act"]) == [0.0, 0.5]


def test_rule_set_view_keeps_order_and_text(extracted):
    result, _ = extracted
    view = result.feature("L0H0.0").rule_set("importance")
    assert isinstance(view, RuleSetView) and view.method == "importance" and view.key_power == 1
    assert [t.rank for t in view.terms] == list(range(len(view.terms))) and len(view.text) == len(view.terms)
    assert view.to_frame()["method"].eq("importance").all()


def test_extract_feature_takes_queries_then_keys(toy, monkeypatch):
    """extract_feature's exact callable and the importance helpers get (queries, keys), the engine's order."""
    seen = {}

    class Stop(Exception):
        pass

    def exact(queries, keys):
        seen["queries"], seen["keys"] = queries, keys
        raise Stop

    real = pipeline.paper_importance

    def importance(circuit, feature, queries, keys, *args, **kwargs):
        seen["importance"] = (queries, keys)
        return real(circuit, feature, queries, keys, *args, **kwargs)

    monkeypatch.setattr(pipeline, "paper_importance", importance)
    circuit = toy.circuit(0)
    table = pipeline.candidate_table(circuit, 0, num_values=10, num_queries=10)
    acts = torch.rand(4, toy.seq_len, circuit.n_inputs)
    positions = torch.tensor([3, 4, 5, 6])
    settings = ExtractSettings(num_values=10, num_queries=10, max_rules=4)
    with pytest.raises(Stop):
        extract_feature(circuit, 0, (acts, positions), (acts, positions, torch.rand(4)), settings, exact)
    assert torch.equal(seen["queries"], pipeline._first_appearance(table.queries))
    assert torch.equal(seen["keys"], pipeline._first_appearance(table.keys))
    assert seen["importance"][0] is seen["queries"] and seen["importance"][1] is seen["keys"]
