"""The model runner: token corpora checked and chunked, and hooked forward passes over them in batches.

- :func:`check_tokens` — a 2-D int64 tensor of valid ids for the model, or a clear error;
- :func:`tokenize_corpus` — REF's contiguous ``seq_len`` chunks of documents, BOS at position 0;
- :func:`hook_names` — the hooks the input and output SAEs of a layer read;
- :func:`run_batches` — blocks 0..L over a corpus in batches, yielding the activations asked for;
  each forward pass stops as soon as the last of them is computed (e.g. before block L's MLP when
  only ``attn.hook_z`` is asked for; before block L itself for ``hook_resid_pre``), so the values are
  those of the full pass, bit for bit, without the work after them.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence

import torch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# The key under which a runner of stored hooks (not run_batches) may also hand over the input-SAE
# activations of ``hook_resid_pre`` it already holds (see attnrules.pipeline.activations.SharedPasses).
INPUT_ACTS = "attnrules.input_sae_acts"


def _progress(iterable: Iterable, total: int, desc: str, show: bool):
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)


def check_tokens(tokens: torch.Tensor, model) -> torch.Tensor:
    """``tokens`` as a 2-D int64 tensor of valid ids for ``model``, or a clear error."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a 2-D tensor [n_sequences, seq_len], got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.numel() == 0:
        raise ValueError("tokens is empty")
    if int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.d_vocab:
        raise ValueError(f"tokens must be ids in [0, {model.cfg.d_vocab}), got {int(tokens.min())}..{int(tokens.max())}")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"tokens have seq_len {tokens.shape[1]} but the model's context is {model.cfg.n_ctx}")
    return tokens.long()


def tokenize_corpus(
    model: HookedTransformer, texts: Iterable[str], *, seq_len: int = 64, n_sequences: int = 50_000, max_chunks_per_doc: int = 16
) -> torch.Tensor:
    """REF's contiguous chunks: each document tokenised with BOS (and truncated to the model's context,
    as ``to_tokens`` does), documents shorter than ``seq_len``
    skipped, cut into ``seq_len`` chunks (at most ``max_chunks_per_doc``), position 0 set to BOS."""
    if model.tokenizer is None:
        raise ValueError("model has no tokenizer: pass token ids instead of text")
    chunks: list[torch.Tensor] = []
    n = 0
    for text in texts:
        toks = model.to_tokens(text, prepend_bos=True)[0]
        usable = (toks.numel() // seq_len) * seq_len
        if usable == 0:
            continue
        doc = toks[:usable].view(-1, seq_len)[:max_chunks_per_doc]
        chunks.append(doc)
        n += doc.shape[0]
        if n >= n_sequences:
            break
    if not chunks:
        raise ValueError(f"no document in texts has {seq_len} tokens or more")
    tokens = torch.cat(chunks)[:n_sequences].clone()
    tokens[:, 0] = model.tokenizer.bos_token_id
    return tokens


def hook_names(layer: int) -> tuple[str, str]:
    """(input-SAE hook, output-SAE hook) of a layer."""
    return f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_z"


class _Computed(Exception):
    """Raised by the last hook asked for: the rest of the forward pass is not needed."""


def hooked_forward(model: HookedTransformer, tokens: torch.Tensor, layer: int, names: Sequence[str],
                   resid: Optional[torch.Tensor] = None) -> dict:
    """{hook name: activation} of blocks 0..layer over ``tokens``, stopping the pass once every hook in
    ``names`` has fired (the activations are the full pass's; nothing after them is computed).
    ``resid``: the tokens' ``hook_resid_pre`` of ``layer``, already computed (:mod:`attnrules.resid_store`):
    block ``layer`` alone runs from it (``names`` then within that block), with the positional input
    and attention mask that the embedding gives these tokens, as in the whole pass."""
    wanted = set(names)
    cache: dict = {}

    def save(tensor: torch.Tensor, hook) -> None:
        cache[hook.name] = tensor.detach()
        if len(cache) == len(wanted):
            raise _Computed

    with model.hooks(fwd_hooks=[(name, save) for name in wanted]):
        try:
            if resid is None:
                model(tokens, stop_at_layer=layer + 1)
            else:
                _, _, shortformer_pos_embed, attention_mask = model.input_to_embed(tokens)
                model(resid, start_at_layer=layer, stop_at_layer=layer + 1, shortformer_pos_embed=shortformer_pos_embed,
                      attention_mask=attention_mask)
        except _Computed:
            pass
    missing = wanted - set(cache)
    if missing:
        raise KeyError(f"the model has no hook {sorted(missing)} in blocks 0..{layer}")
    return cache


def run_batches(
    model: HookedTransformer, tokens: torch.Tensor, layer: int, names: Sequence[str], *, batch_size: int, desc: str,
    progress: bool, resid: Optional[Callable[[slice], torch.Tensor]] = None,
) -> Iterator[tuple[slice, dict]]:
    """Run blocks 0..layer over ``tokens`` in batches, yielding (rows, {hook name: activation}).
    ``resid``: each batch's ``hook_resid_pre`` of ``layer`` (given its rows of ``tokens``), already
    computed (:mod:`attnrules.resid_store`): block ``layer`` alone runs (:func:`hooked_forward`)."""
    tokens = check_tokens(tokens, model)
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be in [0, {model.cfg.n_layers}), got {layer}")
    device = next(model.parameters()).device
    starts = range(0, tokens.shape[0], batch_size)
    with torch.no_grad():
        for start in _progress(starts, len(starts), desc, progress):
            rows = slice(start, min(start + batch_size, tokens.shape[0]))
            cache = hooked_forward(model, tokens[rows].to(device), layer, names,
                                   resid=None if resid is None else resid(rows).to(device))
            yield rows, {name: cache[name] for name in names}
