"""Loaders: the model from the Hugging Face hub (through transformer_lens) or a local folder, sae_lens
SAE folders, and the authors' per-head ``.pt`` + ``_cfg.json`` checkpoints (SAE releases by id and in
their own file formats: :mod:`~attnrules.sources.releases`).

Loaders never wait on the network when it cannot help: with ``HF_HUB_OFFLINE=1`` (or an unreachable
hub) and nothing in the local Hugging Face cache they raise :class:`SourceUnavailableError` at once,
saying what to download and where to put it. Loaders check each source on its own; shapes across
sources (model, input SAE, output SAE) are checked by :func:`~attnrules.sources.check_compatible`.
"""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from attnrules.sources.model import _check_int
from attnrules.sources.saes import OutputSAE

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

_VERSION = re.compile(r"_v(\d+)$")
# Files of a sae_lens SAE folder (sae_lens.constants SAE_CFG_FILENAME / SAE_WEIGHTS_FILENAME).
_SAE_FILES = ("cfg.json", "sae_weights.safetensors")
_HEAD_SAE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")


class SourceUnavailableError(RuntimeError):
    """A model or SAE that must be downloaded is not available offline."""


# --------------------------------------------------------------------------------------------------
# The Hugging Face hub, offline


def _hub_offline() -> bool:
    """Offline mode, read now from the environment as well as from huggingface_hub's import-time flag."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (f or "").strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags
    )


def _hub_cache_dir() -> Path:
    """The hub cache directory the environment names now (HF_HUB_CACHE, else HF_HOME/hub, ...)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _in_hub_cache(repo_id: str, path_in_repo: str) -> bool:
    """Whether some cached snapshot of the model repo holds ``path_in_repo`` (file or folder)."""
    snapshots = _hub_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any((s / path_in_repo).exists() for s in snapshots.iterdir())


def _hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached right now, or None if it may be (quick TCP probe, no retries)."""
    if _hub_offline():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy decides; let the hub client try
    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=3).close()
    except OSError as err:
        return f"the hub at {url.scheme}://{url.netloc} is unreachable ({err})"
    return None


def _unavailable(what: str, repo_id: str, include: str | None, reason: str) -> SourceUnavailableError:
    """The error for a hub download that cannot happen, saying what to fetch and where to put it."""
    files = f" (files {include})" if include else ""
    command = f"hf download {repo_id}" + (f" --include '{include}'" if include else "")
    return SourceUnavailableError(
        f"{what} must be downloaded from the Hugging Face repo {repo_id!r}{files}, but it is not in the "
        f"local cache {_hub_cache_dir()} and {reason}. Either run once with network access (unset "
        f"HF_HUB_OFFLINE), or on a machine with access run `{command}` with HF_HOME set to a folder, "
        "copy that folder here and point HF_HOME (or HF_HUB_CACHE, for its hub/ subfolder) at it."
    )


def _require_on_hub_or_cached(what: str, repo_id: str, path_in_repo: str, include: str | None) -> None:
    """Raise SourceUnavailableError at once when the files are not cached and the hub is out of reach."""
    if not _in_hub_cache(repo_id, path_in_repo):
        reason = _hub_unreachable_reason()
        if reason is not None:
            raise _unavailable(what, repo_id, include, reason)


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _looks_like_path(name: str | os.PathLike) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub model name ("org/model")."""
    if isinstance(name, os.PathLike):
        return True
    return name in (".", "..") or name.startswith(("/", "~", "./", "../")) or (os.sep != "/" and os.sep in name)


