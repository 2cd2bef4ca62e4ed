"""attnrules.sources: loading and checking models and SAEs, on small files in the real formats."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from tiny_gpt2 import build_tiny_gpt2

from attnrules import sources
from attnrules.sources import InputSAE, OutputSAE, SourceUnavailableError

N_HEADS, D_MODEL, D_HEAD = 3, 48, 16  # build_tiny_gpt2's defaults (2 layers)
LAYER, HEAD = 1, 2
KISSANE_STEM = "{prefix}_L{layer}_H{head}_z_lr1.20e-03_l11.00e+00_ds{n_out}_nt2000000000_bs4096_sl64_c1_v{v}"


@pytest.fixture(scope="module")
def model():
    return build_tiny_gpt2()


@pytest.fixture(scope="module")
def cache(model):
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    _, cache = model.run_with_cache(tokens)
    return cache


def standard_sae(d_in: int, d_sae: int, hook_name: str, seed: int, **cfg) -> StandardSAE:
    """A sae_lens StandardSAE with random non-zero biases."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name), **cfg))
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
    return sae


def head_sae_tensors(d_head: int, n_out: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_head, n_out, generator=g),
        "W_dec": torch.randn(n_out, d_head, generator=g),
        "b_enc": torch.randn(n_out, generator=g),
        "b_dec": torch.randn(d_head, generator=g),
    }


def write_head_checkpoint(directory: Path, state: dict, *, head=HEAD, version=0, cfg=None, prefix="gpt2-small") -> Path:
    """A Kissane/REF per-head checkpoint for L{LAYER}: ``{stem}.pt`` state dict + ``{stem}_cfg.json``.

    ``prefix`` is the file-name stem before ``_L``; ``cfg`` changes fields of the config (None removes one).
    """
    n_out = state["W_enc"].shape[1]
    stem = KISSANE_STEM.format(prefix=prefix, layer=LAYER, head=head, n_out=n_out, v=version)
    fields = {
        "act_size": state["W_enc"].shape[0], "dict_size": n_out, "act_name": f"blocks.{LAYER}.attn.hook_z",
        "layer": LAYER, "head": head, "seq_len": 64, "model_name": "gpt2-small", "site": "z",
        "enc_dtype": "fp32", "device": "cuda", "per_head": True, "concat_heads": False, "lr": 1.2e-3,
        "l1_coeff": 1.0, "dict_mult": 32, "name": stem,
    }
    for key, value in (cfg or {}).items():
        fields.pop(key) if value is None else fields.update({key: value})
    torch.save(state, directory / f"{stem}.pt")
    (directory / f"{stem}_cfg.json").write_text(json.dumps(fields))
    return directory / f"{stem}.pt"


# --- models ----------------------------------------------------------------------------------------


def test_processed_model_passes_checks(model):
    sources.check_processed(model)
    assert sources.process_model(model) is model


