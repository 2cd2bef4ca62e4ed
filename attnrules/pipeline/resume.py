"""Resuming a run without mixing runs: content hashes of the inputs, the head folder's bookkeeping,
the cached corpus scan, and :func:`load_results`.

Hashes (:class:`InputHashes`, each the first 16 hex digits of a SHA-256):

- ``model``: every tensor of ``model.state_dict()`` (parameters and buffers) by sorted name — name,
  dtype, shape and bytes — plus the model config (``cfg.to_dict()`` without device, seed and
  initialisation entries) and the tokenizer's vocabulary. Tensors up to :data:`FULL_HASH_LIMIT`
  elements are hashed whole; a larger one (e.g. GPT-2's embedding) by a deterministic sample: its
  first and last :data:`SAMPLE_EDGE` elements and :data:`SAMPLE_STRIDED` elements at a fixed stride
  over the flattened tensor, gathered where the tensor lives (so a GPU model moves only the sample).
- ``input_sae``: layer, hook name, ``W_dec``, ``W_enc``, ``b_dec``, and the tensors ``encode`` uses
  (a bound SAE module's ``state_dict()``, or the tensors its closure holds, e.g. ``b_enc``).
- ``output_sae``: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, layer, head, n_heads, d_head, per_head.
- ``corpus``: the token tensor (dtype, shape, bytes), whole.
- ``settings``: :meth:`ExtractSettings.fingerprint`.

A head folder holds, besides the results (:mod:`attnrules.pipeline.results`)::

    RUN.json            the inputs' hashes, written when a run starts: the folder's identity
    scan.pt             the corpus scan (FeatureScan), sparse, keyed by the model/output-SAE/corpus hashes
    features/NAME.json  each finished feature (FeatureResult.to_json() and the inputs' hashes)
    DONE.json           written last by HeadResult.write: the head is complete

A run into a folder whose ``RUN.json`` (or a feature file, or the marker) names other inputs stops
with :class:`RunMismatchError` saying which differ, unless ``overwrite=True`` (the folder's run files
are removed and the run starts afresh). A folder with our files but no ``RUN.json`` (an older
attnrules) is treated likewise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from attnrules.exemplars import FeatureScan, position_dtype
from attnrules.files import clean_temporaries, write_json, write_torch
from attnrules.pipeline.results import HEAD_FILES, MARKER_FILE, RESULTS_FILE, FeatureResult, HeadResult, RunInfo

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from attnrules.sources import InputSAE, OutputSAE


RUN_FILE = "RUN.json"
SCAN_FILE = "scan.pt"
FEATURES_DIR = "features"
FOLDER_FILES = (*HEAD_FILES, RUN_FILE, SCAN_FILE)

FULL_HASH_LIMIT = 1 << 24  # elements: a tensor up to this size is hashed whole (64 MiB of float32)
SAMPLE_EDGE = 1 << 16  # a larger one: its first and last this many elements ...
SAMPLE_STRIDED = 1 << 20  # ... and this many at a fixed stride
_CFG_SKIP = {"device", "n_devices", "seed", "init_mode", "initializer_range", "init_weights", "n_params",
             "trust_remote_code", "checkpoint_index", "checkpoint_label_type", "checkpoint_value", "from_checkpoint"}
HEAD_NAME = re.compile(r"^L(\d+)H(\d+)$")


class RunMismatchError(ValueError):
    """An output folder holds results of a run with other inputs (``differences``: what differs)."""

    def __init__(self, folder: Path, differences: list[str], detail: str = "") -> None:
        self.folder, self.differences = Path(folder), differences
        what = ", ".join(differences)
        super().__init__(f"{folder} holds results of another run: {what} differ{'s' if len(differences) == 1 else ''}"
                         f"{detail}. Use another output folder, or overwrite=True (CLI: --overwrite) to remove "
                         "them and start afresh")


class IncompleteResultsError(FileNotFoundError):
    """A head folder whose run did not finish (no completion marker)."""


# ----------------------------------------------------------------------------------------------------------
# Hashes


def _update(h, name: str, t: torch.Tensor) -> None:
    t = t.detach()
    flat = t.reshape(-1)
    n = flat.numel()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if n > FULL_HASH_LIMIT:
        step = -(-n // SAMPLE_STRIDED)
        flat = torch.cat([flat[:SAMPLE_EDGE], flat[::step], flat[-SAMPLE_EDGE:]])
        h.update(b"sampled|")
    data = flat.contiguous().cpu()
    if data.dtype.is_complex:
        data = torch.view_as_real(data).reshape(-1)
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def _digest(h) -> str:
    return h.hexdigest()[:16]


def hash_tensors(tensors: dict[str, torch.Tensor], extra: Any = None) -> str:
    """SHA-256 (16 hex digits) of named tensors by sorted name, and of JSON-able ``extra``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        _update(h, name, tensors[name])
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return _digest(h)


