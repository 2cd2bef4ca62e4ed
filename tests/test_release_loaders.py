"""Loaders for the real SAE releases (attnrules.sources.releases), on small files written in each
release's own format: Gemma Scope params.npz, Llama Scope hyperparams.json + final.safetensors,
Kissane's layer-level .pt + _cfg.json, sae_lens folders; release ids read offline from a fake
Hugging Face cache; heads sliced out of layer-level hook_z SAEs, on GPT-2-like and GQA models."""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from attnrules import sources
from attnrules.pipeline.workload import pretrained_workload
from attnrules.sources import SourceUnavailableError, releases
from families import build_family
from tiny_gpt2 import build_tiny_gpt2

REV = "0123456789abcdef0123456789abcdef01234567"


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def gemma_params(d_in: int, d_sae: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of a Gemma Scope params.npz (JumpReLU: per-feature thresholds)."""
    g = rng(seed)
    return {"W_enc": g.normal(size=(d_in, d_sae)).astype(np.float32),
            "W_dec": g.normal(size=(d_sae, d_in)).astype(np.float32),
            "b_enc": g.normal(size=d_sae).astype(np.float32) * 0.1,
            "b_dec": g.normal(size=d_in).astype(np.float32) * 0.1,
            "threshold": np.abs(g.normal(size=d_sae)).astype(np.float32) * 0.5}


def write_llama_scope(folder, d_model: int, d_sae: int, hook: str, seed: int = 0, norm: float = 2.0):
    """A Llama Scope folder: hyperparams.json + checkpoints/final.safetensors (encoder/decoder Linear weights)."""
    g = torch.Generator().manual_seed(seed)
    state = {"encoder.weight": torch.randn(d_sae, d_model, generator=g), "encoder.bias": torch.randn(d_sae, generator=g),
             "decoder.weight": torch.randn(d_model, d_sae, generator=g), "decoder.bias": torch.randn(d_model, generator=g)}
    (folder / "checkpoints").mkdir(parents=True)
    save_file(state, folder / "checkpoints" / "final.safetensors")
    (folder / "hyperparams.json").write_text(json.dumps({
        "d_model": d_model, "d_sae": d_sae, "hook_point_in": hook, "hook_point_out": hook, "top_k": 50,
        "jump_relu_threshold": 0.25, "dataset_average_activation_norm": {"in": norm, "out": norm}}))
    return state


def write_kissane_layer(folder, stem: str, d_in: int, d_sae: int, layer: int, seed: int = 0):
    """A Kissane layer-level checkpoint (gpt2-small-hook-z-kk's format): {stem}.pt + {stem}_cfg.json."""
    g = torch.Generator().manual_seed(seed)
    state = {"W_enc": torch.randn(d_in, d_sae, generator=g), "W_dec": torch.randn(d_sae, d_in, generator=g),
             "b_enc": torch.randn(d_sae, generator=g) * 0.1, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / f"{stem}.pt")
    (folder / f"{stem}_cfg.json").write_text(json.dumps({
        "act_size": d_in, "dict_size": d_sae, "act_name": f"blocks.{layer}.attn.hook_z", "layer": layer,
        "concat_heads": True, "model_name": "gpt2-small"}))
    return state


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A fake HF cache under tmp_path (offline); ``snapshot(repo_id)`` is the folder files go in."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))

    def snapshot(repo_id: str):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(REV)
        return repo / "snapshots" / REV

    return snapshot


@pytest.fixture(scope="module")
def llama():
    return build_family("llama")


def hook_z(model, layer: int) -> torch.Tensor:
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.attn.hook_z")
    return cache[f"blocks.{layer}.attn.hook_z"]


# --- release ids, sae ids -------------------------------------------------------------------------------


def test_release_ids_and_default_sae_ids():
    assert releases.parse_release("gemma-scope-2b-pt-att-canonical") == ("gemma-scope-2b-pt-att-canonical", None)
    assert releases.parse_release("gemma-scope-2b-pt-att-canonical/layer_3/width_16k/canonical") == (
        "gemma-scope-2b-pt-att-canonical", "layer_3/width_16k/canonical")
    assert releases.parse_release("no-such-release/x") is None and releases.parse_release("./folder") is None
    with pytest.raises(ValueError, match=r"names sae_id 'l0r_8x' of release 'llama_scope_lxr_8x', but sae_id='x'"):
        releases.parse_release("llama_scope_lxr_8x/l0r_8x", "x")
    d = releases.default_sae_id
    assert d("gemma-scope-2b-pt-res-canonical", 5, "input") == "layer_4/width_16k/canonical"
    assert d("gemma-scope-2b-pt-att-canonical", 5, "output") == "layer_5/width_16k/canonical"
    assert d("llama_scope_lxr_32x", 3, "input") == "l2r_32x"
    assert d("gpt2-small-res-jb", 3, "input") == "blocks.3.hook_resid_pre"
    assert d("gpt2-small-hook-z-kk", 3, "output") == "blocks.3.hook_z"
    with pytest.raises(ValueError, match=r"no Gemma Scope SAE reads the residual stream entering layer 0"):
        d("gemma-scope-2b-pt-res-canonical", 0, "input")
    assert releases.release_files("gemma-scope-2b-pt-att-canonical", "layer_0/width_16k/canonical") == (
        "google/gemma-scope-2b-pt-att", ["layer_0/width_16k/average_l0_104/params.npz"])
    repo, files = releases.release_files("llama_scope_lxr_8x", "l0r_8x")
    assert (repo, files) == ("fnlp/Llama3_1-8B-Base-LXR-8x", ["Llama3_1-8B-Base-L0R-8x/hyperparams.json",
                                                            "Llama3_1-8B-Base-L0R-8x/checkpoints/final.safetensors"])
    # several SAEs per layer: no default; the ids of that layer are listed
    with pytest.raises(ValueError, match=r"sae_id 'layer_4/width_16k/canonical' is not in release 'gemma-scope-2b-pt-res'; "
                                         r"valid ids: layer_4/width_16k/average_l0_"):
        sources.load_input_sae("gemma-scope-2b-pt-res", layer=5)


# --- local folders in each release's format ------------------------------------------------------------


def test_gemma_scope_att_folder_sliced_to_a_gqa_query_head(tmp_path, llama):
    """A Gemma Scope hook_z folder at the model's dims; GQA: hook_z has one slot per query head."""
    cfg = llama.cfg
    assert cfg.n_key_value_heads < cfg.n_heads  # grouped-query attention
    d_in = cfg.n_heads * cfg.d_head
    params = gemma_params(d_in, 24, seed=1)
    folder = tmp_path / "gemma-scope-2b-pt-att" / "layer_1" / "width_16k" / "average_l0_57"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)

    sae = sources.load_sae(folder)
    assert type(sae).__name__ == "JumpReLUSAE"
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.metadata.hook_name) == (d_in, 24, "blocks.1.attn.hook_z")
    for key, value in params.items():
        torch.testing.assert_close(getattr(sae, key).detach(), torch.from_numpy(value), rtol=0, atol=0)
    assert torch.equal(sources.load_sae(folder / "params.npz").W_dec, sae.W_dec)  # the file itself

    head = cfg.n_heads - 1  # a query head whose kv head is not its own index
    out = sources.load_output_sae(folder, layer=1, head=head, n_heads=cfg.n_heads, d_head=cfg.d_head)
    assert (out.layer, out.head, out.n_heads, out.d_head, out.per_head) == (1, head, cfg.n_heads, cfg.d_head, False)
    rows = slice(head * cfg.d_head, (head + 1) * cfg.d_head)
    torch.testing.assert_close(out.head_encoder, torch.from_numpy(params["W_enc"][rows]))
    sources.check_compatible(llama, output_sae=out)
    z = hook_z(llama, 1)
    assert z.shape[-2] == cfg.n_heads  # query heads, not kv heads
    torch.testing.assert_close(out.encode(z), sae.encode(z))  # sae_lens reshapes hook_z itself
    with pytest.raises(ValueError, match=rf"d_in is {d_in}, expected n_heads\*d_head = {cfg.n_key_value_heads}\*"):
        sources.load_output_sae(folder, layer=1, head=0, n_heads=cfg.n_key_value_heads, d_head=cfg.d_head)
    with pytest.raises(ValueError, match=r"hook_name is 'blocks.1.attn.hook_z', expected 'blocks.0.attn.hook_z'"):
        sources.load_output_sae(folder, layer=0, head=0, n_heads=cfg.n_heads, d_head=cfg.d_head)


