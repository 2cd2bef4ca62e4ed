"""What a run explains: a model, a token corpus, and the SAEs of the heads to explain.

Both ``attnrules extract`` and ``attnrules sweep`` build one :class:`Workload`, either on the
embedded planted model (:func:`toy_workload`) or on a pretrained model with SAEs from sae_lens and
per-head checkpoint files (:func:`pretrained_workload`). SAEs are loaded when first asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from attnrules import sources
from attnrules.sources import check_tokens, tokenize_corpus
from attnrules.toy import build_toy, build_toy_ln

TOY = "toy"
TOY_LN = "toy-ln"  # the planted model's variant with LayerNorm and biases, where paper mode is misled


@dataclass
class Workload:
    name: str  # "toy" or the model name
    model: object
    tokens: torch.Tensor  # [n_sequences, seq_len]
    heads: tuple  # ((layer, head), ...) to explain
    load_input: Callable[[int], object]
    load_output: Callable[[int, int], object]
    _cache: dict = field(default_factory=dict, repr=False)

    def input_sae(self, layer: int):
        if ("in", layer) not in self._cache:
            self._cache["in", layer] = self.load_input(layer)
        return self._cache["in", layer]

    def output_sae(self, layer: int, head: int):
        if ("out", layer, head) not in self._cache:
            self._cache["out", layer, head] = self.load_output(layer, head)
        return self._cache["out", layer, head]


def load_corpus(path: Path, model, *, n_sequences: int, seq_len: int) -> torch.Tensor:
    """Token ids from a ``.pt`` tensor ``[n, T]``, or text (one document per line) chunked as REF does."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"corpus: no such file {path}")
    if path.suffix == ".pt":
        tokens = torch.load(path, map_location="cpu", weights_only=True)
        return check_tokens(tokens, model)[:n_sequences]
    with path.open() as f:
        return tokenize_corpus(model, (line for line in f if line.strip()), seq_len=seq_len, n_sequences=n_sequences)


def toy_workload(
    *,
    layer: int = 0,
    heads: Optional[Sequence[int]] = None,
    n_sequences: int = 3000,
    seq_len: int = 32,
    seed: int = 0,
    corpus: Optional[Path] = None,
    variant: str = TOY,
) -> Workload:
    """The planted model (``variant="toy-ln"``: with LayerNorm and biases); all its planted heads
    unless ``heads`` says otherwise."""
    if variant not in (TOY, TOY_LN):
        raise ValueError(f"variant must be {TOY!r} or {TOY_LN!r}, got {variant!r}")
    toy = (build_toy if variant == TOY else build_toy_ln)(seq_len=seq_len)
    heads = tuple(heads) if heads else tuple(toy.output_saes)
    missing = [h for h in heads if h not in toy.output_saes]
    if missing or layer != 0:
        raise ValueError(f"layer/head: the toy model has planted heads L0H{sorted(toy.output_saes)}, not L{layer}H{missing}")
    tokens = toy.corpus(n_sequences, seed=seed) if corpus is None else load_corpus(
        corpus, toy.model, n_sequences=n_sequences, seq_len=seq_len)
    return Workload(variant, toy.model, tokens, tuple((0, h) for h in heads),
                    lambda _layer: toy.input_sae, lambda _layer, h: toy.output_saes[h])


def pretrained_workload(
    model_name: str,
    *,
    corpus: Path,
    layers: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    sae_in: str = "gpt2-small-res-jb",
    sae_out_dir: Optional[Path] = None,
    sae_out_z: Optional[str] = None,
    sae_out_z_id: Optional[str] = None,
    n_sequences: int = 50_000,
    seq_len: int = 64,
    device: str = "cpu",
) -> Workload:
    """A transformer_lens model (processed as from_pretrained does) with sae_lens input SAEs and
    per-head checkpoints (``sae_out_dir``) or a layer-level hook_z SAE (``sae_out_z``); all layers and
    heads unless given."""
    if (sae_out_dir is None) == (sae_out_z is None):
        raise ValueError("give exactly one of sae_out_dir (per-head checkpoints) or sae_out_z (layer-level hook_z SAE)")
    model = sources.load_model(model_name, device=device)
    layers = tuple(layers) if layers else tuple(range(model.cfg.n_layers))
    heads = tuple(heads) if heads else tuple(range(model.cfg.n_heads))
    for layer in layers:
        for head in heads:
            sources.check_head(model, layer, head)
    tokens = load_corpus(corpus, model, n_sequences=n_sequences, seq_len=seq_len)

    def load_output(layer: int, head: int):
        if sae_out_dir is not None:
            out = sources.load_head_sae(sae_out_dir, layer, head, n_heads=model.cfg.n_heads, device=device)
        else:
            out = sources.load_layer_z_sae(sae_out_z, layer=layer, head=head, n_heads=model.cfg.n_heads,
                                           d_head=model.cfg.d_head, sae_id=sae_out_z_id, device=device)
        sources.check_compatible(model, None, out)
        return out

    return Workload(model_name, model, tokens, tuple((l, h) for l in layers for h in heads),
                    lambda layer: sources.load_input_sae(sae_in, layer=layer, device=device), load_output)
