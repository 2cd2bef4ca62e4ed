"""Input-feature descriptions: layer-0 top tokens and positions; Neuronpedia ids above."""
import torch

from attnrules.rules.descriptions import describe_input_features
from attnrules.sources import InputSAE
from attnrules.toy import VOCAB, build_toy


def test_layer0_features_are_named_by_their_top_token_or_position():
    toy = build_toy()
    d = describe_input_features(toy.model, toy.input_sae, backend="torch")
    assert d.labels[: len(VOCAB)] == VOCAB
    assert d.labels[len(VOCAB) + 3] == "pos3"
    assert d.details[VOCAB.index("If")].startswith("If (1)")


def test_above_layer0_features_are_neuronpedia_ids():
    sae = InputSAE.from_tensors(torch.eye(4), torch.zeros(4), torch.eye(4), torch.zeros(4), layer=3,
                                neuronpedia_id="gpt2-small/3-res-jb")
    d = describe_input_features(None, sae)
    assert d(2) == "3-res-jb/2" and d.details[2] == "https://neuronpedia.org/gpt2-small/3-res-jb/2"
    anonymous = InputSAE.from_tensors(torch.eye(4), torch.zeros(4), torch.eye(4), torch.zeros(4), layer=3)
    assert describe_input_features(None, anonymous)(1) == "L3.in1"


# ----------------------------------------------------------------------------------------------------------
# Described from the corpus

import csv  # noqa: E402

import pytest  # noqa: E402

from attnrules.exemplars import scan_output_features  # noqa: E402
from attnrules.rules.descriptions import InputStatsObserver, load_input_labels  # noqa: E402


def one_hot_sae(n: int, layer: int) -> InputSAE:
    return InputSAE.from_tensors(torch.eye(n), torch.zeros(n), torch.eye(n), torch.zeros(n), layer=layer)


def observe(sae: InputSAE, acts: torch.Tensor, batch: int = 3) -> InputStatsObserver:
    """Feed ``acts [N, T, n]`` (what an identity SAE reads) to an observer in batches, as a corpus pass would."""
    observer = InputStatsObserver(sae, k=4)
    for start in range(0, acts.shape[0], batch):
        rows = slice(start, min(start + batch, acts.shape[0]))
        observer.observe(rows, {sae.hook_name: acts[rows]})
    return observer


def test_planted_input_features_described_from_the_corpus_name_their_token():
    toy = build_toy()
    tokens = toy.corpus(300, seed=1)
    observer = InputStatsObserver(toy.input_sae)
    scan_output_features(toy.model, toy.output_saes[0], tokens, batch_size=64, observers=[observer])
    stats = observer.result()
    d = describe_input_features(toy.model, toy.input_sae, backend="torch", stats=stats, tokens=tokens)
    for word in ("If", "twitter", "games"):
        j = VOCAB.index(word)
        record = d.record(j)
        assert record["contexts"] and all(c["tokens"][c["at"]] == word for c in record["contexts"])
        assert record["frequency"] == int((tokens[:, 1:] == j).sum()) / tokens[:, 1:].numel()  # counted directly
        assert d(j) == word and word in d.details[j] and "active on" in d.details[j]  # layer 0 keeps its token label


def test_above_layer0_a_feature_reads_its_top_corpus_token_and_id():
    toy = build_toy()  # only its tokenizer: token text
    tokens = torch.tensor([[0, 5, 6, 5], [0, 6, 6, 7], [0, 7, 5, 6]])
    n = len(VOCAB)
    acts = torch.nn.functional.one_hot(tokens, n).float() * torch.arange(1, 5)[None, :, None]  # later = stronger
    acts[:, 0] = 0
    sae = one_hot_sae(n, layer=3)
    stats = observe(sae, acts).result()
    # brute force: feature 6's largest activation in each sequence (positions ≥ 1), largest first
    peaks = sorted(((max(float(acts[s, p, 6]) for p in range(1, 4)), s) for s in range(3)), reverse=True)
    peaks = [(a, s) for a, s in peaks if a > 0]
    assert stats.top_act.shape[1] == 3  # k = 4 asked, 3 sequences seen
    assert stats.top_act[6].tolist() == [a for a, _ in peaks] + [0.0] * (3 - len(peaks))
    assert sorted(zip(stats.top_act[6].tolist(), stats.top_seq[6].tolist()))[-len(peaks):] == sorted(peaks)  # ties: any order
    assert [int(tokens[s, p]) for s, p in zip(stats.top_seq[6].tolist(), stats.top_pos[6].tolist())][: len(peaks)] == [6] * len(peaks)
    assert stats.active[6] == 4 and stats.n_tokens == 9 and stats.active[1] == 0
    d = describe_input_features(toy.model, sae, stats=stats, tokens=tokens)
    assert d(6) == f'"{VOCAB[6]}" (L3.in6)' and d(1) == "L3.in1" and "never active" in d.details[1]
    labelled = describe_input_features(toy.model, sae, stats=stats, tokens=tokens, labels={6: "a name"})
    assert labelled(6) == "a name (L3.in6)" and labelled.sources[6] == "user" and labelled(5).startswith('"')
    npid = InputSAE.from_tensors(torch.eye(n), torch.zeros(n), torch.eye(n), torch.zeros(n), layer=3,
                                 neuronpedia_id="gpt2-small/3-res-jb")
    named = describe_input_features(toy.model, npid, stats=stats, tokens=tokens)
    assert named(6) == f'"{VOCAB[6]}" (3-res-jb/6)' and named.record(6)["url"] == "https://neuronpedia.org/gpt2-small/3-res-jb/6"


def test_user_labels_from_a_csv_take_precedence_and_bad_ones_are_named(tmp_path):
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["id", "label"], [1, "conditional word"], [2, " spaced "]])
    assert load_input_labels(path) == {1: "conditional word", 2: "spaced"}
    toy = build_toy()
    d = describe_input_features(toy.model, toy.input_sae, backend="torch", labels=str(path))
    assert d(1) == "conditional word (If)" and d(3) == VOCAB[3]
    path.write_text("id,label\nx,foo\n")
    with pytest.raises(ValueError, match="line 2: id must be an int"):
        load_input_labels(path)
    path.write_text("feature,name\n1,foo\n")
    with pytest.raises(ValueError, match="'id' column and a 'label'"):
        load_input_labels(path)
    with pytest.raises(ValueError, match="is not a file"):
        load_input_labels(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="ids must be input features 0..80"):
        describe_input_features(toy.model, toy.input_sae, backend="torch", labels={500: "x"})
    with pytest.raises(ValueError, match="ids must be ints"):
        load_input_labels({"1": "x"})


def test_cli_input_labels_a_bad_file_stops_before_any_work(tmp_path, capsys):
    from attnrules.cli import main

    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\nx,foo\n")
    assert main(["extract", "--input-labels", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "attnrules extract: error: argument --input-labels:" in err and "line 2" in err
    assert not (tmp_path / "out").exists()