def test_gemma_scope_res_folder_is_an_input_sae(tmp_path):
    params = gemma_params(12, 10, seed=2)
    folder = tmp_path / "sae" / "layer_2" / "width_16k" / "average_l0_20"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)
    with pytest.raises(ValueError, match=r"no component of its path names the release .* pass release="):
        sources.load_sae(folder)
    inp = sources.load_input_sae(folder, release="gemma-scope-2b-pt-res")  # resid_post of layer 2
    assert (inp.layer, inp.hook_name, inp.n_features, inp.d_model) == (3, "blocks.3.hook_resid_pre", 10, 12)
    torch.testing.assert_close(inp.W_dec, torch.from_numpy(params["W_dec"]))
    x = torch.randn(5, 12)
    pre = (x @ torch.from_numpy(params["W_enc"])) + torch.from_numpy(params["b_enc"])  # no b_dec on the input
    expected = torch.relu(pre) * (pre > torch.from_numpy(params["threshold"]))
    torch.testing.assert_close(inp.encode(x), expected)
    with pytest.raises(ValueError, match=r"layer=2 does not match the SAE's hook_name 'blocks.2.hook_resid_post'"):
        sources.load_input_sae(folder, layer=2, release="gemma-scope-2b-pt-res")
    with pytest.raises(ValueError, match=r"not the residual stream entering a layer"):
        sources.load_input_sae(folder, release="gemma-scope-2b-pt-att")
    with pytest.raises(ValueError, match=r"release='gpt2-small-res-jb' is not a Gemma Scope"):
        sources.load_sae(folder, release="gpt2-small-res-jb")
    bare = tmp_path / "gemma-scope-2b-pt-res" / "somewhere"
    bare.mkdir(parents=True)
    np.savez(bare / "params.npz", **params)
    with pytest.raises(ValueError, match=r"not named as a Gemma Scope folder, layer_<L>/width_<W>"):
        sources.load_sae(bare)