def load_model(name: str | os.PathLike = "gpt2-small", *, device: str = "cpu", process: bool = True) -> Any:
    """A ``HookedTransformer`` from a transformer_lens model name (the hub, through
    ``HookedTransformer.from_pretrained``) or from a local folder, processed as the SAEs expect.

    ``name`` is one of:

    - a transformer_lens model name or alias, e.g. ``"gpt2-small"`` (downloaded from the hub or read
      from the local Hugging Face cache);
    - a folder written by :func:`save_model` (transformer_lens format: ``config.json`` holding the
      ``HookedTransformerConfig`` fields with ``"format": "transformer_lens.HookedTransformer"``, and
      ``model.safetensors`` or ``model.pt``);
    - a Hugging Face model folder (``config.json`` with ``architectures``, weights in
      ``model.safetensors`` or ``pytorch_model.bin``, possibly sharded), converted offline by
      transformer_lens' weight conversion for that architecture.

    A folder holding ``config.json`` wins over a model name of the same spelling. A tokenizer saved in
    the folder (``tokenizer.json``/``tokenizer_config.json``...) is attached; otherwise the model has none.

    ``process`` (default) applies ``from_pretrained``'s default processing, which the SAEs expect:
    LayerNorm folded, writing weights and unembedding centred, value biases folded. A
    transformer_lens folder records whether its weights are processed already, and is never
    processed twice; ``process=False`` returns the weights as the hub or folder holds them.
    """
    path = Path(name).expanduser()
    if _is_model_folder(path):
        return _load_local_model(name, path, device=device, process=process)
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        repo_id = get_official_model_name(str(name))
    except ValueError:
        if path.exists():
            return _load_local_model(name, path, device=device, process=process)  # raises what is missing
        expected = (
            "a transformer_lens folder written by attnrules.sources.save_model, or a Hugging Face model folder"
        )
        if _looks_like_path(name):
            raise FileNotFoundError(f"name={str(name)!r}: no such model folder {path} (expected {expected})") from None
        raise ValueError(
            f"name={str(name)!r} is not a transformer_lens model name or alias "
            "(see transformer_lens.supported_models.OFFICIAL_MODEL_NAMES), e.g. 'gpt2-small', "
            f"nor an existing folder ({expected})"
        ) from None
    what = f"model {name!r}"
    _require_on_hub_or_cached(what, repo_id, "config.json", None)
    try:
        model = HookedTransformer.from_pretrained(
            name,
            device=device,
            fold_ln=process,
            center_writing_weights=process,
            center_unembed=process,
            fold_value_biases=process,
        )
    except OSError as err:  # hub and cache errors (missing files offline, HTTP errors) are OSErrors
        raise _unavailable(what, repo_id, None, f"loading failed: {err}") from err
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Local model folders: transformer_lens format (save_model) and Hugging Face format

TL_FORMAT = "transformer_lens.HookedTransformer"
TL_FORMAT_VERSION = 1
_TL_META_KEYS = ("format", "format_version", "processed")  # not HookedTransformerConfig fields
_TL_WEIGHTS = ("model.safetensors", "model.pt")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Architectures transformer_lens' HookedTransformer cannot run (encoders, encoder-decoders, audio).
_NOT_CAUSAL_LM = ("BertForMaskedLM", "T5ForConditionalGeneration", "HubertModel", "HubertForCTC",
                  "Wav2Vec2Model", "Wav2Vec2ForPreTraining")
# Words transformer_lens' convert_hf_model_config matches in a model *name* (and then skips reading
# config.json): a local folder whose path holds one must be read from a copy under a neutral path.
_NAME_HEURISTICS = ("llama", "gemma")


def _expected_folder() -> str:
    return (
        "a transformer_lens folder written by attnrules.sources.save_model (config.json with "
        f"\"format\": \"{TL_FORMAT}\", and {' or '.join(_TL_WEIGHTS)}) or a Hugging Face model folder "
        "(config.json with \"architectures\", and model.safetensors or pytorch_model.bin)"
    )


def _load_local_model(name: str | os.PathLike, path: Path, *, device: str, process: bool) -> Any:
    """A model from a local folder, in either format; errors name the argument and what was expected."""
    arg = f"name={str(name)!r}"
    if not path.is_dir():
        raise ValueError(f"{arg}: {path} is a file; expected a model folder: {_expected_folder()}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{arg}: {path} is not a model folder: missing config.json; expected {_expected_folder()}")
    data = _read_json(cfg_file)
    if "format" in data:
        if data["format"] != TL_FORMAT:
            raise ValueError(f"{arg}: {cfg_file} has format {data['format']!r}; expected {TL_FORMAT!r}")
        return _load_tl_folder(arg, path, data, device=device, process=process)
    if "architectures" in data:
        return _load_hf_folder(arg, path, data, device=device, process=process)
    raise ValueError(
        f"{arg}: {cfg_file} is neither a transformer_lens config (no \"format\": {TL_FORMAT!r}) nor a "
        f"Hugging Face config (no \"architectures\"); expected {_expected_folder()}"
    )


