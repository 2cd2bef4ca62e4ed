"""Value scores, REF's candidate table and the exhaustive ranking, against direct float64 math."""
import numpy as np
import pytest
import torch

from attnrules import engine
from attnrules.circuit import HeadCircuit
from attnrules.scoring import candidate_table, rank_all_pairs, value_scores
from topk_oracle import assert_matches, score_matrix


def make_circuit(n_in=60, d_model=10, d_head=4, n_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    dec, wq, wk, wv, enc = r(n_in, d_model), r(d_model, d_head), r(d_model, d_head), r(d_model, d_head), r(d_head, n_out)
    return HeadCircuit.from_tensors(dec, wq, wk, wv, enc, layer=3, head=7), (dec, wq, wk, wv, enc)


def test_value_scores_are_decoder_times_wv_times_encoder():
    circuit, (dec, _, _, wv, enc) = make_circuit()
    torch.testing.assert_close(value_scores(circuit, 2), dec @ wv @ enc[:, 2])
    torch.testing.assert_close(value_scores(circuit), dec @ wv @ enc)
    torch.testing.assert_close(value_scores(circuit, [4, 1]), (dec @ wv @ enc)[:, [4, 1]])


@pytest.mark.parametrize("negative_values", [False, True])
def test_candidate_table_follows_ref(negative_values):
    circuit, (dec, wq, wk, wv, enc) = make_circuit()
    table = candidate_table(circuit, 1, num_values=7, num_queries=5, negative_values=negative_values, backend="torch")
    v = (dec @ wv @ enc[:, 1]).numpy()
    ranked = np.abs(v) if negative_values else v
    keys = np.argsort(-ranked, kind="stable")[:7]
    a = (dec @ wk).numpy()[keys] @ (dec @ wq).numpy().T  # [keys, queries]
    queries = np.argsort(-a, axis=1, kind="stable")[:, :5]
    assert table.keys.tolist() == np.repeat(keys, 5).tolist()
    assert table.queries.tolist() == queries.ravel().tolist()
    np.testing.assert_allclose(table.attn_score.numpy(), np.take_along_axis(a, queries, 1).ravel())
    np.testing.assert_allclose(table.value_score.numpy(), np.repeat(ranked[keys], 5))
    np.testing.assert_allclose(table.score.numpy(), np.exp(table.attn_score.numpy() + 1e-10) * table.value_score.numpy())
    assert table.feature_name == "L3H7.1" and len(table.to_frame()) == 35


def test_weight_ordering_is_nlargest_keep_first():
    circuit, _ = make_circuit()
    table = candidate_table(circuit, 0, num_values=4, num_queries=3, backend="torch")
    frame = table.to_frame()
    want = frame.nlargest(5, "score", keep="first")
    top = table.top(5)
    assert top.queries.tolist() == want["query"].tolist() and top.keys.tolist() == want["key"].tolist()


def test_rank_all_pairs_matches_oracle():
    circuit, _ = make_circuit()
    c32 = HeadCircuit(*(getattr(circuit, f).float() for f in ("query_proj", "key_proj", "value_proj", "out_encoder", "out_bias")))
    res = rank_all_pairs(c32, 2, 40, backend="torch")
    s = score_matrix(circuit.query_proj, circuit.key_proj, key_weight=value_scores(circuit, 2))
    as_topk = engine.TopK(res.score, res.queries, res.keys, "global")
    assert_matches(as_topk, s, 40, "global", tol=1e-4 * float(np.abs(s).max()))
    torch.testing.assert_close(res.attn_score * res.value_score, res.score, rtol=1e-5, atol=1e-5)


def test_errors_name_the_argument():
    circuit, _ = make_circuit()
    with pytest.raises(ValueError, match="num_values=61 must be between 1 and the number of input features"):
        candidate_table(circuit, 0, num_values=61)
    with pytest.raises(ValueError, match="num_queries=0"):
        candidate_table(circuit, 0, num_values=5, num_queries=0)
    with pytest.raises(ValueError, match=r"feature must be an output-feature index in \[0, 5\)"):
        candidate_table(circuit, 5)
    with pytest.raises(ValueError, match="k=3601 is larger than the number of candidates"):
        rank_all_pairs(circuit, 0, 60 * 60 + 1, backend="torch")