def hash_model(model) -> str:
    """The model's content hash (see the module docstring)."""
    cfg = getattr(model, "cfg", None)
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg)) if cfg is not None else {}
    config = {k: str(v) for k, v in config.items() if k not in _CFG_SKIP}
    tokenizer = getattr(model, "tokenizer", None)
    vocab = sorted(tokenizer.get_vocab().items()) if tokenizer is not None and hasattr(tokenizer, "get_vocab") else None
    return hash_tensors(dict(model.state_dict()), {"config": config, "vocab": vocab})


def _encode_state(encode) -> dict[str, torch.Tensor]:
    """The tensors an SAE's ``encode`` reads besides its weights: a bound module's state, or the tensors
    in its closure."""
    owner = getattr(encode, "__self__", None)
    if owner is not None and hasattr(owner, "state_dict"):
        return {f"encode.{k}": v for k, v in owner.state_dict().items()}
    cells = getattr(encode, "__closure__", None) or ()
    return {f"encode.cell{i}": c.cell_contents for i, c in enumerate(cells)
            if isinstance(c.cell_contents, torch.Tensor)}


def hash_input_sae(sae) -> str:
    tensors = {"W_dec": sae.W_dec, "W_enc": sae.W_enc, "b_dec": sae.b_dec, **_encode_state(sae.encode)}
    return hash_tensors(tensors, {"layer": sae.layer, "hook_name": sae.hook_name,
                                  "encode": getattr(sae.encode, "__qualname__", type(sae.encode).__name__)})


def hash_output_sae(sae) -> str:
    """Everything that decides the output features: weights, activation parameters (JumpReLU threshold,
    TopK k, gated b_gate/r_mag), the SAE's own encode when it has one, and the layout."""
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    tensors.update({k: getattr(sae, k) for k in ("threshold", "b_gate", "r_mag") if getattr(sae, k, None) is not None})
    if getattr(sae, "sae_encode", None) is not None:
        tensors.update(_encode_state(sae.sae_encode))
    meta = ("layer", "head", "n_heads", "d_head", "per_head", "architecture", "k", "apply_b_dec_to_input",
            "scaling_factor")
    return hash_tensors(tensors, {k: getattr(sae, k, None) for k in meta})


