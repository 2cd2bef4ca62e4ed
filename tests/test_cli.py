"""The attnrules command on the embedded default, and its errors."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from attnrules.cli import build_parser, main


def test_extract_on_the_toy_writes_results(tmp_path, capsys):
    code = main(["extract", "--head", "0", "--max-rules", "16", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "[If] … [then] → L0H0.0" in printed and "[http] … [com] → L0H0.1" in printed
    assert "Mean precision / recall / F1" in printed and "capped to 81" in printed
    assert "[http] … [com] → L0H0.1 unless [twitter]" in printed
    head_dir = tmp_path / "L0H0"
    results = json.loads((head_dir / "results.json").read_text())
    names = [f["name"] for f in results["features"]]
    assert names == ["L0H0.0", "L0H0.1", "L0H0.2", "L0H0.3"]  # the dead L0H0.4 is never sampled
    metrics = pd.read_csv(head_dir / "metrics.csv")
    assert set(metrics["method"]) == {"weights", "importance", "exact"} and set(metrics["num_rules"]) == {4, 8, 16}
    rules = pd.read_csv(head_dir / "rules.csv")
    assert {"feature", "method", "query", "key", "attn_score", "value_score", "query_desc", "key_desc"} <= set(rules.columns)
    assert results["metadata"]["distractor_share"] == 0.25
    (evidence,) = results["distractors"]
    assert evidence["feature"] == "L0H0.1" and evidence["mean_act_with"] == 0.0 < evidence["mean_act_without"]
    assert evidence["insertion"]["mean_act"][1:] == [0.0, 0.0, 0.0]
    assert pd.read_csv(head_dir / "absence.csv")["text"].tolist() == ["[http] … [com] → L0H0.1 unless [twitter]"]
    pairs = pd.read_csv(head_dir / "pairs.csv")
    top = pairs[(pairs.feature == "L0H0.0") & (pairs["rank"] == 0)].set_index("ranking")
    assert top.loc["weights_all_pairs", "query_desc"] == "then" and top.loc["weights_all_pairs", "key_desc"] == "If"
    assert top.loc["importance_all_pairs", "query_desc"] == "then" and top.loc["importance_all_pairs", "key_desc"] == "If"
    # a rerun reuses the finished features
    (head_dir / "results.json").unlink()
    assert main(["extract", "--head", "0", "--max-rules", "16", "--quiet", "--out", str(tmp_path)]) == 0
    assert json.loads((head_dir / "results.json").read_text()) == results


def test_counting_rule_on_the_counting_head(tmp_path, capsys):
    assert main(["extract", "--head", "1", "--max-rules", "8", "--exhaustive-k", "0", "--quiet", "--out", str(tmp_path)]) == 0
    assert "count([games]) ≥ 2 → L0H1.0" in capsys.readouterr().out
    counting_csv = pd.read_csv(tmp_path / "L0H1" / "counting.csv")
    assert counting_csv["text"].tolist() == ["count([games]) ≥ 2 → L0H1.0"]
    results = json.loads((tmp_path / "L0H1" / "results.json").read_text())
    counting = {f["name"]: f["counting"] for f in results["features"]}
    assert counting["L0H1.0"]["kind"] == "threshold" and counting["L0H1.1"] is None


def test_help_documents_every_option(tmp_path):
    out = subprocess.run([sys.executable, "-m", "attnrules.cli", "--help"], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    parser = build_parser()
    for command in parser._subparsers._group_actions[0].choices.values():
        for action in command._actions:
            for flag in action.option_strings:
                assert flag in out, flag


@pytest.mark.parametrize(
    "argv,message",
    [
        (["extract", "--head", "5"], "the toy model has planted heads"),
        (["extract", "--model", "gpt2-small"], "--layer and --head are required"),
        (["extract", "--model", "gpt2-small", "--layer", "0", "--head", "0"], "--corpus is required"),
        (["extract", "--features", "a,b"], "expected comma-separated integers"),
    ],
)
def test_bad_arguments_are_explained(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    text = str(exc.value) + capsys.readouterr().err
    assert message in text


def test_library_errors_become_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnrules report: error:") and "missing" in err and "Traceback" not in err


def test_no_eligible_feature_is_said(tmp_path, capsys):
    assert main(["extract", "--head", "1", "--min-count", "100000", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0 features" in out and "note: no output feature is active in at least 100000" in out
