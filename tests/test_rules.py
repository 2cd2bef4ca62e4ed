"""Rule predictions against a literal, loop-by-loop reading of REF §4."""
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
