"""What a run explains: a model, a token corpus, and the SAEs of the heads to explain.

Both ``attnrules extract`` and ``attnrules sweep`` build one :class:`Workload`, either on the
embedded planted model (:func:`toy_workload`) or on a pretrained model with SAEs from sae_lens and
per-head checkpoint files (:func:`pretrained_workload`). SAEs are loaded when first asked for.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch

from attnrules.sources import check_compatible, check_head, check_tokens, load_head_sae, load_input_sae, load_model, load_output_sae, tokenize_corpus
from attnrules.toy import build_toy, build_toy_ln, build_toy_rope

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


TOY = "toy"
TOY_LN = "toy-ln"  # the planted model's variant with LayerNorm and biases, where paper mode is misled
TOY_ROPE = "toy-rope"  # a planted rotary model: a rule at offset 1 only, and one at any offset
TOYS = {TOY: build_toy, TOY_LN: build_toy_ln, TOY_ROPE: build_toy_rope}  # the planted models by name


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


class CorpusError(ValueError):
    """A corpus file that cannot be used; the message starts with the file's path."""


def read_token_file(path: Path) -> torch.Tensor:
    """The token ids of a ``.pt`` corpus (a 2-D integer tensor ``[n, T]``, T ≥ 2), checked without a model:
    a missing, unreadable, truncated or corrupt file, or a tensor of the wrong kind, is a :class:`CorpusError`."""
    path = Path(path)
    _check_corpus_path(path)
    try:
        tokens = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds (RuntimeError, EOFError, UnpicklingError...)
        raise CorpusError(f"{path}: cannot be read as a torch tensor file (truncated or corrupt? "
                          f"{type(err).__name__}: {_first_line(err)}); expected a tensor saved with torch.save, "
                          "token ids of shape [n_sequences, seq_len]") from None
    if not isinstance(tokens, torch.Tensor):
        raise CorpusError(f"{path}: holds a {type(tokens).__name__}, expected one tensor of token ids "
                          "[n_sequences, seq_len]")
    if tokens.dim() != 2:
        raise CorpusError(f"{path}: holds a tensor of shape {tuple(tokens.shape)}, expected 2-D token ids "
                          "[n_sequences, seq_len]")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise CorpusError(f"{path}: holds {tokens.dtype} values, expected integer token ids (e.g. "
                          "torch.save(tokens.long(), path))")
    if tokens.shape[0] < 1:
        raise CorpusError(f"{path}: holds no sequences (shape {tuple(tokens.shape)})")
    if tokens.shape[1] < 2:
        raise CorpusError(f"{path}: holds sequences of {tokens.shape[1]} token(s), expected seq_len ≥ 2 (a query "
                          "attends to earlier keys)")
    return tokens


def load_corpus(path: Path, model: HookedTransformer, *, n_sequences: int, seq_len: int) -> torch.Tensor:
    """Token ids from a ``.pt`` tensor ``[n, T]``, or text (one document per line, UTF-8) chunked as REF does.
    A file that cannot be used is a :class:`CorpusError` naming it and what was expected."""
    path = Path(path)
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 1:
        raise ValueError(f"n_sequences must be an int ≥ 1, got {n_sequences!r}")
    if path.suffix == ".pt":
        tokens = read_token_file(path)
        try:
            return check_tokens(tokens, model)[:n_sequences]
        except (ValueError, TypeError) as err:
            raise CorpusError(f"{path}: {err}") from None
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int ≥ 2, got {seq_len!r}")
    _check_corpus_path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return tokenize_corpus(model, (line for line in f if line.strip()), seq_len=seq_len, n_sequences=n_sequences)
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: is not UTF-8 text ({err}); expected a .txt file with one document per line, "
                          "or a .pt tensor of token ids") from None
    except ValueError as err:  # e.g. no document as long as seq_len
        raise CorpusError(f"{path}: {err}") from None


def _check_corpus_path(path: Path) -> None:
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    if not path.is_file():
        raise CorpusError(f"{path}: is not a file; expected a .pt tensor of token ids or a .txt file "
                          "(one document per line)")


def _first_line(err: BaseException) -> str:
    """The first sentence of an error's message."""
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else "no message"


