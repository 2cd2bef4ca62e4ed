"""SAE architectures and input normalisation, expressed in the model's own activation space.

attnrules reads an SAE through a few tensors and one function: decoder rows D (input features), the
encoder u of each output feature, the decoder bias, and the SAE's own ``encode`` (which features are
active). This module turns any supported SAE — a sae_lens SAE or plain tensors — into those, so that
scores, importances, the exact decomposition and predictions are right whatever the architecture and
the normalisation.

Architectures (``architecture``), with ``sae_in = x − b_dec`` (``x`` when ``apply_b_dec_to_input`` is
False) and ``pre = sae_in @ W_enc + b_enc``:

- ``"standard"``: ``relu(pre)``;
- ``"jumprelu"``: ``relu(pre) · 1[pre > threshold]`` (per-feature ``threshold``; a sae_lens BatchTopK
  SAE is run in its inference form, a JumpReLU with the learnt global threshold, as sae_lens saves it);
- ``"topk"``: the ``k`` largest of ``pre`` (``torch.topk``), then relu, the rest 0 (a sae_lens TopK with
  ``rescale_acts_by_decoder_norm`` is folded: ``W_enc·‖d‖``, ``b_enc·‖d‖``, decoder rows ``d/‖d‖``);
- ``"gated"`` (sae_lens's weight-shared gated SAE): ``1[sae_in @ W_gate + b_gate > 0] · relu(pre)`` with
  the *magnitude* path as ``W_enc = W_gate · exp(r_mag)``, ``b_enc = b_mag``. The magnitude encoder is
  the encoder attnrules uses for value scores and importances: an active feature's activation is linear
  in it, so exact importance is the true gradient; it points along the gate's direction (a positive
  per-feature scale), so rankings within a feature are those of the gate encoder.

sae_lens training SAEs are used in their inference form (``process_state_dict_for_saving_inference``,
what ``save_inference_model`` writes). Other sae_lens architectures (AbsTopK's signed activations,
matching pursuit, temporal SAEs) and transcoders are refused by name.

Normalisation: an SAE trained on ``s·x`` (sae_lens ``normalize_activations="expected_average_only_in"``)
is folded into the model's space exactly as sae_lens's ``fold_activation_norm_scaling_factor`` does —
``W_enc·s``, ``W_dec/s``, ``b_dec/s`` (thresholds, ``k`` and the gate are unchanged) — so ``D`` and
``b_dec`` are model-space and ``encode(x) = sae.encode(s·x)``. sae_lens folds a release's known factor at
``from_pretrained`` (its config then says ``"none"``); otherwise ``scaling_factor=`` must be given.
``"constant_norm_rescale"`` and ``"layer_norm"`` rescale each input by its own statistics at run time
and ``"covariance_whitening"`` needs a whitening the SAE does not hold: no fixed decoder rows exist in
the model's space, so they are refused.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

ARCHITECTURES = ("standard", "jumprelu", "topk", "gated")
_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")


def sae_name(sae: Any = None, release: str | None = None, sae_id: str | None = None) -> str:
    """How error messages name an SAE: its release and id when known, else its class and hook."""
    if release or sae_id:
        return f"SAE {release or '?'}/{sae_id or '?'}"
    hook = getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "hook_name", None)
    kind = type(sae).__name__ if sae is not None else "SAE"
    return f"{kind} on {hook!r}" if hook else kind


def check_kind(owner: str, architecture: str, n: int, *, threshold: Tensor | None, k: int | None,
               b_gate: Tensor | None, r_mag: Tensor | None) -> None:
    """Raise unless the architecture's own parameters are there, of the right shapes, and no others."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{owner}: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    need = {"jumprelu": ("threshold",), "topk": ("k",), "gated": ("b_gate", "r_mag")}.get(architecture, ())
    given = {"threshold": threshold, "k": k, "b_gate": b_gate, "r_mag": r_mag}
    for name, value in given.items():
        if name in need and value is None:
            raise ValueError(f"{owner}: a {architecture} SAE needs {name} (got none)")
        if name not in need and value is not None:
            raise ValueError(f"{owner}: {name} applies to {_owner_of(name)} SAEs, not to a {architecture} SAE")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n):
        raise ValueError(f"{owner}: k must be an int in [1, n_features={n}], got {k!r}")
    for name in ("threshold", "b_gate", "r_mag"):
        t = given[name]
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) != (n,):
            raise ValueError(f"{owner}: {name} must be a floating-point tensor of shape [{n}], got "
                             f"{list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{owner}: {name} contains NaN or infinite values")


