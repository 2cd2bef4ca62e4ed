"""Load and check the model and the SAEs that attnrules explains, and run the model over a corpus.

Three things come in:

- a ``HookedTransformer`` processed the way ``HookedTransformer.from_pretrained`` does by default
  (LayerNorm folded, writing weights centred, value biases folded), because the SAEs were trained
  on the activations of exactly that model: an unprocessed model's ``hook_z`` is shifted by ``b_V``
  (:mod:`~attnrules.sources.model`);
- an input SAE on ``blocks.{L}.hook_resid_pre`` (:class:`InputSAE`), from any sae_lens SAE or tensors;
- an output SAE on one head's ``blocks.{L}.attn.hook_z`` (:class:`OutputSAE`): a per-head SAE in the
  Kissane ``.pt`` + ``_cfg.json`` format of the reference code, or a layer-level SAE over the
  concatenated heads sliced to one head (:mod:`~attnrules.sources.saes`, :mod:`~attnrules.sources.loaders`);
- the SAE releases (Gemma Scope, Llama Scope, Kissane's hook_z SAEs, ...) by sae_lens release id or
  as local files in each release's own format (:mod:`~attnrules.sources.releases`).

:mod:`~attnrules.sources.runner` runs the model over token batches with the hooks a step needs.
"""
from attnrules.sources.loaders import (
    TL_FORMAT,
    SourceUnavailableError,
    find_head_sae_checkpoint,
    load_head_sae,
    load_model,
    save_model,
)
from attnrules.sources.releases import default_sae_id, load_input_sae, load_layer_z_sae, load_output_sae, load_sae
from attnrules.sources.model import attention_window, check_head, check_processed, kv_head, process_model
from attnrules.sources.runner import check_tokens, hook_names, run_batches, tokenize_corpus
from attnrules.sources.sae_kinds import ARCHITECTURES
from attnrules.sources.saes import InputSAE, OutputSAE, as_sources, check_compatible

__all__ = [
    "ARCHITECTURES", "InputSAE", "OutputSAE", "SourceUnavailableError", "TL_FORMAT", "as_sources", "attention_window", "check_compatible",
    "check_head", "kv_head",
    "check_processed", "check_tokens", "find_head_sae_checkpoint", "hook_names", "load_head_sae",
    "load_input_sae", "load_layer_z_sae", "load_model", "load_output_sae", "load_sae", "default_sae_id", "process_model", "run_batches", "save_model",
    "tokenize_corpus",
]