def hash_corpus(tokens: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"corpus|{tokens.dtype}|{tuple(tokens.shape)}|".encode())
    h.update(tokens.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return _digest(h)


LABELS = {"model": "model", "input_sae": "input SAE", "output_sae": "output SAE", "corpus": "corpus",
          "settings": "settings"}


@dataclass(frozen=True)
class InputHashes:
    """Content hashes of everything a head's results depend on."""

    model: str
    input_sae: str
    output_sae: str
    corpus: str
    settings: str

    @classmethod
    def of(cls, model: HookedTransformer, input_sae: InputSAE, output_sae: OutputSAE, tokens: torch.Tensor, settings, *, model_hash: Optional[str] = None,
           corpus_hash: Optional[str] = None, input_sae_hash: Optional[str] = None) -> "InputHashes":
        """Hash the inputs (those already hashed in this run may be passed in)."""
        return cls(model_hash or hash_model(model), input_sae_hash or hash_input_sae(input_sae),
                   hash_output_sae(output_sae), corpus_hash or hash_corpus(tokens), settings.fingerprint())

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "InputHashes":
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})

    def differences(self, other: "InputHashes") -> list[str]:
        """What differs from ``other``, in words ("model", "input SAE", "output SAE", "corpus", "settings")."""
        return [LABELS[f.name] for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    @property
    def scan_key(self) -> dict:
        """What the corpus scan depends on."""
        return {"model": self.model, "output_sae": self.output_sae, "corpus": self.corpus}


# ----------------------------------------------------------------------------------------------------------
# A head folder


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _sparse(t: torch.Tensor) -> dict:
    flat = t.reshape(-1)
    index = torch.nonzero(flat).flatten()
    return {"shape": tuple(t.shape), "dtype": t.dtype, "index": index, "values": flat[index].clone()}


def _dense(data: dict) -> torch.Tensor:
    out = torch.zeros(data["shape"], dtype=data["dtype"])
    out.view(-1)[data["index"]] = data["values"].to(data["dtype"])
    return out


def _positions(argmax: torch.Tensor) -> torch.Tensor:
    """A cached scan's argmax positions in :func:`~attnrules.exemplars.position_dtype` (older caches hold int64)."""
    return argmax.to(position_dtype(int(argmax.max()) + 1 if argmax.numel() else 1))


class HeadFolder:
    """The output folder of one head: checks its identity, cleans up after killed writers, caches the
    scan and the finished features."""

    def __init__(self, path: Path | str, inputs: InputHashes) -> None:
        self.path, self.inputs = Path(path), inputs
        self.features_dir = self.path / FEATURES_DIR

    def _ours(self) -> list[Path]:
        found = [self.path / n for n in FOLDER_FILES if (self.path / n).exists()]
        if self.features_dir.is_dir():
            found += sorted(self.features_dir.glob("*.json"))
        return found

    def mismatch(self) -> Optional[tuple[list[str], str]]:
        """(what differs, details) when the folder holds files of a run with other (or unknown) inputs."""
        run = _read_json(self.path / RUN_FILE)
        if run is not None and isinstance(run.get("inputs"), dict):
            theirs = InputHashes.from_json(run["inputs"])
            diff = self.inputs.differences(theirs)
            if not diff:
                return None
            detail = "; ".join(f"{LABELS[f.name]} {getattr(theirs, f.name)} there, {getattr(self.inputs, f.name)} now"
                               for f in dataclasses.fields(InputHashes)
                               if getattr(self.inputs, f.name) != getattr(theirs, f.name))
            return diff, detail
        found = self._ours()
        if found:
            names = ", ".join(str(p.relative_to(self.path)) for p in found[:3]) + (" ..." if len(found) > 3 else "")
            return ["its inputs (unknown)"], f"{names} from a run that recorded no input hashes in {RUN_FILE}"
        return None

    def prepare(self, *, overwrite: bool = False) -> None:
        """Before a run: remove temporaries left by killed writers; check (or, with ``overwrite``, clear)
        an earlier run's files; record this run's inputs."""
        clean_temporaries(self.path, FOLDER_FILES)
        clean_temporaries(self.features_dir)
        problem = self.mismatch()
        if problem is not None:
            if not overwrite:
                raise RunMismatchError(self.path, problem[0], f" ({problem[1]})")
            self.clear()
        if not (self.path / RUN_FILE).exists():
            write_json(self.path / RUN_FILE, {"inputs": self.inputs.to_json()})

    def clear(self) -> None:
        """Remove every run file of ours (results, marker, scan, features); other files stay."""
        (self.path / MARKER_FILE).unlink(missing_ok=True)  # first: the folder stops looking complete
        for name in FOLDER_FILES:
            (self.path / name).unlink(missing_ok=True)
        if self.features_dir.is_dir():
            shutil.rmtree(self.features_dir)

    # completion

    def complete(self) -> Optional[HeadResult]:
        """The finished head when the folder is complete for these inputs, else None."""
        marker = _read_json(self.path / MARKER_FILE)
        if marker is None or marker.get("inputs") != self.inputs.to_json():
            return None
        if not all((self.path / name).is_file() for name in marker.get("files", ())):
            return None
        try:
            return read_head(self.path)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # the scan

    def _scan_data(self) -> Optional[dict]:
        path = self.path / SCAN_FILE
        if not path.exists():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - unreadable: scan again
            return None
        return data if isinstance(data, dict) and data.get("key") == self.inputs.scan_key else None

    def has_scan(self) -> bool:
        """Whether the folder caches the scan of these inputs."""
        return self._scan_data() is not None

    def load_scan(self) -> Optional[FeatureScan]:
        """The cached corpus scan of these inputs (model, output SAE, corpus), if any."""
        data = self._scan_data()
        if data is None:
            return None
        return FeatureScan(data["counts"].clone(), _dense(data["act_max"]), _positions(_dense(data["act_argmax"])))

    def save_scan(self, scan: FeatureScan) -> None:
        """The scan, sparse (nonzero entries of act_max and act_argmax), written atomically."""
        write_torch(self.path / SCAN_FILE, {"key": self.inputs.scan_key, "counts": scan.counts.cpu(),
                                            "act_max": _sparse(scan.act_max.cpu()),
                                            "act_argmax": _sparse(scan.act_argmax.cpu())})

    # finished features

    def feature_path(self, name: str) -> Path:
        return self.features_dir / f"{name}.json"

    def load_feature(self, name: str) -> Optional[FeatureResult]:
        """A feature finished by an earlier run with these inputs, if any."""
        data = _read_json(self.feature_path(name))
        if data is None:
            return None
        inputs = data.pop("inputs", None)
        if inputs != self.inputs.to_json():
            diff = self.inputs.differences(InputHashes.from_json(inputs or {}))
            raise RunMismatchError(self.path, diff, f" (in {self.feature_path(name)})")
        return FeatureResult.from_json(data)

    def save_feature(self, result: FeatureResult) -> None:
        write_json(self.feature_path(result.name), {"inputs": self.inputs.to_json(), **result.to_json()})


# ----------------------------------------------------------------------------------------------------------
# Reading results back


def read_head(folder: Path | str, *, require_marker: bool = True) -> HeadResult:
    """The HeadResult of one head folder (with its RunInfo from the marker)."""
    folder = Path(folder)
    marker = _read_json(folder / MARKER_FILE)
    if marker is None and require_marker:
        state = "results.json but no" if (folder / RESULTS_FILE).exists() else "no"
        raise IncompleteResultsError(f"{folder} is not a complete head folder ({state} completion marker "
                                     f"{MARKER_FILE}): its run did not finish; rerun it to complete it")
    try:
        data = json.loads((folder / RESULTS_FILE).read_text())
    except FileNotFoundError:
        raise IncompleteResultsError(f"{folder} has no {RESULTS_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / RESULTS_FILE} is not valid JSON: {e}") from None
    run = RunInfo.from_json(marker["run"]) if marker and marker.get("run") else None
    result = HeadResult.from_json(data, run)
    if marker is not None and marker.get("inputs") != result.metadata.get("inputs"):
        raise ValueError(f"{folder}: {MARKER_FILE} and {RESULTS_FILE} name different inputs (mixed runs)")
    return result


def _head_key(path: Path) -> Optional[tuple[int, int]]:
    match = HEAD_NAME.match(path.name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def load_results(path: Path | str, *, skip_incomplete: bool = False
                 ) -> Union[HeadResult, dict[tuple[int, int], HeadResult]]:
    """The results an ``extract`` or ``sweep`` output folder holds, as the run returned them.

    - a head folder (``results.json`` / ``DONE.json`` in it): its :class:`HeadResult`;
    - a folder of ``L{l}H{h}`` head folders (``extract --out``) or a sweep folder (``shards/L{l}H{h}``):
      ``{(layer, head): HeadResult}`` ordered by (layer, head).

    A head folder without its completion marker (a run that did not finish) raises
    :class:`IncompleteResultsError`, or is left out with ``skip_incomplete``.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of attnrules results")
    if (root / RESULTS_FILE).exists() or (root / MARKER_FILE).exists() or (root / RUN_FILE).exists():
        return read_head(root)
    base = root / "shards" if (root / "shards").is_dir() else root
    heads = sorted((k, p) for p in base.iterdir() if p.is_dir() and (k := _head_key(p)) is not None)
    out = {}
    for key, folder in heads:
        if skip_incomplete and not (folder / MARKER_FILE).exists():
            continue
        out[key] = read_head(folder)
    if not out and not heads:
        raise FileNotFoundError(f"no head results in {root}: expected results.json, L{{l}}H{{h}} head folders or shards/")
    return out
