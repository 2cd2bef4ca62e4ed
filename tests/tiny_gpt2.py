"""A small GPT-2-architecture HookedTransformer built offline, for tests.

The model goes through the same path as the real GPT-2: a ``transformers.GPT2LMHeadModel`` is
converted by transformer_lens's GPT-2 weight conversion, then optionally processed exactly as
``HookedTransformer.from_pretrained`` does by default. Its LayerNorm weights and all biases
(including ``b_V``) are made non-trivial, so that skipping a processing step shows.
"""
from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
from transformers import GPT2Config, GPT2LMHeadModel


def build_tiny_gpt2(
    *,
    seed: int = 0,
    processed: bool = True,
    n_layers: int = 2,
    n_heads: int = 3,
    d_model: int = 48,
    d_head: int = 16,
    n_ctx: int = 32,
    d_vocab: int = 101,
) -> HookedTransformer:
    """A random GPT-2 with the given sizes; ``processed`` applies from_pretrained's default processing.

    No tokenizer is attached. The global torch RNG is left untouched.
    """
    if n_heads * d_head != d_model:
        raise ValueError(f"GPT-2 needs n_heads*d_head == d_model, got {n_heads}*{d_head} != {d_model}")
    hf_cfg = GPT2Config(
        n_layer=n_layers, n_head=n_heads, n_embd=d_model, n_positions=n_ctx, vocab_size=d_vocab,
        activation_function="gelu_new",
    )
    cfg = HookedTransformerConfig(
        n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_head=d_head, d_mlp=4 * d_model,
        n_ctx=n_ctx, d_vocab=d_vocab, act_fn="gelu_new", normalization_type="LN",
        eps=hf_cfg.layer_norm_epsilon, original_architecture="GPT2LMHeadModel", seed=seed,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = GPT2LMHeadModel(hf_cfg).eval()
        with torch.no_grad():
            # HF initialises biases to 0 and LayerNorm gains to 1: perturb them all.
            for name, param in hf_model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.1)
                elif ".ln_" in name:
                    param.add_(0.2 * torch.randn_like(param))
        model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf_model, cfg),
        fold_ln=processed,
        center_writing_weights=processed,
        center_unembed=processed,
        fold_value_biases=processed,
    )
    return model.eval()
