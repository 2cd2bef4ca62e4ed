"""Local models: folders written by sources.save_model (transformer_lens format) and Hugging Face
model folders, loaded offline by sources.load_model and by the workload behind ``--model PATH``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from planted import _word_tokenizer
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from tiny_gpt2 import build_tiny_gpt2
from transformer_lens import HookedTransformer
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from attnrules import sources
from attnrules.pipeline.workload import pretrained_workload

D_VOCAB = 101  # build_tiny_gpt2's default
TOKENS = torch.randint(0, D_VOCAB, (3, 12), generator=torch.Generator().manual_seed(7))
HOOK_Z = "blocks.1.attn.hook_z"


def word_tokenizer():
    return _word_tokenizer(tuple(f"w{i}" for i in range(D_VOCAB)), "w0", "tiny-words")


def same_cfg(a, b) -> None:
    """Configs equal but for where the model runs."""
    skip = {"device", "n_devices"}
    da = {k: v for k, v in a.to_dict().items() if k not in skip}
    db = {k: v for k, v in b.to_dict().items() if k not in skip}
    assert da == db


# --- save_model / load_model round trip -------------------------------------------------------------


@pytest.mark.parametrize("weights", ["safetensors", "pt"])
def test_processed_model_round_trips_exactly(tmp_path, weights):
    model = build_tiny_gpt2()
    folder = sources.save_model(model, tmp_path / "tiny", weights=weights)
    assert folder == tmp_path / "tiny"
    assert sorted(os.listdir(folder)) == sorted(["config.json", f"model.{weights}"])
    config = json.loads((folder / "config.json").read_text())
    assert (config["format"], config["format_version"], config["processed"]) == (sources.TL_FORMAT, 1, True)
    assert (config["n_layers"], config["d_head"], config["dtype"], config["normalization_type"]) == (2, 16, "float32", "LNPre")

    rng = torch.get_rng_state()
    loaded = sources.load_model(folder)
    assert torch.equal(torch.get_rng_state(), rng)  # cfg.seed is restored, not replayed into the global RNG
    assert isinstance(loaded, HookedTransformer) and not loaded.training
    sources.check_processed(loaded)
    same_cfg(loaded.cfg, model.cfg)
    assert loaded.cfg.seed == model.cfg.seed == 0
    logits, cache = loaded.run_with_cache(TOKENS)
    expected_logits, expected_cache = model.run_with_cache(TOKENS)
    assert torch.equal(logits, expected_logits)
    assert torch.equal(cache[HOOK_Z], expected_cache[HOOK_Z])
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.tokenizer is None
    # The same through a str path and load_model's keyword
    assert torch.equal(sources.load_model(name=str(folder), process=False)(TOKENS), expected_logits)


def test_processed_model_is_not_processed_twice(tmp_path, monkeypatch):
    folder = sources.save_model(build_tiny_gpt2(), tmp_path / "tiny")

    def refuse(*args, **kwargs):
        raise AssertionError("processed again")

    monkeypatch.setattr(HookedTransformer, "load_and_process_state_dict", refuse)
    monkeypatch.setattr("attnrules.sources.model.process_model", refuse)
    sources.check_processed(sources.load_model(folder))


def test_unprocessed_model_is_processed_on_load_unless_asked_not_to(tmp_path):
    raw = build_tiny_gpt2(processed=False)
    folder = sources.save_model(raw, tmp_path / "raw", weights="pt")
    assert json.loads((folder / "config.json").read_text())["processed"] is False

    loaded = sources.load_model(folder)
    sources.check_processed(loaded)
    processed = build_tiny_gpt2()  # the same weights, processed as from_pretrained does
    for name, tensor in processed.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(loaded(TOKENS).log_softmax(-1), raw(TOKENS).log_softmax(-1), atol=1e-5, rtol=0)

    as_saved = sources.load_model(folder, process=False)
    with pytest.raises(ValueError, match="LayerNorm is not folded"):
        sources.check_processed(as_saved)
    assert torch.equal(as_saved(TOKENS), raw(TOKENS))
    same_cfg(as_saved.cfg, raw.cfg)


def test_tokenizer_is_saved_and_loaded_with_the_model(tmp_path):
    model = build_tiny_gpt2()
    model.set_tokenizer(word_tokenizer())
    folder = sources.save_model(model, tmp_path / "with_tok")
    assert (folder / "tokenizer.json").is_file()
    loaded = sources.load_model(folder)
    assert loaded.tokenizer is not None
    text = "w5 w7 w100 w3"
    assert torch.equal(loaded.to_tokens(text), model.to_tokens(text))
    assert loaded.to_tokens(text)[0, 0].item() == 0  # BOS prepended
    assert loaded.cfg.tokenizer_name == model.cfg.tokenizer_name


# --- errors -----------------------------------------------------------------------------------------


def saved(tmp_path, name="tiny", **kwargs) -> Path:
    return sources.save_model(build_tiny_gpt2(**kwargs), tmp_path / name)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        config.pop(key) if value is None else config.update({key: value})
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_folders_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"name='.*nowhere': no such model folder .*nowhere \(expected a "
                                                r"transformer_lens folder written by attnrules.sources.save_model"):
        sources.load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no such model folder"):
        sources.load_model(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"no such model folder"):
        sources.load_model("./no/such/folder")
    with pytest.raises(ValueError, match=r"name='no-org/no-model' is not a transformer_lens model name or alias .* "
                                         r"nor an existing folder"):
        sources.load_model("no-org/no-model")

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"name='.*empty': .*empty is not a model folder: missing config.json"):
        sources.load_model(tmp_path / "empty")
    (tmp_path / "file.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"name='.*file.pt': .*file.pt is a file; expected a model folder"):
        sources.load_model(tmp_path / "file.pt")

    folder = saved(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"tiny holds no weights: expected model.safetensors or model.pt"):
        sources.load_model(folder)
    torch.save({}, folder / "model.pt")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds both model.safetensors and model.pt; expected exactly one"):
        sources.load_model(folder)
    (folder / "model.pt").unlink()
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors state dict"):
        sources.load_model(folder)


def test_wrong_formats(tmp_path):
    folder = saved(tmp_path)
    edit_config(folder, format=None)
    with pytest.raises(ValueError, match=r"config.json is neither a transformer_lens config \(no \"format\": "
                                         r"'transformer_lens.HookedTransformer'\) nor a Hugging Face config"):
        sources.load_model(folder)
    edit_config(folder, format="something-else")
    with pytest.raises(ValueError, match=r"has format 'something-else'; expected 'transformer_lens.HookedTransformer'"):
        sources.load_model(folder)
    edit_config(folder, format=sources.TL_FORMAT, format_version=2)
    with pytest.raises(ValueError, match=r"has format_version 2; this version of attnrules reads format_version 1"):
        sources.load_model(folder)
    edit_config(folder, format_version=1, processed="yes")
    with pytest.raises(ValueError, match=r"field 'processed' must be true or false, got 'yes'"):
        sources.load_model(folder)
    edit_config(folder, processed=True, d_moel=48)
    with pytest.raises(ValueError, match=r"has fields that are not HookedTransformerConfig fields .*\['d_moel'\]"):
        sources.load_model(folder)
    edit_config(folder, d_moel=None, dtype="float99")
    with pytest.raises(ValueError, match=r"field 'dtype' is 'float99'; expected a torch dtype name"):
        sources.load_model(folder)
    edit_config(folder, dtype="float32", d_model=None)
    with pytest.raises(ValueError, match=r"config.json is not a valid HookedTransformerConfig: .*d_model"):
        sources.load_model(folder)
    edit_config(folder, d_model=48, d_vocab=50)
    with pytest.raises(ValueError, match=r"the weights in .*model.safetensors do not fit the model .*config.json "
                                         r"describes: missing \[\], unexpected \[\], wrong shapes \['embed.W_E: \[101, 48\] "
                                         r"\(config: \[50, 48\]\)'"):
        sources.load_model(folder)


def test_weights_that_do_not_match_the_config(tmp_path):
    folder = saved(tmp_path)
    other = saved(tmp_path, "three_layers", n_layers=3)
    (folder / "model.safetensors").unlink()
    (other / "model.safetensors").rename(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"do not fit the model .* describes: missing \[\], unexpected \['blocks.2."):
        sources.load_model(folder)


def test_processed_flag_that_lies(tmp_path):
    folder = saved(tmp_path, processed=False)
    edit_config(folder, processed=True)
    with pytest.raises(ValueError, match=r"config.json says processed=true, but the weights are not: LayerNorm is not folded"):
        sources.load_model(folder)
    with pytest.raises(ValueError, match=r"says processed=true, but the weights are not"):
        sources.load_model(folder, process=False)  # the record is checked either way


def test_save_model_refuses(tmp_path):
    model = build_tiny_gpt2()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"folder='.*full' exists and is not an empty folder"):
        sources.save_model(model, tmp_path / "full")
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    sources.save_model(model, tmp_path / "empty")  # an empty folder is fine
    with pytest.raises(ValueError, match=r"weights must be 'safetensors' or 'pt', got 'bin'"):
        sources.save_model(model, tmp_path / "x", weights="bin")
    with pytest.raises(TypeError, match=r"model must be a transformer_lens HookedTransformer"):
        sources.save_model(object(), tmp_path / "y")


# --- Hugging Face model folders ---------------------------------------------------------------------


def perturbed(hf_model):
    """Non-zero biases and LayerNorm gains, so that a skipped processing step shows."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for name, param in hf_model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "ln" in name or "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return hf_model.eval()