def _owner_of(name: str) -> str:
    return {"threshold": "jumprelu", "k": "topk", "b_gate": "gated", "r_mag": "gated"}[name]


def activate(sae_in: Tensor, W_enc: Tensor, b_enc: Tensor, architecture: str, *, threshold: Tensor | None = None,
             k: int | None = None, b_gate: Tensor | None = None, r_mag: Tensor | None = None) -> Tensor:
    """Feature activations from the SAE input (already less its input bias), as sae_lens computes them."""
    pre = sae_in @ W_enc + b_enc
    if architecture == "standard":
        return torch.relu(pre)
    if architecture == "jumprelu":
        return torch.relu(pre) * (pre > threshold).to(pre.dtype)
    if architecture == "topk":
        values, indices = torch.topk(pre, k=k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())
    if architecture == "gated":
        gate = sae_in @ (W_enc * torch.exp(-r_mag)) + b_gate
        return (gate > 0).to(pre.dtype) * torch.relu(pre)
    raise ValueError(f"unknown architecture {architecture!r}")  # pragma: no cover - checked at construction


def check_scaling_factor(name: str, scaling_factor: Any) -> float | None:
    if scaling_factor is None:
        return None
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) or \
            not math.isfinite(scaling_factor) or scaling_factor <= 0:
        raise ValueError(f"{name}: scaling_factor must be a finite positive number, got {scaling_factor!r}")
    return float(scaling_factor)


