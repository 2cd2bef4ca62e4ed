"""Tensors spilled to an unnamed temporary file: appended as they are made, read back when needed.

Corpus-sized intermediates (a head's scan, the corpus's input activations) would otherwise sit in the
process's memory for a whole layer or a whole model pass; spilled, the process holds an offset and the
operating system's page cache the bytes. The file lives in ``TMPDIR``, has no name, and is gone when it
is closed or the process ends (killed too).
"""
from __future__ import annotations

import os
import tempfile

import torch


class SpillFile:
    """An unnamed temporary file that tensors' raw bytes are appended to and read back from by offset."""

    def __init__(self, prefix: str = "attnrules-") -> None:
        self.file = tempfile.TemporaryFile(prefix=prefix, buffering=0)
        self.size = 0

    def __del__(self) -> None:  # closed with its owner (an unclosed file would warn when collected)
        file = getattr(self, "file", None)
        if file is not None:
            file.close()

    def append(self, x: torch.Tensor) -> int:
        """Write ``x``'s bytes at the end; returns their offset."""
        data = memoryview(_raw(x.contiguous()))
        offset, done = self.size, 0
        while done < len(data):
            written = os.pwrite(self.file.fileno(), data[done:], offset + done)
            if written <= 0:
                raise OSError(f"could not write to the temporary file {self.file.name} (disk full?)")
            done += written
        self.size += len(data)
        return offset

    def read_into(self, out: torch.Tensor, offset: int) -> torch.Tensor:
        """Fill the contiguous ``out`` with the bytes at ``offset``; returns ``out``."""
        buffer = memoryview(_raw(out))
        done = 0
        while done < len(buffer):
            got = os.preadv(self.file.fileno(), [buffer[done:]], offset + done)
            if got <= 0:
                raise OSError(f"the temporary file {self.file.name} ends before offset {offset + len(buffer)}")
            done += got
        return out


def _raw(x: torch.Tensor):
    """``x``'s bytes as a numpy uint8 array sharing its memory (any dtype, bfloat16 too); ``x`` must be
    contiguous (``view`` raises otherwise, where ``reshape`` would fill a copy)."""
    return x.view(-1).view(torch.uint8).numpy()
