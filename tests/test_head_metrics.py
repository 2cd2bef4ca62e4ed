"""Head metrics (previous-token, induction, entropy) against independent computations."""
import math

import pytest
import torch

from attnrules.evaluation.head_metrics import HeadMetricsObserver, pattern_scores
from attnrules.exemplars import scan_heads
from attnrules.toy import build_toy


def previous_token_model(seq_len: int = 12, n_vocab: int = 5):
    """A 1-layer attention-only model whose head 0 puts all its attention on the previous token
    (exactly: a logit gap of 1e4), and head 1 attends uniformly (all logits 0)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    d_model = n_vocab + seq_len
    cfg = HookedTransformerConfig(n_layers=1, d_model=d_model, n_ctx=seq_len, d_head=seq_len, n_heads=2,
                                  d_vocab=n_vocab, attn_only=True, normalization_type=None, act_fn="relu",
                                  positional_embedding_type="standard", seed=0)
    model = HookedTransformer(cfg)
    state = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    eye = torch.eye(d_model)
    state["embed.W_E"], state["pos_embed.W_pos"] = eye[:n_vocab].clone(), eye[n_vocab:].clone()
    for t in range(seq_len):
        state["blocks.0.attn.W_Q"][0, n_vocab + t, t] = 1e4 * math.sqrt(seq_len)  # query at t looks for t
        if t + 1 < seq_len:
            state["blocks.0.attn.W_K"][0, n_vocab + t, t + 1] = 1.0  # key at t answers query t + 1
    model.load_state_dict(state, strict=False)
    return model.eval()


def brute_force(pattern: torch.Tensor, tokens: torch.Tensor, head: int) -> dict:
    """The metrics by loops over sequences and positions, in float64 (the module docstring's definitions)."""
    prev, ind, ent, ent_n = [], [], [], []
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            row = pattern[b, head, t, : t + 1].double()
            prev.append(float(row[t - 1]))
            h = -sum(float(x) * math.log(float(x)) for x in row if x > 0)
            ent.append(h)
            ent_n.append(h / math.log(t + 1))
            targets = {s + 1 for s in range(t - 1) if tokens[b, s] == tokens[b, t]}
            if targets:
                ind.append(sum(float(row[j]) for j in targets))
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"prev_token": mean(prev), "induction": mean(ind), "entropy": mean(ent), "entropy_norm": mean(ent_n)}


class _OneSAE:
    """The least an output SAE needs for scan_heads: its layer and an encode."""

    layer = 0
    W_enc = torch.zeros(1, 1)

    def encode(self, z):
        return z.flatten(-2)[..., :1]


def test_a_head_that_attends_to_the_previous_token_scores_1_and_a_uniform_head_is_maximal_entropy():
    model = previous_token_model()
    tokens = torch.randint(0, 5, (6, 12), generator=torch.Generator().manual_seed(0))
    observer = HeadMetricsObserver(0, tokens)
    scan_heads(model, [_OneSAE()], tokens, batch_size=4, observers=[observer])
    metrics = observer.result()
    assert metrics[0].prev_token == 1.0 and metrics[0].entropy == 0.0 and metrics[0].entropy_norm == 0.0
    assert metrics[1].entropy_norm == pytest.approx(1.0, abs=1e-6)
    assert metrics[1].prev_token == pytest.approx(sum(1 / (t + 1) for t in range(1, 12)) / 11, abs=1e-6)
    assert metrics[0].n_positions == 6 * 11


def test_the_observer_matches_loops_over_transformer_lens_own_pattern_hook():
    toy = build_toy()
    tokens = toy.corpus(40, seed=3)
    observer = HeadMetricsObserver(0, tokens)
    scan_heads(toy.model, [toy.output_saes[0]], tokens, batch_size=16, observers=[observer])
    _, cache = toy.model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["blocks.0.attn.hook_pattern"]
    for head, got in observer.result().items():
        want = brute_force(pattern, tokens, head)
        for name, value in want.items():
            assert getattr(got, name) == pytest.approx(value, rel=1e-5, abs=1e-7), (head, name)


def test_hand_built_patterns():
    # [BOS, a, b, c, a, b, c]: an induction head at the second a, b, c attends to the b, c, a after the first ones
    tokens = torch.tensor([[0, 1, 2, 3, 1, 2, 3]])
    pattern = torch.zeros(1, 1, 7, 7)
    pattern[0, 0, 0, 0] = 1
    for t in range(1, 4):
        pattern[0, 0, t, 0] = 1  # no earlier occurrence: on BOS
    for t, j in ((4, 2), (5, 3), (6, 4)):
        pattern[0, 0, t, j] = 1
    (m,) = pattern_scores(pattern, tokens)
    assert m.induction == 1.0 and m.n_induction == 3 and m.entropy == 0.0
    assert m.prev_token == pytest.approx(1 / 6)  # only t = 1, whose previous token is BOS
    # half on the previous token, half on BOS: entropy log 2 at t ≥ 2 (t = 1: BOS is the previous token)
    half = torch.zeros(1, 1, 4, 4)
    half[0, 0, 0, 0] = 1
    half[0, 0, 1, 0] = 1
    for t in (2, 3):
        half[0, 0, t, 0] = half[0, 0, t, t - 1] = 0.5
    (m,) = pattern_scores(half, torch.tensor([[0, 1, 2, 3]]))
    assert m.prev_token == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m.entropy == pytest.approx(2 * math.log(2) / 3)
    assert m.entropy_norm == pytest.approx((math.log(2) / math.log(3) + math.log(2) / math.log(4)) / 3)
    assert m.induction is None and m.n_induction == 0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="pattern must be"):
        pattern_scores(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must be"):
        pattern_scores(torch.zeros(2, 1, 4, 4), torch.zeros(2, 5, dtype=torch.long))
