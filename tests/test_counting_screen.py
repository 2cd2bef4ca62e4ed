"""The counting screen (issue 14): a cheap look at a few base sequences decides whether the full
count sweep runs. It must keep every counting rule the sweep finds (the toy's count([games]) ≥ 2,
glyph's and rune's count ≥ 3, and synthetic threshold and monotone responses) and screen plain
skip-grams out, running far fewer counterfactual sequences."""
import sys
from pathlib import Path

import pytest
import torch

import attnrules.evaluation.counts as counts
from attnrules.evaluation.counts import CountingCheck, check_counting, screen_counts
from attnrules.exemplars import scan_output_features
from attnrules.pipeline import ExtractSettings, extract_head
from attnrules.toy import FEATURES, build_toy

sys.path.insert(0, str(Path(__file__).parent))
from planted import build_glyph, build_rune  # noqa: E402


@pytest.fixture
def sequences(monkeypatch):
    """Counts every counterfactual sequence built (screen and sweep alike)."""
    seen = []
    real = counts.counterfactuals

    def counting(base, *args, **kwargs):
        out = real(base, *args, **kwargs)
        seen.append(out.shape[0])
        return out

    monkeypatch.setattr(counts, "counterfactuals", counting)
    return seen


def _toy():
    toy = build_toy()
    return toy, list(FEATURES), toy.corpus(1000, seed=7), toy.token_id("<|endoftext|>")


def _planted(build):
    planted = build()
    return planted, list(planted.features), planted.corpus(2000, seed=1), planted.bos_id


@pytest.mark.parametrize("build", [_toy, lambda: _planted(build_glyph), lambda: _planted(build_rune)],
                         ids=["toy", "glyph", "rune"])
def test_screen_keeps_every_counting_rule_and_screens_out_skipgrams(build, sequences):
    model, features, corpus, bos = build()
    scans = {}
    checked = 0
    for f in features:
        if f.kind in ("dead", "noise") or f.query is None:
            continue
        q, k = model.token_id(f.query), model.token_id(f.key)
        avoid = [model.token_id(f.distractor)] if getattr(f, "distractor", None) else []
        if f.head not in scans:
            scans[f.head] = scan_output_features(model.model, model.output_saes[f.head], corpus)
        act_max = scans[f.head].act_max[:, f.index]
        found = {}
        for screen in (False, True):
            sequences.clear()
            check, rule = check_counting(model.model, model.output_saes[f.head], f.index, f.name, corpus, act_max, q, k,
                                         avoid=avoid, bos=bos, screen=screen)
            assert sum(sequences) == check.n_sequences, (f.name, screen)
            found[screen] = (check, rule)
        (full, full_rule), (screened, screened_rule) = found[False], found[True]
        assert full.status in ("rule", "no rule") and full.screen is None
        if full_rule is not None:  # the screen never loses a rule the sweep finds, and finds the same rule
            assert screened.status == "rule" and screened_rule == full_rule, (f.name, screened)
            assert "the screen let the full sweep run" in screened.reason
        if f.kind == "counting":
            assert full_rule is not None and (full_rule.kind, full_rule.threshold) == ("threshold", f.min_count)
        if f.kind == "skipgram":
            assert screened.status == "screened out" and screened_rule is None, (f.name, screened)
            assert screened.n_sequences <= 32 and full.n_sequences >= 512  # 8 bases × ≤ 4 counts vs 64 × 9
            assert "no base switches on" in screened.reason and screened.screen.n_base == 8
            assert CountingCheck.from_json(screened.to_json()) == screened  # serialised like the others
        checked += 1
    assert checked >= 3


def _fake_response(monkeypatch, key: int, response):
    """The feature's activation at the last position = ``response(copies of key in the sequence)``."""
    def last_acts(model, output_sae, feature, inputs, *, batch_size=64):
        return torch.tensor([float(response(int(n))) for n in (inputs == key).sum(dim=1)])

    monkeypatch.setattr(counts, "last_acts", last_acts)


@pytest.mark.parametrize("query_is_key", [True, False])
@pytest.mark.parametrize("shape", ["threshold2", "threshold5", "threshold8", "monotone", "flat", "silent", "saturating"])
def test_screen_on_synthetic_responses(monkeypatch, query_is_key, shape):
    """Threshold responses at any c and a doubling monotone response pass the screen and keep their
    rule; flat, silent and gently saturating (skip-gram like) responses are screened out."""
    toy = build_toy()
    corpus = toy.corpus(200, seed=3)
    key = toy.token_id("games")
    bos = toy.token_id("<|endoftext|>")
    query = key if query_is_key else next(t for t in corpus[:, 5].tolist() if t not in (key, bos))
    response = {
        "threshold2": lambda n: 1.0 if n >= 2 else 0.0,
        "threshold5": lambda n: 1.0 if n >= 5 else 0.0,
        "threshold8": lambda n: 1.0 if n >= 8 else 0.0,
        "monotone": lambda n: 0.2 * n,
        "flat": lambda n: 0.7 if n >= 1 else 0.0,
        "silent": lambda n: 0.0,
        "saturating": lambda n: 0.0 if n == 0 else 1.0 - 0.3 / n,  # grows 37 % from 1 to 8
    }[shape]
    _fake_response(monkeypatch, key, response)
    act_max = torch.zeros(corpus.shape[0])
    full, full_rule = check_counting(toy.model, toy.output_saes[1], 0, "F", corpus, act_max, query, key, bos=bos,
                                     screen=False)
    screened, screened_rule = check_counting(toy.model, toy.output_saes[1], 0, "F", corpus, act_max, query, key,
                                             bos=bos)
    if shape.startswith("threshold") or shape == "monotone":
        assert full_rule is not None and screened_rule == full_rule, (full, screened)
        assert full_rule.kind == ("monotone" if shape == "monotone" else "threshold")
    else:
        assert full_rule is None and screened.status == "screened out" and screened_rule is None, screened
        assert screened.n_sequences < full.n_sequences / 10


def test_screen_is_inconclusive_on_non_finite_activations(monkeypatch):
    toy = build_toy()
    key = toy.token_id("games")
    _fake_response(monkeypatch, key, lambda n: float("nan"))
    base = toy.corpus(16, seed=2)
    run_full, why, response = screen_counts(toy.model, toy.output_saes[1], 0, base, key, key)
    assert run_full and "inconclusive" in why and response.n_base == 8


@pytest.mark.parametrize("screen", [True, False])
def test_pipeline_setting_turns_the_screen_off(screen):
    """Rune's head L2H2 through the pipeline: the skip-gram and absence features are screened out
    with the screen and swept without; the count ≥ 3 rule is found either way."""
    planted = build_rune()
    names = {f.index: f for f in planted.features if f.head == 2 and f.kind in ("skipgram", "absence", "counting")}
    result = extract_head(planted.model, planted.input_sae, planted.output_saes[2], planted.corpus(2000, seed=1),
                          settings=ExtractSettings(features=tuple(names), counting_screen=screen, exact=False),
                          progress=False)
    assert sorted(f.feature for f in result.features) == sorted(names)
    for f in result.features:
        planted_rule = names[f.feature]
        if planted_rule.kind == "counting":
            assert f.counting is not None and (f.counting.kind, f.counting.threshold) == ("threshold", 3)
            assert f.counting_check.status == "rule"
        else:
            assert f.counting is None
            assert f.counting_check.status == ("screened out" if screen else "no rule"), f.counting_check
            assert (f.counting_check.screen is not None) == screen
