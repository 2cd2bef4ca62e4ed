"""Load and check the model and the SAEs that attnrules explains.

Three things come in:

- a ``HookedTransformer`` processed the way ``HookedTransformer.from_pretrained`` does by default
  (LayerNorm folded, writing weights centred, value biases folded), because the SAEs were trained
  on the activations of exactly that model: an unprocessed model's ``hook_z`` is shifted by ``b_V``;
- an input SAE on ``blocks.{L}.hook_resid_pre`` (:class:`InputSAE`), from any sae_lens SAE or tensors;
- an output SAE on one head's ``blocks.{L}.attn.hook_z`` (:class:`OutputSAE`): a per-head SAE in the
  Kissane ``.pt`` + ``_cfg.json`` format of the reference code, or a layer-level SAE over the
  concatenated heads sliced to one head.

Loaders never wait on the network when it cannot help: with ``HF_HUB_OFFLINE=1`` (or an unreachable
hub) and nothing in the local Hugging Face cache they raise :class:`SourceUnavailableError` at once,
saying what to download and where to put it. Loaders check each source on its own; shapes across
sources (model, input SAE, output SAE) are checked by :func:`check_compatible`.
"""
from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

_RESID_PRE = re.compile(r"blocks\.(\d+)\.hook_resid_pre")
_HOOK_Z = re.compile(r"blocks\.(\d+)\.attn\.hook_z")
_VERSION = re.compile(r"_v(\d+)$")
# Files of a sae_lens SAE folder (sae_lens.constants SAE_CFG_FILENAME / SAE_WEIGHTS_FILENAME).
_SAE_FILES = ("cfg.json", "sae_weights.safetensors")
_HEAD_SAE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")


class SourceUnavailableError(RuntimeError):
    """A model or SAE that must be downloaded is not available offline."""


# --------------------------------------------------------------------------------------------------
# SAE containers