def test_llama_scope_folder(tmp_path):
    folder = tmp_path / "Llama3_1-8B-Base-L3R-8x"
    state = write_llama_scope(folder, 16, 24, "blocks.3.hook_resid_post", seed=3, norm=2.0)
    sae = sources.load_sae(folder)
    assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.normalize_activations == "none"
    scale = 16 ** 0.5 / 2.0  # sqrt(d_model) / dataset_average_activation_norm.in, folded as from_pretrained does
    torch.testing.assert_close(sae.W_enc, state["encoder.weight"].T * scale)
    torch.testing.assert_close(sae.W_dec, state["decoder.weight"].T / scale)
    torch.testing.assert_close(sae.b_dec, state["decoder.bias"] / scale)
    torch.testing.assert_close(sae.b_enc, state["encoder.bias"])
    torch.testing.assert_close(sae.threshold, torch.full((24,), 0.25 * scale))
    inp = sources.load_input_sae(folder / "checkpoints" / "final.safetensors")
    assert (inp.layer, inp.n_features, inp.d_model) == (4, 24, 16)
    x = torch.randn(3, 16)
    torch.testing.assert_close(inp.encode(x), sae.encode(x))

    attn_out = tmp_path / "Llama3_1-8B-Base-L3A-8x"
    write_llama_scope(attn_out, 16, 24, "blocks.3.hook_attn_out")
    with pytest.raises(ValueError, match=r"hook_name 'blocks.3.hook_attn_out' is not the residual stream"):
        sources.load_input_sae(attn_out)
    with pytest.raises(ValueError, match=r"hook_name is 'blocks.3.hook_attn_out', expected 'blocks.3.attn.hook_z'"):
        sources.load_output_sae(attn_out, layer=3, head=0, n_heads=2, d_head=8)
    (folder / "checkpoints" / "final.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"Llama Scope folder without checkpoints/final.safetensors"):
        sources.load_sae(folder)


def test_kissane_layer_level_file_and_sae_lens_folder(tmp_path):
    model = build_tiny_gpt2()
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    stem = "gpt2-small_L1_Hcat_z_lr1.20e-03_v9"
    state = write_kissane_layer(tmp_path / "kk", stem, n_heads * d_head, 20, layer=1, seed=4)
    sae = sources.load_sae(tmp_path / "kk" / f"{stem}.pt")
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.metadata.hook_name) == (n_heads * d_head, 20, "blocks.1.attn.hook_z")
    for key, value in state.items():
        assert torch.equal(getattr(sae, key).detach(), value)
    out = sources.load_output_sae(tmp_path / "kk" / f"{stem}.pt", layer=1, head=2, n_heads=n_heads, d_head=d_head)
    torch.testing.assert_close(out.head_encoder, state["W_enc"][2 * d_head:3 * d_head])
    z = hook_z(model, 1)
    torch.testing.assert_close(out.encode(z), sae.encode(z), atol=1e-5, rtol=1e-5)

    # a sae_lens folder, the file or its folder
    lens = StandardSAE(StandardSAEConfig(d_in=n_heads * d_head, d_sae=12,
                                         metadata=SAEMetadata(hook_name="blocks.1.attn.hook_z")))
    lens.save_model(tmp_path / "lens")
    for source in (tmp_path / "lens", tmp_path / "lens" / "cfg.json"):
        out = sources.load_output_sae(source, layer=1, head=0, n_heads=n_heads, d_head=d_head)
        torch.testing.assert_close(out.head_encoder, lens.W_enc.detach()[:d_head])
    with pytest.raises(ValueError, match=r"sae_id='x' picks an SAE in a release, but .* is a local folder"):
        sources.load_sae(tmp_path / "lens", "x")

    # a per-head Kissane checkpoint given as --sae-out goes to load_head_sae
    g = torch.Generator().manual_seed(0)
    head_state = {"W_enc": torch.randn(d_head, 8, generator=g), "W_dec": torch.randn(8, d_head, generator=g),
                  "b_enc": torch.randn(8, generator=g), "b_dec": torch.randn(d_head, generator=g)}
    torch.save(head_state, tmp_path / "kk" / "gpt2-small_L1_H2_z_v0.pt")
    (tmp_path / "kk" / "gpt2-small_L1_H2_z_v0_cfg.json").write_text(json.dumps(
        {"layer": 1, "head": 2, "act_name": "blocks.1.attn.hook_z", "act_size": d_head, "dict_size": 8}))
    out = sources.load_output_sae(tmp_path / "kk" / "gpt2-small_L1_H2_z_v0.pt", layer=1, head=2, n_heads=n_heads,
                                  d_head=d_head)
    assert out.per_head and torch.equal(out.head_encoder, head_state["W_enc"])
    with pytest.raises(ValueError, match=r"is a per-head checkpoint"):
        sources.load_sae(tmp_path / "kk" / "gpt2-small_L1_H2_z_v0.pt")


