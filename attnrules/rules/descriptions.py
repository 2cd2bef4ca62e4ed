"""Human-readable names of input features, for rule text.

Three sources, strongest first:

- **a user's labels** (a dict or a CSV of id → text, :func:`load_input_labels`): ``text (id)``;
- **layer 0** (REF §8): the tokens and positions whose raw embedding rows project most on the
  feature's encoder column, top-k rows of ``concat(W_E, W_pos[:max_pos]) @ W_enc`` (positions shown
  as ``pos{i}``; models without learned position embeddings, e.g. rotary ones: W_E only);
- **above layer 0, the corpus the run processes** (:class:`InputFeatureStats`, gathered during the
  corpus pass the pipeline already makes, see :class:`InputStatsObserver`): the token where the
  feature is most often among its top activations, quoted, and its id, ``" vehicle" (L3.in812)`` —
  or ``" vehicle" (3-res-jb/812)`` with the SAE's Neuronpedia id, whose page holds the community's
  explanation (not fetched: no network at run time). The full description adds the activation
  frequency and the top-activating contexts.

Position 0 (BOS, whose residual stream is an outlier on most models) is left out of the corpus
statistics. Without statistics, above layer 0, a feature is named by its id alone.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

import attnrules.engine as engine
from attnrules.sources.runner import hook_names

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import InputSAE

TOP_CONTEXTS = 8  # top activations kept per input feature (the label is the token most often among them)
RECORDED_CONTEXTS = 5  # of which the results keep, per input feature a head's rules name
CONTEXT_BEFORE, CONTEXT_AFTER = 4, 1  # tokens of context around an activation
ENCODE_ELEMENTS = 2**24  # the most activations (sequences × tokens × features) encoded at once: 64 MB in float32


@dataclass(frozen=True)
class InputFeatureStats:
    """What the corpus says about every input feature of one layer's SAE (positions ≥ 1 only):
    ``active[j]`` tokens where it fires, and the ``k`` sequences where it peaks highest, ``top_act [n, k]``
    (each sequence once, at its largest activation) at corpus row ``top_seq`` and position ``top_pos``
    (largest first; 0 where fewer sequences fired)."""

    layer: int
    n_tokens: int
    active: torch.Tensor  # [n] int64
    top_act: torch.Tensor  # [n, k]
    top_seq: torch.Tensor  # [n, k] int64
    top_pos: torch.Tensor  # [n, k] int64

    def frequency(self, feature: int) -> float:
        """The share of corpus tokens (positions ≥ 1) where ``feature`` fires."""
        return int(self.active[feature]) / self.n_tokens if self.n_tokens else 0.0

    def to_dict(self) -> dict:
        return {"layer": self.layer, "n_tokens": self.n_tokens, "active": self.active, "top_act": self.top_act,
                "top_seq": self.top_seq, "top_pos": self.top_pos}

    @classmethod
    def from_dict(cls, data: dict) -> "InputFeatureStats":
        return cls(int(data["layer"]), int(data["n_tokens"]), *(data[k].clone() for k in
                                                                ("active", "top_act", "top_seq", "top_pos")))


def encoded_chunks(input_sae: InputSAE, resid: torch.Tensor):
    """``(start, acts)``: the input-SAE activations ``[b, T, n_in]`` of ``resid [N, T, d]``, as many
    sequences at a time as keep them under ``ENCODE_ELEMENTS`` (rows ``start … start + b``)."""
    chunk = max(1, ENCODE_ELEMENTS // max(1, resid.shape[1] * input_sae.n_features))
    for start in range(0, resid.shape[0], chunk):
        yield start, input_sae.encode(resid[start:start + chunk].to(input_sae.W_dec.dtype))


class InputStatsObserver:
    """Gathers :class:`InputFeatureStats` during a corpus pass that already runs the model to the
    layer (:func:`attnrules.exemplars.scan_heads`): it reads ``hook_resid_pre`` of the layer and
    encodes it with the input SAE (:func:`encoded_chunks`). Its cost is that encode (2·d_model·n_in
    FLOPs a token) and a running top-k; no forward pass of its own. A pass that encodes the layer
    anyway hands its activations to :meth:`add` instead (:class:`~attnrules.pipeline.corpus_stats.CorpusObservers`)."""

    def __init__(self, input_sae: InputSAE, *, k: int = TOP_CONTEXTS) -> None:
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        self.sae, self.k = input_sae, k
        self.hooks = [hook_names(input_sae.layer)[0]]
        n = input_sae.n_features
        self.n_tokens = 0
        self.active = torch.zeros(n, dtype=torch.int64)
        self.top_act = torch.zeros(0, n)
        self.top_seq = torch.zeros(0, n, dtype=torch.int64)
        self.top_pos = torch.zeros(0, n, dtype=torch.int64)

    def observe(self, rows: slice, cache: dict) -> None:
        for start, acts in encoded_chunks(self.sae, cache[self.hooks[0]]):
            self.add(torch.arange(rows.start + start, rows.start + start + acts.shape[0]), acts)

    def add(self, sequences: torch.Tensor, acts: torch.Tensor) -> None:
        """Count the activations ``acts [b, T, n]`` of corpus rows ``sequences [b]`` (position 0, BOS, left out)."""
        acts = acts[:, 1:].float()
        b, t1, n = acts.shape
        if t1 == 0:
            return
        self.n_tokens += b * t1
        self.active += torch.count_nonzero(acts > 0, dim=(0, 1)).cpu()
        best, where = acts.max(dim=1)  # [b, n]: each sequence once, at its largest activation
        values, index = best.topk(min(self.k, b), dim=0)  # [k, n]
        self._merge(values.cpu(), sequences.to(index.device)[index].cpu(), (where.gather(0, index) + 1).cpu())

    def _merge(self, values: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> None:
        values = torch.cat([self.top_act, values])
        seq, pos = torch.cat([self.top_seq, seq]), torch.cat([self.top_pos, pos])
        keep = values.topk(min(self.k, values.shape[0]), dim=0).indices
        self.top_act, self.top_seq, self.top_pos = values.gather(0, keep), seq.gather(0, keep), pos.gather(0, keep)

    def result(self) -> InputFeatureStats:
        """The statistics so far; activations ≤ 0 (fewer than k firings) are zeroed with their places."""
        act, seq, pos = self.top_act.T.contiguous(), self.top_seq.T.contiguous(), self.top_pos.T.contiguous()
        fired = act > 0
        return InputFeatureStats(self.sae.layer, self.n_tokens, self.active.clone(), act * fired, seq * fired,
                                 pos * fired)


# ----------------------------------------------------------------------------------------------------------
# User labels


def load_input_labels(source: Mapping[int, str] | str | Path) -> dict[int, str]:
    """A user's input-feature labels: a dict ``{id: text}``, or a CSV file with a header naming an ``id``
    column and a ``label`` (or ``text``, ``description``) column. A bad file or entry is a ValueError
    naming the file, the row and what was expected."""
    if isinstance(source, Mapping):
        labels = {}
        for key, text in source.items():
            if isinstance(key, bool) or not isinstance(key, int) or key < 0:
                raise ValueError(f"input_labels: ids must be ints ≥ 0, got {key!r}")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"input_labels: the label of {key} must be a non-empty string, got {text!r}")
            labels[key] = text.strip()
        return labels
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"input_labels: {path} is not a file; expected a CSV with columns id,label")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        text_col = next((c for c in ("label", "text", "description") if c in columns), None)
        if "id" not in columns or text_col is None:
            raise ValueError(f"input_labels: {path} must have a header with an 'id' column and a 'label' (or 'text', "
                             f"'description') column, got {reader.fieldnames}")
        labels = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "") for k, v in row.items() if k is not None}
            try:
                key = int(row["id"])
            except ValueError:
                raise ValueError(f"input_labels: {path} line {line}: id must be an int ≥ 0, got {row['id']!r}") from None
            if key < 0 or not row[text_col].strip():
                raise ValueError(f"input_labels: {path} line {line}: expected an id ≥ 0 and a non-empty label, "
                                 f"got {row['id']!r}, {row[text_col]!r}")
            labels[key] = row[text_col].strip()
    return labels


# ----------------------------------------------------------------------------------------------------------
# Descriptions


class TokenText:
    """Token id → its text as the model writes it (leading spaces kept, e.g. ``" vehicle"``), cached."""

    def __init__(self, model: Optional[HookedTransformer]) -> None:
        self.tokenizer = getattr(model, "tokenizer", None)
        self.known: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.known:
            self.known[token] = f"tok{token}" if self.tokenizer is None else self.tokenizer.decode([token])
        return self.known[token]


@dataclass(frozen=True)
class CorpusContexts:
    """The corpus side of the descriptions: the statistics and the corpus they index."""

    stats: InputFeatureStats
    tokens: torch.Tensor  # [n_sequences, T] the corpus
    text: TokenText

    def contexts(self, feature: int) -> list[dict]:
        """The feature's top activations, largest first: ``tokens`` around it, ``at`` (the active token's
        index in them), ``act``, corpus ``sequence`` and ``position``."""
        out = []
        for a, s, p in zip(self.stats.top_act[feature].tolist(), self.stats.top_seq[feature].tolist(),
                           self.stats.top_pos[feature].tolist()):
            if a <= 0:
                break
            lo, hi = max(0, p - CONTEXT_BEFORE), min(self.tokens.shape[1], p + CONTEXT_AFTER + 1)
            out.append({"tokens": [self.text(int(t)) for t in self.tokens[s, lo:hi].tolist()], "at": p - lo,
                        "act": a, "sequence": s, "position": p})
        return out

    def top_token(self, feature: int) -> Optional[str]:
        """The token most often at the feature's top activations (ties: the one seen at the largest)."""
        tokens = [self.text(int(self.tokens[s, p])) for a, s, p in zip(
            self.stats.top_act[feature].tolist(), self.stats.top_seq[feature].tolist(),
            self.stats.top_pos[feature].tolist()) if a > 0]
        if not tokens:
            return None
        counts = Counter(tokens)
        return max(tokens, key=lambda t: counts[t])  # max keeps the first (largest activation) among equals


