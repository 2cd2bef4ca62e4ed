"""Every sae_lens SAE architecture as input and output SAE (standard, gated, JumpReLU, TopK, BatchTopK),
normalised activations folded into the model's space, and the clear refusals (issue 13 items 1, 2, 5)."""
import dataclasses
import warnings

import pytest
import torch
from families import build_family
from sae_lens import (
    AbsTopKSAE,
    AbsTopKSAEConfig,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.sae import SAEMetadata
from tiny_gpt2 import build_tiny_gpt2

from attnrules import ExtractSettings, extract_head
from attnrules.circuit import HeadCircuit, reconstruct
from attnrules.evaluation.metrics import binary_metrics
from attnrules.exemplars import input_activations, scan_output_features
from attnrules.importance import paper_importance
from attnrules.sources import InputSAE, OutputSAE, as_sources

ARCHS = ("standard", "gated", "jumprelu", "topk", "batchtopk")
KINDS = {"standard": (StandardSAE, StandardSAEConfig), "gated": (GatedSAE, GatedSAEConfig),
         "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig), "topk": (TopKSAE, TopKSAEConfig),
         "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)}
LAYER, HEAD = 1, 2
SETTINGS = ExtractSettings(features=(0, 1, 2, 3), examples_per_bin=6, num_values=8, num_queries=8, max_rules=8,
                           exhaustive_k=5, counting_bases=8, counting_min_bases=4, counting_max=3, show_exemplars=1)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_gpt2(seed=3)


@pytest.fixture(scope="module")
def tokens(tiny):
    return torch.randint(0, tiny.cfg.d_vocab, (120, 10), generator=torch.Generator().manual_seed(0))


def lens_sae(arch, d_in, d_sae, hook_name, *, seed, data=None, head_index=None, **cfg):
    """A random sae_lens SAE of ``arch``, its pre-activations of order 1 on ``data [N, d_in]`` (samples of
    its input) and its features active on a few tokens each."""
    cls, cfg_cls = KINDS[arch]
    extra = {"k": 4} if arch in ("topk", "batchtopk") else {}
    meta = SAEMetadata(hook_name=hook_name, hook_head_index=head_index)
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=meta, **extra, **cfg))
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mean, scale = (torch.zeros(d_in), 1.0) if data is None else (data.mean(0), float((data - data.mean(0)).std()))
    values = {"W_enc": r(d_in, d_sae) / (scale * d_in**0.5), "W_dec": scale * r(d_sae, d_in) / d_in**0.5,
              "b_dec": mean + 0.1 * scale * r(d_in), "b_enc": 0.5 * r(d_sae) - 1.2, "b_mag": 0.3 * r(d_sae),
              "b_gate": 0.5 * r(d_sae) - 1.0, "r_mag": 0.3 * r(d_sae), "threshold": 0.2 * torch.rand(d_sae, generator=g)}
    if not sae.cfg.apply_b_dec_to_input:  # the same pre-activations without b_dec subtracted
        for name in ("b_enc", "b_mag", "b_gate"):
            values[name] = values[name] - values["b_dec"] @ values["W_enc"]
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(values[name])
        if arch == "batchtopk":
            sae.topk_threshold.fill_(0.1 * float(sae.W_dec.norm(dim=-1).mean()))  # pre-activations are × ‖d‖
    return sae


def sample(model, hook):
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.arange(40).reshape(4, 10) % model.cfg.d_vocab, names_filter=hook)
    return cache[hook]


def pair(model, arch, *, seed=0, per_head=True, reshape="none", **cfg):
    """(sae_lens input SAE, sae_lens output SAE) of ``arch`` on LAYER / HEAD of ``model``."""
    x = sample(model, f"blocks.{LAYER}.hook_resid_pre").flatten(0, 1)
    z = sample(model, f"blocks.{LAYER}.attn.hook_z").flatten(0, 1)
    z = z[:, HEAD] if per_head else z.flatten(-2)
    sae_in = lens_sae(arch, model.cfg.d_model, 24, f"blocks.{LAYER}.hook_resid_pre", seed=seed, data=x, **cfg)
    sae_out = lens_sae(arch, z.shape[-1], 8, f"blocks.{LAYER}.attn.hook_z", seed=seed + 1, data=z,
                       head_index=HEAD if per_head else None, reshape_activations=reshape, **cfg)
    return sae_in, sae_out