# --- release ids, offline from the Hugging Face cache ----------------------------------------------------


def test_kissane_and_llama_scope_releases_from_the_cache(hub_cache):
    snap = hub_cache("ckkissane/attn-saes-gpt2-small-all-layers")
    repo, files = releases.release_files("gpt2-small-hook-z-kk", "blocks.5.hook_z")
    stem = files[0].removesuffix(".pt")
    assert (repo, files[1]) == ("ckkissane/attn-saes-gpt2-small-all-layers", f"{stem}_cfg.json")
    assert stem.startswith("gpt2-small_L5_Hcat_z_")
    state = write_kissane_layer(snap, stem, 4 * 8, 16, layer=5, seed=5)
    for source, sae_id in (("gpt2-small-hook-z-kk", None), ("gpt2-small-hook-z-kk/blocks.5.hook_z", None),
                           ("gpt2-small-hook-z-kk", "blocks.5.hook_z")):
        out = sources.load_output_sae(source, layer=5, head=1, n_heads=4, d_head=8, sae_id=sae_id)
        torch.testing.assert_close(out.head_encoder, state["W_enc"][8:16])
        torch.testing.assert_close(out.W_dec, state["W_dec"])
    assert sources.load_sae("gpt2-small-hook-z-kk/blocks.5.hook_z").cfg.metadata.neuronpedia_id == "gpt2-small/5-att-kk"

    snap = hub_cache("fnlp/Llama3_1-8B-Base-LXR-8x")
    state = write_llama_scope(snap / "Llama3_1-8B-Base-L0R-8x", 16, 24, "blocks.0.hook_resid_post", seed=6)
    inp = sources.load_input_sae("llama_scope_lxr_8x", layer=1)  # sae_id l0r_8x
    assert (inp.layer, inp.n_features, inp.neuronpedia_id) == (1, 24, "llama3.1-8b/0-llamascope-res-32k")
    scale = 58.935251798561154  # the release's norm_scaling_factor in pretrained_saes.yaml
    torch.testing.assert_close(inp.W_dec, state["decoder.weight"].T / scale)
    torch.testing.assert_close(inp.W_enc, state["encoder.weight"].T * scale)


