"""Interventions for absence rules: natural prevalence, counterfactual insertion, distractor checks.

- :func:`natural_prevalence` — over a corpus, how often the skip-gram comes with its distractor and
  the mean activation with and without it (§6.2, Figs. 6a–b);
- :func:`insertion_token` / :func:`feature_tokens` — the token that stands for an input feature;
  :func:`counterfactual_insertion` — insert the distractor's token n times after BOS and measure the
  activation at the query (§6.3, Fig. 6c), at any layer;
- :func:`check_distractors` — each absence rule's distractors inserted once into the exemplars where
  the term fires: confirmed, unconfirmed, or cleared by the real logits (exact mode).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, TYPE_CHECKING

import numpy as np
import torch

from attnrules.rules.absence import MIN_DROP, VALUE_RATIO, AbsenceRule, DistractorCheck
from attnrules.rules.descriptions import embedding_rows
from attnrules.sources.model import attention_window, kv_head
from attnrules.sources.runner import check_tokens, hook_names, run_batches
from attnrules.records import Record
from attnrules.sparse_acts import SparseActs

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import InputSAE, OutputSAE


def check_distractors(
    model: HookedTransformer,
    output_sae: OutputSAE,
    feature: int,
    rules: Sequence[AbsenceRule],
    tokens: torch.Tensor,
    positions: torch.Tensor,
    acts: torch.Tensor,
    token_of: Callable[[int], Optional[int]],
    *,
    per_term: int = 3,
    exact: bool = True,
    min_drop: float = MIN_DROP,
    value_ratio: float = VALUE_RATIO,
    batch_size: int = 64,
) -> list[AbsenceRule]:
    """``rules`` with insertion evidence for the first ``per_term`` distractors of each term.

    Exemplars: ``tokens [N, T]`` scored at ``positions``, with input-SAE activations ``acts [N, T, n_in]``;
    a term's examples are those where its query feature is active at the scored position, its key
    at or before it (within a sliding window, and the query close enough to position 1 that the
    inserted distractor is in the window too), and the output feature fires. ``token_of`` maps an input feature to the token
    to insert (None: untested). With ``exact``, a distractor whose real logit does not exceed the
    key's, or whose real value is not negative with |value| ≥ ``value_ratio``·|key's|, is "cleared"
    whatever the activation does; otherwise the activation decides (see :class:`DistractorCheck`).
    """
    tokens = check_tokens(tokens, model)
    n, t_len = tokens.shape
    # a sliding-window head sees keys up to window − 1 back: the term's key must lie there, and so must the
    # distractor inserted at position 1 from the moved query at t + 1
    window = attention_window(model, output_sae.layer) or t_len + 1
    offset = positions[:, None] - torch.arange(t_len)[None]
    terms, plans = [], []  # (rows, key positions) per rule; (rule index, distractor, token) per check
    for r, rule in enumerate(rules):
        q_on = acts[torch.arange(n), positions, rule.query] > 0
        k_on = (acts[:, :, rule.key] > 0) & (offset >= 0) & (offset < window)
        rows = torch.nonzero(q_on & k_on.any(1) & (positions + 1 < t_len) & (positions < window)).flatten()
        key_pos = (k_on[rows] * torch.arange(1, t_len + 1)).argmax(1)  # the last key position ≤ t
        terms.append((rows, key_pos))
        plans += [(r, d, token_of(d)) for d in rule.distractors[:per_term]]
    # each term's exemplars as they are, then those where the feature fires with each distractor inserted
    originals = _probe(model, output_sae, feature, tokens, positions, [(*t, None) for t in terms], batch_size)
    firing = [(rows[o["act"] > 0], key_pos[o["act"] > 0]) for (rows, key_pos), o in zip(terms, originals)]
    inserted = iter(_probe(model, output_sae, feature, tokens, positions,
                           [(*firing[r], tok) for r, _, tok in plans if tok is not None], batch_size))
    checks: list[list[DistractorCheck]] = [[] for _ in rules]
    for r, d, tok in plans:
        after = next(inserted) if tok is not None else None
        if after is None or after["act"].numel() == 0:
            checks[r].append(DistractorCheck(d, tok, 0, *(float("nan"),) * 6, "untested"))
            continue
        mean = {name: float(values.mean()) for name, values in after.items()}
        without = float(originals[r]["act"][originals[r]["act"] > 0].mean())
        status = "confirmed" if mean["act"] <= (1 - min_drop) * without else "unconfirmed"
        real_distractor = (mean["logit_distractor"] > mean["logit_key"] and mean["value_distractor"] < 0
                           and abs(mean["value_distractor"]) >= value_ratio * abs(mean["value_key"]))
        if exact and not real_distractor:
            status = "cleared"
        checks[r].append(DistractorCheck(d, tok, after["act"].numel(), without, mean["act"], mean["logit_key"],
                                         mean["logit_distractor"], mean["value_key"], mean["value_distractor"], status))
    return [dataclasses.replace(rule, checks=tuple(c)) for rule, c in zip(rules, checks)]


def _probe(
    model: HookedTransformer, output_sae: OutputSAE, feature: int, tokens: torch.Tensor, positions: torch.Tensor,
    runs, batch_size: int,
):
    """For each (rows, key positions, token) run: the exemplars (token None) or the exemplars with
    ``token`` inserted once after BOS; per exemplar the activation at the (moved) query, the real
    logits query → key and query → inserted token (position 1), and their values projected on u.

    A sequence is determined by its row and token, so each distinct (row, token) runs once, however
    many runs ask for it (terms share exemplars and distractors); a sequence's values do not depend
    on the other sequences of its batch (``tests/test_shared_passes.py``), so they are the same."""
    layer, head = output_sae.layer, output_sae.head
    names = [f"blocks.{layer}.attn.hook_{x}" for x in ("z", "attn_scores", "v")]
    u = output_sae.head_encoder[:, feature]
    fields = ("act", "logit_key", "logit_distractor", "value_key", "value_distractor")
    slot: dict[tuple[int, Optional[int]], int] = {}  # (row, token) -> its sequence, in order of first use
    uses = []  # per run: (sequence of each exemplar, key positions in the sequence)
    for rows, key_pos, tok in runs:
        used = torch.tensor([slot.setdefault((r, tok), len(slot)) for r in rows.tolist()], dtype=torch.long)
        uses.append((used, key_pos + (tok is not None) * (key_pos >= 1)))  # BOS stays at 0
    if not slot:
        return [{x: torch.zeros(0, dtype=torch.float64) for x in fields} for _ in runs]
    seqs = torch.empty(len(slot), tokens.shape[1], dtype=tokens.dtype)
    qpos = torch.empty(len(slot), dtype=torch.long)
    by_token: dict[Optional[int], list[int]] = {}
    for (row, tok), i in slot.items():
        by_token.setdefault(tok, []).append(i)
    for tok, where in by_token.items():
        rows = torch.tensor([r for (r, t) in slot if t == tok], dtype=torch.long)
        seqs[where], qpos[where], _ = insert_copies(tokens[rows], positions[rows], 0 if tok is None else tok,
                                                    int(tok is not None))
    act, scores, values = [], [], []  # per sequence: activation at the query, its logits, the values
    for rows, cache in run_batches(model, seqs, layer, names, batch_size=batch_size, desc="", progress=False):
        z, s, v = (cache[name] for name in names)
        b = torch.arange(z.shape[0])
        t = qpos[rows].to(z.device)
        act.append(output_sae.encode(z.to(output_sae.W_enc.dtype))[b, t, feature].cpu())
        scores.append(s[b, head, t].cpu().double())
        values.append((v[:, :, kv_head(model, head)].to(u.dtype) @ u).cpu().double())  # GQA: hook_v holds the kv heads
    act, scores, values = torch.cat(act).double(), torch.cat(scores), torch.cat(values)
    return [{"act": act[i], "logit_key": scores[i, k], "logit_distractor": scores[i, 1],
             "value_key": values[i, k], "value_distractor": values[i, 1]} for i, k in uses]


@dataclass(frozen=True)
class Prevalence:
    """Natural co-occurrence of a skip-gram (k … q) with its distractor k' over a corpus."""

    feature: int
    key: int
    distractor: int
    query: int
    kq_count: int  # sequences with k … q and no k' before q
    kkq_count: int  # sequences with k … q and k' before q
    mean_act_without: float  # mean output activation at q (NaN when no such sequence)
    mean_act_with: float
    examples: tuple  # dicts: idx, kind, k1_pos, k2_pos, q_pos, act_out (first max_examples of each kind)

    @property
    def share_with_distractor(self) -> float:
        total = self.kq_count + self.kkq_count
        return self.kkq_count / total if total else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "share_with_distractor": self.share_with_distractor}


