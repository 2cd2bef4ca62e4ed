"""Input-SAE activations of corpus rows, kept sparse: encoded once, looked up by every step that needs them.

A :class:`SparseActs` store keeps, for each corpus row it holds, the entries of its ``[T, n_in]``
activations whose bits are not +0.0 (so the dense tensor rebuilt from them is bit for bit the one
encoded; -0.0 and NaN are kept): a flat index (``position · n_in + feature``) and the value, about
8 bytes an active entry (int32 indices while ``T · n_in`` < 2³¹). The corpus pass fills one for the
whole corpus (:class:`~attnrules.pipeline.corpus_stats.CorpusObservers`, bounded by
``corpus_acts_mib``) in a temporary file (``on_disk``: the process's memory holds an offset a row,
the operating system's page cache the rest; 1.14 GiB for 50,000 × 64 tokens of GPT-2 small would
otherwise count against a head run's memory), and :class:`~attnrules.pipeline.activations.SharedPasses`
one in memory for the exemplar rows the corpus store does not hold.
"""
from __future__ import annotations

from typing import Optional

import torch

from attnrules.spill import SpillFile

try:
    import attnrules._C as _C
except ImportError:  # the package was installed without building the C++ core: torch does the same, slower
    _C = None


def nonzero_bits(x: torch.Tensor) -> torch.Tensor:
    """Where ``x`` is not +0.0 (keeps -0.0 and NaN, so the rebuilt tensor is bit-identical)."""
    return (x != 0) | torch.signbit(x)


def nonzero_entries(flat: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Each row's entries of the CPU ``flat [rows, n]`` whose bits are not +0.0 (:func:`nonzero_bits`):
    (counts a row, column indices int64, values), rows one after another, columns ascending. float32
    in one pass of the C++ core; other dtypes (or no C++ core) with torch."""
    if flat.dtype != torch.float32 or _C is None:
        keep = nonzero_bits(flat)
        return keep.sum(dim=1).tolist(), torch.nonzero(keep)[:, 1], flat[keep]
    flat = flat.contiguous()
    counts = torch.empty(flat.shape[0], dtype=torch.int64)
    _C.count_nonzero(flat, counts)
    starts = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    index, values = torch.empty(total, dtype=torch.int64), torch.empty(total, dtype=flat.dtype)
    _C.gather_nonzero(flat, starts, index, values)
    return counts.tolist(), index, values


def sparse_times(rows: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``rows.double() @ dense`` (``dense`` float64 ``[n, d]``) for sparse float32 ``rows [m, n]`` (an
    SAE's activations), summed over each row's nonzero entries only: one fused multiply-add chain per
    output element, in index order from +0.0 — exactly rounded steps, so a row's result is the same
    whatever the other rows and on every CPU (MKL's dense product changes its blocking, and so its last
    bit, with the number of rows: ≈ 1e-15 relative). Hundreds of times fewer operations than the dense
    product at ~50 active features of 24,576. Off the CPU, for other dtypes or without the C++ core: the
    dense product."""
    if rows.device.type != "cpu" or dense.device.type != "cpu" or dense.dtype != torch.float64 \
            or rows.dtype != torch.float32 or _C is None:
        return rows.double() @ dense
    counts, index, values = nonzero_entries(rows)  # -0.0 entries too: they leave a chain as it is
    row_start = torch.zeros(rows.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0, out=row_start[1:])
    values = values.double()
    out = torch.empty(rows.shape[0], dense.shape[1], dtype=torch.float64)
    _C.sparse_matmul(row_start, index, values, dense.contiguous(), out)
    return out


class SparseActs:
    """The activations ``[T, n_in]`` of corpus rows, sparse; rows are added until ``max_bytes`` would be
    passed (None: no bound), after which :attr:`full` is set and further rows are left out (never a
    part of a row). ``on_disk``: the entries go to an unnamed temporary file (in ``TMPDIR``, gone when
    the store is) and are read back a row at a time; :attr:`nbytes` counts them either way."""

    def __init__(self, seq_len: int, n_in: int, *, max_bytes: Optional[int] = None, on_disk: bool = False) -> None:
        self.seq_len, self.n_in, self.max_bytes = seq_len, n_in, max_bytes
        self.dtype: Optional[torch.dtype] = None  # the encoder's, from the first rows added
        self.index_dtype = torch.int32 if seq_len * n_in < 2**31 else torch.int64
        # row -> (index, values) in memory, or (byte offset, entries) in the file
        self.rows: dict[int, tuple] = {}
        self.file = SpillFile("attnrules-acts-") if on_disk else None
        self.nbytes = 0
        self.full = False

    def add(self, sequences: torch.Tensor, acts: torch.Tensor) -> None:
        """Keep the activations ``acts [b, T, n_in]`` of corpus rows ``sequences [b]`` (rows already held
        are kept as they are)."""
        if self.full:
            return
        flat = acts.detach().reshape(acts.shape[0], -1).cpu()
        self.dtype = self.dtype or flat.dtype
        counts, index, values = nonzero_entries(flat)
        index = index.to(self.index_dtype)
        entry = index.element_size() + values.element_size()
        for row, idx, val, n in zip(sequences.tolist(), index.split(counts), values.split(counts), counts):
            if row in self.rows:
                continue
            if self.max_bytes is not None and self.nbytes + n * entry > self.max_bytes:
                self.full = True
                return
            if self.file is None:
                self.rows[row] = (idx.clone(), val.clone())
            else:  # the row's indices, then its values
                self.rows[row] = (self.file.append(idx), n)
                self.file.append(val)
            self.nbytes += n * entry

    def entries(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The held row ``row``'s flat indices (``position · n_in + feature``, int64) and values."""
        if self.file is None:
            index, values = self.rows[row]
            return index.long(), values
        offset, n = self.rows[row]
        index = self.file.read_into(torch.empty(n, dtype=self.index_dtype), offset)
        values = self.file.read_into(torch.empty(n, dtype=self.dtype), offset + index.nbytes)
        return index.long(), values

    def covers(self, rows) -> bool:
        return all(int(r) in self.rows for r in rows)

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """The activations ``[len(rows), T, n_in]`` of corpus rows ``rows`` (all held)."""
        out = torch.zeros(len(rows), self.seq_len, self.n_in, dtype=self.dtype or torch.float32)
        for i, r in enumerate(rows.tolist()):
            self.write(int(r), out[i])
        return out

    def write(self, row: int, out: torch.Tensor) -> None:
        """Write the held row ``row``'s activations into the zeroed ``out [T, n_in]``."""
        index, values = self.entries(row)
        out.view(-1)[index] = values

    def columns(self, row: int, col_of: torch.Tensor, n_cols: int) -> torch.Tensor:
        """The held row ``row``'s activations ``[T, n_cols]`` over some features: ``col_of [n_in]`` gives each
        feature's column (-1: not wanted)."""
        index, values = self.entries(row)
        col = col_of[index % self.n_in]
        keep = col >= 0
        out = torch.zeros(self.seq_len, n_cols, dtype=self.dtype or torch.float32)
        out[index[keep] // self.n_in, col[keep]] = values[keep]
        return out

