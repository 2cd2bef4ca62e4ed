"""One tiny random model per architecture family, built offline the way ``from_pretrained`` builds it.

Each builder makes a random ``transformers`` model from the family's own config class (tiny sizes,
norm gains and biases perturbed away from their initial values so that skipping a processing step
shows), converts it with transformer_lens's OWN config and weight conversion, and processes it with
the flags ``HookedTransformer.from_pretrained`` uses by default for that architecture:

- Llama, Mistral, Qwen 3, GPT-NeoX: the HF config is written to a temporary folder (whose name holds
  no model-family word, so transformer_lens reads the config instead of matching a name) and
  converted by ``loading.get_pretrained_model_config``; the weights by ``get_pretrained_state_dict``
  with the HF model passed in. Nothing is downloaded.
- Gemma 2 and Gemma 3: transformer_lens only knows these configs by hub name, so the config dict is
  written by hand, mirroring its ``google/gemma-2-2b`` / ``google/gemma-3-1b`` entries at tiny sizes
  (with ``attn_scale`` = sqrt(query_pre_attn_scalar), as its ``gemma-2-27b`` entry does); the weights
  go through ``convert_gemma_weights``.

API (also reused by end-to-end tests)::

    build_family(name, processed=True) -> HookedTransformer   # eval mode, cached per (name, processed)
    family_saes(model, layer, head, seed=0, n_in=30, n_out=5) -> (InputSAE, OutputSAE)
    FAMILIES: dict name -> builder(seed=0, processed=True) -> a fresh HookedTransformer
    family_tokens(model, n=4, t=12, seed=0) -> [n, t] token ids
    HF_MODELS[id(model)] -> the transformers model it was converted from (TL and HF logits agree)

Every model has 2 layers; ``LOCAL_LAYERS[name]`` names the sliding-window layers where the family
alternates (window ``WINDOW``).
"""
from __future__ import annotations

import functools
import os
import tempfile
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from attnrules.sources import InputSAE, OutputSAE  # noqa: E402

N_CTX = 32
VOCAB = 97
WINDOW = 5  # sliding-window size: shorter than the test sequences, so the window shows
SOFT_CAP = 4.0  # Gemma 2's attention-logit cap, small enough that tanh bends the tiny model's logits
HF_MODELS: dict[int, torch.nn.Module] = {}  # id(HookedTransformer) -> the transformers model it came from
LOCAL_LAYERS = {"gemma2": (0,), "gemma3": (0,), "mistral": (0, 1)}


def _perturb(hf_model: torch.nn.Module, seed: int) -> None:
    """Move norm gains and biases off their initial values (HF initialises them to 1 / 0)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif p.dim() == 2:
                p.normal_(0.0, 0.2, generator=g)  # larger than HF's 0.02 init: logits of order 1


def _process(cfg: HookedTransformerConfig, state_dict: dict, hf_model=None, processed: bool = True) -> HookedTransformer:
    """``from_pretrained``'s model construction and default processing, given a converted config
    (with ``fold_ln`` already applied to ``normalization_type``, as get_pretrained_model_config does);
    ``processed=False``: ``from_pretrained_no_processing`` instead."""
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    if not processed:
        cfg.normalization_type = cfg.normalization_type.removesuffix("Pre")
    fold_ln = center_writing_weights = center_unembed = fold_value_biases = processed
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        fold_ln = center_writing_weights = False
    if softcap_enabled(cfg.output_logits_soft_cap):
        center_unembed = False
    model = HookedTransformer(cfg, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
        center_unembed=center_unembed, fold_value_biases=fold_value_biases,
    )
    HF_MODELS[id(model)] = hf_model  # the source model, for tests that compare the two
    return model.eval()


def _through_config_file(hf_config, model_class, seed: int, processed: bool) -> HookedTransformer:
    """transformer_lens's own config + weight conversion of a random ``model_class(hf_config)``."""
    import transformer_lens.loading_from_pretrained as loading

    hf_config.architectures = [model_class.__name__]  # what a hub config.json records
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = model_class(hf_config).eval()
    _perturb(hf_model, seed)
    with tempfile.TemporaryDirectory(prefix="attnrules-family-") as folder:
        hf_config.save_pretrained(folder)
        cfg = loading.get_pretrained_model_config(
            folder, hf_cfg=hf_model.config.to_dict(), fold_ln=True, n_ctx=N_CTX, dtype=torch.float32, device="cpu",
        )
        for p in hf_model.parameters():
            p.requires_grad_(False)
        state_dict = loading.get_pretrained_state_dict(folder, cfg, hf_model, dtype=torch.float32)
    cfg.tokenizer_name = None  # the temporary folder holds no tokenizer (and is gone)
    return _process(cfg, state_dict, hf_model, processed)


