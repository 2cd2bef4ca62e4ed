"""The model as the SAEs expect it: a head that exists, and the processing ``from_pretrained`` applies
by default (LayerNorm folded, writing weights centred, value biases folded), checked or applied.

What ``HookedTransformer.from_pretrained`` does by default, per architecture (transformer_lens 3.9),
and so what :func:`check_processed` checks and :func:`process_model` applies:

- LayerNorm models (GPT-2, GPT-NeoX/Pythia, parallel attention + MLP or not): LayerNorm folded
  (``LNPre``), value biases folded into ``b_O``, writing weights (W_E, W_pos, W_O, MLP W_out) centred.
- RMSNorm models (Llama, Mistral, Qwen, Gemma): RMSNorm gains folded (``RMSPre``), value biases folded;
  nothing is centred (RMSNorm does not centre). Gemma 2/3's norms after attention and MLP
  (``ln1_post``, ``ln2_post``) and QK-norm gains (``q_norm``, ``k_norm``) stay unfolded: from_pretrained
  cannot fold them either.
- Models with an output-logit soft-cap (Gemma 2): the unembedding is not centred.
- Refused (ValueError): post-norm architectures (OLMo 2/3, which from_pretrained leaves unfolded and
  whose heads read the unnormalised stream), shortformer positions, unknown normalisation types.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def _check_int(name: str, value: Any, *, low: int = 0, below: int | None = None, what: str = "") -> None:
    """Raise TypeError for a non-int and ValueError unless ``low <= value < below`` (``below`` optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (below is not None and value >= below):
        bound = f"{low}..{below - 1}" if below is not None else f">= {low}"
        raise ValueError(f"{name}={value} is out of range: {what}valid range is {bound}")


def check_head(model: HookedTransformer, layer: int, head: int) -> None:
    """Raise ValueError unless (layer, head) names a head of ``model``."""
    cfg = model.cfg
    _check_int("layer", layer, below=cfg.n_layers, what=f"the model has {cfg.n_layers} layers, ")
    _check_int("head", head, below=cfg.n_heads, what=f"the model has {cfg.n_heads} heads per layer, ")


def kv_head(model: HookedTransformer, head: int) -> int:
    """The key/value head that query head ``head`` reads: h // (n_heads / n_key_value_heads) under
    grouped-query attention (transformer_lens repeats each key/value head that many times), else h.
    This indexes ``hook_k``, ``hook_v`` and ``hook_rot_k``, which hold n_key_value_heads heads, unless
    ``cfg.ungroup_grouped_query_attention`` (then they hold all n_heads and the index is h)."""
    n_kv = model.cfg.n_key_value_heads
    if n_kv is None or getattr(model.cfg, "ungroup_grouped_query_attention", False):
        return head
    return head // (model.cfg.n_heads // n_kv)


def attention_window(model: HookedTransformer, layer: int) -> int | None:
    """The sliding window of layer ``layer``'s heads: a query attends to keys up to window − 1 tokens
    back (transformer_lens ``use_local_attn`` with ``attn_type == "local"``), None for global attention."""
    attn = model.blocks[layer].attn
    if getattr(attn, "attn_type", "global") != "local":
        return None
    return int(model.cfg.window_size)


def _writing_weights(model: HookedTransformer) -> dict[str, Tensor]:
    """The weights that write to the residual stream, by name (what ``center_writing_weights`` centres)."""
    weights = {"W_E": model.embed.W_E}
    if hasattr(model, "pos_embed") and hasattr(model.pos_embed, "W_pos"):
        weights["W_pos"] = model.pos_embed.W_pos
    for i, block in enumerate(model.blocks):
        if hasattr(block, "attn"):
            weights[f"blocks.{i}.attn.W_O"] = block.attn.W_O
        w_out = getattr(getattr(block, "mlp", None), "W_out", None)
        if isinstance(w_out, Tensor):
            weights[f"blocks.{i}.mlp.W_out"] = w_out
    return weights


_KNOWN_NORMALIZATIONS = (None, "LN", "LNPre", "RMS", "RMSPre")


def _refuse_uncheckable(model: HookedTransformer) -> None:
    """ValueError for models whose default processing this module does not know how to check."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    problems = []
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        problems.append(
            f"{cfg.original_architecture} is a post-norm architecture (from_pretrained leaves its norms unfolded and "
            "its attention reads the unnormalised residual stream)"
        )
    if cfg.positional_embedding_type == "shortformer":
        problems.append("shortformer positions (from_pretrained cannot fold LayerNorm or centre weights for them)")
    if cfg.normalization_type not in _KNOWN_NORMALIZATIONS:
        problems.append(f"normalization_type {cfg.normalization_type!r} (known: {_KNOWN_NORMALIZATIONS})")
    if problems:
        raise ValueError("cannot check or apply from_pretrained's processing for this model: " + "; ".join(problems))


def _processing_problems(model: HookedTransformer) -> list[str]:
    """What differs from ``from_pretrained``'s default processing (empty when processed)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    _refuse_uncheckable(model)
    cfg = model.cfg
    problems = []
    if cfg.normalization_type in ("LN", "RMS"):
        problems.append(
            f"LayerNorm is not folded (cfg.normalization_type is {cfg.normalization_type!r}, "
            f"expected {cfg.normalization_type + 'Pre'!r})"
        )
    unfolded = [i for i, block in enumerate(model.blocks) if bool((block.attn.b_V != 0).any())]
    if unfolded:
        problems.append(f"value biases are not folded (b_V != 0 in layers {unfolded})")
    centred_model = (
        cfg.normalization_type in ("LN", "LNPre")
        and not getattr(cfg, "final_rms", False)
        and cfg.original_architecture not in POST_NORM_ARCHITECTURES
    )
    if centred_model:
        with torch.no_grad():
            off = [
                name
                for name, w in _writing_weights(model).items()
                if w.float().mean(-1).abs().max() > max(1e-4, 50 * torch.finfo(w.dtype).eps) * w.abs().max()
            ]
        if off:
            problems.append(f"writing weights are not centred (mean over d_model != 0 in {', '.join(off)})")
    return problems


def check_processed(model: HookedTransformer) -> None:
    """Raise ValueError unless ``model`` is processed as the SAEs expect.

    The SAEs were trained on ``HookedTransformer.from_pretrained``'s default processing: LayerNorm
    folded, value biases folded into ``b_O`` (so ``hook_z`` excludes ``b_V``) and, for LayerNorm
    models, writing weights centred (so the residual stream is mean-zero).
    """
    problems = _processing_problems(model)
    if problems:
        raise ValueError(
            "the model is not processed as the SAEs expect: "
            + "; ".join(problems)
            + ". Load it with attnrules.sources.load_model or call attnrules.sources.process_model(model)."
        )


def process_model(model: HookedTransformer) -> HookedTransformer:
    """Apply ``from_pretrained``'s default weight processing in place and return ``model``.

    A no-op on an already processed model; a partly processed one gets the missing steps.
    """
    from transformer_lens.utilities.activation_functions import softcap_enabled

    if not _processing_problems(model):
        return model
    with torch.no_grad():
        model.load_and_process_state_dict(
            model.state_dict(),
            fold_ln=model.cfg.normalization_type in ("LN", "RMS"),
            center_writing_weights=True,  # transformer_lens centres only LayerNorm models without final_rms
            # from_pretrained does not centre W_U under an output soft-cap (tanh is not shift-invariant)
            center_unembed=not softcap_enabled(model.cfg.output_logits_soft_cap),
            fold_value_biases=True,
        )
    return model