def own_active(sae, x):
    """What the SAE itself says is active, from sae_lens (BatchTopK: its inference form, a JumpReLU with
    the learnt global threshold)."""
    with torch.no_grad():
        if isinstance(sae, BatchTopKTrainingSAE):  # hidden_pre scaled by the decoder norms while training
            pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc) * sae.W_dec.norm(dim=-1)
            return pre.relu() * (pre > sae.topk_threshold) > 0
        return sae.encode(x) > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_active_sets_are_the_saes_own_encode(tiny, tokens, arch, model_name):
    """Exemplars' active sets are the SAE's own encode > 0, on a GPT-2-style and a rotary GQA model."""
    model = tiny if model_name == "gpt2" else build_family("llama")
    tokens = tokens % model.cfg.d_vocab
    for per_head, reshape in ((True, "none"), (False, "none"), (False, "hook_z")):
        lens_in, lens_out = pair(model, arch, per_head=per_head, reshape=reshape)
        sae_in = InputSAE.from_sae_lens(lens_in)
        sae_out = OutputSAE.from_sae_lens(lens_out, head=HEAD, n_heads=model.cfg.n_heads, d_head=model.cfg.d_head)
        assert sae_out.per_head == per_head and sae_in.architecture == sae_out.architecture
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        z, x = cache[f"blocks.{LAYER}.attn.hook_z"], cache[f"blocks.{LAYER}.hook_resid_pre"]
        reshaped = reshape == "hook_z" and arch != "batchtopk"  # a training SAE does not reshape itself
        z_sel = z[..., HEAD, :] if per_head else (z if reshaped else z.flatten(-2))
        want_out = own_active(lens_out, z_sel)
        scan = scan_output_features(model, sae_out, tokens, batch_size=32)
        assert torch.equal(scan.act_max > 0, want_out.any(dim=1)), (arch, per_head, reshape)
        assert 0 < int(want_out.sum()) < want_out.numel()
        assert torch.equal(input_activations(model, sae_in, tokens) > 0, own_active(lens_in, x))
    # the same SAE from its own tensors decides the same
    state = {k: v.detach() for k, v in lens_out.state_dict().items()}
    kind = {"batchtopk": "jumprelu"}.get(arch, arch)
    if arch == "batchtopk":  # the inference form: decoder norms folded, the global threshold per feature
        norms = state["W_dec"].norm(dim=-1)
        state.update(W_enc=state["W_enc"] * norms, b_enc=state["b_enc"] * norms, W_dec=state["W_dec"] / norms[:, None],
                     threshold=torch.full((8,), float(lens_out.topk_threshold)))
    from_state = OutputSAE.from_state_dict(state, layer=LAYER, head=HEAD, architecture=kind,
                                           k=4 if arch in ("topk", "batchtopk") and kind == "topk" else None,
                                           n_heads=model.cfg.n_heads, d_head=model.cfg.d_head)
    assert torch.equal(from_state.encode(z) > 0, sae_out.encode(z) > 0)
    torch.testing.assert_close(from_state.encode(z), sae_out.encode(z).detach())


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_reconstruction_and_encoder_direction(tiny, tokens, arch):
    llama = build_family("llama")  # rotary, GQA (head 2 reads key/value head 1)
    for model, (lens_in, lens_out) in [(tiny, pair(tiny, arch)), (llama, pair(llama, arch, seed=5))]:
        sae_in, sae_out = as_sources(model, lens_in, lens_out)
        ids = tokens[:4] % model.cfg.d_vocab
        dec = reconstruct(model, sae_in, HEAD, ids)
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, names_filter=f"blocks.{LAYER}.attn.hook_attn_scores")
        real = cache[f"blocks.{LAYER}.attn.hook_attn_scores"][:, HEAD].double()
        scale = float(real[:, dec.causal].abs().max())
        torch.testing.assert_close(dec.logits[:, dec.causal], real[:, dec.causal], rtol=1e-5, atol=1e-5 * scale)
        # an active feature's activation is linear in the effective encoder u (gated: the magnitude one)
        z = torch.randn(50, model.cfg.n_heads, model.cfg.d_head, generator=torch.Generator().manual_seed(1))
        acts = sae_out.encode(z).detach()
        linear = (z[:, HEAD] - sae_out.head_decoder_bias) @ sae_out.head_encoder + sae_out.b_enc
        torch.testing.assert_close(acts[acts > 0], linear[acts > 0], rtol=1e-5, atol=1e-5)


