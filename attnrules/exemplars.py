"""Feature activations over a token corpus, and REF's exemplar sampling and splits (reference §5).

- :func:`scan_output_features` runs the model once over the corpus: for every output feature, the
  number of sequences where it fires, and each sequence's max activation and its position.
- :func:`sample_features` picks features active in at least ``min_count`` and at most ``max_count``
  sequences; :func:`sample_exemplars` takes the top-activating sequences (positives, scored at their
  argmax) and random inactive ones (negatives, scored at a random position 1..T−1) and splits them
  into train / val / test, stratified, as REF does (50 + 50 each with its defaults).
- :func:`input_activations` gives the input-SAE activations ``[N, T, n_in]`` of chosen sequences.

REF draws with pandas/sklearn/numpy global seeds; we draw with one ``numpy.random.Generator`` per
call, so the sizes and the procedure are REF's but the particular random draws are not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from attnrules.files import plain
from attnrules.spill import SpillFile
from attnrules.sources.model import kv_head
from attnrules.sources.runner import hook_names, run_batches
from attnrules.records import Record

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.resid_store import ResidStore
    from attnrules.sources import InputSAE, OutputSAE


@dataclass(frozen=True)
class FeatureScan:
    """Per-sequence maxima of every output feature over a corpus."""

    counts: torch.Tensor  # [n_out] sequences in which the feature fires anywhere
    act_max: torch.Tensor  # [N, n_out]
    act_argmax: torch.Tensor  # [N, n_out] positions, in the narrowest int type that holds them (position_dtype)

    @property
    def n_sequences(self) -> int:
        return self.act_max.shape[0]

    def column(self, feature: int) -> "FeatureColumn":
        """One feature's maxima and positions, copied (so that they do not keep the whole scan alive)."""
        return FeatureColumn(self.act_max[:, feature].clone(), self.act_argmax[:, feature].clone())


@dataclass(frozen=True)
class FeatureColumn:
    """One output feature's column of a :class:`FeatureScan`: its max activation in each sequence and where.
    A head run keeps the columns of the features it explains, not the scan (0.57 GiB at 50,000 GPT-2 sequences)."""

    act_max: torch.Tensor  # [N]
    act_argmax: torch.Tensor  # [N]


def position_dtype(seq_len: int) -> torch.dtype:
    """The int type of token positions below ``seq_len``: int16 (int32 past 32,768 tokens), so that a
    50,000-sequence scan of 2,048 features holds 0.2 GiB of argmax positions instead of int64's 0.8.
    Not uint8: torch reads a uint8 index as a mask (int16 as an index raises instead)."""
    return torch.int16 if seq_len <= 2**15 else torch.int32


def scan_output_features(
    model: HookedTransformer, output_sae: OutputSAE, tokens: torch.Tensor, *, batch_size: int = 64, progress: bool = False,
    observers: Sequence = (),
) -> FeatureScan:
    """One pass over the corpus with the output SAE on ``hook_z`` of ``output_sae.layer`` (``observers``:
    see :func:`scan_heads`)."""
    return scan_heads(model, [output_sae], tokens, batch_size=batch_size, progress=progress, observers=observers)[0]


def scan_heads(
    model: HookedTransformer, output_saes: Sequence, tokens: torch.Tensor, *, batch_size: int = 64, progress: bool = False,
    observers: Sequence = (),
) -> list[FeatureScan]:
    """:func:`scan_output_features` for several output SAEs, of one layer or of several, sharing one
    forward pass (through blocks 0..the deepest of their layers). ``observers`` measure more on the same
    pass: each names the ``hooks`` it reads and is given every batch, ``observe(rows, cache)`` (e.g.
    input-feature statistics, head attention metrics)."""
    sinks = [ScanInMemory() for _ in output_saes]
    _scan(model, output_saes, tokens, sinks, batch_size, progress, observers)
    return [sink.scan() for sink in sinks]


def scan_heads_deferred(
    model: HookedTransformer, output_saes: Sequence, tokens: torch.Tensor, *, on_disk: bool, batch_size: int = 64,
    progress: bool = False, observers: Sequence = (),
) -> list[ScanFile | ScanInMemory]:
    """:func:`scan_heads`, each head's scan gathered where it waits for its head's turn (``.scan()`` gives
    it): in memory, or (``on_disk``) in a temporary file written as the pass goes — a whole-model pass
    over 50,000 sequences would otherwise hold 0.57 GiB a head of GPT-2 small (144 heads: 82 GiB)."""
    sinks = [ScanFile() if on_disk else ScanInMemory() for _ in output_saes]
    _scan(model, output_saes, tokens, sinks, batch_size, progress, observers)
    return sinks