def _json_value(key: str, value: Any) -> Any:
    """A HookedTransformerConfig field as JSON (dtypes as their names, devices as strings)."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(key, v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(key, v) for k, v in value.items()}
    raise TypeError(f"save_model: config field {key!r} holds a {type(value).__name__}, which has no JSON form")


def _tl_config(arg: str, cfg_file: Path, fields: dict[str, Any], device: str) -> tuple[Any, dict[str, Any]]:
    """A HookedTransformerConfig from the JSON fields with ``seed=None, init_weights=False`` (a seed
    reseeds every RNG in ``__post_init__``; init_weights draws random weights in ``HookedTransformer``),
    and the recorded values of those two fields, to set once the model is built."""
    import dataclasses

    from transformer_lens import HookedTransformerConfig

    known = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"{arg}: {cfg_file} has fields that are not HookedTransformerConfig fields of this "
            f"transformer_lens version: {unknown}"
        )
    fields = dict(fields)
    dtype = fields.get("dtype", "float32")
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        fields["dtype"] = getattr(torch, dtype.removeprefix("torch."))
    else:
        raise ValueError(f"{arg}: {cfg_file}: field 'dtype' is {dtype!r}; expected a torch dtype name, e.g. 'float32'")
    recorded = {"seed": fields.pop("seed", None), "init_weights": fields.pop("init_weights", True)}
    fields.update(device=device, n_devices=1, seed=None, init_weights=False)
    try:
        cfg = HookedTransformerConfig(**fields)
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"{arg}: {cfg_file} is not a valid HookedTransformerConfig: {err}") from err
    return cfg, recorded


def _read_weights(arg: str, path: Path) -> dict[str, Tensor]:
    """A flat state dict from ``model.safetensors`` or ``model.pt``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle, zip and torch errors for a corrupt or foreign file
        raise ValueError(f"{arg}: {path} is not a readable {path.suffix[1:]} state dict: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{arg}: {path} must hold a state dict (parameter name -> tensor), got {type(state).__name__}")
    return dict(state)


def _tokenizer_source(path: Path) -> str | None:
    return str(path.resolve()) if any((path / f).is_file() for f in _TOKENIZER_FILES) else None


def _build_model(arg: str, cfg: Any, tokenizer_dir: str | None, where: Path) -> Any:
    """``HookedTransformer(cfg)`` with the tokenizer read from ``tokenizer_dir`` (never from the hub)."""
    from transformer_lens import HookedTransformer

    recorded = cfg.tokenizer_name
    cfg.tokenizer_name = tokenizer_dir
    try:
        model = HookedTransformer(cfg, move_to_device=False)
    except (OSError, ValueError) as err:
        if tokenizer_dir is None:
            raise
        raise ValueError(f"{arg}: cannot load the tokenizer saved in {where}: {type(err).__name__}: {err}") from err
    model.cfg.tokenizer_name = recorded
    return model


def _load_tl_folder(arg: str, path: Path, data: dict[str, Any], *, device: str, process: bool) -> Any:
    from attnrules.sources.model import _processing_problems, process_model

    cfg_file = path / "config.json"
    if data.get("format_version") != TL_FORMAT_VERSION:
        raise ValueError(
            f"{arg}: {cfg_file} has format_version {data.get('format_version')!r}; this version of attnrules "
            f"reads format_version {TL_FORMAT_VERSION}"
        )
    processed = data.get("processed")
    if not isinstance(processed, bool):
        raise ValueError(f"{arg}: {cfg_file}: field 'processed' must be true or false, got {processed!r}")
    found = [f for f in _TL_WEIGHTS if (path / f).is_file()]
    if not found:
        raise FileNotFoundError(f"{arg}: {path} holds no weights: expected {' or '.join(_TL_WEIGHTS)} next to config.json")
    if len(found) > 1:
        raise ValueError(f"{arg}: {path} holds both {' and '.join(found)}; expected exactly one")
    weights = path / found[0]
    cfg, recorded = _tl_config(arg, cfg_file, {k: v for k, v in data.items() if k not in _TL_META_KEYS}, device)
    state = _read_weights(arg, weights)
    model = _build_model(arg, cfg, _tokenizer_source(path), path)
    for key, value in recorded.items():
        setattr(model.cfg, key, value)
    own = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in own if k not in state and k not in buffers]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {list(v.shape)} (config: {list(own[k].shape)})" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{arg}: the weights in {weights} do not fit the model {cfg_file} describes: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    model.move_model_modules_to_device()
    if processed:
        problems = _processing_problems(model)
        if problems:
            raise ValueError(f"{arg}: {cfg_file} says processed=true, but the weights are not: {'; '.join(problems)}")
    elif process:
        process_model(model)
    return model.eval()


