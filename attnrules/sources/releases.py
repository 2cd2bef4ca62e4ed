"""Pretrained SAE releases and their own file formats, loaded through sae_lens's own loaders.

One entry point, :func:`load_sae`, gives the sae_lens ``SAE`` object for

- a **sae_lens release id** (``pretrained_saes.yaml``), with its ``sae_id`` given separately, in the
  form ``"release/sae_id"`` (release ids hold no ``/``), or derived from a layer
  (:func:`default_sae_id`): Gemma Scope (``gemma-scope-2b-pt-res``, ``gemma-scope-2b-pt-att``, their
  ``-canonical`` twins, ...), Llama Scope (``llama_scope_lxr_8x``, ``llama_scope_lxr_32x``, ...),
  Kissane's ``gpt2-small-hook-z-kk``, Bloom's ``gpt2-small-res-jb``, ... Loaded by
  ``SAE.from_pretrained`` (the release's own conversion function), offline from the Hugging Face
  cache; when a file the release needs is not cached and the hub is out of reach, a
  :class:`~attnrules.sources.SourceUnavailableError` names the repo, the files and the
  ``hf download`` command, at once;
- a **local folder or file** in a release's own format, read by the same sae_lens loader functions,
  their downloads answered from the local folder instead of the hub:

  ========================  ===================================================================
  sae_lens                  ``cfg.json`` + ``sae_weights.safetensors`` (``SAE.save_model``)
  Gemma Scope               ``.../layer_<L>/width_<W>/average_l0_<M>/params.npz`` (the folder or
                            the file); the release (model size; ``res``/``att``/``mlp``) from a
                            path component such as ``gemma-scope-2b-pt-att`` or ``release=``
  Llama Scope               ``<folder>/hyperparams.json`` + ``<folder>/checkpoints/final.safetensors``
  Kissane layer-level       ``<stem>.pt`` state dict + ``<stem>_cfg.json`` (``gpt2-small-hook-z-kk``)
  ========================  ===================================================================

:func:`load_input_sae` and :func:`load_output_sae` wrap the SAE in attnrules' containers, checking
the hook it reads; a layer-level ``hook_z`` SAE (``d_in = n_heads * d_head``) is sliced to one head.
Under grouped-query attention transformer_lens's ``hook_z`` still has one slot per *query* head, so
``n_heads`` and ``head`` count query heads.

Dimensions: ``SAE.from_pretrained`` on a Gemma Scope release takes ``d_in`` from the model named in
the repo id (2b: 2304 on the residual stream, 2048 = 8 heads x 256 on ``hook_z``) and ``d_sae`` from
the ``width_*`` folder, so the cached ``params.npz`` must have the release's full dimensions. A local
Gemma Scope folder takes both from the shapes in its ``params.npz``. Llama Scope and Kissane files
carry their own dimensions (``hyperparams.json``, ``_cfg.json``).
"""
from __future__ import annotations

import inspect
import os
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from attnrules.sources.loaders import (
    _hub_unreachable_reason,
    _in_hub_cache,
    _load_sae_lens,
    _read_json,
    _unavailable,
    load_head_sae,
)
from attnrules.sources.model import _check_int
from attnrules.sources.saes import InputSAE, OutputSAE

DEFAULT_INPUT_RELEASE = "gpt2-small-res-jb"
_GEMMA_REPO = re.compile(r"gemma-scope-(?:2b|9b|27b)-(?:pt|it)-(?:res|att|mlp)")
_GEMMA_FOLDER = re.compile(r"layer_\d+|embedding")
_RESID_PRE = re.compile(r"blocks\.(\d+)\.hook_resid_pre")
_RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")
_HOOK_Z = re.compile(r"blocks\.(\d+)\.attn\.hook_z")
_FORMATS = (
    "a sae_lens release id (with sae_id=, or as 'release/sae_id'), or a local folder or file: a sae_lens "
    "folder (cfg.json + sae_weights.safetensors), a Gemma Scope folder (params.npz), a Llama Scope folder "
    "(hyperparams.json + checkpoints/final.safetensors) or a Kissane layer-level checkpoint (.pt + _cfg.json)"
)


# --------------------------------------------------------------------------------------------------
# Release ids