def _scan(model: HookedTransformer, output_saes: Sequence, tokens: torch.Tensor, sinks: Sequence, batch_size: int,
          progress: bool, observers: Sequence) -> None:
    """The pass behind :func:`scan_heads`: each batch's per-sequence maxima (and their positions) of
    output SAE i go to ``sinks[i].add``."""
    z_names = [hook_names(sae.layer)[1] for sae in output_saes]
    names = list(dict.fromkeys([*z_names, *(h for o in observers for h in o.hooks)]))
    last = max(sae.layer for sae in output_saes)
    for rows, acts in run_batches(model, tokens, last, names, batch_size=batch_size, desc="output features",
                                  progress=progress):
        for observer in observers:
            observer.observe(rows, acts)
        for sae, z_name, sink in zip(output_saes, z_names, sinks):
            m, a = sae.encode(acts[z_name].to(sae.W_enc.dtype)).max(dim=1)  # over positions
            sink.add(m.cpu(), a.to(position_dtype(tokens.shape[1])).cpu())


class ScanInMemory:
    """One head's scan, gathered in memory batch by batch."""

    def __init__(self) -> None:
        self.maxima: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []

    def add(self, act_max: torch.Tensor, act_argmax: torch.Tensor) -> None:
        self.maxima.append(act_max)
        self.positions.append(act_argmax)

    def scan(self) -> FeatureScan:
        act_max = torch.cat(self.maxima)
        return FeatureScan((act_max > 0).sum(0), act_max, torch.cat(self.positions))


class ScanFile:
    """One head's scan spilled to a temporary file (:class:`~attnrules.spill.SpillFile`) batch by batch:
    each batch's maxima, then its positions."""

    def __init__(self) -> None:
        self.file = SpillFile("attnrules-scan-")
        self.batches: list[tuple[int, int]] = []  # (offset, sequences) of each batch
        self.like: tuple[torch.Tensor, torch.Tensor] = ()  # the first batch: dtypes and width

    def add(self, act_max: torch.Tensor, act_argmax: torch.Tensor) -> None:
        self.batches.append((self.file.append(act_max), act_max.shape[0]))
        self.file.append(act_argmax)
        self.like = self.like or (act_max, act_argmax)

    def scan(self) -> FeatureScan:
        """The scan, read back (the file stays, so it can be read again)."""
        n = sum(rows for _, rows in self.batches)
        act_max, act_argmax = (x.new_empty((n, x.shape[1])) for x in self.like)
        start = 0
        for offset, rows in self.batches:
            maxima = self.file.read_into(act_max[start:start + rows], offset)
            self.file.read_into(act_argmax[start:start + rows], offset + maxima.nbytes)
            start += rows
        return FeatureScan((act_max > 0).sum(0), act_max, act_argmax)


def input_activations(
    model: HookedTransformer, input_sae: InputSAE, tokens: torch.Tensor, *, batch_size: int = 8, progress: bool = False
) -> torch.Tensor:
    """Input-SAE activations ``[N, T, n_in]`` on ``hook_resid_pre`` of ``input_sae.layer``."""
    resid_name, _ = hook_names(input_sae.layer)
    out = []
    for _, acts in run_batches(model, tokens, input_sae.layer, [resid_name], batch_size=batch_size,
                               desc="input features", progress=progress):
        out.append(input_sae.encode(acts[resid_name].to(input_sae.W_dec.dtype)).cpu())
    return torch.cat(out)


def sample_features(
    counts: torch.Tensor,
    n_sequences: int,
    *,
    num_features: Optional[int] = 100,
    min_count: int = 150,
    max_count: Optional[int] = None,
    seed: int = 0,
) -> list[int]:
    """Features with ``min_count ≤ count ≤ max_count`` (REF: 150 and n − 150), ``num_features`` of
    them drawn at random (all when None or when fewer are eligible), returned sorted."""
    max_count = n_sequences - min_count if max_count is None else max_count
    eligible = np.nonzero(((counts >= min_count) & (counts <= max_count)).numpy())[0]
    if num_features is None or num_features >= len(eligible):
        return eligible.tolist()
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(eligible, size=num_features, replace=False).tolist())


