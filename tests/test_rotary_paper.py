"""Paper mode on rotary heads: A_δ is the model's own logit at offset δ, the importance sums over the
offsets present (autograd oracle), rules carry offsets and fire only where they promote."""
import math

import pytest
import torch

from attnrules.circuit import HeadCircuit
from attnrules.circuit.rotary import Rotary
from attnrules.importance import paper_importance, rotary_factors_all_pairs
from attnrules.rules import SkipgramRuleSet
from attnrules.rules.skipgram import offset_text, positioned
from attnrules.sources import InputSAE, OutputSAE


def rotary_model(**overrides):
    """A random 1-layer rotary model (RMSPre), with the options a test asks for."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = dict(n_layers=1, d_model=12, n_ctx=10, d_head=8, n_heads=4, d_vocab=30, attn_only=True,
               normalization_type="RMSPre", positional_embedding_type="rotary", rotary_dim=8, act_fn="relu", seed=0)
    cfg.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**cfg)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "b_V" in name or "b_O" in name:
                p.zero_()
            elif name.endswith(".w"):  # norm gains: not all ones, so folding them matters
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def exact_saes(model, head, n_out=3, seed=0, layer=0):
    """An input SAE that reconstructs the residual exactly (features relu(x), relu(−x)) and a random
    output SAE for ``head``."""
    d, dh = model.cfg.d_model, model.cfg.d_head
    eye = torch.eye(d)
    W_dec = torch.cat([eye, -eye])
    sae_in = InputSAE.from_tensors(W_dec.T.contiguous(), torch.zeros(2 * d), W_dec, torch.zeros(d), layer=layer)
    g = torch.Generator().manual_seed(seed)
    sae_out = OutputSAE.from_tensors(torch.randn(dh, n_out, generator=g), torch.zeros(n_out),
                                     torch.randn(n_out, dh, generator=g), torch.zeros(dh), layer=layer, head=head,
                                     n_heads=model.cfg.n_heads, d_head=dh)
    return sae_in, sae_out


CASES = {
    "neox pairing": {},
    "adjacent pairs, partial rotary": {"rotary_adjacent_pairs": True, "rotary_dim": 4},
    "grouped-query attention": {"n_key_value_heads": 2},
    "qk-norm": {"use_qk_norm": True},
    "other base": {"rotary_base": 50},
}


@pytest.mark.parametrize("case", CASES)
def test_paper_score_at_offset_is_the_models_logit_times_the_scale(case):
    """With an input SAE that reconstructs exactly, Σ f_tq f_sk A_{t−s}(q, k) is transformer_lens's
    logit × attn_scale × σ_t σ_s (RMS scales; QK-norm's scales too, which paper mode ignores)."""
    model = rotary_model(**CASES[case])
    head = 3
    sae_in, sae_out = exact_saes(model, head)
    circuit = HeadCircuit.from_model(model, sae_in, sae_out)
    assert torch.equal(circuit.offsets, torch.arange(model.cfg.n_ctx))
    tokens = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    x = cache["blocks.0.hook_resid_pre"]
    f = sae_in.encode(x).double()
    scale = cache["blocks.0.ln1.hook_scale"][..., 0].double()  # [B, T]
    logits = cache["blocks.0.attn.hook_attn_scores"][:, head].double() * model.blocks[0].attn.attn_scale
    logits = logits * scale[:, :, None] * scale[:, None, :]
    if CASES[case].get("use_qk_norm"):
        kv = head // 2 if "n_key_value_heads" in CASES[case] else head
        rho_q = cache["blocks.0.attn.q_norm.hook_scale"].reshape(2, 10, -1)[:, :, head].double()
        rho_k = cache["blocks.0.attn.k_norm.hook_scale"].reshape(2, 10, -1)[:, :, kv].double()
        logits = logits * rho_q[:, :, None] * rho_k[:, None, :]
    t, s = torch.tril_indices(10, 10)
    for b in range(2):
        q = f[b, t] @ circuit.query_proj.double()
        k = f[b, s] @ circuit.key_proj.double()
        mine = circuit.rotary.scores(q, k, t - s)
        torch.testing.assert_close(mine, logits[b, t, s], rtol=1e-5, atol=1e-5 * float(logits.abs().max()))


def test_attn_of_feature_pairs_matches_the_rotation():
    """circuit.attn / attn_profile / best_attn agree with rotating the query projection by hand."""
    model = rotary_model(rotary_adjacent_pairs=True, rotary_dim=6)
    sae_in, sae_out = exact_saes(model, 1)
    circuit = HeadCircuit.from_model(model, sae_in, sae_out, offsets=[0, 2, 3, 7])
    q, k = torch.tensor([0, 5, 9]), torch.tensor([3, 3, 20])
    profile = circuit.attn_profile(q, k)
    assert profile.shape == (3, 8) and torch.isnan(profile[:, [1, 4, 5, 6]]).all()
    for d in (0, 2, 3, 7):
        by_hand = (circuit.rotary.rotate(circuit.query_proj[q].double(), torch.full((3,), d))
                   * circuit.key_proj[k].double()).sum(-1)
        torch.testing.assert_close(profile[:, d], by_hand)
        torch.testing.assert_close(circuit.attn(q, k, torch.full((3,), d)).double(), by_hand, rtol=1e-5, atol=1e-6)
    best, at = circuit.best_attn(q, k)
    torch.testing.assert_close(best.double(), profile.nan_to_num(nan=-math.inf).max(-1).values, rtol=1e-5, atol=1e-6)
    assert set(at.tolist()) <= {0, 2, 3, 7}


def test_offsets_are_checked():
    model = rotary_model()
    sae_in, sae_out = exact_saes(model, 0)
    with pytest.raises(ValueError, match="offsets must lie in"):
        HeadCircuit.from_model(model, sae_in, sae_out, offsets=[0, 10])
    circuit = HeadCircuit.from_model(model, sae_in, sae_out)
    with pytest.raises(ValueError, match="offsets are required"):
        circuit.attn(torch.tensor([0]), torch.tensor([1]))
    assert circuit.offset_blind().rotary is None
    with pytest.raises(ValueError, match="rotary circuits only"):
        circuit.offset_blind().with_offsets([0, 1])


def surrogate_importance(circuit, feature, queries, keys, acts, positions):
    """REF's surrogate with offsets, differentiated by autograd: the oracle."""
    kq = torch.stack([circuit.attn_profile(queries.repeat_interleave(len(keys)), keys.repeat(len(queries)))[:, d]
                      for d in range(acts.shape[1])])  # [D, |Q|·|K|]
    kq = kq.reshape(acts.shape[1], len(queries), len(keys))
    mask = torch.ones(len(queries), len(keys), dtype=torch.float64, requires_grad=True)
    v = (circuit.value_proj.double() @ circuit.encoder_vector(feature).double())[keys]
    total = 0.0
    for n in range(acts.shape[0]):
        t = int(positions[n])
        fq = acts[n, t, queries].double()
        logits = torch.stack([fq @ (kq[t - i] * mask) @ acts[n, i, keys].double() for i in range(t + 1)])
        alpha = torch.softmax(logits, 0)
        total = total + (alpha * (acts[n, : t + 1, keys].double() @ v)).sum()
    total.backward()
    return mask.grad


def random_exemplars(n_in, n=5, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(n, t, n_in, generator=g, dtype=torch.float64) - 0.8)
    positions = torch.randint(2, t, (n,), generator=g)
    return acts, positions


def test_rotary_paper_importance_is_the_gradient_of_the_surrogate():
    model = rotary_model(rotary_dim=6)
    sae_in, sae_out = exact_saes(model, 2)
    circuit = HeadCircuit.from_model(model, sae_in, sae_out)
    c64 = HeadCircuit(*(getattr(circuit, f).double() for f in ("query_proj", "key_proj", "value_proj", "out_encoder",
                                                                  "out_bias")), rotary=circuit.rotary,
                      offsets=circuit.offsets)
    acts, positions = random_exemplars(c64.n_inputs)
    queries, keys = torch.tensor([0, 3, 5, 11, 17]), torch.tensor([1, 3, 8, 20])
    mine = paper_importance(c64, 1, queries, keys, acts, positions)
    torch.testing.assert_close(mine, surrogate_importance(c64, 1, queries, keys, acts, positions))
    # over all pairs: one inner product per pair
    qv, kv = rotary_factors_all_pairs(c64, 1, acts, positions)
    every = torch.arange(c64.n_inputs)
    torch.testing.assert_close(qv @ kv.T, paper_importance(c64, 1, every, every, acts, positions))


def test_offset_text():
    cand = torch.ones(8, dtype=torch.bool)
    as_mask = lambda on: torch.tensor([i in on for i in range(8)])
    assert offset_text(as_mask({1}), cand) == "δ=1"
    assert offset_text(as_mask({2, 3, 4}), cand) == "δ=2–4"
    assert offset_text(as_mask({3, 4, 5, 6, 7}), cand) == "δ≥3"
    assert offset_text(as_mask({1, 5, 6}), cand) == "δ∈{1, 5–6}"
    assert offset_text(as_mask(set(range(8))), cand) == "any"
    assert offset_text(as_mask(set()), cand) == "none"


def test_rules_fire_only_at_offsets_where_they_promote():
    """A term whose A_δ = cos(2(δ − 1)) is positive at offsets 1 and 4 only fires there, scored with the
    A of the offset present, and is rendered with those offsets."""
    rotary = Rotary(torch.tensor([0]), torch.tensor([1]), torch.tensor([], dtype=torch.long),
                    torch.cos(torch.arange(6.0) * 2.0)[:, None].double(), torch.sin(torch.arange(6.0) * 2.0)[:, None].double())
    # query feature 0 rotated so that it meets key feature 1 at angle (δ − 1)·2: A_δ = cos(2(δ − 1))
    q = torch.tensor([[math.cos(2.0), -math.sin(2.0)], [0.0, 0.0]])
    k = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    circuit = HeadCircuit(q, k, torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0], [0.0]]), torch.zeros(1),
                          rotary=rotary, offsets=torch.arange(6))
    profile = circuit.attn_profile(torch.tensor([0]), torch.tensor([1]))[0]
    assert int(profile.argmax()) == 1
    rules = positioned(SkipgramRuleSet("L0H0.0", torch.tensor([0]), torch.tensor([1]), profile.max()[None].float(),
                                       torch.ones(1)), circuit)
    acts = torch.zeros(3, 6, 2)
    positions = torch.tensor([4, 4, 4])
    acts[:, 4, 0] = 1.0  # the query at 4
    acts[0, 3, 1] = 1.0  # key at offset 1: fires
    acts[1, 1, 1] = 1.0  # key at offset 3: A = cos(4) < 0, does not fire
    acts[2, 0, 1] = 1.0  # key at offset 4: A = cos(6)
    predicted = rules.predict(acts, positions)
    torch.testing.assert_close(predicted, torch.tensor([1.0, math.cos(4.0), math.cos(6.0)]))
    assert (predicted > 0).tolist() == [True, False, True]
    assert rules.render(str)[0].startswith("[1] …(δ∈{1, 4})… [0] → L0H0.0   (A=1, V=1, δ*=1)")
    assert rules.to_frame()[["offset", "offsets"]].values.tolist() == [[1, "δ∈{1, 4}"]]