def test_gemma_scope_release_from_the_cache_at_full_dimensions(hub_cache):
    """SAE.from_pretrained takes Gemma Scope's dims from the release (2b hook_z: 8 heads x 256; 16k
    features), so the cached file has them (stored as int8 to keep the test small)."""
    snap = hub_cache("google/gemma-scope-2b-pt-att")
    folder = snap / "layer_0" / "width_16k" / "average_l0_104"  # what layer_0/width_16k/canonical points to
    folder.mkdir(parents=True)
    d_in, d_sae = 2048, 16384
    g = rng(7)
    small = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    params = {k: g.integers(-3, 4, size=s, dtype=np.int8) for k, s in small.items()}
    np.savez(folder / "params.npz", **params)
    del params["W_dec"]
    out = sources.load_output_sae("gemma-scope-2b-pt-att-canonical", layer=0, head=3, n_heads=8, d_head=256)
    assert (out.n_features, out.per_head, out.n_heads, out.d_head) == (d_sae, False, 8, 256)
    assert torch.equal(out.head_encoder, torch.from_numpy(params["W_enc"][3 * 256:4 * 256]).float())
    assert torch.equal(out.b_enc, torch.from_numpy(params["b_enc"]).float())

    other = snap / "layer_1" / "width_16k" / "average_l0_79"  # layer_1/width_16k/canonical, at small dims
    other.mkdir(parents=True)
    np.savez(other / "params.npz", **gemma_params(32, 20))
    with pytest.raises(ValueError, match=r"layer_1/width_16k/average_l0_79/params.npz of repo 'google/gemma-scope-2b-pt-att' "
                                         r"\(SAE.from_pretrained takes .* full dimensions\): RuntimeError"):
        sources.load_sae("gemma-scope-2b-pt-att-canonical/layer_1/width_16k/canonical")


@pytest.mark.parametrize("release, layer, repo, files", [
    ("gemma-scope-2b-pt-att-canonical", 2, "google/gemma-scope-2b-pt-att", ["layer_2/width_16k/average_l0_93/params.npz"]),
    ("gpt2-small-hook-z-kk", 0, "ckkissane/attn-saes-gpt2-small-all-layers", ["gpt2-small_L0_Hcat_z_lr1.20e-03_l11.80e+00_"]),
])
def test_missing_release_file_fails_at_once(hub_cache, release, layer, repo, files):
    hub_cache(repo)  # the repo is cached, the SAE's files are not
    start = time.perf_counter()
    with pytest.raises(SourceUnavailableError) as err:
        sources.load_output_sae(release, layer=layer, head=0, n_heads=8, d_head=256)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    for part in [f"repo {repo!r}", f"hf download {repo} --include", "HF_HUB_OFFLINE is set", "HF_HOME", *files]:
        assert part in message


def test_missing_llama_scope_weights_name_the_file(hub_cache):
    snap = hub_cache("fnlp/Llama3_1-8B-Base-LXR-8x")
    write_llama_scope(snap / "Llama3_1-8B-Base-L4R-8x", 16, 24, "blocks.4.hook_resid_post")
    (snap / "Llama3_1-8B-Base-L4R-8x" / "checkpoints" / "final.safetensors").unlink()
    with pytest.raises(SourceUnavailableError) as err:
        sources.load_input_sae("llama_scope_lxr_8x/l4r_8x")
    message = str(err.value)
    assert "whose files Llama3_1-8B-Base-L4R-8x/checkpoints/final.safetensors must be downloaded" in message
    assert "hyperparams.json" not in message.split("must be downloaded")[0]
    assert "hf download fnlp/Llama3_1-8B-Base-LXR-8x --include 'Llama3_1-8B-Base-L4R-8x*'" in message


# --- the workload behind the CLI --------------------------------------------------------------------------


