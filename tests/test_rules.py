"""Rule predictions against a literal, loop-by-loop reading of REF §4."""
import dataclasses

import pytest
import torch

from attnrules.rules import SkipgramRuleSet


def ref_prediction(acts, t, terms, key_power, importance):
    """REF: a row per matching (t' ≤ t, selected (k, q)); max of predicted scores, 0 with no row."""
    scores = []
    for q, k, a, v in terms:
        if acts[t, q] <= 0:
            continue
        for tp in range(t + 1):
            if acts[tp, k] > 0 and not (importance and a == 0):
                scores.append(float(acts[t, q] * acts[tp, k] ** key_power * a * v))
    return max(scores) if scores else 0.0


@pytest.mark.parametrize("method,power", [("weights", 2), ("importance", 1)])
def test_predict_matches_literal_reading(method, power):
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(20, 10, 15, generator=g, dtype=torch.float64)
    acts = acts * (torch.rand(20, 10, 15, generator=g, dtype=torch.float64) < 0.3)
    positions = torch.randint(0, 10, (20,), generator=g)
    terms = [(1, 2, 0.5, 1.0), (3, 3, -0.2, 2.0), (4, 0, 0.0, 1.0), (5, 6, -1.0, -1.0), (1, 7, 2.0, -0.5)]
    rules = SkipgramRuleSet(
        "L0H0.1",
        torch.tensor([t[0] for t in terms]), torch.tensor([t[1] for t in terms]),
        torch.tensor([t[2] for t in terms], dtype=torch.float64), torch.tensor([t[3] for t in terms], dtype=torch.float64),
        key_power=power, method=method,
    )
    got = rules.predict(acts, positions)
    want = [ref_prediction(acts[i], int(positions[i]), terms, power, method == "importance") for i in range(20)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert (got > 0).any() and (got == 0).any()  # the data exercises both outcomes


def test_render_and_frame():
    rules = SkipgramRuleSet("L0H0.94", torch.tensor([2]), torch.tensor([1]), torch.tensor([0.1]), torch.tensor([0.2]))
    names = {1: "If", 2: "then"}
    assert rules.render(names.get) == ["[If] … [then] → L0H0.94   (A=0.1, V=0.2)"]
    frame = rules.to_frame(names.get)
    assert frame.loc[0, "query_desc"] == "then" and frame.loc[0, "key_desc"] == "If"


def test_predict_rejects_bad_shapes():
    rules = SkipgramRuleSet("L0H0.0", torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="acts must be"):
        rules.predict(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="positions must be"):
        rules.predict(torch.zeros(3, 4, 2), torch.zeros(2, dtype=torch.long))


def exact_prediction(acts, t, terms, min_weight):
    """The exact-mode reading: pseudo ids (< 0) are present everywhere (activation 1), a term's score is
    q_act · k_act · weight, and a term whose weight is not above ``min_weight`` never fires."""
    scores = []
    for q, k, w in terms:
        q_act = 1.0 if q < 0 else float(acts[t, q])
        if q_act <= 0 or w <= min_weight:
            continue
        for tp in range(t + 1):
            k_act = 1.0 if k < 0 else float(acts[tp, k])
            if k_act > 0:
                scores.append(q_act * k_act * w)
    return max(scores) if scores else 0.0


def test_exact_predictions_use_importance_weights_pseudo_terms_and_ignore_float_noise():
    g = torch.Generator().manual_seed(1)
    acts = torch.rand(30, 8, 6, generator=g, dtype=torch.float64)
    acts = acts * (torch.rand(30, 8, 6, generator=g, dtype=torch.float64) < 0.3)
    positions = torch.randint(0, 8, (30,), generator=g)
    # (query, key, importance): a real term, a float-noise term, a query-bias term, a pseudo-key term, a negative one
    terms = [(1, 2, 5.0), (3, 4, 1e-8), (-2, 5, 2.0), (0, -1, 0.5), (2, 2, -3.0)]
    rules = SkipgramRuleSet(
        "L1H0.3", torch.tensor([t[0] for t in terms]), torch.tensor([t[1] for t in terms]),
        torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), key_power=1, method="exact",
        weight=torch.tensor([t[2] for t in terms], dtype=torch.float64), min_weight=5e-3,
    )
    got = rules.predict(acts, positions)
    want = [exact_prediction(acts[i], int(positions[i]), terms, 5e-3) for i in range(30)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    noise_only = [i for i in range(30) if acts[i, int(positions[i]), 3] > 0 and (acts[i, : int(positions[i]) + 1, 4] > 0).any()]
    assert noise_only, "the data must hold matches of the float-noise term"
    # the float-noise term alone never makes a prediction: REF's convention (A·V > 0) would fire on it
    alone = SkipgramRuleSet("x", torch.tensor([3]), torch.tensor([4]), torch.ones(1), torch.ones(1), key_power=1,
                            method="exact", weight=torch.tensor([1e-8]), min_weight=5e-3)
    assert (alone.predict(acts.float(), positions) == 0).all()
    assert (dataclasses.replace(alone, weight=None, min_weight=float("-inf")).predict(acts.float(), positions) > 0).any()


def test_pseudo_terms_render_readably():
    rules = SkipgramRuleSet("L1H0.5", torch.tensor([-2, 4]), torch.tensor([7, -1]), torch.tensor([1.0, 2.0]),
                            torch.tensor([0.5, float("nan")]), method="exact", weight=torch.tensor([1.0, 1.0]))
    names = {7: "plon", 4: "fep"}
    text = rules.render(names.__getitem__)
    assert text[0].startswith("[plon] … [any query, via b_Q] → L1H0.5")
    assert text[1].startswith("[any key, via SAE residual] … [fep] → L1H0.5")
    frame = rules.to_frame(names.__getitem__)
    assert frame["query_desc"].tolist() == ["any query, via b_Q", "fep"] and "weight" in frame


def test_exact_predictions_ignore_float_noise_activations():
    """An SAE whose encoder leaves ±1e-8 on every feature: REF's convention makes the key present
    everywhere; exact mode counts it only where it really fires."""
    acts = torch.zeros(4, 5, 3)
    acts[:, :, 1] = 1e-8  # the key feature as float noise at every position
    acts[:2, 1, 1] = 1.0  # really present in exemplars 0 and 1
    acts[:, 3, 2] = 1.0  # the query feature at the scored position 3
    positions = torch.full((4,), 3)
    exact = SkipgramRuleSet("x", torch.tensor([2]), torch.tensor([1]), torch.ones(1), torch.ones(1), key_power=1,
                            method="exact", weight=torch.tensor([1.0]), min_weight=0.0, act_floor=1e-4)
    assert (exact.predict(acts, positions) > 0).tolist() == [True, True, False, False]
    paper = dataclasses.replace(exact, method="weights", weight=None, act_floor=0.0, min_weight=float("-inf"))
    assert (paper.predict(acts, positions) > 0).all()