def _directory() -> dict[str, Any]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def parse_release(source: str | os.PathLike, sae_id: str | None = None) -> tuple[str, str | None] | None:
    """``(release, sae_id)`` when ``source`` names a sae_lens release, as ``"release"`` (``sae_id`` as
    given) or ``"release/sae_id"`` (``sae_id`` must then be None or the same); None otherwise."""
    if isinstance(source, os.PathLike) or not isinstance(source, str):
        return None
    releases = _directory()
    if source in releases:
        return source, sae_id
    release, sep, rest = source.partition("/")
    if sep and rest and release in releases:
        if sae_id is not None and sae_id != rest:
            raise ValueError(f"{source!r} names sae_id {rest!r} of release {release!r}, but sae_id={sae_id!r} was given")
        return release, rest
    return None


def default_sae_id(release: str, layer: int, kind: str) -> str:
    """The sae_id of ``release`` that explains layer ``layer``'s head: ``kind="input"``, the SAE on the
    residual stream entering the layer; ``kind="output"``, the SAE on its ``hook_z``.

    ============================  =============================  ================================
    release (conversion)          input (``resid_pre`` of L)     output (``hook_z`` of L)
    ============================  =============================  ================================
    Gemma Scope ``*-canonical``   ``layer_{L-1}/width_16k/canonical`` (``resid_post`` of L-1)
                                                                 ``layer_{L}/width_16k/canonical``
    Llama Scope ``llama_scope_lxr_{F}x``  ``l{L-1}r_{F}x``       (none: Llama Scope has no ``hook_z`` SAEs)
    others (sae_lens, Kissane)    ``blocks.{L}.hook_resid_pre``  ``blocks.{L}.hook_z``
    ============================  =============================  ================================

    The id is returned whether or not the release holds it (the loader says so). Releases with several
    SAEs per layer (Gemma Scope's non-canonical ``average_l0_*``) have no default: pass the sae_id.
    """
    if kind not in ("input", "output"):
        raise ValueError(f"kind must be 'input' or 'output', got {kind!r}")
    _check_int("layer", layer)
    info = _directory().get(release)
    conversion = getattr(info, "conversion_func", None)
    if conversion == "gemma_2":
        if kind == "input" and layer == 0:
            raise ValueError(
                f"release {release!r}: no Gemma Scope SAE reads the residual stream entering layer 0 "
                "(its residual SAEs read blocks.<L>.hook_resid_post, the stream entering layer L+1; its "
                "embedding SAEs read hook_embed, before Gemma's sqrt(d_model) scaling); pick a layer >= 1"
            )
        return f"layer_{layer - 1 if kind == 'input' else layer}/width_16k/canonical"
    if conversion == "llama_scope" and kind == "input":
        if layer == 0:
            raise ValueError(f"release {release!r}: Llama Scope's residual SAEs read blocks.<L>.hook_resid_post, "
                             "the stream entering layer L+1; none reads the stream entering layer 0")
        factor = release.rsplit("_", 1)[-1]
        return f"l{layer - 1}r_{factor}"
    return f"blocks.{layer}.hook_resid_pre" if kind == "input" else f"blocks.{layer}.hook_z"


def release_files(release: str, sae_id: str) -> tuple[str, list[str]]:
    """``(repo_id, files)``: the Hugging Face repo and the files in it that ``SAE.from_pretrained``
    reads for this SAE (per the release's conversion function; optional files left out)."""
    from sae_lens.loading.pretrained_sae_loaders import get_conversion_loader_name
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    conversion = get_conversion_loader_name(release)
    files = {
        "sae_lens": [f"{folder}/cfg.json", f"{folder}/sae_weights.safetensors"],
        "connor_rob_hook_z": [folder, folder.split(".pt")[0] + "_cfg.json"],
        "gemma_2": [f"{folder}/params.npz"],
        "llama_scope": [f"{folder}/hyperparams.json", f"{folder}/checkpoints/final.safetensors"],
    }.get(conversion, [folder])
    return repo_id, files