@dataclass(frozen=True)
class InputDescriptions:
    """``labels[j]``: a short name for rule text; ``details[j]``: the full description; ``ids[j]``: the
    feature's id (``L3.in812``, ``3-res-jb/812``, or at layer 0 its label); ``sources[j]``: where the label
    comes from ("user", "tokens", "corpus", "id"); ``urls[j]``: its Neuronpedia page, if any;
    ``corpus``: the corpus statistics, when the run gathered them."""

    labels: tuple[str, ...]
    details: tuple[str, ...]
    ids: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    urls: tuple[Optional[str], ...] = ()
    corpus: Optional[CorpusContexts] = field(default=None, compare=False)

    def __call__(self, feature: int) -> str:
        return self.labels[feature]

    def record(self, feature: int) -> dict[str, Any]:
        """Everything known of one input feature, JSON-ready (what results and the report keep)."""
        data: dict[str, Any] = {"id": feature, "label": self.labels[feature], "detail": self.details[feature]}
        if self.ids:
            data.update(name=self.ids[feature], source=self.sources[feature], url=self.urls[feature])
        if self.corpus is not None:
            data.update(frequency=self.corpus.stats.frequency(feature), n_tokens=self.corpus.stats.n_tokens,
                        contexts=self.corpus.contexts(feature)[:RECORDED_CONTEXTS])
        return data


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


