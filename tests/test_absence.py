"""Absence rules, REF's distractor check, natural prevalence and counterfactual insertion."""
import numpy as np
import pytest
import torch

from attnrules.rules.absence import absence_rules, distractor_share, paper_distractor
from attnrules.evaluation.insertion import counterfactual_insertion, insert_copies, insertion_token, natural_prevalence
from attnrules.circuit import HeadCircuit
from attnrules.rules import SkipgramRuleSet
from attnrules.scoring import value_scores


def _terms(name, pairs):
    q = torch.tensor([p[0] for p in pairs])
    k = torch.tensor([p[1] for p in pairs])
    return SkipgramRuleSet(name, q, k, torch.zeros(len(pairs)), torch.zeros(len(pairs)))


def test_planted_distractor_is_found_and_rendered(toy):
    c = toy.circuit(0)
    tid = toy.token_id
    rules = absence_rules(c, 1, _terms("L0H0.1", [(tid("com"), tid("http"))]), backend="torch")
    assert len(rules) == 1 and rules[0].distractors == (tid("twitter"),)
    assert rules[0].render(lambda j: toy.model.tokenizer.convert_ids_to_tokens(j)) == "[http] … [com] → L0H0.1 unless [twitter]"
    assert absence_rules(c, 0, _terms("L0H0.0", [(tid("then"), tid("If"))]), backend="torch") == []


def test_absence_rules_match_brute_force():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    c = HeadCircuit.from_tensors(r(50, 8), r(8, 4), r(8, 4), r(8, 4), r(4, 3))
    pairs = [(3, 7), (10, 2), (3, 11), (49, 0)]
    got = {(a.query, a.key): a.distractors for a in absence_rules(c, 2, _terms("x", pairs), backend="torch")}
    v = value_scores(c, 2).numpy()
    a_all = (c.query_proj @ c.key_proj.T).numpy()
    for q, k in pairs:
        row = a_all[q]
        order = np.lexsort((np.arange(50), -row))
        promotes = row[k] * v[k] > 0
        want = tuple(int(j) for j in order if promotes and row[j] > row[k] + 0.01 * row.std(ddof=1)
                     and v[j] < 0 and abs(v[j]) >= 0.1 * abs(v[k]))
        assert got.get((q, k), ()) == want
    assert any(got.values())


def test_float_noise_values_make_no_distractor():
    """A key whose value is float noise (|V| ~ 1e-8 against values ~1) is no distractor, even when its
    value vector is itself that small (as a key no weight writes), and a term whose own value is noise
    gets none; a weak but real negative value below 10% of the term's is none."""
    q_proj = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    k_proj = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
    # key 2: the term's key (V = 1); key 3: pulls harder, V = -1e-8 (noise); key 4: pulls harder, V = -0.05
    v_proj = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [-1e-8, 0.0], [-0.05, 1.0]])
    c = HeadCircuit(q_proj, k_proj, v_proj, torch.tensor([[1.0], [0.0]]), torch.zeros(1))
    assert absence_rules(c, 0, _terms("x", [(0, 2)]), backend="torch") == []
    strong = HeadCircuit(q_proj, k_proj, v_proj * torch.tensor([[1.0, 1.0]] * 4 + [[4.0, 1.0]]),
                         torch.tensor([[1.0], [0.0]]), torch.zeros(1))
    (rule,) = absence_rules(strong, 0, _terms("x", [(0, 2)]), backend="torch")
    assert rule.distractors == (4,)


def test_paper_distractor_and_share(toy):
    c = toy.circuit(0)
    tid = toy.token_id
    d = paper_distractor(c, 1)
    assert (d.k, d.q, d.k_, d.k_rank, d.k_rank_) == (tid("http"), tid("com"), tid("twitter"), 1, 0)
    assert d.has_distractor and d.value_score_ == pytest.approx(-1.5)
    plain = paper_distractor(c, 0)
    assert (plain.k, plain.q, plain.k_) == (tid("If"), tid("then"), None) and not plain.has_distractor
    assert distractor_share(c, [0, 1, 2, 3]) == 0.25
    with pytest.raises(ValueError, match="features is empty"):
        distractor_share(c, [])


def test_natural_prevalence_matches_token_reading(toy):
    tokens = toy.corpus(600, seed=2)
    tid = toy.token_id
    k, d, q = tid("http"), tid("twitter"), tid("com")
    (p,) = natural_prevalence(toy.model, toy.input_sae, toy.output_saes[0], tokens, [(1, k, d, q)], batch_size=128)
    kq = kkq = 0
    for row in tokens.tolist():
        if k not in row:
            continue
        first_k = row.index(k)
        q_pos = next((i for i in range(first_k, len(row)) if row[i] == q), None)
        if q_pos is None:
            continue
        if d in row[: q_pos + 1]:
            kkq += 1
        else:
            kq += 1
    assert (p.kq_count, p.kkq_count) == (kq, kkq) and kq > 0 and kkq > 0
    assert p.mean_act_without > 0 and p.mean_act_with == 0.0
    assert p.share_with_distractor == pytest.approx(kkq / (kq + kkq))


def test_insertion_suppresses_the_absence_feature(toy):
    tokens = toy.model.to_tokens(["http the com the a", "http a of com the"])
    positions = torch.tensor([3, 4])
    tw = insertion_token(toy.model, toy.input_sae, toy.token_id("twitter"))
    assert tw == toy.token_id("twitter")
    assert insertion_token(toy.model, toy.input_sae, toy.token_id("twitter"), mode="activation") == tw
    assert insertion_token(toy.model, toy.input_sae, len(toy.model.tokenizer.get_vocab()) + 2) is None  # a position
    res = counterfactual_insertion(toy.model, toy.output_saes[0], 1, tokens, positions, tw, counts=(0, 1, 2, 3))
    assert res.mean_act[0] > 0.3 and res.mean_act[1:3] == (0.0, 0.0) and res.n_examples == (2, 2, 1, 0)
    assert res.mean_act[3] is None  # both scored positions fell off the end: no number (None, as in JSON)


def test_insert_copies_moves_and_drops():
    tokens = torch.arange(6).repeat(2, 1)
    new, pos, keep = insert_copies(tokens, torch.tensor([2, 4]), 9, 2)
    assert new.tolist() == [[0, 9, 9, 1, 2, 3]] and pos.tolist() == [4] and keep.tolist() == [0]
