"""Activations over a corpus and REF's exemplar sampling (§5), checked against brute force."""
import pytest
import torch

from attnrules.exemplars import FeatureScan, input_activations, sample_exemplars, sample_features, scan_output_features
from attnrules.sources import tokenize_corpus


def test_scan_equals_a_direct_forward_pass(toy):
    tokens = toy.corpus(70, seed=1)
    scan = scan_output_features(toy.model, toy.output_saes[0], tokens, batch_size=16)
    _, cache = toy.model.run_with_cache(tokens)
    acts = toy.output_saes[0].encode(cache["blocks.0.attn.hook_z"])
    torch.testing.assert_close(scan.act_max, acts.max(1).values)
    assert torch.equal(scan.counts, (acts.max(1).values > 0).sum(0))
    assert torch.equal(scan.act_argmax.long(), acts.argmax(1)) and scan.act_argmax.dtype == torch.int16


def test_input_activations_are_the_sae_encoding_of_resid_pre(toy):
    tokens = toy.corpus(9, seed=2)
    acts = input_activations(toy.model, toy.input_sae, tokens, batch_size=4)
    _, cache = toy.model.run_with_cache(tokens)
    torch.testing.assert_close(acts, toy.input_sae.encode(cache["blocks.0.hook_resid_pre"]))
    # the toy's input features are its tokens and positions
    assert torch.equal(acts[:, :, : len(toy.model.tokenizer.get_vocab())].argmax(-1), tokens)


def _scan(act_max):
    return FeatureScan((act_max > 0).sum(0), act_max, torch.zeros_like(act_max, dtype=torch.long) + 3)


def test_split_sizes_are_refs():
    g = torch.Generator().manual_seed(0)
    act = torch.rand(1000, 2, generator=g) * (torch.rand(1000, 2, generator=g) < 0.4)
    ex = sample_exemplars(_scan(act), 1, seq_len=64)
    for split in (ex.train, ex.val, ex.test):
        assert len(split) == 100 and int(split.positive.sum()) == 50
        assert (split.act_max[split.positive] > 0).all() and (split.act_max[~split.positive] == 0).all()
        assert ((split.position[~split.positive] >= 1) & (split.position[~split.positive] < 64)).all()
        assert (split.position[split.positive] == 3).all()  # positives are scored at their argmax
    seqs = torch.cat([ex.train.sequence, ex.val.sequence, ex.test.sequence])
    assert seqs.unique().numel() == 300
    positives = seqs[torch.cat([ex.train.positive, ex.val.positive, ex.test.positive])]
    top150 = torch.sort(act[:, 1], descending=True).indices[:150]
    assert set(positives.tolist()) == set(top150.tolist())


def test_quantile_positives_span_the_activation_ranks():
    g = torch.Generator().manual_seed(0)
    act = torch.rand(1000, 2, generator=g) * (torch.rand(1000, 2, generator=g) < 0.4)
    ex = sample_exemplars(_scan(act), 1, seq_len=64, positives="quantiles")
    positives = torch.cat([s.sequence[s.positive] for s in (ex.train, ex.val, ex.test)])
    active = torch.nonzero(act[:, 1] > 0).flatten()
    ranked = active[torch.sort(act[active, 1], descending=True, stable=True).indices]
    assert positives.numel() == 150 and set(positives.tolist()) <= set(ranked.tolist())
    assert ranked[0] in positives and ranked[-1] in positives  # the strongest and the weakest
    ranks = sorted(int((ranked == p).nonzero()) for p in positives)
    gaps = torch.diff(torch.tensor(ranks))
    assert int(gaps.max()) - int(gaps.min()) <= 1  # evenly spread
    with pytest.raises(ValueError, match="positives must be"):
        sample_exemplars(_scan(act), 1, seq_len=64, positives="bottom")


def test_small_bins_and_skips():
    act = torch.zeros(40, 1)
    act[:20, 0] = torch.linspace(1, 2, 20)
    ex = sample_exemplars(_scan(act), 0, seq_len=16, examples_per_bin=150)
    assert sum(len(s) for s in (ex.train, ex.val, ex.test)) == 40
    assert len(ex.test) == 14 and len(ex.train) == 14 and len(ex.val) == 12
    act[5:, 0] = 0
    assert sample_exemplars(_scan(act), 0, seq_len=16) is None  # fewer than 6 positives: skipped