def _layer0_tokens(model: HookedTransformer, input_sae: InputSAE, k: int, max_pos: int,
                   backend: str) -> tuple[list[str], list[str]]:
    """Layer 0: each feature's top embedding row (label) and its top k with scores (detail)."""
    rows = embedding_rows(model, max_pos).to(input_sae.W_enc.dtype)
    names = token_strings(model) + [f"pos{i}" for i in range(rows.shape[0] - model.cfg.d_vocab)]
    k = min(k, rows.shape[0])
    best = engine.pair_topk(rows.contiguous(), input_sae.W_enc.T.contiguous(), k, by="key", backend=backend)
    labels, details = [], []
    for j in range(input_sae.n_features):
        tops = [(names[i], s) for i, s in zip(best.query_idx[j].tolist(), best.scores[j].tolist())]
        labels.append(tops[0][0])
        details.append(" ".join(f"{name} ({score:.3g})" for name, score in tops))
    return labels, details


def _context_text(context: dict) -> str:
    toks = context["tokens"]
    return "".join(toks[: context["at"]]) + "⟨" + toks[context["at"]] + "⟩" + "".join(toks[context["at"] + 1:])


def describe_input_features(
    model: Optional[HookedTransformer], input_sae: InputSAE, *, k: int = 3, max_pos: int = 128, backend: str = "auto",
    stats: Optional[InputFeatureStats] = None, tokens: Optional[torch.Tensor] = None,
    labels: Optional[Mapping[int, str] | str | Path] = None, shown_contexts: int = 3,
) -> InputDescriptions:
    """Descriptions of every input feature of ``input_sae`` (see the module docstring). ``stats`` (with
    the ``tokens`` they index): the corpus statistics of the layer; ``labels``: the user's labels (a dict
    or a CSV path, see :func:`load_input_labels`), which take precedence."""
    n, layer = input_sae.n_features, input_sae.layer
    user = load_input_labels(labels) if labels is not None else {}
    bad = sorted(j for j in user if j >= n)
    if bad:
        raise ValueError(f"input_labels: ids must be input features 0..{n - 1} of the layer-{layer} SAE, got {bad[:5]}")
    if stats is not None:
        if tokens is None:
            raise ValueError("tokens (the corpus the statistics index) are required with stats")
        if stats.active.shape[0] != n or stats.layer != layer:
            raise ValueError(f"stats are of a layer-{stats.layer} SAE with {stats.active.shape[0]} features, "
                             f"expected layer {layer} with {n}")
    corpus = CorpusContexts(stats, tokens, TokenText(model)) if stats is not None else None
    npid = input_sae.neuronpedia_id
    ids = [f"{npid.split('/')[-1]}/{j}" if npid else f"L{layer}.in{j}" for j in range(n)]
    urls = [f"https://neuronpedia.org/{npid}/{j}" if npid else None for j in range(n)]
    if layer == 0 and model is not None:
        token_labels, token_details = _layer0_tokens(model, input_sae, k, max_pos, backend)
        ids = token_labels if not npid else ids
    else:
        token_labels = token_details = None
    out_labels, details, sources = [], [], []
    for j in range(n):
        parts = [urls[j]] if urls[j] else []
        if token_details is not None:
            parts.append(token_details[j])
        top = corpus.top_token(j) if corpus is not None else None
        if corpus is not None:
            if top is None:
                parts.append(f"never active in {stats.n_tokens} corpus tokens")
            else:
                shown = "; ".join(f"{_context_text(c)} ({c['act']:.3g})" for c in corpus.contexts(j)[:shown_contexts])
                parts.append(f"active on {stats.frequency(j):.3%} of {stats.n_tokens} corpus tokens; top: {shown}")
        if j in user:
            label, source = f"{user[j]} ({ids[j]})", "user"
        elif token_labels is not None:
            label, source = token_labels[j], "tokens"
        elif top is not None:
            label, source = f"{json.dumps(top, ensure_ascii=False)} ({ids[j]})", "corpus"
        else:
            label, source = ids[j], "id"
        out_labels.append(label)
        sources.append(source)
        details.append("; ".join(parts) or label)
    return InputDescriptions(tuple(out_labels), tuple(details), tuple(ids), tuple(sources), tuple(urls), corpus)