def fold(W_enc: Tensor, W_dec: Tensor, b_dec: Tensor, scaling_factor: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """(W_enc·s, W_dec/s, b_dec/s): an SAE trained on s·x, in the model's space (sae_lens's own fold)."""
    if scaling_factor is None or scaling_factor == 1.0:
        return W_enc, W_dec, b_dec
    return W_enc * scaling_factor, W_dec / scaling_factor, b_dec / scaling_factor


class LensEncode(torch.nn.Module):
    """A sae_lens SAE's own ``encode`` on model-space inputs: ``sae.encode(s·x)``, with ``x`` unflattened
    to ``[..., n_heads, d_head]`` for an SAE that reshapes ``hook_z`` itself. A module, so that its
    state (the SAE's and ``s``) is what a content hash of the bound ``encode`` sees."""

    def __init__(self, sae: Any, scaling_factor: float | None, d_head: int | None = None) -> None:
        super().__init__()
        self.sae = sae
        self.register_buffer("scale", torch.tensor(1.0 if scaling_factor is None else scaling_factor))
        self.d_head = d_head

    def encode(self, x: Tensor) -> Tensor:
        if float(self.scale) != 1.0:
            x = x * self.scale.to(x.dtype)
        if self.d_head is not None:
            x = x.unflatten(-1, (-1, self.d_head))
        return self.sae.encode(x)


def lens_parts(sae: Any, *, scaling_factor: float | None = None, release: str | None = None,
               sae_id: str | None = None) -> dict[str, Any]:
    """A sae_lens SAE as model-space parts: ``W_enc`` (effective encoder: the magnitude one of a gated
    SAE), ``b_enc``, ``W_dec`` (effective decoder rows), ``b_dec``, ``apply_b_dec_to_input``, the
    architecture's own parameters, ``sae`` (its inference form, whose ``encode`` decides activity),
    ``scaling_factor``, ``normalization`` (the config's ``normalize_activations``), release and id."""
    name = sae_name(sae, release, sae_id)
    missing = [a for a in ("W_enc", "W_dec", "b_dec", "encode", "cfg") if not hasattr(sae, a)]
    if missing:
        raise TypeError(f"sae must be a sae_lens SAE; {type(sae).__name__} has no {', '.join(missing)}")
    cfg = sae.cfg
    architecture = cfg.architecture() if callable(getattr(cfg, "architecture", None)) else None
    meta = getattr(cfg, "metadata", None)
    hook_in, hook_out = getattr(meta, "hook_name", None), getattr(meta, "hook_name_out", None)
    if architecture in _TRANSCODERS or "transcoder" in str(architecture) or \
            getattr(cfg, "d_out", cfg.d_in) != cfg.d_in or (hook_out is not None and hook_out != hook_in):
        raise ValueError(
            f"{name} is a transcoder (architecture {architecture!r}, reads {hook_in!r}, writes "
            f"{hook_out if hook_out is not None else 'another activation'!r}): attnrules needs an SAE that "
            "reconstructs the activation it reads")
    from sae_lens.saes.sae import SAE, TrainingSAE

    if isinstance(sae, TrainingSAE):  # the inference form, as sae_lens saves it (BatchTopK → JumpReLU)
        state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
        sae.process_state_dict_for_saving_inference(state)
        inference = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
        inference.load_state_dict(state, strict=False)
        inference.to(device=sae.W_enc.device)
        sae, cfg = inference, inference.cfg
        architecture = cfg.architecture()
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{name}: architecture {architecture!r} is not supported: attnrules reads SAEs whose features "
            f"are non-negative and each has one encoder vector, {ARCHITECTURES} (a BatchTopK SAE runs as JumpReLU)")
    norm = getattr(cfg, "normalize_activations", "none") or "none"
    scaling_factor = check_scaling_factor(name, scaling_factor)
    if norm == "none":
        if scaling_factor is not None and scaling_factor != 1.0:
            raise ValueError(
                f"{name}: scaling_factor={scaling_factor} given, but the SAE's normalize_activations is 'none' "
                "(its inputs are not scaled; sae_lens folds a release's known factor at from_pretrained): pass none")
        scaling_factor = None
    elif norm == "expected_average_only_in":
        if scaling_factor is None:
            raise ValueError(
                f"{name} scales its inputs (normalize_activations='expected_average_only_in') by a factor that "
                "sae_lens did not fold (not known for this release/id): pass scaling_factor= (the constant s its "
                "training activations were multiplied by, so that encode(x) = sae.encode(s·x))")
    else:
        raise ValueError(
            f"{name}: normalize_activations={norm!r} rescales each input by its own statistics at run time (or "
            "needs a whitening the SAE does not hold), so its features have no fixed decoder rows in the "
            "model's activation space: attnrules supports 'none' and 'expected_average_only_in' with a known "
            "scaling_factor")
    W_enc, W_dec, b_dec = sae.W_enc.detach(), sae.W_dec.detach(), sae.b_dec.detach()
    b_enc = getattr(sae, "b_enc", None)
    parts: dict[str, Any] = {"threshold": None, "k": None, "b_gate": None, "r_mag": None}
    if architecture == "gated":
        r_mag = sae.r_mag.detach()
        W_enc, b_enc = W_enc * r_mag.exp(), sae.b_mag.detach()
        parts.update(b_gate=sae.b_gate.detach(), r_mag=r_mag)
    else:
        b_enc = b_enc.detach()
    if architecture == "jumprelu":
        parts["threshold"] = sae.threshold.detach()
    if architecture == "topk":
        parts["k"] = int(cfg.k)
        if getattr(cfg, "rescale_acts_by_decoder_norm", False):
            norms = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    W_enc, W_dec, b_dec = fold(W_enc, W_dec, b_dec, scaling_factor)
    parts.update(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, architecture=architecture, sae=sae,
                 apply_b_dec_to_input=bool(cfg.apply_b_dec_to_input), scaling_factor=scaling_factor,
                 normalization=norm, release=release, sae_id=sae_id, name=name)
    return parts


def state_dict_parts(state: dict[str, Tensor], architecture: str, name: str) -> dict[str, Any]:
    """The tensors of a sae_lens-format state dict (``W_enc``, ``W_dec``, ``b_dec``, ``b_enc``; JumpReLU:
    ``threshold`` or ``log_threshold``; gated: ``b_gate``, ``b_mag``, ``r_mag``) as from_tensors
    arguments, or a ValueError naming the SAE and the missing keys."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{name}: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    state = dict(state)
    if architecture == "jumprelu" and "threshold" not in state and "log_threshold" in state:
        state["threshold"] = torch.exp(state.pop("log_threshold"))
    if architecture == "gated":
        state["b_enc"] = state.get("b_mag")
    need = ["W_enc", "W_dec", "b_dec", "b_mag" if architecture == "gated" else "b_enc"]
    need += {"jumprelu": ["threshold"], "gated": ["b_gate", "r_mag"]}.get(architecture, [])
    missing = [key for key in need if state.get(key) is None]
    if missing:
        raise ValueError(f"{name}: a {architecture} SAE's state dict needs {', '.join(need)}; "
                         f"missing {', '.join(missing)} (has {', '.join(sorted(state)) or 'nothing'})")
    out = {key: state[key] for key in ("W_enc", "b_enc", "W_dec", "b_dec")}
    out.update({key: state[key] for key in ("threshold", "b_gate", "r_mag") if key in need})
    return out
