"""Bad input to the attnrules command, tried as a new user would: each one is a single line
``attnrules <command>: error: ...`` naming the option and what was expected, exit status 2, and
none of them starts the long work (loading the model, the corpus scan, the extraction)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import attnrules.cli as cli
from attnrules.cli import check_backend, main
from attnrules.pipeline.settings import ExtractSettings, InvalidSetting
from test_cli import run as run_command


@pytest.fixture
def no_long_work(monkeypatch):
    """Fail the test if the command gets as far as building a workload or extracting."""
    def started(*args, **kwargs):
        raise AssertionError("the long work started before the bad input was reported")
    for name in ("toy_workload", "pretrained_workload", "extract_head", "sweep"):
        monkeypatch.setattr(cli, name, started)


def run(argv, capsys):
    """(exit status, stderr) of the command (tests/test_cli.py runs it)."""
    code, _, err = run_command(argv, capsys)
    return code, err


def assert_usage_error(code, err, command, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"attnrules {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------
# 2. Settings: checked by ExtractSettings itself, said by the CLI with the option's name


@pytest.mark.parametrize(
    "kwargs,setting,expected",
    [
        ({"threshold": float("nan")}, "threshold", "a finite number"),
        ({"min_count": -1}, "min_count", "an int ≥ 0"),
        ({"counting_max": -1}, "counting_max", "an int ≥ 0"),
        ({"batch_size": 0}, "batch_size", "an int ≥ 1"),
        ({"max_distractors": -2}, "max_distractors", "an int ≥ 0"),
        ({"show_terms": -1}, "show_terms", "an int ≥ 0"),
        ({"exhaustive_k": -1}, "exhaustive_k", "an int ≥ 0"),
        ({"distractor_checks": -1}, "distractor_checks", "an int ≥ 0"),
        ({"counting_bases": 0}, "counting_bases", "an int ≥ 1"),
        ({"counting_min_bases": 0}, "counting_min_bases", "an int ≥ 1"),
        ({"examples_per_bin": 0}, "examples_per_bin", "an int ≥ 1"),
        ({"num_values": 0}, "num_values", "an int ≥ 1"),
        ({"num_queries": 0}, "num_queries", "an int ≥ 1"),
        ({"max_rules": 3}, "max_rules", "an int ≥ 4"),
        ({"loss_type": "mse"}, "loss_type", "one of 'activation', 'post_activation'"),
        ({"positives": "bottom"}, "positives", "one of 'top', 'quantiles'"),
        ({"backend": "cuda"}, "backend", "one of 'auto', 'torch', 'cpu', 'triton'"),
        ({"insertion_counts": (0, -1)}, "insertion_counts", "a non-empty tuple of ints ≥ 0"),
        ({"insertion_counts": ()}, "insertion_counts", "a non-empty tuple of ints ≥ 0"),
        ({"features": (-1,)}, "features", "a non-empty tuple of ints ≥ 0 or None"),
        ({"num_features": 0}, "num_features", "an int ≥ 1 or None"),
        ({"seed": -1}, "seed", "an int ≥ 0"),
        ({"batch_size": 2.5}, "batch_size", "an int ≥ 1"),
        ({"exact": "no"}, "exact", "True or False"),
        ({"max_count": 10}, "max_count", "at least min_count (150) or None"),
        ({"counting_bases": 8}, "counting_min_bases", "at most counting_bases (8)"),
    ],
)
def test_settings_check_themselves(kwargs, setting, expected):
    with pytest.raises(InvalidSetting) as exc:
        ExtractSettings(**kwargs)
    assert exc.value.setting == setting and exc.value.expected == expected
    assert str(exc.value).startswith(f"ExtractSettings.{setting} must be {expected}, got ")


def test_settings_take_lists_and_numpy_ints_as_their_types():
    import numpy as np

    s = ExtractSettings(features=[3, 1], insertion_counts=[0, 2], num_values=np.int64(7), threshold=1)
    assert s.features == (3, 1) and s.insertion_counts == (0, 2) and type(s.num_values) is int
    assert type(s.threshold) is float and hash(s) == hash(ExtractSettings(features=(3, 1), insertion_counts=(0, 2),
                                                                         num_values=7, threshold=1.0))
    assert s.fingerprint() == ExtractSettings(features=(3, 1), insertion_counts=(0, 2), num_values=7,
                                              threshold=1.0).fingerprint()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--threshold", "nan"], "argument --threshold: expected a finite number, got nan"),
        (["--min-count", "-1"], "argument --min-count: expected an int ≥ 0, got -1"),
        (["--counting-max", "-1"], "argument --counting-max: expected an int ≥ 0, got -1"),
        (["--batch-size", "0"], "argument --batch-size: expected an int ≥ 1, got 0"),
        (["--max-distractors", "-1"], "argument --max-distractors: expected an int ≥ 0, got -1"),
        (["--show-terms", "-1"], "argument --show-terms: expected an int ≥ 0, got -1"),
        (["--exhaustive-k", "-5"], "argument --exhaustive-k: expected an int ≥ 0, got -5"),
        (["--distractor-checks", "-1"], "argument --distractor-checks: expected an int ≥ 0, got -1"),
        (["--counting-bases", "0"], "argument --counting-bases: expected an int ≥ 1, got 0"),
        (["--counting-min-bases", "0"], "argument --counting-min-bases: expected an int ≥ 1, got 0"),
        (["--examples-per-bin", "0"], "argument --examples-per-bin: expected an int ≥ 1, got 0"),
        (["--num-values", "0"], "argument --num-values: expected an int ≥ 1, got 0"),
        (["--num-queries", "0"], "argument --num-queries: expected an int ≥ 1, got 0"),
        (["--max-rules", "2"], "argument --max-rules: expected an int ≥ 4, got 2"),
        (["--insertion-counts", "0,-1"], "argument --insertion-counts: expected a non-empty tuple of ints ≥ 0, got 0,-1"),
        (["--num-features", "0"], "argument --num-features: expected an int ≥ 1 or 'all', got 0"),
        (["--max-count", "10"], "argument --max-count: expected at least --min-count (150) or 'auto', got 10"),
        (["--counting-bases", "8"], "argument --counting-min-bases: expected at most --counting-bases (8), got 16"),
        (["--seed", "-3"], "argument --seed: expected an int ≥ 0, got -3"),
        (["--loss-type", "mse"], "argument --loss-type: invalid choice: 'mse'"),
        (["--positives", "bottom"], "argument --positives: invalid choice: 'bottom'"),
        (["--backend", "gpu"], "argument --backend: invalid choice: 'gpu'"),
        (["--min-count", "many"], "argument --min-count: expected an int, got 'many'"),
    ],
)
@pytest.mark.parametrize("command", ["extract", "sweep"])
def test_bad_settings_are_usage_errors_before_any_work(command, argv, message, capsys, no_long_work, tmp_path):
    code, err = run([command, *argv, "--out", str(tmp_path / "out")], capsys)
    assert_usage_error(code, err, command, message)
    assert not (tmp_path / "out").exists()  # said before --out is even created


# ----------------------------------------------------------------------------------------------------------
# 3. Sources, corpus, device, backend, output folder


@pytest.fixture
def corpora(tmp_path):
    """Corpus files as a user might hand them over."""
    good = torch.randint(0, 10, (20, 8))
    torch.save(good, tmp_path / "good.pt")
    raw = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "corrupt.pt").write_bytes(b"these are not the tokens you are looking for")
    torch.save(good.float(), tmp_path / "float.pt")
    torch.save(good[:, :1].clone(), tmp_path / "one_token.pt")
    torch.save(good[0].clone(), tmp_path / "flat.pt")
    torch.save({"tokens": good}, tmp_path / "dict.pt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    return tmp_path


@pytest.mark.parametrize(
    "name,fragments",
    [
        ("truncated.pt", ["truncated.pt: cannot be read as a torch tensor file (truncated or corrupt?",
                          "expected a tensor saved with torch.save"]),
        ("corrupt.pt", ["corrupt.pt: cannot be read as a torch tensor file (truncated or corrupt?"]),
        ("float.pt", ["float.pt: holds torch.float32 values, expected integer token ids"]),
        ("one_token.pt", ["one_token.pt: holds sequences of 1 token(s), expected seq_len ≥ 2"]),
        ("flat.pt", ["flat.pt: holds a tensor of shape (8,), expected 2-D token ids [n_sequences, seq_len]"]),
        ("dict.pt", ["dict.pt: holds a dict, expected one tensor of token ids"]),
        ("missing.pt", ["missing.pt does not exist"]),
    ],
)
def test_bad_token_corpora_are_named_before_any_work(name, fragments, corpora, capsys, no_long_work):
    code, err = run(["extract", "--corpus", str(corpora / name), "--out", str(corpora / "out")], capsys)
    assert_usage_error(code, err, "extract", "argument --corpus: ", *fragments)


def test_bad_corpus_with_a_real_model_is_said_before_the_model_loads(corpora, capsys, no_long_work):
    (corpora / "gpt2-small_L0_H0_z_v1.pt").write_bytes(b"")
    code, err = run(["extract", "--model", "gpt2-small", "--layer", "0", "--head", "0", "--sae-out-dir", str(corpora),
                     "--corpus", str(corpora / "truncated.pt"), "--out", str(corpora / "out")], capsys)
    assert_usage_error(code, err, "extract", "argument --corpus: ", "truncated.pt: cannot be read")


def test_a_text_corpus_that_is_not_utf8_is_named(corpora, capsys):
    code, err = run(["extract", "--corpus", str(corpora / "latin1.txt"), "--out", str(corpora / "out")], capsys)
    assert_usage_error(code, err, "extract", "argument --corpus: ", "latin1.txt: is not UTF-8 text")


def test_a_corpus_folder_is_not_a_corpus(tmp_path, capsys, no_long_work):
    code, err = run(["extract", "--corpus", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert_usage_error(code, err, "extract", f"argument --corpus: {tmp_path} is not a file")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--n-sequences", "0"], "argument --n-sequences: expected an int ≥ 1, got '0'"),
        (["--n-sequences", "-5"], "argument --n-sequences: expected an int ≥ 1, got '-5'"),
        (["--seq-len", "1"], "argument --seq-len: expected an int ≥ 2, got '1'"),
        (["--layer", "-1"], "argument --layer: expected an int ≥ 0, got '-1'"),
        (["--head", "-1"], "argument --head: expected head indices ≥ 0, got '-1'"),
        (["--head", ","], "argument --head: expected comma-separated integers, got ','"),
        (["--device", "bogus"], "argument --device: expected a torch device such as cpu, cuda or cuda:0, got 'bogus'"),
        (["--device", "meta"], "argument --device: expected cpu, cuda, cuda:N or mps, got 'meta'"),
        (["--sae-out-dir", "ckpts"], "argument --sae-out-dir: not used with the planted model (--model toy)"),
        (["--sae-in", "gpt2-small-res-jb"], "argument --sae-in: not used with the planted model (--model toy)"),
        (["--sae-out-z", "x", "--model", "toy-ln"], "argument --sae-out-z: not used with the planted model (--model toy-ln)"),
    ],
)
def test_bad_run_options_are_usage_errors_before_any_work(argv, message, capsys, no_long_work, tmp_path):
    code, err = run(["extract", *argv, "--out", str(tmp_path / "out")], capsys)
    assert_usage_error(code, err, "extract", message)


def test_n_sequences_is_never_silently_replaced(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_toy(**kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")
    monkeypatch.setattr(cli, "toy_workload", fake_toy)
    code, err = run(["extract", "--n-sequences", "7", "--out", str(tmp_path)], capsys)
    assert code == 2 and seen["n_sequences"] == 7
    code, err = run(["extract", "--out", str(tmp_path)], capsys)
    assert code == 2 and seen["n_sequences"] == 3000


def test_cuda_without_cuda(monkeypatch, tmp_path, capsys, no_long_work):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        code, err = run(["extract", "--model", "gpt2-small", "--layer", "0", "--head", "0", "--device", device,
                         "--out", str(tmp_path)], capsys)
        assert_usage_error(code, err, "extract", f"argument --device: '{device}' asked for, but CUDA is not available here")


def test_the_toy_runs_on_the_cpu_only(monkeypatch, tmp_path, capsys, no_long_work):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, err = run(["extract", "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert_usage_error(code, err, "extract", "argument --device: the planted model (--model toy) runs on the CPU")


def test_triton_without_a_gpu(monkeypatch, tmp_path, capsys, no_long_work):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, err = run(["extract", "--backend", "triton", "--out", str(tmp_path)], capsys)
    assert_usage_error(code, err, "extract", "argument --backend: triton needs a CUDA GPU", "TRITON_INTERPRET=1")


def test_triton_in_its_interpreter_is_allowed_without_a_gpu():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", "from attnrules.cli import check_backend; check_backend('triton')"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_unavailable_backend_is_named(monkeypatch):
    import attnrules.engine as engine

    monkeypatch.setattr(engine, "available_backends", lambda: ["torch"])
    with pytest.raises(cli.UsageError, match=r"argument --backend: cpu is not available here \(available: torch\)"):
        check_backend("cpu")


def test_real_model_options(tmp_path, capsys, no_long_work):
    base = ["extract", "--model", "gpt2-small", "--layer", "0", "--head", "0", "--out", str(tmp_path / "out")]
    code, err = run(base + ["--corpus", "c.txt"], capsys)
    assert_usage_error(code, err, "extract", "give exactly one of --sae-out-dir", "--sae-out-z")
    code, err = run(base + ["--sae-out-dir", str(tmp_path / "nowhere"), "--corpus", "c.txt"], capsys)
    assert_usage_error(code, err, "extract", f"argument --sae-out-dir: {tmp_path / 'nowhere'} does not exist")
    (tmp_path / "file").write_text("")
    code, err = run(base + ["--sae-out-dir", str(tmp_path / "file"), "--corpus", "c.txt"], capsys)
    assert_usage_error(code, err, "extract", f"argument --sae-out-dir: {tmp_path / 'file'} is not a folder")
    code, err = run(base + ["--sae-out-dir", str(tmp_path), "--corpus", "c.txt"], capsys)
    assert_usage_error(code, err, "extract", "argument --sae-out-dir: no per-head SAE checkpoint '*_L0_H0_z*.pt' in")
    (tmp_path / "gpt2-small_L0_H0_z_v1.pt").write_bytes(b"")  # found by name; read once the model is loaded
    code, err = run(base + ["--sae-out-dir", str(tmp_path), "--sae-out-z", "x"], capsys)
    assert_usage_error(code, err, "extract", "give exactly one of --sae-out-dir")
    code, err = run(base + ["--sae-out-dir", str(tmp_path), "--sae-out-z-id", "x"], capsys)
    assert_usage_error(code, err, "extract", "argument --sae-out-z-id: only used with --sae-out-z")
    code, err = run(base + ["--sae-out-dir", str(tmp_path)], capsys)
    assert_usage_error(code, err, "extract", "--corpus is required with a real model")
    code, err = run(base + ["--sae-out-dir", str(tmp_path), "--corpus", str(tmp_path / "none.txt")], capsys)
    assert_usage_error(code, err, "extract", f"argument --corpus: {tmp_path / 'none.txt'} does not exist")
    assert not (tmp_path / "out").exists()


def test_an_unknown_model_is_a_usage_error(tmp_path, capsys):
    torch.save(torch.zeros(4, 8, dtype=torch.long), tmp_path / "c.pt")
    (tmp_path / "gpt2-small_L0_H0_z_v1.pt").write_bytes(b"")
    code, err = run(["extract", "--model", "no-such-model-anywhere", "--layer", "0", "--head", "0",
                     "--sae-out-dir", str(tmp_path), "--corpus", str(tmp_path / "c.pt"), "--out", str(tmp_path / "o")],
                    capsys)
    assert_usage_error(code, err, "extract", "no-such-model-anywhere")
    assert not (tmp_path / "o").exists()  # a failed start leaves no empty --out behind


def test_an_out_folder_that_cannot_be_written(tmp_path, capsys, no_long_work):
    (tmp_path / "a_file").write_text("")
    code, err = run(["extract", "--out", str(tmp_path / "a_file")], capsys)
    assert_usage_error(code, err, "extract", f"argument --out: {tmp_path / 'a_file'} is a file, expected a folder")
    code, err = run(["sweep", "--out", str(tmp_path / "a_file" / "sub")], capsys)
    assert_usage_error(code, err, "sweep", f"argument --out: cannot write to {tmp_path / 'a_file' / 'sub'}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_folder(tmp_path, capsys, no_long_work):
    (tmp_path / "ro").mkdir(mode=0o500)
    code, err = run(["extract", "--out", str(tmp_path / "ro")], capsys)
    assert_usage_error(code, err, "extract", f"argument --out: cannot write to {tmp_path / 'ro'}")


def test_features_beyond_the_output_sae(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "extract_head", lambda *a, **k: pytest.fail("extraction started"))
    code, err = run(["extract", "--head", "0", "--features", "2,5,9", "--out", str(tmp_path)], capsys)
    assert_usage_error(code, err, "extract", "argument --features: L0H0 has output features 0..4, got 5,9")


# ----------------------------------------------------------------------------------------------------------
# report: results files that lack what the report reads


def minimal_results(**feature):
    return {"layer": 0, "head": 0, "metadata": {"notes": []},
            "features": [{"name": "L0H0.0", "rules": {"weights": {"text": ["[a] … [b] → L0H0.0"], "terms": []}},
                          "sweep": [{"method": "weights", "num_rules": 4, "precision": 1.0, "recall": 0.5, "f1": 0.67}],
                          **feature}]}


@pytest.mark.parametrize(
    "edit,where",
    [
        (lambda d: d["features"][0].pop("sweep"), "features[0] (L0H0.0) has no key 'sweep'"),
        (lambda d: d["features"][0].pop("rules"), "features[0] (L0H0.0) has no key 'rules'"),
        (lambda d: d["features"][0]["sweep"][0].pop("f1"), "features[0] (L0H0.0).sweep[0] has no key 'f1'"),
        (lambda d: d["features"][0].update(sweep={}), "features[0] (L0H0.0).sweep must be a JSON list, got an object"),
        (lambda d: d["features"][0].update(counting={"text": "x"}),
         "features[0] (L0H0.0).counting has no key 'kind' (nor 'threshold', 'evidence')"),
        (lambda d: d.update(features={}), "features must be a JSON list, got an object"),
        (lambda d: d.update(head="0"), "head must be an integer, got a string"),
        (lambda d: d.update(distractors=[{"feature": "L0H0.0"}]), "distractors[0] has no key 'kq_count'"),
    ],
)
def test_report_on_an_incomplete_results_file(edit, where, tmp_path, capsys):
    head = tmp_path / "L0H0"
    head.mkdir()
    data = minimal_results()
    (head / "results.json").write_text(json.dumps(data))
    assert main(["report", str(tmp_path)]) == 0  # the minimal file is complete
    capsys.readouterr()
    edit(data)
    (head / "results.json").write_text(json.dumps(data))
    code, err = run(["report", str(tmp_path), "--out", str(tmp_path / "r.html")], capsys)
    assert_usage_error(code, err, "report", f"{head / 'results.json'} is not a complete attnrules results file: {where}")


def test_report_on_a_file_without_features(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"layer": 0, "head": 0}))
    code, err = run(["report", str(tmp_path)], capsys)
    assert_usage_error(code, err, "report", f"{tmp_path / 'results.json'} is not an attnrules results file (missing features)")


# ----------------------------------------------------------------------------------------------------------
# 4. Notes: a capped setting is said once, as a note, never as a UserWarning with a source line


SMALL = ["--n-sequences", "400", "--min-count", "20", "--num-features", "1", "--max-rules", "4", "--exhaustive-k", "0",
         "--no-exact", "--no-counting", "--show-exemplars", "0"]


def test_a_capped_setting_is_said_once(tmp_path, capsys):
    code, err = run(["extract", *SMALL, "--out", str(tmp_path)], capsys)  # both heads: capped twice each
    assert code == 0
    for name in ("num_values", "num_queries"):
        note = f"attnrules extract: note: {name}=100 capped to 81 (the number of input features)"
        assert err.count(note) == 1, err
    assert "UserWarning" not in err and "warn" not in err and ".py:" not in err
    code, err = run(["extract", *SMALL, "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0 and err == ""  # quiet: only errors


def test_no_warning_reaches_the_user_of_the_command(tmp_path):
    done = subprocess.run([sys.executable, "-W", "default", "-m", "attnrules.cli", "sweep", "--head", "1", *SMALL,
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if "note:" in line]
    assert notes == ["attnrules sweep: note: num_values=100 capped to 81 (the number of input features)",
                     "attnrules sweep: note: num_queries=100 capped to 81 (the number of input features)"]
    assert "Warning" not in done.stderr and "warnings.warn" not in done.stderr
    quiet = subprocess.run([sys.executable, "-W", "default", "-m", "attnrules.cli", "sweep", "--head", "1", *SMALL,
                            "--quiet", "--out", str(tmp_path / "again")], capture_output=True, text=True, cwd=tmp_path)
    assert quiet.returncode == 0
    # the sweep's per-shard log ("[rank 0/1] L0H1: done ...") is its record of what ran; nothing else is said
    assert [line for line in quiet.stderr.splitlines() if not line.startswith("[rank ")] == []


def test_another_runs_out_folder_needs_overwrite(tmp_path, capsys):
    first = ["extract", "--head", "1", *SMALL, "--quiet", "--out", str(tmp_path)]
    assert run(first, capsys)[0] == 0
    other = ["extract", "--head", "1", *SMALL, "--seed", "1", "--quiet", "--out", str(tmp_path)]
    code, err = run(other, capsys)
    assert_usage_error(code, err, "extract", "holds results of another run", "--overwrite")
    code, err = run([*other, "--overwrite"], capsys)
    assert code == 0 and err == ""