@dataclass(frozen=True)
class ExemplarSplit:
    """Exemplars of one feature: a sequence and the one position scored in it."""

    feature: int
    sequence: torch.Tensor  # [n] row in the corpus
    position: torch.Tensor  # [n] position scored (argmax for positives, random for negatives)
    act_max: torch.Tensor  # [n] the sequence's max activation (0 for negatives)
    positive: torch.Tensor  # [n] bool: sampled as a top-activating sequence

    def __len__(self) -> int:
        return self.sequence.numel()

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "feature": self.feature,
                "idx": plain(self.sequence),
                "act_argmax": plain(self.position),
                "act_max": plain(self.act_max),
                "bin": plain(self.positive.long()),
            }
        )


@dataclass(frozen=True)
class Exemplars:
    train: ExemplarSplit
    val: ExemplarSplit
    test: ExemplarSplit


def sample_exemplars(
    scan: FeatureScan,
    feature: int,
    *,
    seq_len: int,
    examples_per_bin: int = 150,
    min_bin: int = 6,
    seed: int = 0,
    positives: str = "top",
) -> Optional[Exemplars]:
    """REF's two-bin sampling and split for one feature; None when a bin has fewer than ``min_bin``.

    Positives (``positives="top"``, REF): the ``examples_per_bin`` sequences with the highest max
    activation (> 0), scored at their argmax. ``positives="quantiles"``: as many active sequences
    spread evenly over the ranks of their max activation (the strongest, the weakest and evenly
    between), so that a weaker way to fire (e.g. a second key of a disjunction) is seen too. Negatives: ``examples_per_bin`` random sequences where the feature never fires,
    scored at a random position in 1..seq_len−1. Each class is split 1/3 test, then the rest in
    half, train and val (REF: 50/50/50 per class).
    """
    if not 0 <= feature < scan.act_max.shape[1]:
        raise ValueError(f"feature must be in [0, {scan.act_max.shape[1]}), got {feature}")
    rng = np.random.default_rng(seed)
    act = scan.act_max[:, feature]
    if positives not in ("top", "quantiles"):
        raise ValueError(f"positives must be 'top' or 'quantiles', got {positives!r}")
    active = torch.nonzero(act > 0).flatten()
    ranked = active[torch.sort(act[active], descending=True, stable=True).indices]
    if positives == "top" or ranked.numel() <= examples_per_bin:
        top = ranked[:examples_per_bin]
    else:
        top = ranked[torch.from_numpy(np.unique(np.linspace(0, ranked.numel() - 1, examples_per_bin).round().astype(np.int64)))]
    inactive = torch.nonzero(act == 0).flatten().numpy()
    if top.numel() < min_bin or len(inactive) < min_bin:
        return None
    neg = torch.from_numpy(rng.choice(inactive, size=min(examples_per_bin, len(inactive)), replace=False))
    pos = top[torch.from_numpy(rng.permutation(top.numel()))]
    pos_positions = scan.act_argmax[pos, feature].long()
    neg_positions = torch.from_numpy(rng.integers(1, seq_len, size=neg.numel()))
    parts = {"train": [], "val": [], "test": []}
    for seqs, positions, positive in ((pos, pos_positions, True), (neg, neg_positions, False)):
        for name, (a, b) in split_bounds(seqs.numel()).items():
            parts[name].append((seqs[a:b], positions[a:b], positive))
    splits = {}
    for name, pieces in parts.items():
        seq = torch.cat([p[0] for p in pieces])
        splits[name] = ExemplarSplit(
            feature=feature,
            sequence=seq,
            position=torch.cat([p[1] for p in pieces]),
            act_max=act[seq],
            positive=torch.cat([torch.full((p[0].numel(),), p[2]) for p in pieces]),
        )
    return Exemplars(**splits)


def split_bounds(n: int) -> dict[str, tuple[int, int]]:
    """REF's split of one class of ``n`` exemplars (in drawn order): the first 1/3 (rounded) test, then
    the rest in half, train (the larger half) and val."""
    n_test = round(n / 3)
    n_train = (n - n_test + 1) // 2
    return {"test": (0, n_test), "train": (n_test, n_test + n_train), "val": (n_test + n_train, n)}


