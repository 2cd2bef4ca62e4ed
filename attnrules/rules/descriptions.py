"""Human-readable names of input features, for rule text.

Layer 0 (REF §8): a feature is described by the tokens and positions whose raw embedding rows
project most on its encoder column, top-k rows of ``concat(W_E, W_pos[:max_pos]) @ W_enc``
(positions shown as ``pos{i}``; models without learned position embeddings, e.g. rotary ones: W_E only). Above layer 0: its Neuronpedia id (``{sae id}/{index}``), whose
page holds the community's explanation; we do not fetch it (no network at run time).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass

import torch

import attnrules.engine as engine

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import InputSAE


@dataclass(frozen=True)
class InputDescriptions:
    """``labels[j]``: a short name for rule text; ``details[j]``: the full description."""

    labels: tuple[str, ...]
    details: tuple[str, ...]

    def __call__(self, feature: int) -> str:
        return self.labels[feature]


def token_strings(model) -> list[str]:
    """Vocabulary strings, with GPT-2's leading-space marker removed for readability."""
    if model.tokenizer is None:
        return [f"tok{i}" for i in range(model.cfg.d_vocab)]
    raw = model.tokenizer.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))
    return [(t or "").replace("Ġ", " ").replace("Ċ", "\\n").strip() or repr(t) for t in raw]


def embedding_rows(model: HookedTransformer, max_pos: int) -> torch.Tensor:
    """What layer 0 reads, row by row: ``W_E`` (tokens), then ``W_pos[:max_pos]`` (positions) when the
    model has learned position embeddings (rotary models have none)."""
    rows = [model.W_E.detach()]
    if model.cfg.positional_embedding_type == "standard":
        rows.append(model.W_pos.detach()[:max_pos])
    return torch.cat(rows)


def describe_input_features(
    model: HookedTransformer, input_sae: InputSAE, *, k: int = 3, max_pos: int = 128, backend: str = "auto",
) -> InputDescriptions:
    """Descriptions of every input feature of ``input_sae`` (see the module docstring)."""
    n = input_sae.n_features
    if input_sae.layer > 0:
        if input_sae.neuronpedia_id:
            labels = tuple(f"{input_sae.neuronpedia_id.split('/')[-1]}/{j}" for j in range(n))
            details = tuple(f"https://neuronpedia.org/{input_sae.neuronpedia_id}/{j}" for j in range(n))
        else:
            labels = tuple(f"L{input_sae.layer}.in{j}" for j in range(n))
            details = labels
        return InputDescriptions(labels, details)
    rows = embedding_rows(model, max_pos).to(input_sae.W_enc.dtype)
    names = token_strings(model) + [f"pos{i}" for i in range(rows.shape[0] - model.cfg.d_vocab)]
    k = min(k, rows.shape[0])
    best = engine.pair_topk(rows.contiguous(), input_sae.W_enc.T.contiguous(), k, by="key", backend=backend)
    labels, details = [], []
    for j in range(n):
        tops = [(names[i], s) for i, s in zip(best.query_idx[j].tolist(), best.scores[j].tolist())]
        labels.append(tops[0][0])
        details.append(" ".join(f"{name} ({score:.3g})" for name, score in tops))
    return InputDescriptions(tuple(labels), tuple(details))