def _neutral_config_copy(arg: str, cfg_file: Path, data: dict[str, Any], workdir: str) -> str:
    """A copy of an HF ``config.json`` under a path transformer_lens reads by its content, not its name."""
    folder = Path(workdir) / "model"
    if any(word in str(folder).lower() for word in _NAME_HEURISTICS):
        raise ValueError(
            f"{arg}: the temporary folder {folder} holds one of {list(_NAME_HEURISTICS)}, which makes "
            "transformer_lens guess the architecture from the path; set TMPDIR to another folder"
        )
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(data))
    return str(folder)


def _load_hf_folder(arg: str, path: Path, data: dict[str, Any], *, device: str, process: bool) -> Any:
    """A Hugging Face model folder, converted offline by transformer_lens and processed as from_pretrained does."""
    import tempfile

    from transformer_lens import loading_from_pretrained as loading
    from transformer_lens.utilities import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_file = path / "config.json"
    archs = data["architectures"]
    if not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
        raise ValueError(f"{arg}: {cfg_file}: field 'architectures' must be a non-empty list of names, got {archs!r}")
    arch = archs[0]
    if arch in _NOT_CAUSAL_LM:
        raise ValueError(f"{arg}: {cfg_file} describes a {arch}; expected a decoder-only causal language model")
    if not any((path / f).is_file() for f in _HF_WEIGHTS):
        raise FileNotFoundError(f"{arg}: {path} holds no weights; expected one of {', '.join(_HF_WEIGHTS)}")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises ValueError/KeyError/OSError for unknown or broken configs
        raise ValueError(f"{arg}: transformers cannot read {cfg_file}: {type(err).__name__}: {err}") from err
    if arch == "GPT2LMHeadModel" and "n_ctx" not in data:  # transformers >= 5 no longer writes it
        data = {**data, "n_ctx": hf_config.n_positions}
    with tempfile.TemporaryDirectory(prefix="attnrules-hf-config-") as workdir:
        copy = _neutral_config_copy(arg, cfg_file, data, workdir)
        try:
            cfg = loading.get_pretrained_model_config(
                copy, hf_cfg=hf_config.to_dict(), fold_ln=process, device=device, dtype=torch.float32
            )
        except NotImplementedError as err:
            raise ValueError(
                f"{arg}: transformer_lens cannot convert the architecture {arch!r} of {cfg_file}: {err}"
            ) from err
        except (AttributeError, KeyError, TypeError, ValueError, AssertionError) as err:
            raise ValueError(
                f"{arg}: transformer_lens cannot convert the config {cfg_file} ({arch}): {type(err).__name__}: {err}"
            ) from err
    cfg.model_name = path.resolve().name
    cfg.tokenizer_name = _tokenizer_source(path)  # not the temporary copy's path
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, local_files_only=True, dtype=torch.float32)
    except Exception as err:  # missing or corrupt weight files, unknown architectures
        raise ValueError(f"{arg}: transformers cannot load the model in {path}: {type(err).__name__}: {err}") from err
    hf_model.eval().requires_grad_(False)
    try:
        state = loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=torch.float32)
    except (NotImplementedError, ValueError, AttributeError, KeyError) as err:
        raise ValueError(
            f"{arg}: transformer_lens cannot convert the weights in {path} ({arch}): {type(err).__name__}: {err}"
        ) from err
    del hf_model
    # The processing from_pretrained applies, with its exceptions.
    fold_ln = center_writing_weights = center_unembed = fold_value_biases = process
    if cfg.positional_embedding_type == "shortformer":
        fold_ln = center_writing_weights = center_unembed = False
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        fold_ln = center_writing_weights = False
    if softcap_enabled(cfg.output_logits_soft_cap):
        center_unembed = False
    model = _build_model(arg, cfg, _tokenizer_source(path), path)
    model.load_and_process_state_dict(
        state,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )
    model.move_model_modules_to_device()
    return model.eval()