def decile_sequences(act_max: torch.Tensor, n: int = 10) -> torch.Tensor:
    """Corpus rows spread over the activation range, as dataset-wide viewers show them: the sequences where
    the feature fires (``act_max [n_sequences] > 0``) ranked by their max activation, and the one at the
    middle rank of each of ``n`` equal slices of that ranking, weakest first (fewer when fewer fire)."""
    active = torch.nonzero(act_max > 0).flatten()
    if active.numel() == 0:
        return active
    ranked = active[torch.sort(act_max[active], stable=True).indices]
    picks = ((torch.arange(n, dtype=torch.float64) + 0.5) / n * ranked.numel()).floor().long()
    return ranked[torch.unique(picks.clamp(max=ranked.numel() - 1))]


@dataclass(frozen=True)
class TermMatch(Record):
    """A rule term that fires in an exemplar: its ordering (``method``), its rank in that ordering's stored
    rule set, its input features, and the key position it matched (the query is the exemplar's scored
    position)."""

    method: str
    rank: int
    query: int
    key: int
    key_position: int


@dataclass(frozen=True)
class ConditionHit(Record):
    """A condition of a combined rule set that holds in an exemplar and silences the term (query, key):
    ``kind`` "distractor": the distractor input ``feature`` is present at ``positions`` (at or before the
    query); "count": the key ``feature`` is present only at ``positions``, fewer than ``min_count`` times."""

    kind: str
    query: int
    key: int
    feature: int
    positions: tuple[int, ...]
    min_count: Optional[int] = None


@dataclass(frozen=True)
class ExemplarView(Record):
    """What a reader sees of one exemplar: its tokens, the feature's activation at every position, and
    the direct feature attribution of every key position to the scored one (paper §4.1); with the rule
    terms that fire at the scored position (``matches``) and, for a pattern negative, the conditions
    of the combined rule set that hold there (``conditions``: the distractor, or too few keys)."""

    sequence: int
    position: int
    tokens: tuple[str, ...]
    acts: tuple[float, ...]
    dfa: tuple[float, ...]  # a[t, t'] · (v[t'] · u), 0 after t
    matches: tuple[TermMatch, ...] = ()
    conditions: tuple[ConditionHit, ...] = ()


def exemplar_views(
    model: HookedTransformer, output_sae: OutputSAE, feature: int, tokens: torch.Tensor, sequences: torch.Tensor, positions: torch.Tensor,
    *, batch_size: int = 64, resid: Optional[ResidStore] = None,
) -> list[ExemplarView]:
    """Activations and DFA of ``feature`` on the given corpus rows, each at its scored position.

    DFA follows REF: the head's attention from the scored position times each key's value vector
    projected on the feature's encoder column u (no SAE biases). ``resid``: the layer's
    ``hook_resid_pre`` the corpus pass kept (:class:`~attnrules.resid_store.ResidStore`); when it holds
    every row, the head's block alone runs from it (the values of the corpus pass; equal to a pass of
    their own where the model's rows are independent of their batch, e.g. GPT-2-small widths).
    """
    layer, head = output_sae.layer, output_sae.head
    _, z = hook_names(layer)
    v_name, a_name = f"blocks.{layer}.attn.hook_v", f"blocks.{layer}.attn.hook_pattern"
    u = output_sae.head_encoder[:, feature]
    rows = tokens[sequences]
    words = token_strings_of(model, rows)
    views = []
    kept = resid is not None and all(int(r) in resid.rows for r in sequences)
    for batch, cache in run_batches(model, rows, layer, [z, v_name, a_name], batch_size=batch_size,
                                    desc="exemplar views", progress=False,
                                    resid=resid.reader(sequences.tolist()) if kept else None):
        acts = output_sae.encode(cache[z].to(output_sae.W_enc.dtype))[..., feature].cpu()
        value = (cache[v_name][:, :, kv_head(model, head)].to(u.dtype) @ u).cpu()  # [B, T] (GQA: the kv head)
        pattern = cache[a_name][:, head].cpu()  # [B, Tq, Tk]
        for i in range(acts.shape[0]):
            n = batch.start + i
            t = int(positions[n])
            views.append(ExemplarView(int(sequences[n]), t, tuple(words[n]), tuple(acts[i].tolist()),
                                      tuple((pattern[i, t].to(value.dtype) * value[i]).tolist())))
    return views


def token_strings_of(model: HookedTransformer, tokens: torch.Tensor) -> list[list[str]]:
    """Token strings of each row (ids when the model has no tokenizer)."""
    if model.tokenizer is None:
        return [[str(t) for t in row] for row in tokens.tolist()]
    return [model.to_str_tokens(row) for row in tokens]