def test_pretrained_workload_with_sae_out(tmp_path):
    model = build_tiny_gpt2()
    folder = sources.save_model(model, tmp_path / "tiny")
    n_heads, d_head, d_model = model.cfg.n_heads, model.cfg.d_head, model.cfg.d_model
    in_params = gemma_params(d_model, 10, seed=8)
    in_folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_0" / "width_16k" / "average_l0_5"
    in_folder.mkdir(parents=True)
    np.savez(in_folder / "params.npz", **in_params)
    out_params = gemma_params(n_heads * d_head, 12, seed=9)
    out_folder = tmp_path / "gemma-scope-2b-pt-att" / "layer_1" / "width_16k" / "average_l0_5"
    out_folder.mkdir(parents=True)
    np.savez(out_folder / "params.npz", **out_params)
    corpus = tmp_path / "tokens.pt"
    torch.save(torch.randint(0, model.cfg.d_vocab, (4, 10), generator=torch.Generator().manual_seed(0)), corpus)

    work = pretrained_workload(str(folder), corpus=corpus, layers=[1], heads=[2], sae_in=str(in_folder),
                               sae_out=str(out_folder), n_sequences=4, seq_len=10)
    out, inp = work.output_sae(1, 2), work.input_sae(1)
    assert (out.layer, out.head, out.n_features, inp.layer, inp.n_features) == (1, 2, 12, 1, 10)
    sources.check_compatible(work.model, inp, out)
    with pytest.raises(ValueError, match=r"give exactly one of sae_out_dir"):
        pretrained_workload(str(folder), corpus=corpus, sae_out=str(out_folder), sae_out_z=str(out_folder))


def test_cli_sae_options(tmp_path, capsys):
    from attnrules import cli

    model = build_tiny_gpt2()
    folder = sources.save_model(model, tmp_path / "tiny")
    in_folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_0" / "width_16k" / "average_l0_5"
    in_folder.mkdir(parents=True)
    np.savez(in_folder / "params.npz", **gemma_params(model.cfg.d_model, 10, seed=8))
    kk = tmp_path / "kk"
    state = write_kissane_layer(kk, "gpt2-small_L1_Hcat_z_v9", model.cfg.n_heads * model.cfg.d_head, 12, layer=1)
    corpus = tmp_path / "tokens.pt"
    torch.save(torch.randint(0, model.cfg.d_vocab, (4, 10), generator=torch.Generator().manual_seed(0)), corpus)
    base = ["extract", "--model", str(folder), "--layer", "1", "--head", "2", "--corpus", str(corpus),
            "--n-sequences", "4", "--out", str(tmp_path / "out")]
    parser = cli.build_parser()

    args = parser.parse_args(base + ["--sae-in", str(in_folder), "--sae-out", str(kk / "gpt2-small_L1_Hcat_z_v9.pt")])
    cli.check_sources(args, whole_model=False)
    work = cli.workload_from_args(args, whole_model=False)
    d_head = model.cfg.d_head
    assert torch.equal(work.output_sae(1, 2).head_encoder, state["W_enc"][2 * d_head:3 * d_head])
    assert work.input_sae(1).n_features == 10

    for extra, message in [
        (["--sae-out", "x", "--sae-out-dir", str(tmp_path)], "give exactly one of --sae-out-dir"),
        (["--sae-out", "x", "--sae-out-z", "y"], "--sae-out (an output SAE: release id, folder or file)"),
        (["--sae-out-dir", str(tmp_path), "--sae-out-id", "x"], "argument --sae-out-id: only used with --sae-out"),
    ]:
        with pytest.raises(cli.UsageError, match=re.escape(message)):
            cli.check_sources(parser.parse_args(base + extra), whole_model=False)
    sweep = parser.parse_args(["sweep", "--model", str(folder), "--corpus", str(corpus), "--sae-out", "x",
                               "--sae-in-id", "layer_0/width_16k/canonical"])
    with pytest.raises(cli.UsageError, match=r"argument --sae-in-id: names the SAE of one layer; give --layer"):
        cli.check_sources(sweep, whole_model=True)
    code = cli.main(["extract", "--sae-out", "gpt2-small-hook-z-kk"])  # the toy takes --sae-out for one head only
    assert code == 2 and "argument --sae-out: with the planted model, name the one head" in capsys.readouterr().err
    code = cli.main(["extract", "--sae-out-id", "x"])
    assert code == 2 and "argument --sae-out-id: not used with the planted model" in capsys.readouterr().err