def save_model(model: HookedTransformer, folder: str | os.PathLike, *, weights: str = "safetensors") -> Path:
    """Write ``model`` (a ``HookedTransformer``) to a new or empty ``folder`` that :func:`load_model` reads.

    The folder holds ``config.json`` (every ``HookedTransformerConfig`` field, dtypes by name, plus
    ``"format": "transformer_lens.HookedTransformer"``, ``"format_version": 1`` and ``"processed"``:
    whether the weights already have ``from_pretrained``'s default processing), the state dict as
    ``model.safetensors`` (``weights="safetensors"``) or ``model.pt`` (``weights="pt"``, a torch
    state dict), and the model's tokenizer, if it has one (``tokenizer.save_pretrained``).
    Returns the folder.
    """
    from attnrules.sources.model import _processing_problems

    if weights not in ("safetensors", "pt"):
        raise ValueError(f"weights must be 'safetensors' or 'pt', got {weights!r}")
    for attr in ("cfg", "state_dict", "blocks"):
        if not hasattr(model, attr):
            raise TypeError(f"model must be a transformer_lens HookedTransformer; {type(model).__name__} has no {attr}")
    folder = Path(folder).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"folder={str(folder)!r} exists and is not an empty folder; save_model writes a new folder")
    cfg = {k: _json_value(k, v) for k, v in model.cfg.to_dict().items()}
    clash = sorted(set(cfg) & set(_TL_META_KEYS))
    if clash:
        raise ValueError(f"save_model: the model's config has fields {clash}, which the folder format reserves")
    config = {"format": TL_FORMAT, "format_version": TL_FORMAT_VERSION, "processed": not _processing_problems(model), **cfg}
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        state[key] = tensor
    folder.mkdir(parents=True, exist_ok=True)
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(state, folder / "model.safetensors")
    else:
        torch.save(state, folder / "model.pt")
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# --------------------------------------------------------------------------------------------------
# sae_lens SAEs (input SAEs, layer-level hook_z SAEs)