def test_unprocessed_model_is_refused_then_fixed_by_process_model(model):
    raw = build_tiny_gpt2(processed=False)
    with pytest.raises(ValueError, match=r"(?s)LayerNorm is not folded.*value biases are not folded.*process_model"):
        sources.check_processed(raw)
    tokens = torch.randint(0, raw.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    logp_raw, cache_raw = raw.run_with_cache(tokens)
    # What folding b_V removes from hook_z: b_V plus LN1's bias read through W_V.
    attn = raw.blocks[LAYER].attn
    removed = (attn.b_V + torch.einsum("d,hde->he", raw.blocks[LAYER].ln1.b, attn.W_V)).detach()

    sources.process_model(raw)
    sources.check_processed(raw)
    logp, cache = raw.run_with_cache(tokens)
    torch.testing.assert_close(logp.log_softmax(-1), logp_raw.log_softmax(-1), atol=1e-5, rtol=0)
    z_raw, z = cache_raw[f"blocks.{LAYER}.attn.hook_z"], cache[f"blocks.{LAYER}.attn.hook_z"]
    torch.testing.assert_close(z, z_raw - removed, atol=1e-5, rtol=0)
    # The processed copy matches from_pretrained-style processing of the same weights.
    for name, w in build_tiny_gpt2().state_dict().items():
        torch.testing.assert_close(raw.state_dict()[name], w, atol=1e-5, rtol=0, msg=name)


def test_check_processed_names_each_missing_step(model):
    partly = build_tiny_gpt2()
    with torch.no_grad():
        partly.blocks[0].attn.b_V[1, 3] = 0.5
        partly.embed.W_E += 0.1
    with pytest.raises(ValueError) as err:
        sources.check_processed(partly)
    message = str(err.value)
    assert "value biases are not folded (b_V != 0 in layers [0])" in message
    assert "writing weights are not centred" in message and "W_E" in message
    assert "LayerNorm" not in message
    sources.process_model(partly)
    sources.check_processed(partly)


@pytest.mark.parametrize(
    "layer, head, match",
    [(2, 0, r"layer=2 is out of range: the model has 2 layers, valid range is 0\.\.1"),
     (0, 3, r"head=3 is out of range: the model has 3 heads per layer, valid range is 0\.\.2"),
     (-1, 0, r"layer=-1"), (0, 1.0, r"head must be an int, got 1.0")],
)
def test_check_head(model, layer, head, match):
    sources.check_head(model, 1, 2)
    with pytest.raises(TypeError if isinstance(head, float) else ValueError, match=match):
        sources.check_head(model, layer, head)


# --- offline behaviour -----------------------------------------------------------------------------


@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return tmp_path / "hf"


@pytest.mark.parametrize(
    "load, names",
    [(lambda: sources.load_model("gpt2-small"), ["model 'gpt2-small'", "repo 'gpt2'", "hf download gpt2"]),
     (lambda: sources.load_input_sae("gpt2-small-res-jb", layer=0),
      ["repo 'jbloom/GPT2-Small-SAEs-Reformatted'", "--include 'blocks.0.hook_resid_pre*'"])],
    ids=["model", "input_sae"],
)
def test_offline_missing_source_fails_at_once(empty_hf_home, monkeypatch, load, names):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(SourceUnavailableError) as err:
        load()
    assert time.perf_counter() - start < 10
    message = str(err.value)
    for name in names + ["HF_HUB_OFFLINE", "hf download", "HF_HOME", str(empty_hf_home / "hub")]:
        assert name in message


def test_release_loads_offline_from_the_hub_cache(tmp_path, monkeypatch):
    """A release already in the HF cache loads offline, with the registry's neuronpedia id."""
    cache_dir = tmp_path / "hub"
    repo = cache_dir / "models--jbloom--GPT2-Small-SAEs-Reformatted"
    sae = standard_sae(D_MODEL, 32, "blocks.0.hook_resid_pre", seed=5)
    sae.save_model(repo / "snapshots" / ("0" * 40) / "blocks.0.hook_resid_pre")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache_dir))

    loaded = sources.load_input_sae("gpt2-small-res-jb", layer=0)
    assert (loaded.layer, loaded.neuronpedia_id, loaded.n_features) == (0, "gpt2-small/0-res-jb", 32)
    torch.testing.assert_close(loaded.W_dec, sae.W_dec.detach())


