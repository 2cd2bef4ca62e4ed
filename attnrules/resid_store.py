"""The corpus's ``hook_resid_pre`` of one layer, kept from the corpus pass: exemplar passes start at the layer.

Exact importance reads, for each train exemplar, the input of the head's layer and that layer's
attention (:class:`~attnrules.pipeline.activations.SharedPasses`). Computing the input means running
blocks 0..L-1 again for every exemplar — most of a feature's time. The corpus pass computes it for
every row anyway: a :class:`ResidStore` keeps it (as computed, in a temporary file: ``T × d_model`` values
a row, 196 kB for GPT-2 small at 64 tokens, 9.8 GB for 50,000 rows), and the exemplar pass runs block L
alone from it (:func:`~attnrules.sources.runner.hooked_forward` with ``resid``), with the values the
whole pass gives (row independence, as for the kept input activations: ``tests/test_resid_store.py``).
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from typing import Callable, Optional, Sequence

import torch

from attnrules.spill import SpillFile


DISK_SHARE = 0.5  # at most this share of TMPDIR's free space (when the store is made) is taken


class ResidStore:
    """Rows' ``[T, d_model]`` residual stream, in a temporary file (``TMPDIR``); rows are added until
    ``max_bytes`` (None: no bound of its own) or :data:`DISK_SHARE` of ``TMPDIR``'s free space would be
    passed, or a write fails (disk full: a warning says so), after which :attr:`full` is set and further
    rows are left out (their exemplar passes run the blocks before the layer, as without a store)."""

    def __init__(self, max_bytes: Optional[int] = None) -> None:
        room = int(DISK_SHARE * shutil.disk_usage(tempfile.gettempdir()).free)
        self.max_bytes = room if max_bytes is None else min(max_bytes, room)
        self.rows: dict[int, int] = {}  # row -> byte offset in the file
        self.shape: Optional[tuple] = None  # (T, d_model) and the dtype, from the first rows added
        self.dtype: Optional[torch.dtype] = None
        self.file = SpillFile("attnrules-resid-")
        self.nbytes = 0
        self.full = False

    def add(self, sequences: torch.Tensor, resid: torch.Tensor) -> None:
        """Keep ``resid [b, T, d_model]`` of corpus rows ``sequences [b]`` (rows already held stay as they are)."""
        if self.full or not sequences.numel():
            return
        resid = resid.detach().cpu()
        if self.shape is None:
            self.shape, self.dtype = tuple(resid.shape[1:]), resid.dtype
        elif tuple(resid.shape[1:]) != self.shape or resid.dtype != self.dtype:
            raise ValueError(f"resid must be [b, {', '.join(map(str, self.shape))}] {self.dtype}, got "
                             f"{list(resid.shape)} {resid.dtype}")
        row_bytes = resid[0].numel() * resid.element_size()
        for i, row in enumerate(sequences.tolist()):
            if row in self.rows:
                continue
            if self.nbytes + row_bytes > self.max_bytes:
                self.full = True
                return
            try:
                self.rows[row] = self.file.append(resid[i])
            except OSError as err:
                self.full = True
                warnings.warn(f"hook_resid_pre is kept for {len(self.rows)} corpus rows only: {err}; exemplar passes "
                              "of the other rows run the blocks before the layer", RuntimeWarning, stacklevel=2)
                return
            self.nbytes += row_bytes

    def read(self, rows: Sequence[int]) -> torch.Tensor:
        """The held rows' residual stream ``[len(rows), T, d_model]``."""
        out = torch.empty((len(rows), *self.shape), dtype=self.dtype)
        for i, row in enumerate(rows):
            self.file.read_into(out[i], self.rows[int(row)])
        return out

    def reader(self, rows: Sequence[int]) -> Callable[[slice], torch.Tensor]:
        """For :func:`~attnrules.sources.runner.run_batches` over ``tokens[rows]``: a batch's residual stream."""
        rows = [int(r) for r in rows]
        return lambda batch: self.read(rows[batch])