def _load_sae_lens(source: str | os.PathLike, sae_id: str | None, device: str, what: str) -> Any:
    """A sae_lens SAE from a local folder (cfg.json + sae_weights.safetensors) or a sae_lens release."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import (
        get_pretrained_saes_directory,
        get_repo_id_and_folder_name,
    )

    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{what}: {path} is a file; expected a sae_lens SAE folder holding {', '.join(_SAE_FILES)}"
            )
        missing = [f for f in _SAE_FILES if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{what}: {path} is not a sae_lens SAE folder: missing {', '.join(missing)} "
                f"(expected {', '.join(_SAE_FILES)}, as written by SAE.save_model)"
            )
        try:
            sae = SAE.load_from_disk(path, device=device)
        except Exception as err:  # sae_lens/safetensors raise many kinds for a corrupt folder
            raise ValueError(
                f"{what}: cannot load the sae_lens SAE folder {path}: {type(err).__name__}: {err}"
            ) from err
    else:
        releases = get_pretrained_saes_directory()
        if source not in releases:
            raise FileNotFoundError(
                f"{what}: {str(source)!r} is neither an existing folder nor a sae_lens release "
                "(see sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory())"
            )
        valid = releases[source].saes_map
        if sae_id not in valid:
            shown = ", ".join(list(valid)[:6]) + (", ..." if len(valid) > 6 else "")
            problem = "pass layer= or sae_id= to pick an SAE" if sae_id is None else f"sae_id {sae_id!r} is not"
            raise ValueError(f"{what}: {problem} in release {source!r}; valid ids: {shown}")
        repo_id, folder = get_repo_id_and_folder_name(source, sae_id)
        what = f"{what} (sae_id {sae_id!r})"
        include = folder.removesuffix(".pt") + "*"  # a folder, or a Kissane .pt with its _cfg.json
        _require_on_hub_or_cached(what, repo_id, folder, include)
        try:
            sae = SAE.from_pretrained(source, sae_id, device=device)
        except OSError as err:
            raise _unavailable(what, repo_id, include, f"loading failed: {err}") from err
        if sae.cfg.metadata.neuronpedia_id is None:
            sae.cfg.metadata.neuronpedia_id = releases[source].neuronpedia_id.get(sae_id)
    return sae.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Per-head SAE checkpoints (Kissane format, as used by the reference code)


def find_head_sae_checkpoint(
    directory: str | os.PathLike, layer: int, head: int, prefix: str | None = None
) -> Path:
    """The newest (by ctime) per-head checkpoint ``{prefix}_L{layer}_H{head}_z*.pt`` in ``directory``.

    ``prefix`` is the file-name stem before ``_L{layer}`` (in the authors' files, the model name they
    trained on, e.g. ``"gpt2-small"``); ``None`` (default) matches any stem,
    ``*_L{layer}_H{head}_z*.pt``. Ties in ctime go to the higher ``_v{N}`` version, then the later name.
    """
    _check_int("layer", layer)
    _check_int("head", head)
    if prefix is not None and (not isinstance(prefix, str) or not prefix or any(c in prefix for c in "*?[/")):
        raise ValueError(f"prefix must be a non-empty file-name stem without wildcards or '/', got {prefix!r}")
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"directory={str(directory)!r} is not an existing folder of per-head SAE checkpoints")
    pattern = f"{prefix or '*'}_L{layer}_H{head}_z*.pt"
    found = list(directory.glob(pattern))
    if not found:
        others = sorted(p.name for p in directory.glob("*.pt"))[:5]
        hint = f"; .pt files there include {others}" if others else "; it holds no .pt files"
        raise FileNotFoundError(f"no per-head SAE checkpoint {pattern!r} in {directory}{hint}")

    def newest_key(p: Path) -> tuple[int, int, str]:
        version = _VERSION.search(p.stem)
        return p.stat().st_ctime_ns, int(version.group(1)) if version else -1, p.name

    return max(found, key=newest_key)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"missing config file {path} (expected next to its checkpoint)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _cfg_index(cfg: dict[str, Any], cfg_path: Path, key: str) -> int:
    """The ``layer`` or ``head`` field of a Kissane ``_cfg.json``."""
    if key not in cfg:
        raise ValueError(f"{cfg_path}: missing field {key!r}")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{cfg_path}: field {key!r} must be an int >= 0, got {value!r}")
    return value


def _check_head_cfg(
    cfg: dict[str, Any], cfg_path: Path, layer: int, head: int, model_name: str | None = None
) -> None:
    """Check a Kissane ``_cfg.json`` against the head (and, if given, the model name) it is loaded for."""
    for key, value in (("layer", layer), ("head", head)):
        if key not in cfg:
            raise ValueError(f"{cfg_path}: missing field {key!r}")
        if cfg[key] != value:
            raise ValueError(
                f"{cfg_path}: field {key!r} is {cfg[key]!r}, expected {value!r} for L{layer}H{head} "
                f"(the checkpoint is for L{cfg.get('layer')}H{cfg.get('head')}, but layer={layer}, head={head} were asked for)"
            )
    expected = {"act_name": f"blocks.{layer}.attn.hook_z", "per_head": True, "concat_heads": False}
    for key, value in expected.items():
        if key in cfg and cfg[key] != value:
            raise ValueError(f"{cfg_path}: field {key!r} is {cfg[key]!r}, expected {value!r} for L{layer}H{head}")
    if model_name is not None:
        if "model_name" not in cfg:
            raise ValueError(
                f"{cfg_path}: has no field 'model_name' to check model_name={model_name!r} against; "
                "pass model_name=None to skip the check"
            )
        if cfg["model_name"] != model_name:
            raise ValueError(
                f"{cfg_path}: the checkpoint was trained on model {cfg['model_name']!r} (field 'model_name'), "
                f"but model_name={model_name!r} was asked for; pass model_name={cfg['model_name']!r} or None "
                "to accept it, or prefix= to pick another checkpoint"
            )


def _read_head_state_dict(path: Path, device: str) -> dict[str, Tensor]:
    """The four SAE tensors of a Kissane ``.pt`` state dict (an all-ones ``scaling_factor`` is dropped)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # pickle, zip and torch errors for a corrupt or foreign file
        raise ValueError(f"{path} is not a readable torch state dict: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} must hold a state dict with keys {list(_HEAD_SAE_KEYS)}, got {type(state).__name__}")
    state = dict(state)
    scale = state.pop("scaling_factor", None)
    if scale is not None and not (isinstance(scale, Tensor) and bool((scale == 1).all())):
        raise ValueError(f"{path}: scaling_factor is not all ones, which this loader does not support")
    missing = [k for k in _HEAD_SAE_KEYS if k not in state]
    extra = sorted(set(state) - set(_HEAD_SAE_KEYS))
    if missing or extra:
        raise ValueError(f"{path}: expected keys {list(_HEAD_SAE_KEYS)}; missing {missing}, unexpected {extra}")
    if not all(isinstance(state[k], Tensor) for k in _HEAD_SAE_KEYS) or state["W_enc"].dim() != 2:
        shapes = {k: list(v.shape) if isinstance(v, Tensor) else type(v).__name__ for k, v in state.items()}
        raise ValueError(f"{path}: expected tensors with W_enc of shape [d_head, n_out], got {shapes}")
    return state