def test_unreachable_hub_fails_at_once(empty_hf_home, monkeypatch):
    """Not in offline mode, but the hub is out of reach: a quick probe, no retries."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    probed = []

    def refuse(address, timeout):
        probed.append((address, timeout))
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    with pytest.raises(SourceUnavailableError, match=r"the hub at https://hub.example:8443 is unreachable \(refused\)"):
        sources.load_model("gpt2-small")
    assert probed == [(("hub.example", 8443), 3)]


def test_unknown_model_and_release_names():
    with pytest.raises(ValueError, match=r"name='no-such-model' is not a transformer_lens model name"):
        sources.load_model("no-such-model")
    with pytest.raises(FileNotFoundError, match=r"neither an existing folder nor a sae_lens release"):
        sources.load_input_sae("no-such-release", layer=0)
    with pytest.raises(ValueError, match=r"sae_id 'blocks.99.hook_resid_pre' is not in release"):
        sources.load_input_sae("gpt2-small-res-jb", layer=99)
    with pytest.raises(ValueError, match=r"pass layer= or sae_id= to pick an SAE in release 'gpt2-small-res-jb'; valid"):
        sources.load_input_sae("gpt2-small-res-jb")


# --- input SAE ----------------------------------------------------------------------------------------


def test_input_sae_from_sae_lens_folder(tmp_path, model, cache):
    sae = standard_sae(D_MODEL, 64, f"blocks.{LAYER}.hook_resid_pre", seed=0)
    sae.cfg.metadata.neuronpedia_id = "tiny/1-res"
    sae.save_model(tmp_path / "in_sae")

    loaded = sources.load_input_sae(tmp_path / "in_sae")
    assert (loaded.layer, loaded.hook_name, loaded.neuronpedia_id) == (LAYER, "blocks.1.hook_resid_pre", "tiny/1-res")
    assert (loaded.n_features, loaded.d_model) == (64, D_MODEL)
    torch.testing.assert_close(loaded.W_dec, sae.W_dec.detach())
    torch.testing.assert_close(loaded.W_enc, sae.W_enc.detach())
    x = cache[loaded.hook_name]
    expected = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    torch.testing.assert_close(loaded.encode(x), expected)
    sources.check_compatible(model, loaded)
    assert sources.load_input_sae(str(tmp_path / "in_sae"), layer=LAYER).layer == LAYER
    with pytest.raises(ValueError, match=r"layer=0 does not match the SAE's hook_name 'blocks.1.hook_resid_pre'"):
        sources.load_input_sae(tmp_path / "in_sae", layer=0)


def test_input_sae_from_tensors_and_hook_names():
    g = torch.Generator().manual_seed(0)
    W_enc, b_enc, W_dec, b_dec = (torch.randn(*s, generator=g) for s in ((8, 20), (20,), (20, 8), (8,)))
    sae = InputSAE.from_tensors(W_enc, b_enc, W_dec, b_dec, layer=3, neuronpedia_id="m/3-x")
    x = torch.randn(5, 8, generator=g)
    torch.testing.assert_close(sae.encode(x), torch.relu((x - b_dec) @ W_enc + b_enc))
    assert (sae.n_features, sae.d_model, sae.hook_name) == (20, 8, "blocks.3.hook_resid_pre")
    with pytest.raises(ValueError, match=r"InputSAE: W_enc must have shape \[8, 20\], got \[20, 8\]"):
        InputSAE.from_tensors(W_enc.T, b_enc, W_dec, b_dec, layer=0)
    with pytest.raises(ValueError, match=r"InputSAE: b_enc must have shape \[20\], got \[3\]"):
        InputSAE.from_tensors(W_enc, b_enc[:3], W_dec, b_dec, layer=0)

    post = standard_sae(8, 20, "blocks.2.hook_resid_post", seed=0)
    assert InputSAE.from_sae_lens(post, layer=3).hook_name == "blocks.3.hook_resid_pre"
    with pytest.raises(ValueError, match=r"hook_name 'blocks.2.hook_resid_post' is not .*: pass layer="):
        InputSAE.from_sae_lens(post)
    with pytest.raises(TypeError, match=r"sae must be a sae_lens SAE; object has no W_enc"):
        InputSAE.from_sae_lens(object())


def test_input_sae_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither an existing folder"):
        sources.load_input_sae(tmp_path / "missing", layer=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty is not a sae_lens SAE folder: missing cfg.json, sae_weights"):
        sources.load_input_sae(tmp_path / "empty")
    standard_sae(D_MODEL, 16, "blocks.0.hook_resid_pre", seed=0).save_model(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"cannot load the sae_lens SAE folder .*corrupt"):
        sources.load_input_sae(tmp_path / "corrupt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is a file; expected a sae_lens SAE folder"):
        sources.load_input_sae(tmp_path / "file")


# --- per-head output SAE (Kissane / REF format) ---------------------------------------------------


def test_head_sae_newest_checkpoint_is_loaded(tmp_path, model, cache):
    versions = [head_sae_tensors(D_HEAD, 40, seed=v) for v in range(3)]
    for v, state in enumerate(versions):
        write_head_checkpoint(tmp_path, state, version=v)
        time.sleep(0.02)  # file ctimes have coarse (jiffy) resolution
    write_head_checkpoint(tmp_path, head_sae_tensors(D_HEAD, 40, seed=9), head=12)  # H12 must not match H1x
    write_head_checkpoint(tmp_path, head_sae_tensors(D_HEAD, 40, seed=9), head=1)

    path = sources.find_head_sae_checkpoint(tmp_path, LAYER, HEAD)
    assert path.name.startswith(f"gpt2-small_L{LAYER}_H{HEAD}_z") and path.stem.endswith("_v2")
    assert sources.find_head_sae_checkpoint(tmp_path, LAYER, 1).name.startswith("gpt2-small_L1_H1_z")

    out = sources.load_head_sae(tmp_path, LAYER, HEAD, n_heads=N_HEADS)
    newest = versions[2]
    assert (out.layer, out.head, out.n_heads, out.d_head) == (LAYER, HEAD, N_HEADS, D_HEAD)
    assert out.per_head and out.n_features == 40
    torch.testing.assert_close(out.W_enc, newest["W_enc"])
    torch.testing.assert_close(out.head_encoder, newest["W_enc"])
    torch.testing.assert_close(out.head_decoder_bias, newest["b_dec"])
    z = cache[f"blocks.{LAYER}.attn.hook_z"]
    pre = torch.einsum("bti,in->btn", z[:, :, HEAD] - newest["b_dec"], newest["W_enc"]) + newest["b_enc"]
    expected = torch.relu(pre)
    torch.testing.assert_close(out.encode(z), expected)
    sources.check_compatible(model, output_sae=out)


def test_head_sae_drops_unit_scaling_factor_and_works_without_n_heads(tmp_path):
    state = head_sae_tensors(D_HEAD, 8, seed=0)
    write_head_checkpoint(tmp_path, {**state, "scaling_factor": torch.ones(8)})
    out = sources.load_head_sae(tmp_path, LAYER, HEAD)
    assert out.n_heads is None
    assert out.encode(torch.randn(4, HEAD + 1, D_HEAD)).shape == (4, 8)
    write_head_checkpoint(tmp_path, {**state, "scaling_factor": torch.full((8,), 2.0)}, version=1)
    with pytest.raises(ValueError, match=r"_v1.pt: scaling_factor is not all ones"):
        sources.load_head_sae(tmp_path, LAYER, HEAD)


GOOD = head_sae_tensors(D_HEAD, 8, seed=0)
NAN = {**GOOD, "b_enc": GOOD["b_enc"].clone().index_fill_(0, torch.tensor([3]), float("nan"))}


def cfg_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}_cfg.json")


# (writer into the checkpoint folder, expected error type, message pattern)
BAD_CHECKPOINTS = {
    "no checkpoint": (lambda d: write_head_checkpoint(d, GOOD, head=0), FileNotFoundError,
                      r"no per-head SAE checkpoint '\*_L1_H2_z\*.pt' in .*; .pt files there include \['"),
    "corrupt pt": (lambda d: write_head_checkpoint(d, GOOD).write_bytes(b"garbage"), ValueError,
                   r"_v0.pt is not a readable torch state dict"),
    "not a dict": (lambda d: torch.save(torch.zeros(3), write_head_checkpoint(d, GOOD)), ValueError,
                   r"_v0.pt must hold a state dict with keys \['W_enc', 'W_dec', 'b_enc', 'b_dec'\], got Tensor"),
    "missing key": (lambda d: write_head_checkpoint(d, {k: v for k, v in GOOD.items() if k != "b_dec"}), ValueError,
                    r"_v0.pt: expected keys .*; missing \['b_dec'\], unexpected \[\]"),
    "cfg missing": (lambda d: cfg_path(write_head_checkpoint(d, GOOD)).unlink(), FileNotFoundError,
                    r"missing config file .*_v0_cfg.json"),
    "cfg corrupt": (lambda d: cfg_path(write_head_checkpoint(d, GOOD)).write_text("{oops"), ValueError,
                    r"_v0_cfg.json is not valid JSON"),
    "cfg layer": (lambda d: write_head_checkpoint(d, GOOD, cfg={"layer": 0}), ValueError,
                  r"_v0_cfg.json: field 'layer' is 0, expected 1 for L1H2"),
    "cfg head": (lambda d: write_head_checkpoint(d, GOOD, cfg={"head": 1}), ValueError,
                 r"field 'head' is 1, expected 2 for L1H2"),
    "cfg no head": (lambda d: write_head_checkpoint(d, GOOD, cfg={"head": None}), ValueError,
                    r"_v0_cfg.json: missing field 'head'"),
    "concat cfg": (lambda d: write_head_checkpoint(d, GOOD, cfg={"per_head": False}), ValueError,
                   r"field 'per_head' is False, expected True"),
    "cfg dict_size": (lambda d: write_head_checkpoint(d, GOOD, cfg={"dict_size": 2048}), ValueError,
                      r"field 'dict_size' is 2048 but W_enc in .*_v0.pt has shape \[16, 8\]"),
    "1-d W_enc": (lambda d: torch.save({**GOOD, "W_enc": torch.zeros(16)}, write_head_checkpoint(d, GOOD)), ValueError,
                  r"_v0.pt: expected tensors with W_enc of shape \[d_head, n_out\], got \{'W_enc': \[16\]"),
    "wrong shape": (lambda d: write_head_checkpoint(d, {**GOOD, "W_dec": GOOD["W_dec"][:, :4].clone()}), ValueError,
                    r"_v0.pt: OutputSAE: W_dec must have shape \[8, 16\], got \[8, 4\]"),
    "nan": (lambda d: write_head_checkpoint(d, NAN), ValueError, r"_v0.pt: OutputSAE: b_enc contains NaN"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_head_sae_bad_checkpoints(tmp_path, case):
    write, error, pattern = BAD_CHECKPOINTS[case]
    write(tmp_path)
    with pytest.raises(error, match=pattern):
        sources.load_head_sae(tmp_path, LAYER, HEAD)


def test_head_sae_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"source='.*nowhere' is neither an existing folder of per-head SAE "
                                                 r"checkpoints nor a checkpoint .pt file"):
        sources.load_head_sae(tmp_path / "nowhere", LAYER, HEAD)
    with pytest.raises(FileNotFoundError, match=r"directory='.*nowhere' is not an existing folder"):
        sources.find_head_sae_checkpoint(tmp_path / "nowhere", LAYER, HEAD)
    write_head_checkpoint(tmp_path, head_sae_tensors(D_HEAD, 8, seed=0))
    with pytest.raises(ValueError, match=r"head=2 is out of range: n_heads=2, valid range is 0\.\.1"):
        sources.load_head_sae(tmp_path, LAYER, HEAD, n_heads=2)
    with pytest.raises(ValueError, match=r"layer=-1 is out of range"):
        sources.find_head_sae_checkpoint(tmp_path, -1, HEAD)
    out = sources.load_head_sae(tmp_path, LAYER, HEAD, n_heads=N_HEADS)
    with pytest.raises(ValueError, match=r"z must have n_heads=3 heads"):
        out.encode(torch.randn(2, 4, D_HEAD))
    with pytest.raises(ValueError, match=r"z must be hook_z of shape \[\.\.\., n_heads, d_head=16\]"):
        out.encode(torch.randn(2, N_HEADS * D_HEAD))


def test_head_sae_stem_and_model_name_are_separate(tmp_path):
    """The file-name stem (prefix) picks files; model_name, when given, is checked against the config."""
    state = head_sae_tensors(D_HEAD, 8, seed=0)
    # Stem says gpt2-small, the config names another model.
    write_head_checkpoint(tmp_path, state, cfg={"model_name": "tiny-gpt2"})
    assert sources.load_head_sae(tmp_path, LAYER, HEAD).n_features == 8  # not checked by default
    assert sources.load_head_sae(tmp_path, LAYER, HEAD, model_name="tiny-gpt2").head == HEAD
    assert sources.load_head_sae(tmp_path, LAYER, HEAD, prefix="gpt2-small", model_name="tiny-gpt2").layer == LAYER
    with pytest.raises(ValueError, match=r"_v0_cfg.json: the checkpoint was trained on model 'tiny-gpt2' "
                                         r"\(field 'model_name'\), but model_name='gpt2-small' was asked for"):
        sources.load_head_sae(tmp_path, LAYER, HEAD, model_name="gpt2-small")
    with pytest.raises(FileNotFoundError, match=r"no per-head SAE checkpoint 'tiny-gpt2_L1_H2_z\*.pt'"):
        sources.load_head_sae(tmp_path, LAYER, HEAD, prefix="tiny-gpt2")

    # The reverse: any stem, the config names gpt2-small.
    other = tmp_path / "other"
    other.mkdir()
    path = write_head_checkpoint(other, state, prefix="my-run")
    assert path.name.startswith("my-run_L1_H2_z")
    assert sources.find_head_sae_checkpoint(other, LAYER, HEAD) == path
    assert sources.find_head_sae_checkpoint(other, LAYER, HEAD, "my-run") == path  # prefix stays 4th positional
    out = sources.load_head_sae(other, LAYER, HEAD, model_name="gpt2-small", prefix="my-run")
    torch.testing.assert_close(out.W_enc, state["W_enc"])
    with pytest.raises(FileNotFoundError, match=r"'gpt2-small_L1_H2_z\*.pt'.*include \['my-run_L1_H2_z"):
        sources.load_head_sae(other, LAYER, HEAD, prefix="gpt2-small")
    with pytest.raises(ValueError, match=r"model_name='pythia-70m' was asked for"):
        sources.load_head_sae(other, LAYER, HEAD, model_name="pythia-70m")
    with pytest.raises(ValueError, match=r"prefix must be a non-empty file-name stem without wildcards"):
        sources.find_head_sae_checkpoint(other, LAYER, HEAD, "my-*")

    # A config without model_name: nothing to check against.
    write_head_checkpoint(other, state, version=1, cfg={"model_name": None})
    with pytest.raises(ValueError, match=r"_v1_cfg.json: has no field 'model_name' to check model_name='gpt2-small'"):
        sources.load_head_sae(other, LAYER, HEAD, model_name="gpt2-small", prefix="gpt2-small")


def test_head_sae_newest_of_any_stem_wins_unless_prefix_given(tmp_path):
    old = write_head_checkpoint(tmp_path, head_sae_tensors(D_HEAD, 8, seed=0), prefix="gpt2-small")
    time.sleep(0.02)  # file ctimes have coarse (jiffy) resolution
    new = write_head_checkpoint(tmp_path, head_sae_tensors(D_HEAD, 8, seed=1), prefix="run2")
    write_head_checkpoint(tmp_path, head_sae_tensors(D_HEAD, 8, seed=2), prefix="run2", head=12)  # H12 is not H1x
    assert sources.find_head_sae_checkpoint(tmp_path, LAYER, HEAD) == new
    assert sources.find_head_sae_checkpoint(tmp_path, LAYER, HEAD, prefix="gpt2-small") == old
    out = sources.load_head_sae(tmp_path, LAYER, HEAD, prefix="gpt2-small")
    torch.testing.assert_close(out.W_enc, head_sae_tensors(D_HEAD, 8, seed=0)["W_enc"])


def test_head_sae_from_an_explicit_checkpoint_path(tmp_path, model, cache):
    state = head_sae_tensors(D_HEAD, 8, seed=3)
    path = write_head_checkpoint(tmp_path, state, cfg={"model_name": "tiny-gpt2"})
    time.sleep(0.02)
    write_head_checkpoint(tmp_path, head_sae_tensors(D_HEAD, 8, seed=4), version=1)  # newer, not asked for

    out = sources.load_head_sae(path)  # layer and head from the config
    assert (out.layer, out.head, out.n_heads, out.per_head) == (LAYER, HEAD, None, True)
    torch.testing.assert_close(out.W_enc, state["W_enc"])
    z = cache[f"blocks.{LAYER}.attn.hook_z"]
    expected = torch.relu(torch.einsum("bti,in->btn", z[:, :, HEAD] - state["b_dec"], state["W_enc"]) + state["b_enc"])
    torch.testing.assert_close(out.encode(z), expected)
    for kwargs in ({"layer": LAYER, "head": HEAD}, {"head": HEAD}, {"n_heads": N_HEADS, "model_name": "tiny-gpt2"}):
        sources.check_compatible(model, output_sae=sources.load_head_sae(str(path), **kwargs))

    with pytest.raises(ValueError, match=r"_v0_cfg.json: field 'layer' is 1, expected 0 for L0H2 \(the checkpoint is "
                                         r"for L1H2, but layer=0, head=2 were asked for\)"):
        sources.load_head_sae(path, layer=0)
    with pytest.raises(ValueError, match=r"field 'head' is 2, expected 1 for L1H1"):
        sources.load_head_sae(path, LAYER, 1)
    with pytest.raises(ValueError, match=r"_v0_cfg.json: the checkpoint is for head 2, out of range for n_heads=2"):
        sources.load_head_sae(path, n_heads=2)
    with pytest.raises(ValueError, match=r"model_name='gpt2-small' was asked for"):
        sources.load_head_sae(path, model_name="gpt2-small")
    with pytest.raises(ValueError, match=r"prefix='gpt2-small' picks a checkpoint in a folder; source='.*_v0.pt' is a file"):
        sources.load_head_sae(path, prefix="gpt2-small")
    with pytest.raises(ValueError, match=r"source='.*_v0_cfg.json' is a file but not a .pt checkpoint"):
        sources.load_head_sae(cfg_path(path))
    with pytest.raises(ValueError, match=r"layer and head are required when source is a folder"):
        sources.load_head_sae(tmp_path)
    with pytest.raises(ValueError, match=r"layer and head are required when source is a folder"):
        sources.load_head_sae(tmp_path, LAYER)
    with pytest.raises(FileNotFoundError, match=r"source='.*missing.pt' is neither an existing folder"):
        sources.load_head_sae(tmp_path / "missing.pt")
    cfg_path(path).write_text(json.dumps({**json.loads(cfg_path(path).read_text()), "head": "two"}))
    with pytest.raises(ValueError, match=r"_v0_cfg.json: field 'head' must be an int >= 0, got 'two'"):
        sources.load_head_sae(path)
    cfg_path(path).unlink()
    with pytest.raises(FileNotFoundError, match=r"missing config file .*_v0_cfg.json"):
        sources.load_head_sae(path)


# --- layer-level hook_z SAE sliced to one head ---------------------------------------------------------


def test_layer_z_sae_sliced_to_one_head(tmp_path, model, cache):
    sae = standard_sae(N_HEADS * D_HEAD, 40, f"blocks.{LAYER}.attn.hook_z", seed=3, reshape_activations="hook_z")
    sae.save_model(tmp_path / "z_sae")
    out = sources.load_layer_z_sae(tmp_path / "z_sae", layer=LAYER, head=HEAD, n_heads=N_HEADS, d_head=D_HEAD)
    assert (out.per_head, out.n_heads, out.d_head, out.n_features) == (False, N_HEADS, D_HEAD, 40)
    rows = slice(HEAD * D_HEAD, (HEAD + 1) * D_HEAD)
    torch.testing.assert_close(out.head_encoder, sae.W_enc.detach()[rows])
    torch.testing.assert_close(out.head_decoder_bias, sae.b_dec.detach()[rows])

    z = cache[f"blocks.{LAYER}.attn.hook_z"]
    W_enc, b_enc, b_dec = (t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    by_hand = torch.zeros(*z.shape[:2], 40, dtype=torch.float64)
    for h in range(N_HEADS):  # the concatenation, head by head
        part = slice(h * D_HEAD, (h + 1) * D_HEAD)
        by_hand += (z[:, :, h].double() - b_dec[part]) @ W_enc[part]
    expected = torch.relu(by_hand + b_enc).float()
    torch.testing.assert_close(out.encode(z), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.encode(z), sae.encode(z).detach(), atol=1e-5, rtol=1e-5)
    sources.check_compatible(model, output_sae=out)

    with pytest.raises(ValueError, match=r"d_in is 48, expected n_heads\*d_head = 2\*16 = 32"):
        sources.load_layer_z_sae(tmp_path / "z_sae", layer=LAYER, head=1, n_heads=2, d_head=D_HEAD)
    with pytest.raises(ValueError, match=r"hook_name is 'blocks.1.attn.hook_z', expected 'blocks.0.attn.hook_z'"):
        sources.load_layer_z_sae(tmp_path / "z_sae", layer=0, head=HEAD, n_heads=N_HEADS, d_head=D_HEAD)
    with pytest.raises(ValueError, match=r"head=3 is out of range: n_heads=3"):
        sources.load_layer_z_sae(tmp_path / "z_sae", layer=LAYER, head=3, n_heads=N_HEADS, d_head=D_HEAD)


def test_output_sae_from_tensors_layouts():
    per_head = head_sae_tensors(D_HEAD, 8, seed=0)
    args = (per_head["W_enc"], per_head["b_enc"], per_head["W_dec"], per_head["b_dec"])
    assert OutputSAE.from_tensors(*args, layer=0, head=1).per_head
    concat = head_sae_tensors(N_HEADS * D_HEAD, 8, seed=0)
    sae = OutputSAE.from_tensors(concat["W_enc"], concat["b_enc"], concat["W_dec"], concat["b_dec"],
                                 layer=0, head=1, n_heads=N_HEADS, d_head=D_HEAD)
    assert not sae.per_head
    torch.testing.assert_close(sae.head_encoder, concat["W_enc"][D_HEAD:2 * D_HEAD])
    with pytest.raises(ValueError, match=r"has 16 rows, expected d_head=20 \(per-head SAE\) or n_heads\*d_head=60"):
        OutputSAE.from_tensors(*args, layer=0, head=1, n_heads=3, d_head=20)


# --- across sources --------------------------------------------------------------------------------


def input_sae(d_model: int, layer: int) -> InputSAE:
    g = torch.Generator().manual_seed(layer)
    W_enc, W_dec = torch.randn(d_model, 10, generator=g), torch.randn(10, d_model, generator=g)
    return InputSAE.from_tensors(W_enc, torch.zeros(10), W_dec, torch.zeros(d_model), layer=layer)


def output_sae(d_head: int, layer: int) -> OutputSAE:
    state = head_sae_tensors(d_head, 8, seed=0)
    return OutputSAE.from_tensors(state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], layer=layer, head=0)


def test_check_compatible_mismatches(model):
    sources.check_compatible(model, input_sae(D_MODEL, 1), output_sae(D_HEAD, 1))
    with pytest.raises(ValueError, match=r"input_sae reads layer 0 but output_sae is for layer 1"):
        sources.check_compatible(model, input_sae(D_MODEL, 0), output_sae(D_HEAD, 1))
    with pytest.raises(ValueError, match=r"input_sae has d_model 8 but the model has d_model 48"):
        sources.check_compatible(model, input_sae(8, 0))
    with pytest.raises(ValueError, match=r"input_sae.layer=5 is out of range: the model has 2 layers"):
        sources.check_compatible(model, input_sae(D_MODEL, 5))
    with pytest.raises(ValueError, match=r"output_sae has d_head 8 but the model has d_head 16"):
        sources.check_compatible(model, output_sae=output_sae(8, 1))
    with pytest.raises(ValueError, match=r"layer=4 is out of range"):
        sources.check_compatible(model, output_sae=output_sae(D_HEAD, 4))