def _first_kkq(k1: np.ndarray, k2: np.ndarray, q: np.ndarray) -> Optional[dict]:
    """REF's state machine over one sequence's positions (first occurrences; k' after q ignored)."""
    state, found = "", {}
    for i in range(len(q)):
        if state in ("", "k2") and k1[i]:
            state += "k1"
            found["k1_pos"] = i
        elif state in ("", "k1") and k2[i]:
            state += "k2"
            found["k2_pos"] = i
        if state in ("k1", "k1k2", "k2k1") and q[i]:
            found["q_pos"] = i
            found["kind"] = "has_distractor" if "k2" in state else "no_distractor"
            return found
    return None


def natural_prevalence(
    model: HookedTransformer,
    input_sae: InputSAE,
    output_sae: OutputSAE | Sequence[OutputSAE],
    tokens: torch.Tensor,
    checks: Sequence[tuple[int, int, int, int]],
    *,
    batch_size: int = 64,
    max_examples: int = 100,
    progress: bool = False,
    known: Optional[SparseActs] = None,
) -> list[Prevalence]:
    """For each (feature, key, distractor, query) in ``checks``, one shared pass over the corpus.
    ``output_sae``: the SAE of every check, or one per check (heads of the input SAE's layer: the
    checks of a layer's heads share the pass). ``known``: the corpus's input-SAE activations, kept
    (:class:`~attnrules.sparse_acts.SparseActs`): when it holds every row, the presence of
    k, k' and q is read from it and the model runs only over the sequences with a hit."""
    if not checks:
        return []
    saes = list(output_sae) if isinstance(output_sae, Sequence) else [output_sae] * len(checks)
    if len(saes) != len(checks):
        raise ValueError(f"output_sae: one SAE per check expected ({len(checks)}), got {len(saes)}")
    resid, z = hook_names(input_sae.layer)
    if any(sae.layer != input_sae.layer for sae in saes):
        raise ValueError(f"output_sae: every output SAE must read layer {input_sae.layer} (the input SAE's)")
    cols = torch.tensor([c for _, k, d, q in checks for c in (k, d, q)], dtype=torch.long)
    heads: dict[int, list[int]] = {}  # each distinct SAE (by identity): the checks it encodes
    for c, sae in enumerate(saes):
        heads.setdefault(id(sae), []).append(c)
    found: list[list[dict]] = [[] for _ in checks]

    def output_acts(z_acts: torch.Tensor) -> np.ndarray:
        """``[b, T, len(checks)]``: each check's output feature, encoded by its head's SAE (once a head)."""
        encoded = []
        for members in heads.values():
            sae = saes[members[0]]
            feats = torch.tensor([checks[c][0] for c in members], dtype=torch.long)
            encoded.append((members, sae.encode(z_acts.to(sae.W_enc.dtype))[:, :, feats].cpu().numpy()))
        out = np.empty((*z_acts.shape[:2], len(checks)), dtype=np.result_type(*(a.dtype for _, a in encoded)))
        for members, a in encoded:
            out[:, :, members] = a
        return out

    def first_hits(f_in: np.ndarray) -> list[tuple[int, dict]]:
        """(check, hit) of one sequence from its input features' presence ``[T, 3·len(checks)]``."""
        hits = ((c, _first_kkq(f_in[:, 3 * c], f_in[:, 3 * c + 1], f_in[:, 3 * c + 2])) for c in range(len(checks)))
        return [(c, hit) for c, hit in hits if hit is not None]

    if known is not None and known.covers(range(tokens.shape[0])):
        # presence read from the kept activations; the model runs only over the sequences with a hit
        unique, inverse = torch.unique(cols, return_inverse=True)
        col_of = torch.full((input_sae.n_features,), -1, dtype=torch.long)
        col_of[unique] = torch.arange(unique.numel())
        hits = {}
        for row in range(tokens.shape[0]):
            present = (known.columns(row, col_of, unique.numel()) > 0)[:, inverse].numpy()
            row_hits = first_hits(present)
            if row_hits:
                hits[row] = row_hits
        rows_hit = sorted(hits)
        batches = run_batches(model, tokens[rows_hit], input_sae.layer, [z], batch_size=batch_size,
                              desc="prevalence", progress=progress) if rows_hit else ()
        for rows, acts in batches:
            out = output_acts(acts[z])
            for b, row in enumerate(rows_hit[rows]):
                for c, hit in hits[row]:
                    found[c].append({"idx": row, **hit, "act_out": float(out[b, hit["q_pos"], c])})
    else:
        for rows, acts in run_batches(model, tokens, input_sae.layer, [resid, z], batch_size=batch_size,
                                      desc="prevalence", progress=progress):
            f_in = input_sae.encode(acts[resid].to(input_sae.W_dec.dtype))[:, :, cols].cpu().numpy() > 0
            out = output_acts(acts[z])
            for b in range(f_in.shape[0]):
                for c, hit in first_hits(f_in[b]):
                    found[c].append({"idx": rows.start + b, **hit, "act_out": float(out[b, hit["q_pos"], c])})
    results = []
    for (g, k, d, q), hits in zip(checks, found):
        acts_by = {kind: [h["act_out"] for h in hits if h["kind"] == kind] for kind in ("no_distractor", "has_distractor")}
        mean = {kind: float(np.mean(a)) if a else float("nan") for kind, a in acts_by.items()}
        examples = [h for kind in acts_by for h in [x for x in hits if x["kind"] == kind][:max_examples]]
        results.append(Prevalence(g, k, d, q, len(acts_by["no_distractor"]), len(acts_by["has_distractor"]),
                                  mean["no_distractor"], mean["has_distractor"], tuple(examples)))
    return results