def _check_int(name: str, value: Any, *, low: int = 0, below: int | None = None, what: str = "") -> None:
    """Raise TypeError for a non-int and ValueError unless ``low <= value < below`` (``below`` optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (below is not None and value >= below):
        bound = f"{low}..{below - 1}" if below is not None else f">= {low}"
        raise ValueError(f"{name}={value} is out of range: {what}valid range is {bound}")


def _check_tensors(owner: str, tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Check that each tensor is a finite floating tensor of the expected shape, all on one device."""
    devices = set()
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            kind = f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{owner}: {name} must be a floating-point tensor, got {kind}")
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{owner}: {name} must have shape {list(shapes[name])}, got {list(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{owner}: {name} contains NaN or infinite values")
        devices.add(t.device)
    if len(devices) > 1:
        raise ValueError(f"{owner}: tensors are on different devices {sorted(map(str, devices))}")


@dataclass(frozen=True, eq=False)
class InputSAE:
    """An SAE on the residual stream entering a layer; any sae_lens SAE or plain tensors.

    Only the decoder rows (``W_dec``), the encoder (for layer-0 token descriptions) and the SAE's
    own ``encode`` are used downstream, so any architecture works.
    """

    W_dec: Tensor  # [n_in, d_model] decoder rows d_j
    W_enc: Tensor  # [d_model, n_in]
    b_dec: Tensor  # [d_model]
    encode: Callable[[Tensor], Tensor]  # [..., d_model] -> [..., n_in]
    layer: int
    hook_name: str  # "blocks.{layer}.hook_resid_pre"
    neuronpedia_id: str | None = None  # feature j's page: https://neuronpedia.org/{id}/{j}

    def __post_init__(self) -> None:
        _check_int("InputSAE.layer", self.layer)
        if self.W_dec.dim() != 2:
            raise ValueError(f"InputSAE: W_dec must be [n_in, d_model], got shape {list(self.W_dec.shape)}")
        n_in, d_model = self.W_dec.shape
        _check_tensors(
            "InputSAE",
            {"W_dec": self.W_dec, "W_enc": self.W_enc, "b_dec": self.b_dec},
            {"W_dec": (n_in, d_model), "W_enc": (d_model, n_in), "b_dec": (d_model,)},
        )
        if self.hook_name != f"blocks.{self.layer}.hook_resid_pre":
            raise ValueError(
                f"InputSAE: hook_name must be 'blocks.{self.layer}.hook_resid_pre' for layer {self.layer}, "
                f"got {self.hook_name!r}"
            )

    @property
    def n_features(self) -> int:
        return self.W_dec.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_dec.shape[1]

    @classmethod
    def from_sae_lens(cls, sae: Any, layer: int | None = None) -> InputSAE:
        """Wrap a sae_lens SAE; ``layer`` defaults to the one in ``sae.cfg.metadata.hook_name``.

        An explicit ``layer`` is accepted for an SAE whose hook name is not a ``hook_resid_pre``
        (e.g. ``blocks.{layer-1}.hook_resid_post``, the same activations), but must agree with a
        ``hook_resid_pre`` name when there is one.
        """
        missing = [a for a in ("W_enc", "W_dec", "b_dec", "encode", "cfg") if not hasattr(sae, a)]
        if missing:
            raise TypeError(f"sae must be a sae_lens SAE; {type(sae).__name__} has no {', '.join(missing)}")
        hook_name = sae.cfg.metadata.hook_name
        match = _RESID_PRE.fullmatch(hook_name or "")
        if match is None and layer is None:
            raise ValueError(
                f"the SAE's hook_name {hook_name!r} is not 'blocks.<L>.hook_resid_pre': "
                "pass layer= to say which layer's residual stream it reads"
            )
        if match is not None and layer is not None and int(match.group(1)) != layer:
            raise ValueError(f"layer={layer} does not match the SAE's hook_name {hook_name!r}")
        layer = int(match.group(1)) if layer is None else layer
        return cls(
            W_dec=sae.W_dec.detach(),
            W_enc=sae.W_enc.detach(),
            b_dec=sae.b_dec.detach(),
            encode=sae.encode,
            layer=layer,
            hook_name=f"blocks.{layer}.hook_resid_pre",
            neuronpedia_id=sae.cfg.metadata.neuronpedia_id,
        )

    @classmethod
    def from_tensors(
        cls,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        *,
        layer: int,
        neuronpedia_id: str | None = None,
    ) -> InputSAE:
        """A standard ReLU SAE: ``encode(x) = relu((x - b_dec) @ W_enc + b_enc)``."""

        def encode(x: Tensor) -> Tensor:
            return torch.relu((x - b_dec) @ W_enc + b_enc)

        sae = cls(
            W_dec=W_dec,
            W_enc=W_enc,
            b_dec=b_dec,
            encode=encode,
            layer=layer,
            hook_name=f"blocks.{layer}.hook_resid_pre",
            neuronpedia_id=neuronpedia_id,
        )
        _check_tensors("InputSAE", {"b_enc": b_enc}, {"b_enc": (sae.n_features,)})
        return sae


@dataclass(frozen=True, eq=False)
class OutputSAE:
    """A standard ReLU SAE on ``hook_z`` of one head.

    Per-head (``per_head=True``): ``d_in = d_head``, reads ``z[..., head, :]``. Layer-level
    (``per_head=False``): ``d_in = n_heads * d_head`` over the heads concatenated head-major, as
    ``z.flatten(-2)``; this head's slice of the encoder is rows ``head*d_head : (head+1)*d_head``.
    ``n_heads`` may be ``None`` for a per-head SAE loaded without knowing the model.
    """

    W_enc: Tensor  # [d_in, n_out]
    b_enc: Tensor  # [n_out]
    W_dec: Tensor  # [n_out, d_in]
    b_dec: Tensor  # [d_in]
    layer: int
    head: int
    n_heads: int | None
    d_head: int
    per_head: bool

    def __post_init__(self) -> None:
        _check_int("OutputSAE.layer", self.layer)
        if self.n_heads is not None:
            _check_int("OutputSAE.n_heads", self.n_heads, low=1)
        elif not self.per_head:
            raise ValueError("OutputSAE: n_heads is required for a layer-level (per_head=False) SAE")
        known = f"n_heads={self.n_heads}, " if self.n_heads is not None else ""
        _check_int("OutputSAE.head", self.head, below=self.n_heads, what=known)
        _check_int("OutputSAE.d_head", self.d_head, low=1)
        if self.W_enc.dim() != 2:
            raise ValueError(f"OutputSAE: W_enc must be [d_in, n_out], got shape {list(self.W_enc.shape)}")
        d_in = self.d_head if self.per_head else self.n_heads * self.d_head
        layout = "d_head" if self.per_head else "n_heads*d_head"
        if self.W_enc.shape[0] != d_in:
            raise ValueError(
                f"OutputSAE: W_enc must have {layout}={d_in} rows, got shape {list(self.W_enc.shape)}"
            )
        n_out = self.W_enc.shape[1]
        _check_tensors(
            "OutputSAE",
            {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec},
            {"W_enc": (d_in, n_out), "b_enc": (n_out,), "W_dec": (n_out, d_in), "b_dec": (d_in,)},
        )

    @property
    def n_features(self) -> int:
        return self.W_enc.shape[1]

    @property
    def _rows(self) -> slice:
        """This head's rows of the SAE input."""
        start = 0 if self.per_head else self.head * self.d_head
        return slice(start, start + self.d_head)

    @property
    def head_encoder(self) -> Tensor:
        """``[d_head, n_out]``: the encoder rows that read this head's ``z``."""
        return self.W_enc[self._rows]

    @property
    def head_decoder_bias(self) -> Tensor:
        """``[d_head]``: the part of ``b_dec`` subtracted from this head's ``z`` before encoding."""
        return self.b_dec[self._rows]

    def encode(self, z: Tensor) -> Tensor:
        """``hook_z [..., n_heads, d_head] -> [..., n_out] = relu((z_sel - b_dec) @ W_enc + b_enc)``."""
        if z.dim() < 2 or z.shape[-1] != self.d_head or z.shape[-2] <= self.head:
            raise ValueError(
                f"z must be hook_z of shape [..., n_heads, d_head={self.d_head}] with head {self.head} "
                f"in range, got shape {list(z.shape)}"
            )
        if self.n_heads is not None and z.shape[-2] != self.n_heads:
            raise ValueError(f"z must have n_heads={self.n_heads} heads (dim -2), got shape {list(z.shape)}")
        z_sel = z[..., self.head, :] if self.per_head else z.flatten(-2)
        return torch.relu((z_sel - self.b_dec) @ self.W_enc + self.b_enc)

    @classmethod
    def from_tensors(
        cls,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        *,
        layer: int,
        head: int,
        n_heads: int | None = None,
        d_head: int | None = None,
    ) -> OutputSAE:
        """Build from tensors; per-head when ``W_enc`` has ``d_head`` rows (or ``d_head`` is not
        given), layer-level when it has ``n_heads * d_head`` rows."""
        d_in = W_enc.shape[0]
        if d_head is None or d_in == d_head:
            return cls(W_enc, b_enc, W_dec, b_dec, layer, head, n_heads, d_in, per_head=True)
        if n_heads is None or d_in != n_heads * d_head:
            raise ValueError(
                f"OutputSAE: W_enc has {d_in} rows, expected d_head={d_head} (per-head SAE) or "
                f"n_heads*d_head={'?' if n_heads is None else n_heads * d_head} (layer-level SAE)"
            )
        return cls(W_enc, b_enc, W_dec, b_dec, layer, head, n_heads, d_head, per_head=False)


# --------------------------------------------------------------------------------------------------
# The model


def check_head(model: Any, layer: int, head: int) -> None:
    """Raise ValueError unless (layer, head) names a head of ``model``."""
    cfg = model.cfg
    _check_int("layer", layer, below=cfg.n_layers, what=f"the model has {cfg.n_layers} layers, ")
    _check_int("head", head, below=cfg.n_heads, what=f"the model has {cfg.n_heads} heads per layer, ")


def _writing_weights(model: Any) -> dict[str, Tensor]:
    """The weights that write to the residual stream, by name (what ``center_writing_weights`` centres)."""
    weights = {"W_E": model.embed.W_E}
    if hasattr(model, "pos_embed") and hasattr(model.pos_embed, "W_pos"):
        weights["W_pos"] = model.pos_embed.W_pos
    for i, block in enumerate(model.blocks):
        if hasattr(block, "attn"):
            weights[f"blocks.{i}.attn.W_O"] = block.attn.W_O
        w_out = getattr(getattr(block, "mlp", None), "W_out", None)
        if isinstance(w_out, Tensor):
            weights[f"blocks.{i}.mlp.W_out"] = w_out
    return weights


def _processing_problems(model: Any) -> list[str]:
    """What differs from ``from_pretrained``'s default processing (empty when processed)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    problems = []
    if cfg.normalization_type in ("LN", "RMS"):
        problems.append(
            f"LayerNorm is not folded (cfg.normalization_type is {cfg.normalization_type!r}, "
            f"expected {cfg.normalization_type + 'Pre'!r})"
        )
    unfolded = [i for i, block in enumerate(model.blocks) if bool((block.attn.b_V != 0).any())]
    if unfolded:
        problems.append(f"value biases are not folded (b_V != 0 in layers {unfolded})")
    centred_model = (
        cfg.normalization_type in ("LN", "LNPre")
        and not getattr(cfg, "final_rms", False)
        and cfg.original_architecture not in POST_NORM_ARCHITECTURES
    )
    if centred_model:
        with torch.no_grad():
            off = [
                name
                for name, w in _writing_weights(model).items()
                if w.float().mean(-1).abs().max() > max(1e-4, 50 * torch.finfo(w.dtype).eps) * w.abs().max()
            ]
        if off:
            problems.append(f"writing weights are not centred (mean over d_model != 0 in {', '.join(off)})")
    return problems


def check_processed(model: Any) -> None:
    """Raise ValueError unless ``model`` is processed as the SAEs expect.

    The SAEs were trained on ``HookedTransformer.from_pretrained``'s default processing: LayerNorm
    folded, value biases folded into ``b_O`` (so ``hook_z`` excludes ``b_V``) and, for LayerNorm
    models, writing weights centred (so the residual stream is mean-zero).
    """
    problems = _processing_problems(model)
    if problems:
        raise ValueError(
            "the model is not processed as the SAEs expect: "
            + "; ".join(problems)
            + ". Load it with attnrules.sources.load_model or call attnrules.sources.process_model(model)."
        )


def process_model(model: Any) -> Any:
    """Apply ``from_pretrained``'s default weight processing in place and return ``model``.

    A no-op on an already processed model; a partly processed one gets the missing steps.
    """
    if not _processing_problems(model):
        return model
    with torch.no_grad():
        model.load_and_process_state_dict(
            model.state_dict(),
            fold_ln=model.cfg.normalization_type in ("LN", "RMS"),
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
        )
    return model


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


def as_sources(
    model: Any, input_sae: Any, output_sae: Any, *, layer: int | None = None, head: int | None = None
) -> tuple[InputSAE, OutputSAE]:
    """(InputSAE, OutputSAE) from our containers or from sae_lens SAEs, so that any sae_lens SAE of
    matching shapes can be passed where attnrules expects its own.

    A sae_lens output SAE is per-head when its ``d_in`` is the model's ``d_head`` (the head from
    ``head`` or its ``hook_head_index``) and layer-level when ``d_in = n_heads * d_head`` (then
    ``head`` is required); its layer comes from ``layer`` or its ``blocks.{L}.attn.hook_z`` hook name.
    """
    if not isinstance(input_sae, InputSAE):
        input_sae = InputSAE.from_sae_lens(input_sae, layer)
    if isinstance(output_sae, OutputSAE):
        return input_sae, output_sae
    if not all(hasattr(output_sae, a) for a in ("W_enc", "b_enc", "W_dec", "b_dec", "cfg")):
        raise TypeError(f"output_sae must be an OutputSAE or a sae_lens SAE, got {type(output_sae).__name__}")
    meta = output_sae.cfg.metadata
    match = _HOOK_Z.fullmatch(getattr(meta, "hook_name", None) or "")
    if layer is None:
        if match is None:
            raise ValueError(f"output_sae's hook_name {getattr(meta, 'hook_name', None)!r} is not "
                             "'blocks.<L>.attn.hook_z': pass layer=")
        layer = int(match.group(1))
    head = getattr(meta, "hook_head_index", None) if head is None else head
    if head is None:
        raise ValueError("output_sae does not say which head it reads (no hook_head_index): pass head=")
    weights = [getattr(output_sae, a).detach() for a in ("W_enc", "b_enc", "W_dec", "b_dec")]
    return input_sae, OutputSAE.from_tensors(*weights, layer=layer, head=head, n_heads=model.cfg.n_heads,
                                             d_head=model.cfg.d_head)


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


# --------------------------------------------------------------------------------------------------
# Across sources


def check_compatible(model: Any, input_sae: InputSAE | None = None, output_sae: OutputSAE | None = None) -> None:
    """Raise ValueError unless the SAEs fit the model and each other.

    The input SAE must read ``d_model``-sized residual streams of an existing layer; the output SAE
    must read an existing head's ``z`` of ``d_head`` (and ``n_heads``); both must be in the same layer.
    """
    cfg = model.cfg
    if input_sae is not None:
        layers = f"the model has {cfg.n_layers} layers, "
        _check_int("input_sae.layer", input_sae.layer, below=cfg.n_layers, what=layers)
        if input_sae.d_model != cfg.d_model:
            raise ValueError(f"input_sae has d_model {input_sae.d_model} but the model has d_model {cfg.d_model}")
    if output_sae is not None:
        check_head(model, output_sae.layer, output_sae.head)
        if output_sae.d_head != cfg.d_head:
            raise ValueError(f"output_sae has d_head {output_sae.d_head} but the model has d_head {cfg.d_head}")
        if output_sae.n_heads is not None and output_sae.n_heads != cfg.n_heads:
            raise ValueError(
                f"output_sae has n_heads {output_sae.n_heads} but the model has {cfg.n_heads} heads per layer"
            )
    if input_sae is not None and output_sae is not None and input_sae.layer != output_sae.layer:
        raise ValueError(
            f"input_sae reads layer {input_sae.layer} but output_sae is for layer {output_sae.layer}; "
            "they must be the same layer"
        )
