"""Small helpers shared by result dataclasses: tables, JSON, atomic files and their stale temporaries.

Every file is written through a temporary file in the same folder, named ``.{name}.tmp-XXXXXXXX``
(``TEMP_MARK``), and renamed over ``name``: a reader never sees half a file. A process killed between
the write and the rename leaves the temporary behind; :func:`clean_temporaries` removes them (a run
calls it on the folders it alone writes, before it starts).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import pandas as pd
import torch

TEMP_MARK = ".tmp-"
# ours: ".{name}.tmp-" + mkstemp's 8 random characters; and, from before TEMP_MARK, ".{name}." + 8 characters
_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:tmp-)?[a-z0-9_]{8}$")


def plain(value: Any) -> Any:
    """Tensors, numpy values, result records and nested containers as JSON-ready Python values
    (NaN as None)."""
    if isinstance(value, torch.Tensor):
        return plain(value.detach().cpu().tolist())
    if getattr(type(value), "__json_record__", False):  # attnrules.pipeline.results records
        return value.to_json()
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON
    return value


def json_copy(value: Any) -> Any:
    """``value`` as it reads back from its JSON: plain values, lists for tuples, None for NaN."""
    return json.loads(json.dumps(plain(value), allow_nan=False))


def write_with(path: Path | str, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically with ``write(binary file)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    return write_with(path, lambda f: f.write(text.encode("utf-8")))


def write_torch(path: Path | str, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path``, atomically."""
    return write_with(path, lambda f: torch.save(obj, f))


def write_json(path: Path | str, data: Any) -> Path:
    return write_atomic(path, json.dumps(plain(data), indent=1, allow_nan=False) + "\n")


def write_csv(path: Path | str, frame: pd.DataFrame) -> Path:
    return write_atomic(path, frame.to_csv(index=False))


def is_temporary(path: Path | str, names: Iterable[str] | None = None) -> bool:
    """Whether ``path`` is a temporary of :func:`write_atomic` (for one of ``names``, when given)."""
    match = _TEMP.match(Path(path).name)
    return match is not None and (names is None or match.group("name") in set(names))


def clean_temporaries(folder: Path | str, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder`` (of ``names`` only, when given);
    only for a folder no other process is writing to. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = None if names is None else set(names)
    removed = []
    for path in folder.iterdir():
        if path.is_file() and is_temporary(path, names):
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)