def _load_release(release: str, sae_id: str | None, device: str, what: str) -> Any:
    """``SAE.from_pretrained(release, sae_id)``, failing at once when a file is neither cached nor
    downloadable."""
    from sae_lens import SAE

    info = _directory()[release]
    valid = info.saes_map
    if sae_id not in valid:
        layer_of = re.match(r"(layer_\d+/|l\d+[a-z]_|blocks\.\d+\.)", sae_id or "")
        near = [i for i in valid if layer_of and i.startswith(layer_of.group(1))] or list(valid)
        shown = ", ".join(near[:6]) + (", ..." if len(near) > 6 else "")
        problem = "pass layer= or sae_id= to pick an SAE" if sae_id is None else f"sae_id {sae_id!r} is not"
        raise ValueError(f"{what}: {problem} in release {release!r}; valid ids: {shown}")
    repo_id, files = release_files(release, sae_id)
    what = f"{what} (sae_id {sae_id!r})"
    include = valid[sae_id].removesuffix(".pt") + "*"  # the SAE's folder, or a Kissane .pt with its _cfg.json
    missing = [f for f in files if not _in_hub_cache(repo_id, f)]
    if missing:
        reason = _hub_unreachable_reason()
        if reason is not None:
            raise _unavailable(f"{what}, whose files {', '.join(missing)}", repo_id, include, reason)
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device)
    except OSError as err:  # hub and cache errors (a file missing offline, HTTP errors) are OSErrors
        raise _unavailable(f"{what}, whose files {', '.join(files)}", repo_id, include, f"loading failed: {err}") from err
    except (RuntimeError, KeyError, ValueError) as err:  # files of other shapes or keys than the release's
        full = (" (SAE.from_pretrained takes a Gemma Scope SAE's d_in from the model in the repo id and d_sae "
                "from its width_* folder: the file must have the release's full dimensions)"
                if info.conversion_func == "gemma_2" else "")
        raise ValueError(f"{what}: sae_lens cannot load the files {', '.join(files)} of repo {repo_id!r}{full}: "
                         f"{type(err).__name__}: {str(err).strip().splitlines()[0]}") from err
    if sae.cfg.metadata.neuronpedia_id is None:
        sae.cfg.metadata.neuronpedia_id = info.neuronpedia_id.get(sae_id)
    return sae


# --------------------------------------------------------------------------------------------------
# Local files in a release's own format, read by sae_lens's own loader functions

_LOCAL_HUB = threading.Lock()


@contextmanager
def _downloads_from(root: Path) -> Iterator[None]:
    """While inside, the hub downloads of sae_lens's release loaders are answered from ``root``
    (``root/subfolder/filename``; a missing file raises ``LocalEntryNotFoundError``, which the
    loaders treat as an absent optional file). Nothing is fetched; one caller at a time."""
    import sae_lens.loading.pretrained_sae_loaders as loaders
    from huggingface_hub.errors import LocalEntryNotFoundError

    def local_file(repo_id: str, filename: str, subfolder: str | None = None, **_: Any) -> str:
        path = root / (subfolder or "") / filename
        if not path.is_file():
            raise LocalEntryNotFoundError(f"missing file {path}")
        return str(path)

    with _LOCAL_HUB:
        saved = loaders.hf_hub_download
        loaders.hf_hub_download = local_file
        try:
            yield
        finally:
            loaders.hf_hub_download = saved