def test_toy_rope_offset_rule_is_recovered_and_offset_blind_scoring_misses_it(tmp_path, capsys):
    """`attnrules extract --model toy-rope`: the offset-1 rule with its offset and F1 = 1, the offset-free
    skip-gram without one; scored offset-blind (A = A_0), the offset-1 rule is lost (F1 = 0)."""
    import html
    import json

    import pandas as pd

    from attnrules.cli import main
    from attnrules.report import render_report, load_results

    argv = ["extract", "--model", "toy-rope", "--features", "0,1", "--max-rules", "8", "--counting-bases", "16",
            "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "aware")]) == 0
    printed = capsys.readouterr().out
    assert "[Harry] …(δ=1)… [Potter] → L0H0.0" in printed and "[If] … [then] → L0H0.1" in printed
    head = tmp_path / "aware" / "L0H0"
    metrics = pd.read_csv(head / "metrics.csv")
    assert (metrics["f1"] == 1.0).all()  # every ordering, every N, both features
    rules = pd.read_csv(head / "rules.csv")
    top = rules[(rules["rank"] == 0)].set_index(["feature", "method"])
    assert (top.loc["L0H0.0", ["offset", "offsets"]].values.tolist() == [[1, "δ=1"]] * 3)
    assert (top.loc["L0H0.1", "offsets"] == "any").all()
    pairs = pd.read_csv(head / "pairs.csv")
    best = pairs[(pairs.feature == "L0H0.0") & (pairs.ranking == "weights_all_pairs")].iloc[0]
    assert (best.query_desc, best.key_desc, best.offset) == ("Potter", "Harry", 1)
    assert "[Harry] …(δ=1)… [Potter]" in html.unescape(render_report(load_results(tmp_path / "aware")))

    assert main([*argv, "--offset-blind", "--out", str(tmp_path / "blind")]) == 0
    printed = capsys.readouterr().out
    assert "δ" not in printed
    blind = pd.read_csv(tmp_path / "blind" / "L0H0" / "metrics.csv")
    paper = blind[(blind.feature == "L0H0.0") & blind.method.isin(["weights", "importance"])]
    assert (paper["f1"] == 0.0).all()
    notes = json.loads((tmp_path / "blind" / "L0H0" / "results.json").read_text())["metadata"]["notes"]
    assert any("offset_blind" in n for n in notes)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen3", "gemma2", "gemma3", "neox"])
def test_paper_circuit_on_every_family_is_the_models_rotated_query_key_product(name):
    """On each family (tests/families.py), with an input SAE that reconstructs exactly, the paper-mode
    score Σ f_tq f_sk A_{t−s}(q, k) equals the model's own query and key — hook_q / hook_k without
    their biases and norm scales (what paper mode drops), with the QK-norm gains — rotated by
    transformer_lens's apply_rotary at t and s: the rotation tables, pairing, partial rotary, local
    bases, GQA mapping and folded gains are all the model's."""
    from families import LOCAL_LAYERS, build_family

    model = build_family(name)
    for layer in range(model.cfg.n_layers):
        head = model.cfg.n_heads - 1
        sae_in, sae_out = exact_saes(model, head, layer=layer)
        circuit = HeadCircuit.from_model(model, sae_in, sae_out)
        assert (circuit.window is not None) == (layer in LOCAL_LAYERS.get(name, ()))
        tokens = torch.randint(0, model.cfg.d_vocab, (1, 12), generator=torch.Generator().manual_seed(layer))
        _, cache = model.run_with_cache(tokens)
        attn = model.blocks[layer].attn
        kv = head // (model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads))
        scale = cache[f"blocks.{layer}.ln1.hook_scale"][0, :, 0].double()[:, None]

        def raw(hook, index, bias, norm):
            """The head's un-normalised projection, bias removed, norm gain applied, rotated at its position."""
            x = (cache[f"blocks.{layer}.attn.hook_{hook}"][0, :, index].double() - bias[index].double()) * scale
            if norm is not None:
                x = x * norm.w.detach().double().reshape(-1, model.cfg.d_head)[index if norm.w.numel() > x.shape[-1] else 0]
            return attn.apply_rotary(x[None, :, None, :].float(), 0, None)[0, :, 0].double()

        use_norm = model.cfg.use_qk_norm
        q = raw("q", head, attn.b_Q, attn.q_norm if use_norm else None)
        k = raw("k", kv, attn._b_K if hasattr(attn, "_b_K") else attn.b_K, attn.k_norm if use_norm else None)
        f = sae_in.encode(cache[f"blocks.{layer}.hook_resid_pre"][0]).double()
        t, s = torch.tril_indices(12, 12)
        mine = circuit.rotary.scores(f[t] @ circuit.query_proj.double(), f[s] @ circuit.key_proj.double(), t - s)
        want = (q[t] * k[s]).sum(-1)
        torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