def test_sample_features_uses_count_bounds():
    counts = torch.tensor([10, 150, 151, 850, 851, 0])
    assert sample_features(counts, 1000, num_features=None) == [1, 2, 3]
    picked = sample_features(counts, 1000, num_features=2, seed=1)
    assert len(picked) == 2 and set(picked) <= {1, 2, 3}
    assert sample_features(counts, 1000, num_features=2, seed=1) == picked


def test_tokenize_corpus_chunks_like_ref(toy):
    docs = ["If the day then " * 20, "too short", "the city " * 40]
    tokens = tokenize_corpus(toy.model, docs, seq_len=16, n_sequences=100)
    bos = toy.model.tokenizer.bos_token_id
    assert tokens.shape[1] == 16 and (tokens[:, 0] == bos).all()
    # 81 tokens each, truncated to the model's context (32) as to_tokens does: 2 chunks per long doc
    assert tokens.shape[0] == 2 * (32 // 16)
    with pytest.raises(ValueError, match="no document"):
        tokenize_corpus(toy.model, ["short"], seq_len=16)


def test_bad_tokens_are_rejected(toy):
    with pytest.raises(ValueError, match="tokens must be ids in"):
        scan_output_features(toy.model, toy.output_saes[0], torch.full((2, 8), 10_000))
    with pytest.raises(ValueError, match="tokens must be a 2-D tensor"):
        scan_output_features(toy.model, toy.output_saes[0], torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        scan_output_features(toy.model, toy.output_saes[0], torch.zeros(2, 8))
    with pytest.raises(ValueError, match="context"):
        scan_output_features(toy.model, toy.output_saes[0], torch.zeros(2, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="feature must be in"):
        sample_exemplars(_scan(torch.zeros(10, 2)), 2, seq_len=8)


def test_exemplar_views_give_acts_and_dfa(toy):
    from attnrules.exemplars import exemplar_views

    tokens = toy.model.to_tokens(["If the day then a", "the If of then"])
    views = exemplar_views(toy.model, toy.output_saes[0], 0, tokens, torch.tensor([0, 1]), torch.tensor([4, 4]))
    v = views[0]
    assert v.tokens[:5] == ("<|endoftext|>", "If", "the", "day", "then") and v.position == 4
    assert v.acts[4] > 0 and v.acts[2] == 0
    # DFA: all of the attribution sits on the key [If]; positions after t get none
    assert max(range(len(v.dfa)), key=lambda i: v.dfa[i]) == 1 and v.dfa[5] == 0
    _, cache = toy.model.run_with_cache(tokens)
    u = toy.output_saes[0].head_encoder[:, 0]
    expected = cache["blocks.0.attn.hook_pattern"][0, 0, 4] * (cache["blocks.0.attn.hook_v"][0, :, 0] @ u)
    torch.testing.assert_close(torch.tensor(v.dfa), expected)


def test_scan_heads_equals_a_direct_forward_pass_with_one_pass(toy, monkeypatch):
    """Each head's scan equals transformer_lens's own forward pass, and all heads share one pass."""
    from attnrules import exemplars
    from attnrules.exemplars import scan_heads

    passes = []
    real = exemplars.run_batches

    def counted(*args, **kwargs):
        passes.append(1)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(exemplars, "run_batches", counted)
    tokens = toy.corpus(40, seed=3)
    both = scan_heads(toy.model, [toy.output_saes[0], toy.output_saes[1]], tokens, batch_size=16)
    assert len(passes) == 1
    _, cache = toy.model.run_with_cache(tokens)
    for scan, head in zip(both, (0, 1)):
        acts = toy.output_saes[head].encode(cache["blocks.0.attn.hook_z"])
        torch.testing.assert_close(scan.act_max, acts.max(1).values)
        assert torch.equal(scan.act_argmax.long(), acts.argmax(1)) and scan.act_argmax.dtype == torch.int16
        assert torch.equal(scan.counts, (acts.max(1).values > 0).sum(0)) and int(scan.counts.sum()) > 0