def _from_disk(path: Path, loader: Callable[..., tuple], root: Path, folder: str, repo_id: str,
               overrides: dict[str, Any], device: str) -> Any:
    """``SAE.load_from_disk`` with a release loader (``loader(repo_id, folder, ...)``) reading ``root/folder``."""
    from sae_lens import SAE

    def converter(_path: Any, device: str, cfg_overrides: dict[str, Any] | None = None) -> tuple:
        with _downloads_from(root):
            cfg, state, *_ = loader(repo_id, folder, device, False, {**overrides, **(cfg_overrides or {})})
        return cfg, state

    return SAE.load_from_disk(path, device=device, converter=converter)


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The array shapes in an ``.npz`` file, read from the headers only."""
    shapes = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            with z.open(name) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shapes[name.removesuffix(".npy")] = tuple(read(f)[0])
    return shapes


def _load_gemma_scope(folder: Path, release: str | None, device: str, what: str) -> Any:
    """A Gemma Scope folder (``params.npz``) through ``gemma_2_sae_huggingface_loader``."""
    from sae_lens.loading.pretrained_sae_loaders import gemma_2_sae_huggingface_loader

    if release is not None:
        info = _directory().get(release)
        if info is None or info.conversion_func != "gemma_2":
            raise ValueError(f"{what}: release={release!r} is not a Gemma Scope (Gemma 2) release of sae_lens")
        repo_id = info.repo_id
    else:
        match = _GEMMA_REPO.search(str(folder))
        if match is None:
            raise ValueError(
                f"{what}: {folder} holds a Gemma Scope params.npz, but no component of its path names the "
                "release (e.g. gemma-scope-2b-pt-att), which says the model and the hook the SAE reads; "
                "pass release= (e.g. 'gemma-scope-2b-pt-res')"
            )
        repo_id = f"google/{match.group(0)}"
    parts = folder.parts
    start = next((i for i, p in enumerate(parts) if _GEMMA_FOLDER.fullmatch(p)), None)
    if start is None:
        raise ValueError(f"{what}: {folder} is not named as a Gemma Scope folder, layer_<L>/width_<W>/average_l0_<M> "
                         "(the layer comes from that name)")
    try:
        shapes = _npz_shapes(folder / "params.npz")
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{what}: {folder / 'params.npz'} is not a readable .npz file: {err}") from err
    enc = shapes.get("W_enc", shapes.get("w_enc"))
    if enc is None or len(enc) != 2:
        raise ValueError(f"{what}: {folder / 'params.npz'} has no 2-D W_enc; arrays: {shapes}")
    overrides = {"d_in": enc[0], "d_sae": enc[1], "dtype": "float32"}
    return _from_disk(folder, gemma_2_sae_huggingface_loader, Path(*parts[:start]), "/".join(parts[start:]),
                      repo_id, overrides, device)


def _load_llama_scope(folder: Path, device: str) -> Any:
    """A Llama Scope folder through ``llama_scope_sae_huggingface_loader``, with its activation-norm
    scaling folded into the weights as ``SAE.from_pretrained`` does (the loader scales the threshold
    to match)."""
    from sae_lens.loading.pretrained_sae_loaders import llama_scope_sae_huggingface_loader

    sae = _from_disk(folder, llama_scope_sae_huggingface_loader, folder.parent, folder.name, "local",
                     {"dtype": "float32"}, device)
    hyper = _read_json(folder / "hyperparams.json")
    sae.fold_activation_norm_scaling_factor(hyper["d_model"] ** 0.5 / hyper["dataset_average_activation_norm"]["in"])
    return sae


def _load_kissane_layer(file: Path, device: str) -> Any:
    """A Kissane layer-level ``.pt`` + ``_cfg.json`` through ``connor_rob_hook_z_huggingface_loader``."""
    from sae_lens.loading.pretrained_sae_loaders import connor_rob_hook_z_huggingface_loader

    return _from_disk(file, connor_rob_hook_z_huggingface_loader, file.parent, file.name, "local", {}, device)


def _kissane_cfg(file: Path) -> dict[str, Any]:
    return _read_json(file.with_name(f"{file.stem}_cfg.json"))


def _is_per_head_kissane(file: Path) -> bool:
    cfg = _kissane_cfg(file)
    return bool(cfg.get("per_head")) or ("head" in cfg and not cfg.get("concat_heads", False))


def _load_local(path: Path, release: str | None, device: str, what: str) -> Any:
    """A local folder or file, in whichever release format it is."""
    try:
        return _load_local_format(path, release, device, what)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # sae_lens, numpy, torch and safetensors raise many kinds for a corrupt or foreign file
        raise ValueError(f"{what}: cannot load {path}: {type(err).__name__}: {err}") from err


def _load_local_format(path: Path, release: str | None, device: str, what: str) -> Any:
    if path.is_file():
        if path.name == "params.npz":
            path = path.parent
        elif path.name == "final.safetensors" and path.parent.name == "checkpoints":
            path = path.parent.parent
        elif path.name in ("cfg.json", "sae_weights.safetensors"):
            path = path.parent
        elif path.suffix == ".pt":
            if _is_per_head_kissane(path):
                raise ValueError(f"{what}: {path} is a per-head checkpoint (its _cfg.json names a head); "
                                 "load it as an output SAE (load_output_sae / load_head_sae, --sae-out)")
            return _load_kissane_layer(path, device)
        else:
            raise ValueError(f"{what}: {path} is a file; expected a sae_lens SAE folder holding cfg.json, "
                             f"sae_weights.safetensors, or {_FORMATS}")
    if (path / "params.npz").is_file():
        return _load_gemma_scope(path, release, device, what)
    if (path / "hyperparams.json").is_file():
        if not (path / "checkpoints" / "final.safetensors").is_file():
            raise FileNotFoundError(f"{what}: {path} is a Llama Scope folder without checkpoints/final.safetensors")
        return _load_llama_scope(path, device)
    return _load_sae_lens(path, None, device, what)  # a sae_lens folder; says what is missing otherwise


# --------------------------------------------------------------------------------------------------
# Public loaders


def load_sae(
    source: str | os.PathLike,
    sae_id: str | None = None,
    *,
    release: str | None = None,
    device: str = "cpu",
) -> Any:
    """The sae_lens ``SAE`` named by ``source``: a release id (``sae_id`` given, or ``"release/sae_id"``)
    or a local folder or file in a release's format (see the module docstring). ``release`` tells a
    local Gemma Scope folder which release it comes from when its path does not. Returned in eval
    mode, without gradients."""
    return _load(source, sae_id, release, device, f"SAE {str(source)!r}")[0]


def _load(source: str | os.PathLike, sae_id: str | None, release: str | None, device: str, what: str,
          default: Callable[[str], str] | None = None) -> tuple[Any, str | None, str | None]:
    """(the SAE in eval mode without gradients, its release, its sae_id)."""
    path = Path(source).expanduser()
    if path.exists():
        if sae_id is not None:
            raise ValueError(f"{what}: sae_id={sae_id!r} picks an SAE in a release, but {path} is a local folder or file")
        return _load_local(path.absolute(), release, device, what).eval().requires_grad_(False), release, None
    named = parse_release(source, sae_id)
    if named is None:
        raise FileNotFoundError(
            f"{what}: {str(source)!r} is neither an existing folder nor a sae_lens release "
            "(see sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory()); expected "
            f"{_FORMATS}"
        )
    release_id, sae_id = named
    if sae_id is None and default is not None:
        sae_id = default(release_id)
    return _load_release(release_id, sae_id, device, what).eval().requires_grad_(False), release_id, sae_id


def input_layer(hook_name: str | None) -> int | None:
    """The layer whose entering residual stream ``hook_name`` reads: ``blocks.{L}.hook_resid_pre`` -> L,
    ``blocks.{L}.hook_resid_post`` -> L+1; None for any other hook."""
    for pattern, shift in ((_RESID_PRE, 0), (_RESID_POST, 1)):
        match = pattern.fullmatch(hook_name or "")
        if match:
            return int(match.group(1)) + shift
    return None


def load_input_sae(
    source: str | os.PathLike = DEFAULT_INPUT_RELEASE,
    *,
    layer: int | None = None,
    sae_id: str | None = None,
    release: str | None = None,
    device: str = "cpu",
) -> InputSAE:
    """An input SAE (on the residual stream entering ``layer``) from a release or a local folder/file.

    For a release, ``sae_id`` defaults to :func:`default_sae_id` (``blocks.{L}.hook_resid_pre`` for
    the res-jb ids; ``layer_{L-1}/width_16k/canonical`` on Gemma Scope, ``l{L-1}r_{F}x`` on Llama Scope,
    whose residual SAEs read the stream *leaving* the layer before). The SAE's hook must be
    ``blocks.{L}.hook_resid_pre`` or ``blocks.{L-1}.hook_resid_post`` (the same activations); ``layer``
    defaults to that L. An SAE on another hook (attention or MLP output, embeddings) is refused.
    """
    if layer is not None:
        _check_int("layer", layer)
    what = f"input SAE {str(source)!r}"
    default = (lambda r: default_sae_id(r, layer, "input")) if layer is not None else None
    sae, release, sae_id = _load(source, sae_id, release, device, what, default)
    hook = sae.cfg.metadata.hook_name
    reads = input_layer(hook)
    if reads is None and (layer is None or (hook or "").startswith(("blocks.", "hook_"))):
        raise ValueError(
            f"{what}: its hook_name {hook!r} is not the residual stream entering a layer "
            "(blocks.<L>.hook_resid_pre, or blocks.<L-1>.hook_resid_post)"
        )
    if reads is not None and layer is not None and reads != layer:
        raise ValueError(f"layer={layer} does not match the SAE's hook_name {hook!r}")
    layer = reads if layer is None else layer
    if "release" not in inspect.signature(InputSAE.from_sae_lens).parameters:  # until the containers take them
        return InputSAE.from_sae_lens(sae, layer)
    return InputSAE.from_sae_lens(sae, layer, release=release, sae_id=sae_id)


def load_output_sae(
    source: str | os.PathLike,
    *,
    layer: int,
    head: int,
    n_heads: int,
    d_head: int,
    sae_id: str | None = None,
    release: str | None = None,
    device: str = "cpu",
) -> OutputSAE:
    """An output SAE for head ``head`` of layer ``layer``: a ``hook_z`` SAE from a release or a local
    folder/file, or a per-head Kissane checkpoint (``.pt`` whose ``_cfg.json`` names a head).

    A layer-level SAE reads the heads' ``z`` concatenated head-major (``d_in = n_heads * d_head``) and
    is sliced to ``head``. ``n_heads`` is the model's number of *query* heads: under grouped-query
    attention transformer_lens's ``hook_z`` has one slot per query head (shared key/value heads are
    repeated), so ``head`` is a query head. For a release, ``sae_id`` defaults to
    ``blocks.{layer}.hook_z`` (``gpt2-small-hook-z-kk``) or ``layer_{layer}/width_16k/canonical``
    (Gemma Scope ``-att-canonical``). Any architecture sae_lens loads (ReLU, JumpReLU, TopK, ...).
    """
    _check_int("layer", layer)
    _check_int("n_heads", n_heads, low=1)
    _check_int("head", head, below=n_heads, what=f"n_heads={n_heads}, ")
    _check_int("d_head", d_head, low=1)
    what = f"hook_z SAE {str(source)!r}"
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".pt" and _is_per_head_kissane(path):
        return load_head_sae(path, layer, head, n_heads=n_heads, device=device)
    sae, release, sae_id = _load(source, sae_id, release, device, what, lambda r: default_sae_id(r, layer, "output"))
    cfg = sae.cfg
    hook_name = cfg.metadata.hook_name
    match = _HOOK_Z.fullmatch(hook_name or "")
    if hook_name is not None and (match is None or int(match.group(1)) != layer):
        raise ValueError(f"{what}: its hook_name is {hook_name!r}, expected 'blocks.{layer}.attn.hook_z'")
    head_index = cfg.metadata.hook_head_index
    if head_index is not None:
        if head_index != head or cfg.d_in != d_head:
            raise ValueError(f"{what}: reads only head {head_index} (hook_head_index, d_in {cfg.d_in}); "
                             f"expected a layer-level SAE or one of head {head} with d_in = d_head = {d_head}")
    elif cfg.d_in != n_heads * d_head:
        raise ValueError(
            f"{what}: d_in is {cfg.d_in}, expected n_heads*d_head = {n_heads}*{d_head} = {n_heads * d_head}"
            " (n_heads counts query heads)"
        )
    return _output_container(sae, what, layer=layer, head=head, n_heads=n_heads, d_head=d_head,
                             release=release, sae_id=sae_id)


def _output_container(sae: Any, what: str, *, layer: int, head: int, n_heads: int, d_head: int,
                      release: str | None, sae_id: str | None) -> OutputSAE:
    """The OutputSAE of a sae_lens SAE on ``hook_z``."""
    from_sae_lens = getattr(OutputSAE, "from_sae_lens", None)
    if from_sae_lens is not None:
        return from_sae_lens(sae, layer=layer, head=head, n_heads=n_heads, d_head=d_head, release=release,
                             sae_id=sae_id)
    cfg = sae.cfg  # until the containers take every architecture: standard ReLU SAEs only
    if cfg.architecture() != "standard" or not cfg.apply_b_dec_to_input or cfg.normalize_activations != "none":
        raise ValueError(
            f"{what}: expected a standard ReLU SAE with apply_b_dec_to_input and no activation normalisation, "
            f"got architecture {cfg.architecture()!r}, apply_b_dec_to_input={cfg.apply_b_dec_to_input}, "
            f"normalize_activations={cfg.normalize_activations!r}"
        )
    weights = (sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach(), sae.b_dec.detach())
    return OutputSAE.from_tensors(*weights, layer=layer, head=head, n_heads=n_heads, d_head=d_head)


load_layer_z_sae = load_output_sae  # the earlier name, for layer-level hook_z SAEs