def insertion_token(model: HookedTransformer, input_sae: InputSAE, feature: int, *, mode: str = "paper", max_pos: int = 64,
                    batch_size: int = 512) -> Optional[int]:
    """The token to insert for input feature ``feature``; None when there is none (see :func:`feature_tokens`)."""
    return feature_tokens(model, input_sae, [feature], mode=mode, max_pos=max_pos, batch_size=batch_size)[feature]


def feature_tokens(model: HookedTransformer, input_sae: InputSAE, features: Sequence[int], *, mode: str = "paper", max_pos: int = 64,
                   batch_size: int = 512, bos: Optional[int] = None) -> dict[int, Optional[int]]:
    """The token that stands for each input feature in ``features`` (to insert or place), or None.

    ``mode="paper"`` (REF): argmax over the raw rows of ``concat(W_E, W_pos[:max_pos]) @ W_enc[:, j]``
    (:func:`~attnrules.rules.descriptions.embedding_rows`),
    None when the best row is a position. ``mode="activation"``: the token t maximising the feature's
    real activation at position 1 of [BOS, t] (meaningful at any layer), None when it never fires
    there (``bos``: the BOS id, default the tokenizer's, else 0). One streaming pass over the
    vocabulary serves all ``features``.
    """
    if mode not in ("paper", "activation"):
        raise ValueError(f"mode must be 'paper' or 'activation', got {mode!r}")
    cols = torch.tensor(sorted(set(int(f) for f in features)), dtype=torch.long)
    if cols.numel() == 0:
        return {}
    if int(cols.min()) < 0 or int(cols.max()) >= input_sae.n_features:
        raise ValueError(f"features must be input-feature indices in [0, {input_sae.n_features}), got {cols.tolist()}")
    best = torch.full((cols.numel(),), -float("inf"), dtype=torch.float64)
    arg = torch.full((cols.numel(),), -1, dtype=torch.long)

    def update(start: int, scores: torch.Tensor) -> None:
        value, index = scores.double().max(dim=0)
        better = value > best
        best[better], arg[better] = value[better], index[better] + start

    if mode == "paper":
        rows = embedding_rows(model, max_pos).to(input_sae.W_enc.dtype)
        w = input_sae.W_enc[:, cols.to(input_sae.W_enc.device)].detach()
        for start in range(0, rows.shape[0], batch_size):
            update(start, (rows[start:start + batch_size].to(w.device) @ w).cpu())
        return {int(c): (int(a) if 0 <= a < model.cfg.d_vocab else None) for c, a in zip(cols, arg)}
    if bos is None:
        bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    vocab = torch.arange(model.cfg.d_vocab)
    pairs = torch.stack([torch.full_like(vocab, 0 if bos is None else bos), vocab], dim=1)
    resid, _ = hook_names(input_sae.layer)
    for rows, acts in run_batches(model, pairs, input_sae.layer, [resid], batch_size=batch_size,
                                  desc="feature tokens", progress=False):
        update(rows.start, input_sae.encode(acts[resid][:, 1].to(input_sae.W_dec.dtype))[:, cols.to(acts[resid].device)].cpu())
    return {int(c): (int(a) if v > 0 else None) for c, a, v in zip(cols, arg, best)}


