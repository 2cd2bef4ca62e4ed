"""The attnrules command on the embedded default, its options (generated from ExtractSettings), and its errors."""
import dataclasses
import json

import pandas as pd
import pytest

from attnrules.cli import build_parser, main, setting_flags, settings_from_args
from attnrules.pipeline import ExtractSettings


def run(argv, capsys):
    """main(argv) as the command runs it: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_extract_on_the_toy_writes_results(tmp_path, capsys):
    code, printed, err = run(["extract", "--head", "0", "--max-rules", "16", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert err == ""  # --quiet: no progress, no notes, no warnings
    assert "[If] … [then] → L0H0.0" in printed and "[http] … [com] → L0H0.1" in printed
    assert "Mean precision / recall / F1" in printed and "capped to 81" not in printed
    assert "[http] … [com] → L0H0.1 unless [twitter]" in printed
    head_dir = tmp_path / "L0H0"
    results = json.loads((head_dir / "results.json").read_text())
    assert results["metadata"]["notes"] == ["num_values=100 capped to 81 (the number of input features)",
                                            "num_queries=100 capped to 81 (the number of input features)"]
    names = [f["name"] for f in results["features"]]
    assert names == ["L0H0.0", "L0H0.1", "L0H0.2", "L0H0.3"]  # the dead L0H0.4 is never sampled
    metrics = pd.read_csv(head_dir / "metrics.csv")
    ref = metrics[metrics["negatives"] == "random"]  # REF's evaluation; "pattern": hard negatives (issue 15)
    assert set(ref["method"]) == {"weights", "importance", "exact", "weights+absence+counting",
                                  "importance+absence+counting", "exact+absence+counting"}
    assert set(metrics["negatives"]) == {"random", "pattern"} and set(metrics["num_rules"]) == {4, 8, 16}
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


# Every ExtractSettings field, the option that sets it (the names README and users rely on) and a
# value other than its default, as typed and as parsed.
OPTIONS = {
    "features": (["--features", "1,3"], (1, 3)),
    "num_features": (["--num-features", "all"], None),
    "min_count": (["--min-count", "7"], 7),
    "max_count": (["--max-count", "900"], 900),
    "examples_per_bin": (["--examples-per-bin", "30"], 30),
    "positives": (["--positives", "quantiles"], "quantiles"),
    "num_values": (["--num-values", "5"], 5),
    "num_queries": (["--num-queries", "6"], 6),
    "max_rules": (["--max-rules", "16"], 16),
    "negative_values": (["--negative-values"], True),
    "absolute": (["--signed"], False),
    "loss_type": (["--loss-type", "post_activation"], "post_activation"),
    "threshold": (["--threshold", "0.25"], 0.25),
    "prediction_threshold": (["--prediction-threshold", "sae"], "sae"),
    "aggregation": (["--aggregation", "kq_max"], "kq_max"),
    "unigram": (["--unigram"], True),
    "pattern_negatives": (["--no-pattern-negatives"], False),
    "pattern_pool": (["--pattern-pool", "64"], 64),
    "corpus_stats_sequences": (["--corpus-stats-sequences", "all"], None),
    "corpus_acts_mib": (["--corpus-acts-mib", "0"], 0),
    "corpus_resid_mib": (["--corpus-resid-mib", "64"], 64),
    "layers_per_pass": (["--layers-per-pass", "2"], 2),
    "offsets": (["--offsets", "0,1,4"], (0, 1, 4)),
    "max_offset": (["--max-offset", "12"], 12),
    "offset_blind": (["--offset-blind"], True),
    "seed": (["--seed", "3"], 3),
    "batch_size": (["--batch-size", "8"], 8),
    "backend": (["--backend", "torch"], "torch"),
    "show_terms": (["--show-terms", "2"], 2),
    "exhaustive_k": (["--exhaustive-k", "0"], 0),
    "max_distractors": (["--max-distractors", "9"], 9),
    "distractor_checks": (["--distractor-checks", "1"], 1),
    "counting": (["--no-counting"], False),
    "counting_max": (["--counting-max", "4"], 4),
    "counting_bases": (["--counting-bases", "32"], 32),
    "counting_min_bases": (["--counting-min-bases", "8"], 8),
    "counting_screen": (["--no-counting-screen"], False),
    "insertion_counts": (["--insertion-counts", "0,2"], (0, 2)),
    "show_exemplars": (["--show-exemplars", "1"], 1),
    "input_labels": (["--input-labels", "labels.csv"], "labels.csv"),
    "exact": (["--no-exact"], False),
}


@pytest.mark.parametrize("command", ["extract", "sweep"])
def test_every_setting_is_an_option_and_the_defaults_are_the_settings(command):
    fields = [f.name for f in dataclasses.fields(ExtractSettings)]
    assert sorted(OPTIONS) == sorted(fields)  # a new setting needs a line here
    parser = build_parser()
    assert settings_from_args(parser.parse_args([command])) == ExtractSettings()
    default = ExtractSettings()
    for name, (argv, value) in OPTIONS.items():
        assert getattr(default, name) != value, name
        got = settings_from_args(parser.parse_args([command, *argv]))
        assert got == dataclasses.replace(default, **{name: value}), name  # that setting and no other
        assert setting_flags()[name] == argv[0]
    everything = [token for argv, _ in OPTIONS.values() for token in argv]
    assert settings_from_args(parser.parse_args([command, *everything])) == ExtractSettings(
        **{name: value for name, (_, value) in OPTIONS.items()})


def test_help_comes_from_the_settings_and_lists_every_option():
    parser = build_parser()
    extract = parser._subparsers._group_actions[0].choices["extract"]
    by_dest = {a.dest: a for a in extract._actions}
    for f in dataclasses.fields(ExtractSettings):
        action = by_dest[f.name]
        assert action.help == f.metadata.get("flag_help", f.metadata["help"]), f.name
        assert action.default == f.default, f.name
        group = next(g for g in extract._action_groups if action in g._group_actions)
        assert group.title == f.metadata["group"], f.name
    text = parser.format_help()  # the epilog holds every command's help
    for command in parser._subparsers._group_actions[0].choices.values():
        for action in command._actions:
            for flag in action.option_strings:
                assert flag in text, flag
    assert "--insertion-counts INSERTION_COUNTS[,...]" in text and "(default: 0,1,2,3)" in text
    assert "{top,quantiles}" in text and "{auto,torch,cpu,triton}" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["extract", "--head", "5"], "the toy model has planted heads L0H0, L0H1 (layer 0) only; got head 5"),
        (["extract", "--layer", "2"], "the toy model has planted heads L0H0, L0H1 (layer 0) only; got layer 2"),
        (["extract", "--model", "gpt2-small"], "--layer and --head are required"),
        (["extract", "--features", "a,b"], "argument --features: expected comma-separated integers, got 'a,b'"),
        (["extract", "--threshold", "x"], "argument --threshold: expected a number, got 'x'"),
        (["extract", "--num-features", "some"], "argument --num-features: expected an int or 'all', got 'some'"),
    ],
)
def test_bad_arguments_are_explained(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert f"attnrules {argv[0]}: error: {message}" in err and "Traceback" not in err


def test_library_errors_become_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnrules report: error:") and "missing" in err and "Traceback" not in err


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run([], capsys)
    assert code == 2 and "attnrules: error: choose a command: extract, sweep or report" in err


def test_no_eligible_feature_is_said_once_unless_quiet(tmp_path, capsys):
    code, out, err = run(["extract", "--head", "1", "--min-count", "100000", "--out", str(tmp_path)], capsys)
    assert code == 0 and "0 features" in out and "note:" not in out
    note = "attnrules extract: note: no output feature is active in at least 100000"
    assert err.count(note) == 1
    code, out, err = run(["extract", "--head", "1", "--min-count", "100000", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0 and "0 features" in out and err == ""