def build_llama(seed: int = 0, processed: bool = True) -> HookedTransformer:
    """Llama: RMSNorm, rotary (half-split pairs), GQA (4 query heads on 2 key/value heads), gated MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=N_CTX,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    return _through_config_file(cfg, LlamaForCausalLM, seed, processed)


def build_mistral(seed: int = 0, processed: bool = True) -> HookedTransformer:
    """Mistral: Llama's layout with a sliding window on every layer, GQA."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=N_CTX,
                        sliding_window=WINDOW, tie_word_embeddings=False)
    return _through_config_file(cfg, MistralForCausalLM, seed, processed)


def build_qwen3(seed: int = 0, processed: bool = True) -> HookedTransformer:
    """Qwen 3: QK-norm (RMS of each head's query and key, with gains), rotary, GQA."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=N_CTX,
                      tie_word_embeddings=False)
    return _through_config_file(cfg, Qwen3ForCausalLM, seed, processed)


def build_neox(seed: int = 0, processed: bool = True) -> HookedTransformer:
    """GPT-NeoX / Pythia: LayerNorm with biases, parallel attention + MLP, partial rotary (rotary_dim
    4 of d_head 8), query/key/value biases."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=N_CTX, use_parallel_residual=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                        tie_word_embeddings=False)
    model = _through_config_file(cfg, GPTNeoXForCausalLM, seed, processed)
    assert model.cfg.rotary_dim == 4 and model.cfg.parallel_attn_mlp
    return model


def _gemma(hf_config, model_class, cfg_dict: dict, seed: int, processed: bool) -> HookedTransformer:
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = model_class(hf_config).eval()
    _perturb(hf_model, seed)
    # What get_pretrained_model_config adds with fold_ln=True, then HookedTransformerConfig.from_dict.
    cfg_dict = {**cfg_dict, "normalization_type": "RMSPre", "init_weights": False, "dtype": torch.float32,
                "device": "cpu", "n_devices": 1, "default_prepend_bos": True, "from_checkpoint": False}
    cfg = HookedTransformerConfig.from_dict(cfg_dict)
    with torch.no_grad():
        state_dict = convert_gemma_weights(hf_model, cfg)
    return _process(cfg, state_dict, hf_model, processed)


