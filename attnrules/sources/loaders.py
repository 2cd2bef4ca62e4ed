"""Loaders: the model and the SAEs from the Hugging Face hub (through transformer_lens and sae_lens),
from local sae_lens folders, and the authors' per-head ``.pt`` + ``_cfg.json`` checkpoints.

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
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from attnrules.sources.model import _check_int
from attnrules.sources.saes import _HOOK_Z, InputSAE, OutputSAE

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


def load_model(name: str = "gpt2-small", *, device: str = "cpu") -> Any:
    """``HookedTransformer.from_pretrained`` with the processing the SAEs expect (the TL defaults,
    spelled out): LayerNorm folded, writing weights and unembedding centred, value biases folded."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        repo_id = get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"name={name!r} is not a transformer_lens model name or alias "
            "(see transformer_lens.supported_models.OFFICIAL_MODEL_NAMES), e.g. 'gpt2-small'"
        ) from None
    what = f"model {name!r}"
    _require_on_hub_or_cached(what, repo_id, "config.json", None)
    try:
        model = HookedTransformer.from_pretrained(
            name,
            device=device,
            fold_ln=True,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
        )
    except OSError as err:  # hub and cache errors (missing files offline, HTTP errors) are OSErrors
        raise _unavailable(what, repo_id, None, f"loading failed: {err}") from err
    return model.eval()


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


def load_input_sae(
    source: str | os.PathLike = "gpt2-small-res-jb",
    *,
    layer: int | None = None,
    sae_id: str | None = None,
    device: str = "cpu",
) -> InputSAE:
    """An input SAE from a local sae_lens folder or a sae_lens release.

    For a release, ``sae_id`` defaults to ``blocks.{layer}.hook_resid_pre`` (the res-jb ids); for a
    folder, ``layer`` defaults to the layer in the SAE's hook name.
    """
    if layer is not None:
        _check_int("layer", layer)
    if sae_id is None and layer is not None:
        sae_id = f"blocks.{layer}.hook_resid_pre"
    sae = _load_sae_lens(source, sae_id, device, f"input SAE {str(source)!r}")
    return InputSAE.from_sae_lens(sae, layer)


def load_layer_z_sae(
    source: str | os.PathLike,
    *,
    layer: int,
    head: int,
    n_heads: int,
    d_head: int,
    sae_id: str | None = None,
    device: str = "cpu",
) -> OutputSAE:
    """A layer-level ``hook_z`` SAE over the concatenated heads (sae_lens folder or release), sliced to one head.

    For a release, ``sae_id`` defaults to ``blocks.{layer}.hook_z`` (the ids of ``gpt2-small-hook-z-kk``).
    Must be a standard ReLU SAE (``relu((z - b_dec) @ W_enc + b_enc)``) with ``d_in = n_heads * d_head``.
    """
    _check_int("layer", layer)
    _check_int("n_heads", n_heads, low=1)
    _check_int("head", head, below=n_heads, what=f"n_heads={n_heads}, ")
    _check_int("d_head", d_head, low=1)
    what = f"hook_z SAE {str(source)!r}"
    sae = _load_sae_lens(source, sae_id or f"blocks.{layer}.hook_z", device, what)
    cfg = sae.cfg
    if cfg.architecture() != "standard" or not cfg.apply_b_dec_to_input or cfg.normalize_activations != "none":
        raise ValueError(
            f"{what}: expected a standard ReLU SAE with apply_b_dec_to_input and no activation normalisation, "
            f"got architecture {cfg.architecture()!r}, apply_b_dec_to_input={cfg.apply_b_dec_to_input}, "
            f"normalize_activations={cfg.normalize_activations!r}"
        )
    hook_name = cfg.metadata.hook_name
    match = _HOOK_Z.fullmatch(hook_name or "")
    if hook_name is not None and (match is None or int(match.group(1)) != layer):
        raise ValueError(f"{what}: its hook_name is {hook_name!r}, expected 'blocks.{layer}.attn.hook_z'")
    if cfg.metadata.hook_head_index is not None:
        raise ValueError(
            f"{what}: reads only head {cfg.metadata.hook_head_index} (hook_head_index); expected a layer-level SAE"
        )
    if cfg.d_in != n_heads * d_head:
        raise ValueError(
            f"{what}: d_in is {cfg.d_in}, expected n_heads*d_head = {n_heads}*{d_head} = {n_heads * d_head}"
        )
    weights = (sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach(), sae.b_dec.detach())
    return OutputSAE(*weights, layer, head, n_heads, d_head, per_head=False)


# --------------------------------------------------------------------------------------------------
# Per-head SAE checkpoints (Kissane format, as used by the reference code)


def find_head_sae_checkpoint(
    directory: str | os.PathLike, layer: int, head: int, model_name: str = "gpt2-small"
) -> Path:
    """The newest (by ctime) ``{model_name}_L{layer}_H{head}_z*.pt`` in ``directory``.

    Ties in ctime go to the higher ``_v{N}`` version, then the later name.
    """
    _check_int("layer", layer)
    _check_int("head", head)
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"directory={str(directory)!r} is not an existing folder of per-head SAE checkpoints")
    pattern = f"{model_name}_L{layer}_H{head}_z*.pt"
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


def _check_head_cfg(cfg: dict[str, Any], cfg_path: Path, layer: int, head: int, model_name: str) -> None:
    """Check a Kissane ``_cfg.json`` against the requested head."""
    for key in ("layer", "head"):
        if key not in cfg:
            raise ValueError(f"{cfg_path}: missing field {key!r}")
    expected = {
        "layer": layer,
        "head": head,
        "act_name": f"blocks.{layer}.attn.hook_z",
        "model_name": model_name,
        "per_head": True,
        "concat_heads": False,
    }
    for key, value in expected.items():
        if key in cfg and cfg[key] != value:
            raise ValueError(f"{cfg_path}: field {key!r} is {cfg[key]!r}, expected {value!r} for L{layer}H{head}")


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
    directory: str | os.PathLike,
    layer: int,
    head: int,
    *,
    model_name: str = "gpt2-small",
    n_heads: int | None = None,
    device: str = "cpu",
) -> OutputSAE:
    """The newest per-head SAE checkpoint for (layer, head) in ``directory`` (Kissane ``.pt`` + ``_cfg.json``)."""
    if n_heads is not None:
        _check_int("n_heads", n_heads, low=1)
        _check_int("head", head, below=n_heads, what=f"n_heads={n_heads}, ")
    path = find_head_sae_checkpoint(directory, layer, head, model_name)
    cfg_path = path.with_name(f"{path.stem}_cfg.json")
    cfg = _read_json(cfg_path)
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
