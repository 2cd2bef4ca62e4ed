"""One forward pass per head serves every feature: the hooks the exemplar steps read, kept in memory.

Each feature's steps used to run blocks 0..L over their own exemplars: the input-SAE activations of
the train and val sequences (:func:`attnrules.exemplars.input_activations`) and, in exact mode, the
exact-importance pass over the train sequences (:func:`attnrules.importance.exact_importance_terms`).
:class:`SharedPasses` runs blocks 0..L ONCE over the union of the sequences that a group of features
uses and keeps

- the input-SAE activations of every sequence, sparse (the entries whose bits are not +0.0, so that
  the dense tensor rebuilt from them is bit for bit the one computed);
- in exact mode, for the train sequences, what the exact pass reads: ``hook_resid_pre`` (whole),
  ``hook_z`` (the head's slot, or every head for a layer-level output SAE), ``hook_v`` (the head's
  key/value slot), ``hook_pattern`` and ``hook_attn_scores`` (the head's slot), on the CPU.

Each feature then looks its rows up: :meth:`SharedPasses.input_activations` rebuilds the dense
``[N, T, n_in]`` tensor, and :meth:`SharedPasses.runner` gives a drop-in for
:func:`~attnrules.sources.runner.run_batches` that yields the stored hooks in the feature's own batch
composition (the other heads' slots zero; the exact pass reads only this head's), so every later
float operation is today's on the same values. Identity rests on a forward pass and an SAE encode
giving each sequence the same values whatever the other sequences of its batch (row independence:
checked bit for bit in ``tests/test_shared_passes.py`` on the planted models and on GPT-2-small
shapes on the CPU).

Memory is bounded: features are grouped (in their order) so that a group's union holds at most
:data:`SHARED_MAX_SEQUENCES` sequences, and a group whose stored hooks pass :data:`SHARED_MAX_BYTES`
while being built is dropped; a feature outside any group (or in a dropped one) runs its own passes
as before. On GPT-2-small shapes (d_model 768, 64 tokens, ~50 active input features a token) a train
sequence costs about 0.25 MB (mostly ``hook_resid_pre``) and a val sequence about 40 kB.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

from attnrules.resid_store import ResidStore
from attnrules.sparse_acts import SparseActs
from attnrules.sources.runner import INPUT_ACTS, hook_names, run_batches

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import InputSAE, OutputSAE

# The most sequences one shared pass keeps (the union of a group of features' train and val rows).
SHARED_MAX_SEQUENCES = 4096
# The most bytes one shared pass keeps; a group that would keep more falls back to per-feature passes.
SHARED_MAX_BYTES = 4 * 2**30


class SharedPasses:
    """The hooks of ``tokens[rows]`` for one head, from one pass over their union (module docstring).

    ``rows``: corpus rows whose input-SAE activations are kept; ``exact_rows`` (a subset): rows whose
    exact-pass hooks are kept too (None: none). ``known``: input-SAE activations already held (the
    corpus pass's :class:`~attnrules.sparse_acts.SparseActs`): rows it holds are looked up there,
    so the pass runs only over the others and the exact rows, and encodes only the others. ``resid``:
    the layer's ``hook_resid_pre`` the corpus pass kept (:class:`~attnrules.resid_store.ResidStore`):
    exact rows it holds (and ``known`` holds) run block L alone from it, not blocks 0..L, and their
    ``hook_resid_pre`` is read back from it when asked for, not held in memory (0.2 MB a GPT-2 row).
    ``batch_size``: sequences per forward pass. Raises :class:`MemoryError` when the stored hooks would
    pass ``max_bytes``."""

    def __init__(self, model: HookedTransformer, input_sae: InputSAE, output_sae: OutputSAE, tokens: torch.Tensor,
                 rows: Sequence[int], exact_rows: Optional[Sequence[int]] = None, *, batch_size: int = 8,
                 max_bytes: int = SHARED_MAX_BYTES, known: Optional[SparseActs] = None,
                 resid: Optional[ResidStore] = None) -> None:
        self.tokens, self.layer = tokens, input_sae.layer
        wanted = sorted({int(r) for r in rows})
        exact_set = set() if exact_rows is None else {int(r) for r in exact_rows}
        if not exact_set <= set(wanted):
            raise ValueError("exact_rows must be among rows")
        resid_hook, z_name = hook_names(output_sae.layer)
        self.names = [resid_hook]
        self.slices: dict[str, Optional[int]] = {resid_hook: None}  # hook name -> head slot kept (None: whole)
        if exact_set:
            from attnrules.circuit.exact import head_weights

            h = head_weights(model, input_sae, output_sae.layer, output_sae.head)
            kv = output_sae.head if h.kv_head is None else h.kv_head
            attn = f"blocks.{output_sae.layer}.attn"
            self.slices.update({f"{attn}.hook_v": kv, f"{attn}.hook_pattern": output_sae.head,
                                z_name: output_sae.head if output_sae.per_head else None})
            if h.soft_cap is not None:
                self.slices[f"{attn}.hook_attn_scores"] = output_sae.head
            self.names = list(self.slices)
        self.head_dim = {f"blocks.{output_sae.layer}.attn.hook_{x}": d for x, d in
                         (("v", 2), ("pattern", 1), ("attn_scores", 1), ("z", 2))}
        self.shapes: dict[str, tuple] = {}
        self.hooks: dict[int, dict[str, torch.Tensor]] = {}
        self.known = known if known is not None and known.seq_len == tokens.shape[1] else None
        held = self.known.rows if self.known is not None else {}
        self.acts = SparseActs(tokens.shape[1], input_sae.n_features)
        run = [r for r in wanted if r not in held or r in exact_set]  # the rows the pass runs over
        # exact rows whose layer input the corpus pass kept (their activations too): block L alone
        from_resid = [r for r in run if r in held and resid is not None and r in resid.rows]
        self.resid = resid
        on_disk = set(from_resid)  # their hook_resid_pre is read back from the store, not held here
        self.passes = 0
        nbytes = 0
        full = [r for r in run if r not in on_disk]
        for batch_rows, cache in self._batches(model, full, from_resid, resid, batch_size):
            self.passes += 1
            new = [i for i, r in enumerate(batch_rows) if r not in held]
            if new:
                x = cache[resid_hook] if len(new) == len(batch_rows) else cache[resid_hook][new]
                self.acts.add(torch.tensor([batch_rows[i] for i in new]),
                              input_sae.encode(x.to(input_sae.W_dec.dtype)).cpu())
            for i, row in enumerate(batch_rows):
                if row in exact_set:
                    kept = {}
                    for name in self.names:
                        if name == resid_hook and row in on_disk:
                            continue
                        a = cache[name]
                        self.shapes[name] = tuple(a.shape[1:])
                        s = self.slices[name]
                        part = a[i] if s is None else a[i].select(self.head_dim[name] - 1, s)
                        kept[name] = part.detach().cpu().clone()
                        nbytes += kept[name].numel() * kept[name].element_size()
                    self.hooks[row] = kept
            if nbytes + self.acts.nbytes > max_bytes:
                raise MemoryError(f"the shared pass would keep more than {max_bytes} bytes")
        self.nbytes = nbytes + self.acts.nbytes

    def _batches(self, model: HookedTransformer, full: list, from_resid: list, resid: Optional[ResidStore],
                 batch_size: int):
        """(rows, hooks) of the ``full`` rows (blocks 0..L), then of the ``from_resid`` rows (block L from
        the kept ``hook_resid_pre``)."""
        for rows, kept in ((full, None), (from_resid, resid)):
            if rows:
                for batch, cache in run_batches(model, self.tokens[rows], self.layer, self.names, batch_size=batch_size,
                                                desc="shared passes", progress=False, resid=None if kept is None else kept.reader(rows)):
                    yield rows[batch], cache

    def _store(self, row: int) -> Optional[SparseActs]:
        """Where ``row``'s input-SAE activations are held (None: nowhere)."""
        if row in self.acts.rows:
            return self.acts
        return self.known if self.known is not None and row in self.known.rows else None

    def covers(self, rows: torch.Tensor, exact: bool = False) -> bool:
        rows = [int(r) for r in rows]
        return all(self._store(r) is not None for r in rows) and (not exact or all(r in self.hooks for r in rows))

    def input_activations(self, rows: torch.Tensor) -> torch.Tensor:
        """The input-SAE activations ``[len(rows), T, n_in]`` of corpus rows ``rows``, as
        :func:`~attnrules.exemplars.input_activations` computes them."""
        stores = [self._store(int(r)) for r in rows.tolist()]
        dtype = next((s.dtype for s in stores if s.dtype is not None), torch.float32)
        out = torch.zeros(len(rows), self.tokens.shape[1], self.acts.n_in, dtype=dtype)
        for i, (r, store) in enumerate(zip(rows.tolist(), stores)):
            store.write(int(r), out[i])
        return out

    def runner(self, rows: torch.Tensor):
        """A drop-in for :func:`~attnrules.sources.runner.run_batches` over ``tokens[rows]`` that yields the
        stored hooks (in the caller's batches), with the stored input-SAE activations under
        :data:`~attnrules.sources.runner.INPUT_ACTS` (so the exact pass does not encode them again); it
        runs the model as before for anything not stored."""
        rows = rows.clone()

        def run(model, tokens, layer, names, *, batch_size, desc, progress):
            stored = (layer == self.layer and all(n in self.slices for n in names)
                      and all(int(r) in self.hooks for r in rows) and tokens.shape == (len(rows), self.tokens.shape[1])
                      and torch.equal(tokens.cpu().long(), self.tokens[rows].long()))
            if not stored:
                yield from run_batches(model, tokens, layer, names, batch_size=batch_size, desc=desc, progress=progress)
                return
            device = next(model.parameters()).device
            with torch.no_grad():  # as run_batches: the caller's code between batches runs without grad too
                for start in range(0, len(rows), batch_size):
                    batch = slice(start, min(start + batch_size, len(rows)))
                    hooks = {name: self._stack(name, rows[batch]).to(device) for name in names}
                    yield batch, {**hooks, INPUT_ACTS: self.input_activations(rows[batch]).to(device)}

        return run

    def _stack(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        parts = [self.hooks[int(r)][name] if name in self.hooks[int(r)] else self.resid.read([int(r)])[0] for r in rows]
        s = self.slices[name]
        if s is None:
            return torch.stack(parts)
        full = torch.zeros((len(parts), *self.shapes[name]), dtype=parts[0].dtype)
        full.select(self.head_dim[name], s).copy_(torch.stack(parts))
        return full


def group_features(uses: Sequence[tuple[torch.Tensor, torch.Tensor]], max_sequences: int = SHARED_MAX_SEQUENCES
                   ) -> list[list[int]]:
    """Consecutive groups of features (indices into ``uses``: each feature's (train rows, val rows))
    whose union of rows holds at most ``max_sequences``; a feature that alone holds more is left out."""
    groups, current, union = [], [], set()
    for i, (train, val) in enumerate(uses):
        rows = {int(r) for r in train} | {int(r) for r in val}
        if len(rows) > max_sequences:
            continue
        if current and len(union | rows) > max_sequences:
            groups.append(current)
            current, union = [], set()
        current.append(i)
        union |= rows
    if current:
        groups.append(current)
    return groups
