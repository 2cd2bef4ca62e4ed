"""HeadCircuit from a model + SAEs or tensors; consistency with transformer_lens's forward pass."""
import dataclasses

import pytest
import torch

from attnrules.circuit import HeadCircuit
from attnrules.exemplars import input_activations
from attnrules.sources import InputSAE, OutputSAE
from attnrules.toy import build_toy
from tiny_gpt2 import build_tiny_gpt2


def random_saes(model, layer, head, n_in=70, n_out=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, dh = model.cfg.d_model, model.cfg.d_head
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sae_in = InputSAE.from_tensors(r(d, n_in), r(n_in), r(n_in, d), r(d), layer=layer)
    sae_out = OutputSAE.from_tensors(r(dh, n_out), r(n_out), r(n_out, dh), r(dh), layer=layer, head=head,
                                     n_heads=model.cfg.n_heads, d_head=dh)
    return sae_in, sae_out


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_gpt2()


def test_projections_are_decoder_times_head_weights(tiny):
    sae_in, sae_out = random_saes(tiny, 1, 2)
    c = HeadCircuit.from_model(tiny, sae_in, sae_out)
    attn = tiny.blocks[1].attn
    torch.testing.assert_close(c.query_proj, sae_in.W_dec @ attn.W_Q[2])
    torch.testing.assert_close(c.key_proj, sae_in.W_dec @ attn.W_K[2])
    torch.testing.assert_close(c.value_proj, sae_in.W_dec @ attn.W_V[2])
    torch.testing.assert_close(c.out_encoder, sae_out.W_enc)
    assert (c.layer, c.head, c.n_inputs, c.n_outputs, c.d_head) == (1, 2, 70, 9, 16)
    assert c.feature_name(4) == "L1H2.4"


def test_paper_scores_equal_tl_attention_scores_when_nothing_is_dropped():
    """On the toy (no LayerNorm, no biases, exact identity SAE) the feature pair terms sum to the real logits."""
    toy = build_toy()
    tokens = toy.corpus(4, seed=5)
    acts = input_activations(toy.model, toy.input_sae, tokens)
    _, cache = toy.model.run_with_cache(tokens)
    for head in (0, 1):
        c = toy.circuit(head)
        logits = torch.einsum("nqd,nkd->nqk", acts @ c.query_proj, acts @ c.key_proj) / c.d_head**0.5
        real = cache["blocks.0.attn.hook_attn_scores"][:, head]
        causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril()
        torch.testing.assert_close(logits[:, causal], real[:, causal], rtol=1e-5, atol=1e-5)


def test_unprocessed_model_is_refused():
    raw = build_tiny_gpt2(processed=False)
    sae_in, sae_out = random_saes(raw, 0, 0)
    with pytest.raises(ValueError, match="(?i)layernorm|value bias"):
        HeadCircuit.from_model(raw, sae_in, sae_out)


def test_mismatches_are_refused(tiny):
    sae_in, sae_out = random_saes(tiny, 1, 2)
    with pytest.raises(ValueError, match="head"):
        HeadCircuit.from_model(tiny, sae_in, sae_out, head=3)
    with pytest.raises(ValueError, match="layer"):
        HeadCircuit.from_model(tiny, sae_in, sae_out, layer=5)
    other_in, _ = random_saes(tiny, 0, 2)
    with pytest.raises(ValueError, match="input_sae reads layer 0 but output_sae is for layer 1"):
        HeadCircuit.from_model(tiny, other_in, sae_out)
    with pytest.raises(ValueError, match="output_sae is for L1H2"):
        HeadCircuit.from_model(tiny, sae_in, sae_out, head=1)


def test_from_tensors_checks_shapes_and_values():
    d, dh = torch.randn(5, 4), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"W_K must be \[d_model=4, d_head\]"):
        HeadCircuit.from_tensors(d, dh, torch.randn(5, 3), dh, torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"out_encoder must be \[d_head=3, n_out\]"):
        HeadCircuit.from_tensors(d, dh, dh, dh, torch.randn(4, 2))
    with pytest.raises(ValueError, match="out_bias must have shape"):
        HeadCircuit.from_tensors(d, dh, dh, dh, torch.randn(3, 2), torch.zeros(3))
    bad = dh.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="query_proj contains NaN"):
        HeadCircuit.from_tensors(d, bad, dh, dh, torch.randn(3, 2))
    c = HeadCircuit.from_tensors(d, dh, dh, dh, torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"feature must be an output-feature index in \[0, 2\)"):
        c.feature_name(2)
    with pytest.raises(ValueError, match="key_proj must have shape"):
        dataclasses.replace(c, key_proj=torch.zeros(5, 2))


def test_sae_lens_saes_are_accepted_directly(tiny):
    """Any sae_lens SAE of matching shapes works where attnrules' own containers are expected."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    def sae(d_in, d_sae, hook, head=None):
        cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=True, reshape_activations="none",
                                metadata=SAEMetadata(hook_name=hook, hook_head_index=head))
        s = StandardSAE(cfg)
        with torch.no_grad():
            for p in s.parameters():
                p.normal_(0, 0.3)
        return s

    sae_in = sae(48, 40, "blocks.1.hook_resid_pre")
    per_head = sae(16, 12, "blocks.1.attn.hook_z", head=2)
    c = HeadCircuit.from_model(tiny, sae_in, per_head)
    assert (c.layer, c.head, c.n_inputs, c.n_outputs) == (1, 2, 40, 12)
    torch.testing.assert_close(c.query_proj, sae_in.W_dec.detach() @ tiny.blocks[1].attn.W_Q[2])
    layer_level = sae(48, 12, "blocks.1.attn.hook_z")
    c = HeadCircuit.from_model(tiny, sae_in, layer_level, head=1)
    torch.testing.assert_close(c.out_encoder, layer_level.W_enc.detach()[16:32])
    with pytest.raises(ValueError, match="pass head="):
        HeadCircuit.from_model(tiny, sae_in, layer_level)
