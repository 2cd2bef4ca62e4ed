"""Per-head output SAEs trained on demand through sae_lens's training runner
(:mod:`attnrules.pipeline.train`, ``attnrules train-head-saes``), on the planted model.

Recovery: per-head SAEs of 32 features, trained for 1,000 steps of 1,024 tokens (L1 0.01) on heads 0
and 1 of ``build_toy()`` over ``toy.corpus(3000)``, explained by ``extract_head`` with the toy's
input SAE. A planted skip-gram counts as recovered when some trained feature's top weights-ordered
rule is that (key, query) pair. Measured: 4 of 4 ([If]…[then], [http]…[com], [Harry]…[Potter],
[games]…[games] = count(games)) for each of the seeds 0–5 (24/24); with 500 steps and 16 features,
11/12 over seeds 0–2 ([If]…[then] missed once). The test asserts ≥ 3 of 4.
"""
import json
import time

import pytest
import torch

from attnrules import ExtractSettings, extract_head, load_results
from attnrules.cli import main
from attnrules.pipeline.train import (
    CHECKPOINTS,
    TRAIN_FILE,
    HeadSAETrainSettings,
    TrainingMismatchError,
    is_complete,
    train_head_saes,
)

PLANTED = {("If", "then"), ("http", "com"), ("Harry", "Potter"), ("games", "games")}
SETTINGS = HeadSAETrainSettings(d_sae=32, l1_coefficient=0.01, batch_size_tokens=1024, training_tokens=1024 * 1000)
TINY = HeadSAETrainSettings(d_sae=8, l1_coefficient=0.01, batch_size_tokens=256, training_tokens=256 * 20)
EXTRACT = ExtractSettings(num_features=None, min_count=30, exact=False, counting=False, exhaustive_k=0,
                          distractor_checks=0, show_exemplars=0, max_rules=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The SAEs here are tiny (d_in 8): one thread is as fast on a quiet machine and 8× faster on a busy one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokens(toy):
    return toy.corpus(3000)


@pytest.fixture(scope="module")
def trained(toy, tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("head-saes")
    return out, train_head_saes(toy.model, tokens, 0, (0, 1), out, settings=SETTINGS, progress=False)


def test_each_head_is_a_sae_lens_folder_of_that_head(trained, toy):
    from sae_lens import SAE

    from attnrules.sources import load_output_sae

    out, folders = trained
    assert set(folders) == {0, 1}
    for head, folder in folders.items():
        assert folder == out / f"L0H{head}" and is_complete(folder)
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["d_in"] == toy.model.cfg.d_head and cfg["d_sae"] == 32 and cfg["architecture"] == "standard"
        assert cfg["metadata"]["hook_name"] == "blocks.0.attn.hook_z" and cfg["metadata"]["hook_head_index"] == head
        report = json.loads((folder / TRAIN_FILE).read_text())
        assert report["head"] == head and report["steps"] == 1000 and report["settings"]["d_sae"] == 32
        sae = SAE.load_from_disk(folder)
        loaded = load_output_sae(folder, layer=0, head=head, n_heads=2, d_head=8)
        assert loaded.head == head and loaded.per_head and torch.equal(loaded.W_enc, sae.W_enc.detach())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial or checkpoint folder left


def test_trained_features_recover_the_planted_skipgrams(trained, toy, tokens):
    from sae_lens import SAE

    _, folders = trained
    found, tops = set(), []
    for head, folder in folders.items():
        result = extract_head(toy.model, toy.input_sae, SAE.load_from_disk(folder), tokens, settings=EXTRACT,
                              progress=False)
        for feature in result.features:
            term = feature.rule_set("weights").terms[0]
            tops.append((term.key_desc, term.query_desc))
    found = PLANTED & set(tops)
    assert len(found) >= 3, f"recovered {sorted(found)} of {sorted(PLANTED)}; top rules {tops}"


def test_rerun_skips_finished_heads(trained, toy, tokens, capsys):
    out, folders = trained
    stamps = {h: (f / "sae_weights.safetensors").stat().st_mtime_ns for h, f in folders.items()}
    t0 = time.perf_counter()
    again = train_head_saes(toy.model, tokens, 0, (0, 1), out, settings=SETTINGS)
    assert again == folders and time.perf_counter() - t0 < 10
    assert {h: (f / "sae_weights.safetensors").stat().st_mtime_ns for h, f in folders.items()} == stamps
    assert capsys.readouterr().err.count("skipped") == 2
    with pytest.raises(TrainingMismatchError, match="settings"):  # the same folder, other settings
        train_head_saes(toy.model, tokens, 0, (0,), out, settings=TINY, progress=False)
    with pytest.raises(TrainingMismatchError, match="corpus"):
        train_head_saes(toy.model, tokens[:100], 0, (0,), out, settings=SETTINGS, progress=False)


def test_a_rerun_continues_where_a_killed_run_stopped(toy, tmp_path, monkeypatch):
    """A stale partial folder is cleared; with checkpoints, a killed head resumes mid-way; finished heads stay."""
    from sae_lens.training.sae_trainer import SAETrainer

    tokens = toy.corpus(300)
    settings = HeadSAETrainSettings(d_sae=8, l1_coefficient=0.01, batch_size_tokens=256, training_tokens=256 * 40,
                                    n_checkpoints=3)
    train_head_saes(toy.model, tokens, 0, (0,), tmp_path, settings=settings, progress=False)
    (tmp_path / ".L0H1.partial").mkdir()  # a killed run's half-written output
    (tmp_path / ".L0H1.partial" / "cfg.json").write_text("{")
    save = SAETrainer.save_checkpoint

    def killed(self, *args, **kwargs):  # dies right after its first checkpoint
        save(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(SAETrainer, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train_head_saes(toy.model, tokens, 0, (0, 1), tmp_path, settings=settings, progress=False)
    assert not (tmp_path / "L0H1").exists() and (tmp_path / f".L0H1{CHECKPOINTS}").is_dir()
    monkeypatch.setattr(SAETrainer, "save_checkpoint", save)
    folders = train_head_saes(toy.model, tokens, 0, (0, 1), tmp_path, settings=settings, progress=False)
    report = json.loads((folders[1] / TRAIN_FILE).read_text())
    assert report["resumed_from"] and 0 < report["resumed_from"] < settings.training_tokens
    assert json.loads((folders[0] / TRAIN_FILE).read_text())["resumed_from"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["L0H0", "L0H1"]


def test_clear_errors(toy, tokens, tmp_path):
    with pytest.raises(ValueError, match="head"):
        train_head_saes(toy.model, tokens, 0, (2,), tmp_path, settings=TINY)
    with pytest.raises(ValueError, match="layer"):
        train_head_saes(toy.model, tokens, 1, (0,), tmp_path, settings=TINY)
    with pytest.raises(ValueError, match="context_size"):
        train_head_saes(toy.model, tokens, 0, (0,), tmp_path, settings=HeadSAETrainSettings(context_size=64))
    with pytest.raises(ValueError, match="l1_coefficient"):
        HeadSAETrainSettings(l1_coefficient=0)
    with pytest.raises(ValueError, match="training_tokens"):
        HeadSAETrainSettings(training_tokens=10, batch_size_tokens=4096)
    assert list(tmp_path.iterdir()) == []


def test_cli_trains_reruns_and_says_what_is_wrong(tmp_path, capsys):
    out = tmp_path / "saes"
    tiny = ["--d-sae", "8", "--l1-coefficient", "0.01", "--batch-size-tokens", "256", "--training-tokens", "5120",
            "--n-sequences", "300", "--out", str(out)]
    assert main(["train-head-saes", "--heads", "0,1", *tiny]) == 0
    captured = capsys.readouterr()
    assert f"L0H0: {out / 'L0H0'}" in captured.out and "training a 8-feature SAE" in captured.err
    assert all(is_complete(out / f"L0H{h}") for h in (0, 1))
    assert main(["train-head-saes", "--heads", "0,1", *tiny]) == 0
    assert capsys.readouterr().err.count("skipped") == 2
    for argv, message in (
        (["--heads", "5"], "head"),
        (["--corpus", str(tmp_path / "missing.pt")], "--corpus"),
        (["--model", str(tmp_path), "--heads", "0"], "--corpus is required"),
    ):
        assert main(["train-head-saes", *tiny, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("attnrules train-head-saes: error:") and message in err, err
    with pytest.raises(SystemExit):
        main(["train-head-saes", *tiny, "--training-tokens", "1.5"])
    assert "expected an int" in capsys.readouterr().err


def test_cli_extract_reads_a_trained_folder(trained, tmp_path, capsys):
    """The trained folder goes straight to ``attnrules extract --model toy --head 1 --sae-out FOLDER``,
    replacing the planted output SAE of that head."""
    out, folders = trained
    argv = ["extract", "--model", "toy", "--head", "1", "--sae-out", str(folders[1]), "--min-count", "30",
            "--num-features", "all", "--no-exact", "--no-counting", "--exhaustive-k", "0",
            "--distractor-checks", "0", "--out", str(tmp_path / "ex"), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    result = load_results(tmp_path / "ex" / "L0H1")
    tops = {(f.rule_set("weights").terms[0].key_desc, f.rule_set("weights").terms[0].query_desc) for f in result.features}
    assert ("games", "games") in tops