def viable(model, sae_out, tokens, n=3):
    """Up to n output features active in some but not nearly all sequences (exemplars of both kinds)."""
    counts = scan_output_features(model, sae_out, tokens).counts
    features = tuple(g for g, c in enumerate(counts.tolist()) if 12 <= c <= len(tokens) - 12)[:n]
    assert features, counts
    return features


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_extract_head_runs_on_every_architecture(tiny, tokens, arch, model_name):
    """On a GPT-2-style model and on a rotary GQA one (Llama), with no failed step."""
    model = tiny if model_name == "gpt2" else build_family("llama")
    tokens = tokens % model.cfg.d_vocab
    lens_in, lens_out = pair(model, arch, per_head=arch != "topk")
    sae_in, sae_out = as_sources(model, lens_in, lens_out, head=HEAD)
    settings = dataclasses.replace(SETTINGS, features=viable(model, sae_out, tokens))
    if arch == "jumprelu":
        settings = dataclasses.replace(settings, loss_type="post_activation", prediction_threshold="sae")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_head(model, sae_in, sae_out, tokens, settings=settings, progress=False)
    assert result.metadata["failed_steps"] == 0, [e for f in result.features for e in f.errors]
    assert result.features
    kind = "jumprelu" if arch == "batchtopk" else arch
    assert result.metadata["saes"]["output"]["architecture"] == kind
    assert result.metadata["saes"]["input"]["normalization"] == "none"


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_normalised_sae_equals_the_unnormalised_one(tiny, tokens, apply_b_dec):
    s = 4.0  # a power of two: folding is exact in floating point
    plain_in, plain_out = pair(tiny, "jumprelu", seed=7, apply_b_dec_to_input=apply_b_dec)
    norm_in, norm_out = pair(tiny, "jumprelu", seed=7, apply_b_dec_to_input=apply_b_dec,
                             normalize_activations="expected_average_only_in")
    with torch.no_grad():  # trained on s·x: W_enc/s, W_dec·s, b_dec·s
        for plain, norm in ((plain_in, norm_in), (plain_out, norm_out)):
            norm.W_enc.copy_(plain.W_enc / s)
            norm.W_dec.copy_(plain.W_dec * s)
            norm.b_dec.copy_(plain.b_dec * s)
    a = as_sources(tiny, plain_in, plain_out)
    b = (InputSAE.from_sae_lens(norm_in, scaling_factor=s, release="r", sae_id="in"),
         OutputSAE.from_sae_lens(norm_out, scaling_factor=s, n_heads=tiny.cfg.n_heads, d_head=tiny.cfg.d_head))
    for name in ("W_dec", "W_enc", "b_dec"):
        assert torch.equal(getattr(a[0], name), getattr(b[0], name)), name
    assert torch.equal(a[1].head_encoder, b[1].head_encoder)
    dec_a, dec_b = (reconstruct(tiny, i, HEAD, tokens[:4]) for i, _ in (a, b))
    torch.testing.assert_close(dec_a.groups, dec_b.groups, rtol=1e-6, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settings = dataclasses.replace(SETTINGS, features=viable(tiny, a[1], tokens))
        ra, rb = (extract_head(tiny, i, o, tokens, settings=settings, progress=False) for i, o in (a, b))
    assert [f.name for f in ra.features] == [f.name for f in rb.features] and ra.features
    for fa, fb in zip(ra.features, rb.features):
        for x, y in zip(fa.rules, fb.rules):
            assert [(t.query, t.key) for t in x.terms] == [(t.query, t.key) for t in y.terms]
    meta = rb.metadata["saes"]["input"]
    assert (meta["normalization"], meta["scaling_factor"], meta["release"], meta["sae_id"]) == \
        ("expected_average_only_in", s, "r", "in")
    assert meta["apply_b_dec_to_input"] is apply_b_dec
    # the same from tensors
    t_in = InputSAE.from_tensors(norm_in.W_enc.detach(), norm_in.b_enc.detach(), norm_in.W_dec.detach(),
                                 norm_in.b_dec.detach(), layer=LAYER, architecture="jumprelu",
                                 threshold=norm_in.threshold.detach(), apply_b_dec_to_input=apply_b_dec, scaling_factor=s)
    x = sample(tiny, f"blocks.{LAYER}.hook_resid_pre")
    assert torch.equal(t_in.W_dec, a[0].W_dec) and torch.equal(t_in.encode(x) > 0, a[0].encode(x) > 0)


def test_post_activation_gate_and_prediction_threshold_are_the_saes(tiny, tokens):
    lens_in, lens_out = pair(tiny, "jumprelu", seed=2)
    sae_in, sae_out = as_sources(tiny, lens_in, lens_out)
    gate = sae_out.surrogate_gate(0)
    b, th = float(sae_out.b_enc[0]), float(sae_out.threshold[0])
    pred = torch.tensor([th - b - 0.01, th - b + 0.01]).double()
    assert gate(pred).tolist() == [False, True]
    assert torch.equal(sae_out.firing_threshold, sae_out.threshold)
    circuit = HeadCircuit.from_model(tiny, sae_in, sae_out)
    acts = input_activations(tiny, sae_in, tokens[:30])
    positions = torch.full((30,), 9)
    keys = queries = torch.arange(10)
    pre = paper_importance(circuit, 0, queries, keys, acts, positions, loss_type="activation")
    opened = paper_importance(circuit, 0, queries, keys, acts, positions, loss_type="post_activation",
                              gate=lambda p: torch.ones_like(p, dtype=torch.bool))
    closed = paper_importance(circuit, 0, queries, keys, acts, positions, loss_type="post_activation",
                              gate=lambda p: torch.zeros_like(p, dtype=torch.bool))
    assert bool(pre.abs().sum()) and torch.equal(pre, opened) and not bool(closed.abs().sum())
    m = binary_metrics(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.5, 1.5, 2.0]), prediction_threshold=1.0)
    assert (m.tp, m.fp, m.fn, m.tn) == (1, 1, 0, 1)  # truth above threshold (0), predictions above 1.0