def toy_workload(
    *,
    layer: int = 0,
    heads: Optional[Sequence[int]] = None,
    n_sequences: int = 3000,
    seq_len: int = 32,
    seed: int = 0,
    corpus: Optional[Path] = None,
    variant: str = TOY,
    sae_out: Optional[Union[str, os.PathLike]] = None,
) -> Workload:
    """A planted model (``variant``: one of :data:`TOYS`); all its planted heads unless ``heads`` says
    otherwise. ``sae_out``: an output SAE (folder or file, e.g. one that ``train-head-saes`` wrote) that
    replaces the planted output SAE of the heads asked for."""
    if variant not in TOYS:
        raise ValueError(f"variant must be one of {sorted(TOYS)}, got {variant!r}")
    for name, value, least in (("n_sequences", n_sequences, 1), ("seq_len", seq_len, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int ≥ {least}, got {value!r}")
    toy = TOYS[variant](seq_len=seq_len)
    heads = tuple(heads) if heads else tuple(toy.output_saes)
    missing = [h for h in heads if h not in toy.output_saes]
    if missing or layer != 0:
        planted = ", ".join(f"L0H{h}" for h in sorted(toy.output_saes))
        asked = f"layer {layer}" if layer != 0 else "head " + ",".join(map(str, missing))
        raise ValueError(f"the toy model has planted heads {planted} (layer 0) only; got {asked}")
    tokens = toy.corpus(n_sequences, seed=seed) if corpus is None else load_corpus(
        corpus, toy.model, n_sequences=n_sequences, seq_len=seq_len)
    def output_sae(layer: int, head: int):
        if sae_out is None:
            return toy.output_saes[head]
        cfg = toy.model.cfg
        return load_output_sae(sae_out, layer=layer, head=head, n_heads=cfg.n_heads, d_head=cfg.d_head)

    return Workload(variant, toy.model, tokens, tuple((0, h) for h in heads), lambda _layer: toy.input_sae, output_sae)


def _model_source(model_name: Union[str, os.PathLike]) -> Union[str, Path]:
    """``--model``: an existing folder (a local model) as a Path, else the transformer_lens model name."""
    if isinstance(model_name, os.PathLike):
        return Path(model_name)
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model must be a transformer_lens model name or a model folder, got {model_name!r}")
    path = Path(model_name).expanduser()
    return path if (path / "config.json").is_file() else model_name


def pretrained_workload(
    model_name: Union[str, os.PathLike],
    *,
    corpus: Path,
    layers: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    sae_in: str = "gpt2-small-res-jb",
    sae_out_dir: Optional[Path] = None,
    sae_out_z: Optional[str] = None,
    sae_out_z_id: Optional[str] = None,
    sae_in_id: Optional[str] = None,
    sae_out: Optional[str] = None,
    sae_out_id: Optional[str] = None,
    n_sequences: int = 50_000,
    seq_len: int = 64,
    device: str = "cpu",
) -> Workload:
    """A transformer_lens model (processed as from_pretrained does) with input SAEs and per-head
    checkpoints (``sae_out_dir``) or output SAEs (``sae_out``, or its earlier name ``sae_out_z``); all
    layers and heads unless given.

    ``sae_in`` and ``sae_out`` are sae_lens release ids (``sae_in_id``/``sae_out_id`` pick the SAE, or
    the ``"release/sae_id"`` form does; by default the id comes from each layer, see
    :func:`attnrules.sources.default_sae_id`), or local folders or files in a release's own format
    (:mod:`attnrules.sources.releases`). A layer-level ``hook_z`` output SAE is sliced to each head.

    ``model_name`` is a transformer_lens model name (e.g. ``gpt2-small``) or the path of a local model
    folder: one written by :func:`attnrules.sources.save_model`, or a Hugging Face model folder (see
    :func:`attnrules.sources.load_model`)."""
    if sum(x is not None for x in (sae_out_dir, sae_out, sae_out_z)) != 1:
        raise ValueError("give exactly one of sae_out_dir (per-head checkpoints), sae_out (an output SAE: release "
                         "or local files) or sae_out_z (its earlier name)")
    if sae_out_z is not None:
        sae_out, sae_out_id = sae_out_z, sae_out_z_id if sae_out_id is None else sae_out_id
    model = load_model(_model_source(model_name), device=device)
    layers = tuple(layers) if layers else tuple(range(model.cfg.n_layers))
    heads = tuple(heads) if heads else tuple(range(model.cfg.n_heads))
    for layer in layers:
        for head in heads:
            check_head(model, layer, head)
    tokens = load_corpus(corpus, model, n_sequences=n_sequences, seq_len=seq_len)

    def load_output(layer: int, head: int):
        if sae_out_dir is not None:
            out = load_head_sae(sae_out_dir, layer, head, n_heads=model.cfg.n_heads, device=device)
        else:
            out = load_output_sae(sae_out, layer=layer, head=head, n_heads=model.cfg.n_heads,
                                  d_head=model.cfg.d_head, sae_id=sae_out_id, device=device)
        check_compatible(model, None, out)
        return out

    return Workload(str(model_name), model, tokens, tuple((l, h) for l in layers for h in heads),
                    lambda layer: load_input_sae(sae_in, layer=layer, sae_id=sae_in_id, device=device), load_output)