def load_head_sae(
    source: str | os.PathLike,
    layer: int | None = None,
    head: int | None = None,
    *,
    prefix: str | None = None,
    model_name: str | None = None,
    n_heads: int | None = None,
    device: str = "cpu",
) -> OutputSAE:
    """A per-head SAE checkpoint (Kissane/REF format: ``{stem}.pt`` state dict + ``{stem}_cfg.json``).

    ``source`` is either a folder, searched for the newest ``{prefix}_L{layer}_H{head}_z*.pt`` (any
    stem unless ``prefix`` is given; see :func:`find_head_sae_checkpoint`), for which ``layer`` and
    ``head`` are required; or the ``.pt`` file itself, whose ``layer`` and ``head`` come from its
    config (and must agree with the arguments when given).

    ``model_name``, when given, must equal the config's ``model_name`` field (the model the SAE was
    trained on); by default it is not checked. The file-name stem is never checked against it.
    """
    if n_heads is not None:
        _check_int("n_heads", n_heads, low=1)
    for name, value in (("layer", layer), ("head", head)):
        if value is not None:
            _check_int(name, value, below=n_heads if name == "head" else None,
                       what=f"n_heads={n_heads}, " if name == "head" else "")
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".pt":
            raise ValueError(
                f"source={str(source)!r} is a file but not a .pt checkpoint; expected a per-head SAE "
                "checkpoint {stem}.pt (with {stem}_cfg.json beside it) or a folder of them"
            )
        if prefix is not None:
            raise ValueError(f"prefix={prefix!r} picks a checkpoint in a folder; source={str(source)!r} is a file")
    elif path.is_dir():
        if layer is None or head is None:
            raise ValueError(
                f"layer and head are required when source is a folder ({str(source)!r}); "
                "pass them, or pass the checkpoint's .pt file as source"
            )
        path = find_head_sae_checkpoint(path, layer, head, prefix)
    else:
        raise FileNotFoundError(
            f"source={str(source)!r} is neither an existing folder of per-head SAE checkpoints nor a "
            "checkpoint .pt file"
        )
    cfg_path = path.with_name(f"{path.stem}_cfg.json")
    cfg = _read_json(cfg_path)
    layer = _cfg_index(cfg, cfg_path, "layer") if layer is None else layer
    head = _cfg_index(cfg, cfg_path, "head") if head is None else head
    if n_heads is not None and head >= n_heads:
        raise ValueError(f"{cfg_path}: the checkpoint is for head {head}, out of range for n_heads={n_heads}")
    _check_head_cfg(cfg, cfg_path, layer, head, model_name)
    state = _read_head_state_dict(path, device)
    d_in, n_out = state["W_enc"].shape
    for key, value in (("act_size", d_in), ("dict_size", n_out)):
        if key in cfg and cfg[key] != value:
            raise ValueError(
                f"{cfg_path}: field {key!r} is {cfg[key]!r} but W_enc in {path.name} has shape [{d_in}, {n_out}]"
            )
    try:
        return OutputSAE(
            state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"],
            layer, head, n_heads, d_head=d_in, per_head=True,
        )
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