def test_bad_sae_inputs_are_refused_by_name(tiny):
    d, dh, nh = tiny.cfg.d_model, tiny.cfg.d_head, tiny.cfg.n_heads
    lens_in, lens_out = pair(tiny, "standard")
    with pytest.raises(ValueError, match=r"StandardSAE on 'blocks.1.hook_resid_pre'.*layer=0 does not match"):
        InputSAE.from_sae_lens(lens_in, layer=0)
    with pytest.raises(ValueError, match=r"layer=0 does not match the SAE's hook_name 'blocks.1.attn.hook_z'"):
        OutputSAE.from_sae_lens(lens_out, layer=0, n_heads=nh, d_head=dh)
    with pytest.raises(ValueError, match="is not 'blocks.<L>.attn.hook_z'"):
        OutputSAE.from_sae_lens(lens_in, head=0, n_heads=nh, d_head=dh)
    tc = Transcoder(TranscoderConfig(d_in=d, d_sae=8, d_out=d, apply_b_dec_to_input=False, metadata=SAEMetadata(
        hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out")))
    with pytest.raises(ValueError, match="Transcoder on 'blocks.1.ln2.hook_normalized' is a transcoder"):
        InputSAE.from_sae_lens(tc, layer=1)
    signed = AbsTopKSAE(AbsTopKSAEConfig(d_in=d, d_sae=8, k=2, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre")))
    with pytest.raises(ValueError, match="architecture 'abstopk' is not supported"):
        InputSAE.from_sae_lens(signed)
    odd = lens_sae("standard", 20, 8, "blocks.1.attn.hook_z", seed=0, head_index=0)
    with pytest.raises(ValueError, match=r"SAE rel/odd: d_in is 20, expected d_head=16.*n_heads\*d_head=48"):
        OutputSAE.from_sae_lens(odd, n_heads=nh, d_head=dh, release="rel", sae_id="odd")
    norm = lens_sae("standard", d, 8, "blocks.1.hook_resid_pre", seed=0, normalize_activations="expected_average_only_in")
    with pytest.raises(ValueError, match="StandardSAE on 'blocks.1.hook_resid_pre' scales its inputs.*pass scaling_factor="):
        InputSAE.from_sae_lens(norm)
    with pytest.raises(ValueError, match="normalize_activations is 'none'"):
        InputSAE.from_sae_lens(lens_in, scaling_factor=2.0)
    ln = lens_sae("standard", d, 8, "blocks.1.hook_resid_pre", seed=0, normalize_activations="layer_norm")
    with pytest.raises(ValueError, match="normalize_activations='layer_norm' rescales each input"):
        InputSAE.from_sae_lens(ln)
    state = {k: v.detach() for k, v in lens_sae("jumprelu", dh, 8, None, seed=0).state_dict().items()}
    del state["threshold"]
    with pytest.raises(ValueError, match="L1H2.pt: a jumprelu SAE's state dict needs .*missing threshold"):
        OutputSAE.from_state_dict(state, layer=1, head=2, architecture="jumprelu", name="L1H2.pt")
    with pytest.raises(ValueError, match="a jumprelu SAE needs threshold"):
        InputSAE.from_tensors(torch.zeros(d, 8), torch.zeros(8), torch.zeros(8, d), torch.zeros(d), layer=1,
                              architecture="jumprelu")
    with pytest.raises(ValueError, match="a topk SAE needs k"):
        OutputSAE.from_tensors(torch.zeros(dh, 8), torch.zeros(8), torch.zeros(8, dh), torch.zeros(dh), layer=1,
                               head=0, architecture="topk")