def tiny_hf(kind: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "gpt2":
            return perturbed(GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=3, n_embd=48, n_positions=32,
                                                        vocab_size=D_VOCAB, activation_function="gelu_new")))
        if kind == "neox":
            return perturbed(GPTNeoXForCausalLM(GPTNeoXConfig(
                num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                max_position_embeddings=32, vocab_size=D_VOCAB, rotary_pct=0.5)))
        return perturbed(LlamaForCausalLM(LlamaConfig(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
            intermediate_size=128, max_position_embeddings=32, vocab_size=D_VOCAB)))


def hf_log_probs(hf_model):
    with torch.no_grad():
        return hf_model(TOKENS).logits.log_softmax(-1)


@pytest.mark.parametrize("kind, folder_name", [("gpt2", "tiny-gpt2"), ("neox", "tiny-neox"),
                                               ("llama", "tiny-llama")])  # "llama" in the path must not mislead TL
def test_hf_folder_loads_offline_and_processed(tmp_path, kind, folder_name):
    hf_model = tiny_hf(kind)
    folder = tmp_path / folder_name
    hf_model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()

    model = sources.load_model(folder)
    sources.check_processed(model)
    assert model.cfg.original_architecture == type(hf_model).__name__
    assert (model.cfg.model_name, model.cfg.tokenizer_name, model.tokenizer) == (folder_name, None, None)
    assert model.cfg.n_layers == 2 and model.cfg.d_vocab == D_VOCAB
    torch.testing.assert_close(model(TOKENS).log_softmax(-1), hf_log_probs(hf_model), atol=1e-4, rtol=0)

    raw = sources.load_model(folder, process=False)
    with pytest.raises(ValueError, match="not processed"):
        sources.check_processed(raw)
    torch.testing.assert_close(raw(TOKENS), hf_model(TOKENS).logits.detach(), atol=1e-4, rtol=0)
    # process_model on the raw conversion gives the same model as load_model
    sources.process_model(raw)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(raw.state_dict()[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_hf_gpt2_folder_matches_transformer_lens_conversion(tmp_path):
    """What from_pretrained would build for these weights: TL's GPT-2 conversion, default processing."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    hf_model = tiny_hf("gpt2")
    hf_model.save_pretrained(tmp_path / "gpt2")
    cfg = HookedTransformerConfig(n_layers=2, n_heads=3, d_model=48, d_head=16, d_mlp=192, n_ctx=32, d_vocab=D_VOCAB,
                                  act_fn="gelu_new", normalization_type="LN", eps=hf_model.config.layer_norm_epsilon,
                                  original_architecture="GPT2LMHeadModel", device="cpu")
    expected = HookedTransformer(cfg)
    expected.load_and_process_state_dict(convert_gpt2_weights(hf_model, cfg))
    model = sources.load_model(tmp_path / "gpt2")
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert torch.equal(model(TOKENS), expected(TOKENS))


def test_hf_folder_with_pytorch_bin_and_tokenizer(tmp_path):
    hf_model = tiny_hf("gpt2")
    folder = tmp_path / "bin"
    hf_model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), folder / "pytorch_model.bin")
    word_tokenizer().save_pretrained(folder)

    model = sources.load_model(folder)
    assert model.tokenizer is not None and model.cfg.tokenizer_name == str(folder.resolve())
    assert model.to_tokens("w4 w9")[0].tolist() == [0, 4, 9]
    torch.testing.assert_close(model(TOKENS).log_softmax(-1), hf_log_probs(hf_model), atol=1e-4, rtol=0)
    # An HF folder, converted and saved in the transformer_lens format, round-trips exactly.
    again = sources.load_model(sources.save_model(model, tmp_path / "tl"))
    assert torch.equal(again(TOKENS), model(TOKENS)) and again.tokenizer is not None


def test_hf_folder_errors(tmp_path):
    folder = tmp_path / "gpt2"
    tiny_hf("gpt2").save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"name='.*gpt2': .*gpt2 holds no weights; expected one of "
                                                r"model.safetensors, .*pytorch_model.bin"):
        sources.load_model(folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"transformers cannot load the model in .*gpt2"):
        sources.load_model(folder)

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    (bert / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"describes a BertForMaskedLM; expected a decoder-only causal language model"):
        sources.load_model(bert)

    falcon = tmp_path / "falcon"
    falcon.mkdir()
    (falcon / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    (falcon / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"transformer_lens cannot convert the architecture 'FalconForCausalLM'"):
        sources.load_model(falcon)

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"architectures": "GPT2LMHeadModel"}))
    with pytest.raises(ValueError, match=r"field 'architectures' must be a non-empty list of names, got 'GPT2LMHeadModel'"):
        sources.load_model(odd)


# --- the workload behind `attnrules extract --model PATH` -------------------------------------------


def test_pretrained_workload_on_a_model_folder(tmp_path):
    model = build_tiny_gpt2()
    folder = sources.save_model(model, tmp_path / "models" / "tiny")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        sae = StandardSAE(StandardSAEConfig(d_in=48, d_sae=32, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre")))
    sae.save_model(tmp_path / "sae_in")
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    g = torch.Generator().manual_seed(0)
    state = {"W_enc": torch.randn(16, 8, generator=g), "W_dec": torch.randn(8, 16, generator=g),
             "b_enc": torch.randn(8, generator=g), "b_dec": torch.randn(16, generator=g)}
    stem = "gpt2-small_L1_H2_z_v0"  # the authors' stem, trained (here) on another model
    torch.save(state, checkpoints / f"{stem}.pt")
    (checkpoints / f"{stem}_cfg.json").write_text(json.dumps(
        {"layer": 1, "head": 2, "model_name": "tiny", "act_name": "blocks.1.attn.hook_z", "act_size": 16, "dict_size": 8}))
    corpus = tmp_path / "tokens.pt"
    torch.save(torch.randint(0, D_VOCAB, (6, 10), generator=g), corpus)

    for spelling in (str(folder), folder, os.path.relpath(folder)):
        work = pretrained_workload(spelling, corpus=corpus, layers=[1], heads=[2], sae_in=str(tmp_path / "sae_in"),
                                   sae_out_dir=checkpoints, n_sequences=4, seq_len=10)
        assert work.name == str(spelling) and work.heads == ((1, 2),) and work.tokens.shape == (4, 10)
        assert torch.equal(work.model(TOKENS), model(TOKENS))
        out = work.output_sae(1, 2)
        assert (out.layer, out.head, out.n_heads, out.n_features) == (1, 2, 3, 8)
        assert work.input_sae(1).layer == 1

    hf_folder = tmp_path / "hf-gpt2"
    tiny_hf("gpt2").save_pretrained(hf_folder)
    work = pretrained_workload(str(hf_folder), corpus=corpus, layers=[1], heads=[2], sae_in=str(tmp_path / "sae_in"),
                               sae_out_dir=checkpoints, n_sequences=4, seq_len=10)
    sources.check_processed(work.model)
    assert work.output_sae(1, 2).d_head == 16

    with pytest.raises(FileNotFoundError, match=r"no such model folder"):
        pretrained_workload(str(tmp_path / "models" / "nope"), corpus=corpus, sae_out_dir=checkpoints)