def insert_copies(
    tokens: torch.Tensor, positions: torch.Tensor, token_id: int, n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """REF's insertion: ``n`` copies of ``token_id`` right after BOS, the scored position moves by n,
    sequences whose position falls off the end are dropped, the rest truncated to the length.

    Returns (tokens [M, T], positions [M], kept row indices [M])."""
    t_len = tokens.shape[1]
    keep = torch.nonzero(positions + n < t_len).flatten()
    inserted = torch.full((keep.numel(), n), token_id, dtype=tokens.dtype)
    new = torch.cat([tokens[keep, :1], inserted, tokens[keep, 1:]], dim=1)[:, :t_len]
    return new, positions[keep] + n, keep


@dataclass(frozen=True)
class InsertionResult(Record):
    """Mean output activation at the query after inserting the distractor n times (Fig. 6c)."""

    feature: int
    token_id: int
    counts: tuple[int, ...]
    mean_act: tuple[Optional[float], ...]  # None where every scored position fell off the end
    n_examples: tuple[int, ...]


def counterfactual_insertion(
    model: HookedTransformer,
    output_sae: OutputSAE,
    feature: int,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    token_id: int,
    *,
    counts: Sequence[int] = (0, 1, 2, 3),
    batch_size: int = 64,
) -> InsertionResult:
    """Insert ``token_id`` n times (n in ``counts``; REF: 0..3) and read the feature at the moved position."""
    tokens = check_tokens(tokens, model)
    _, z = hook_names(output_sae.layer)
    means, sizes = [], []
    for n in counts:
        new, pos, _ = insert_copies(tokens, positions, token_id, n)
        if new.shape[0] == 0:  # every scored position fell off the end
            means.append(float("nan"))
            sizes.append(0)
            continue
        acts = []
        for rows, cache in run_batches(model, new, output_sae.layer, [z], batch_size=batch_size,
                                       desc=f"insert x{n}", progress=False):
            out = output_sae.encode(cache[z].to(output_sae.W_enc.dtype))[..., feature]
            acts.append(out[torch.arange(out.shape[0]), pos[rows]].cpu())
        values = torch.cat(acts) if acts else torch.zeros(0)
        means.append(float(values.mean()) if values.numel() else float("nan"))
        sizes.append(int(values.numel()))
    return InsertionResult(feature, token_id, tuple(counts), tuple(means), tuple(sizes))