def build_gemma2(seed: int = 0, processed: bool = True) -> HookedTransformer:
    """Gemma 2: RMSNorm before and after attention and MLP, GQA, attention-logit soft-capping,
    alternating sliding-window (layer 0) and global (layer 1) layers, attn_scale from
    query_pre_attn_scalar."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    d_model, n_heads, n_kv, d_head, d_mlp, qpas = 32, 4, 2, 8, 64, 16
    hf_cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=2,
                          num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=d_head,
                          max_position_embeddings=N_CTX, query_pre_attn_scalar=qpas, sliding_window=WINDOW,
                          attn_logit_softcapping=SOFT_CAP, final_logit_softcapping=30.0)
    cfg_dict = {  # transformer_lens's "google/gemma-2-2b" entry (and -27b's attn_scale), at tiny sizes
        "d_model": d_model, "d_head": d_head, "n_heads": n_heads, "d_mlp": d_mlp, "n_layers": 2, "n_ctx": N_CTX,
        "eps": 1e-06, "d_vocab": VOCAB, "act_fn": "gelu_pytorch_tanh", "initializer_range": 0.02,
        "normalization_type": "RMS", "rotary_base": 10000.0, "positional_embedding_type": "rotary",
        "use_attn_scale": True, "attn_scale": qpas**0.5, "n_key_value_heads": n_kv, "window_size": WINDOW,
        "use_local_attn": True, "attn_types": ["local", "global"], "attn_scores_soft_cap": SOFT_CAP,
        "output_logits_soft_cap": 30.0, "gated_mlp": True, "final_rms": True,
        "use_normalization_before_and_after": True, "original_architecture": "Gemma2ForCausalLM",
        "rotary_dim": d_head,
    }
    return _gemma(hf_cfg, Gemma2ForCausalLM, cfg_dict, seed, processed)


def build_gemma3(seed: int = 0, processed: bool = True) -> HookedTransformer:
    """Gemma 3: Gemma 2's norms plus QK-norm, local (base 10,000, sliding window, layer 0) and global
    (base 1,000,000, layer 1) rotary; no soft-capping."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    d_model, n_heads, n_kv, d_head, d_mlp = 32, 4, 2, 8, 64
    hf_cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=2,
                              num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=d_head,
                              max_position_embeddings=N_CTX, query_pre_attn_scalar=d_head, sliding_window=WINDOW,
                              layer_types=["sliding_attention", "full_attention"])
    cfg_dict = {  # transformer_lens's "google/gemma-3-1b" entry, at tiny sizes
        "d_model": d_model, "d_head": d_head, "n_heads": n_heads, "d_mlp": d_mlp, "n_layers": 2, "n_ctx": N_CTX,
        "eps": 1e-06, "d_vocab": VOCAB, "act_fn": "gelu_pytorch_tanh", "initializer_range": 0.02,
        "normalization_type": "RMS", "rotary_base": 1000000, "rotary_base_local": 10000,
        "positional_embedding_type": "rotary", "use_attn_scale": True, "n_key_value_heads": n_kv,
        "gated_mlp": True, "final_rms": True, "use_normalization_before_and_after": True, "use_qk_norm": True,
        "window_size": WINDOW, "use_local_attn": True, "attn_types": ["local", "global"],
        "original_architecture": "Gemma3ForCausalLM", "rotary_dim": d_head,
    }
    return _gemma(hf_cfg, Gemma3ForCausalLM, cfg_dict, seed, processed)


FAMILIES: dict[str, Callable[..., HookedTransformer]] = {
    "llama": build_llama,
    "gemma2": build_gemma2,
    "gemma3": build_gemma3,
    "qwen3": build_qwen3,
    "neox": build_neox,
    "mistral": build_mistral,
}


@functools.lru_cache(maxsize=None)
def build_family(name: str, processed: bool = True) -> HookedTransformer:
    """The tiny model of family ``name`` (one of :data:`FAMILIES`), processed as ``from_pretrained``
    does by default (``processed=False``: as ``from_pretrained_no_processing``), cached: don't modify it."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name](processed=processed)


def family_saes(model: HookedTransformer, layer: int, head: int, seed: int = 0, n_in: int = 30,
                n_out: int = 5) -> tuple[InputSAE, OutputSAE]:
    """A random input SAE on ``layer``'s residual stream (a large error term; about a third of its
    features active) and a random output SAE on head ``head``'s ``hook_z``."""
    g = torch.Generator().manual_seed(seed)
    d, dh = model.cfg.d_model, model.cfg.d_head
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    # The residual stream's scale differs between families (Gemma multiplies embeddings by sqrt(d_model)):
    # scale the encoder so that pre-activations are of order 1.
    with torch.no_grad():
        tokens = family_tokens(model, n=2, t=8, seed=seed)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == f"blocks.{layer}.hook_resid_pre")
        rms = float(cache[f"blocks.{layer}.hook_resid_pre"].pow(2).mean().sqrt())
    sae_in = InputSAE.from_tensors(r(d, n_in) / (rms * d**0.5), r(n_in) - 0.5, rms * r(n_in, d) / d**0.5,
                                   0.3 * rms * r(d), layer=layer)
    sae_out = OutputSAE.from_tensors(r(dh, n_out), 0.1 * r(n_out), r(n_out, dh), 0.3 * r(dh), layer=layer,
                                     head=head, n_heads=model.cfg.n_heads, d_head=dh)
    return sae_in, sae_out


def family_tokens(model: HookedTransformer, n: int = 4, t: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n, t), generator=g)
