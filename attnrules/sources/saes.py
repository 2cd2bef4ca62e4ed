"""SAE containers: :class:`InputSAE` (on ``blocks.{L}.hook_resid_pre``) and :class:`OutputSAE` (on one
head's ``blocks.{L}.attn.hook_z``), built from tensors or any sae_lens SAE (:func:`as_sources`), and
the check that a model and its SAEs fit together (:func:`check_compatible`)."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from attnrules.sources.model import _check_int, check_head
from attnrules.sources.sae_kinds import (
    LensEncode,
    activate,
    check_kind,
    check_scaling_factor,
    fold,
    lens_parts,
    sae_name,
    state_dict_parts,
)

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


_RESID_PRE = re.compile(r"blocks\.(\d+)\.hook_resid_pre")
_HOOK_Z = re.compile(r"blocks\.(\d+)\.attn\.hook_z")
_RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")


def _tensor_encode(owner: str, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *, architecture: str,
                   threshold: Tensor | None, k: int | None, b_gate: Tensor | None, r_mag: Tensor | None,
                   apply_b_dec_to_input: bool, scaling_factor: float | None) -> tuple[dict[str, Any], Callable]:
    """Model-space tensors (see :mod:`~attnrules.sources.sae_kinds`) and the encode of an SAE given by
    its own tensors (``W_enc`` a gated SAE's shared gate/magnitude matrix, ``b_enc`` its ``b_mag``)."""
    n = W_enc.shape[-1] if W_enc.dim() == 2 else 0
    check_kind(owner, architecture, n, threshold=threshold, k=k, b_gate=b_gate, r_mag=r_mag)
    scaling_factor = check_scaling_factor(owner, scaling_factor)
    if architecture == "gated":
        W_enc = W_enc * r_mag.exp()
    W_enc, W_dec, b_dec = fold(W_enc, W_dec, b_dec, scaling_factor)
    kind = {"threshold": threshold, "k": k, "b_gate": b_gate, "r_mag": r_mag}
    in_bias = b_dec if apply_b_dec_to_input else None

    def encode(x: Tensor) -> Tensor:
        return activate(x if in_bias is None else x - in_bias, W_enc, b_enc, architecture, **kind)

    return {"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec, **kind}, encode


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
    own ``encode`` (which decides which features are active) are used downstream, so any supported
    architecture works (:mod:`~attnrules.sources.sae_kinds`). ``W_dec``, ``W_enc`` and ``b_dec`` are in the
    model's own activation space: an SAE trained on ``s·x`` is folded (``W_dec/s``, ``W_enc·s``,
    ``b_dec/s``) and its ``encode`` takes the model's ``x``. ``b_dec`` is the decoder bias (added by the
    decoder whether or not ``apply_b_dec_to_input``), so ``x = acts @ W_dec + b_dec + error``.
    ``architecture``, ``release``, ``sae_id``, ``normalization`` (the SAE's ``normalize_activations``) and
    ``scaling_factor`` describe where it came from (None when unknown).
    """

    W_dec: Tensor  # [n_in, d_model] decoder rows d_j
    W_enc: Tensor  # [d_model, n_in]
    b_dec: Tensor  # [d_model]
    encode: Callable[[Tensor], Tensor]  # [..., d_model] -> [..., n_in]
    layer: int
    hook_name: str  # "blocks.{layer}.hook_resid_pre"
    neuronpedia_id: str | None = None  # feature j's page: https://neuronpedia.org/{id}/{j}
    architecture: str | None = None
    release: str | None = None
    sae_id: str | None = None
    normalization: str | None = None
    scaling_factor: float | None = None
    apply_b_dec_to_input: bool | None = None

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
    def from_sae_lens(cls, sae: Any, layer: int | None = None, *, scaling_factor: float | None = None,
                      release: str | None = None, sae_id: str | None = None) -> InputSAE:
        """Wrap a sae_lens SAE; ``layer`` defaults to the one in ``sae.cfg.metadata.hook_name``.

        An explicit ``layer`` is accepted for an SAE whose hook name is not a ``hook_resid_pre``
        (e.g. ``blocks.{layer-1}.hook_resid_post``, the same activations), but must agree with a
        ``hook_resid_pre`` or ``hook_resid_post`` name when there is one. ``encode`` is the SAE's own
        (on ``scaling_factor·x`` for an SAE that normalises its inputs with an unfolded factor; see
        :mod:`~attnrules.sources.sae_kinds` for the architectures and normalisations accepted).
        """
        parts = lens_parts(sae, scaling_factor=scaling_factor, release=release, sae_id=sae_id)
        name, hook_name = parts["name"], sae.cfg.metadata.hook_name
        match = _RESID_PRE.fullmatch(hook_name or "")
        post = _RESID_POST.fullmatch(hook_name or "")
        if match is None and layer is None:
            raise ValueError(
                f"{name}: its hook_name {hook_name!r} is not 'blocks.<L>.hook_resid_pre': "
                "pass layer= to say which layer's residual stream it reads"
            )
        expected = int(match.group(1)) if match else int(post.group(1)) + 1 if post else None
        if expected is not None and layer is not None and expected != layer:
            raise ValueError(f"{name}: layer={layer} does not match the SAE's hook_name {hook_name!r} "
                             f"(expected layer {expected})")
        layer = int(match.group(1)) if layer is None else layer
        scale = parts["scaling_factor"]
        encode = parts["sae"].encode if scale is None else LensEncode(parts["sae"], scale).encode
        return cls(
            W_dec=parts["W_dec"],
            W_enc=parts["W_enc"],
            b_dec=parts["b_dec"],
            encode=encode,
            layer=layer,
            hook_name=f"blocks.{layer}.hook_resid_pre",
            neuronpedia_id=sae.cfg.metadata.neuronpedia_id,
            architecture=parts["architecture"],
            release=release,
            sae_id=sae_id,
            normalization=parts["normalization"],
            scaling_factor=scale,
            apply_b_dec_to_input=parts["apply_b_dec_to_input"],
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
        architecture: str = "standard",
        threshold: Tensor | None = None,
        k: int | None = None,
        b_gate: Tensor | None = None,
        r_mag: Tensor | None = None,
        apply_b_dec_to_input: bool = True,
        scaling_factor: float | None = None,
        release: str | None = None,
        sae_id: str | None = None,
    ) -> InputSAE:
        """An SAE from its own tensors; by default a standard ReLU SAE,
        ``encode(x) = relu((x - b_dec) @ W_enc + b_enc)``.

        ``architecture`` "jumprelu" needs ``threshold``, "topk" ``k``, "gated" ``b_gate`` and ``r_mag``
        (``W_enc`` then the shared gate/magnitude matrix and ``b_enc`` its ``b_mag``), as sae_lens names
        them; ``apply_b_dec_to_input=False`` subtracts nothing before the encoder; ``scaling_factor``
        says the tensors were trained on ``s·x`` (folded into the model's space here).
        """
        owner = f"InputSAE ({sae_name(None, release, sae_id)})" if release or sae_id else "InputSAE"
        parts, encode = _tensor_encode(owner, W_enc, b_enc, W_dec, b_dec, architecture=architecture,
                                       threshold=threshold, k=k, b_gate=b_gate, r_mag=r_mag,
                                       apply_b_dec_to_input=apply_b_dec_to_input, scaling_factor=scaling_factor)
        sae = cls(
            W_dec=parts["W_dec"],
            W_enc=parts["W_enc"],
            b_dec=parts["b_dec"],
            encode=encode,
            layer=layer,
            hook_name=f"blocks.{layer}.hook_resid_pre",
            neuronpedia_id=neuronpedia_id,
            architecture=architecture,
            release=release,
            sae_id=sae_id,
            normalization="none" if scaling_factor is None else "expected_average_only_in",
            scaling_factor=None if scaling_factor is None else float(scaling_factor),
            apply_b_dec_to_input=apply_b_dec_to_input,
        )
        _check_tensors("InputSAE", {"b_enc": b_enc}, {"b_enc": (sae.n_features,)})
        return sae

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], *, layer: int, architecture: str = "standard",
                        k: int | None = None, name: str | None = None, **options: Any) -> InputSAE:
        """From a sae_lens-format state dict (see :func:`~attnrules.sources.sae_kinds.state_dict_parts`);
        ``name`` (e.g. the file) names the SAE in errors; ``options`` as :meth:`from_tensors`."""
        tensors = state_dict_parts(state, architecture, name or "input SAE")
        return cls.from_tensors(**tensors, layer=layer, architecture=architecture, k=k, **options)


@dataclass(frozen=True, eq=False)
class OutputSAE:
    """An SAE on ``hook_z`` of one head, of any supported architecture (:mod:`~attnrules.sources.sae_kinds`).

    Per-head (``per_head=True``): ``d_in = d_head``, reads ``z[..., head, :]``. Layer-level
    (``per_head=False``): ``d_in = n_heads * d_head`` over the heads concatenated head-major, as
    ``z.flatten(-2)``; this head's slice of the encoder is rows ``head*d_head : (head+1)*d_head``.
    ``n_heads`` may be ``None`` for a per-head SAE loaded without knowing the model.

    Every tensor is in the model's own activation space (an SAE trained on ``s·z`` folded: ``W_enc·s``,
    ``W_dec/s``, ``b_dec/s``). ``W_enc``/``b_enc`` are the *effective* encoder: a feature's activation,
    when active, is ``(z_sel − b_dec)·u + b_enc`` (no ``b_dec`` when not ``apply_b_dec_to_input``), so u
    (:attr:`head_encoder`) is what value scores and importances use; for a gated SAE it is the magnitude
    encoder ``W_gate·exp(r_mag)`` and ``b_enc`` is ``b_mag``. Which features are active is the SAE's own
    decision: ``sae_encode`` (a sae_lens SAE's ``encode`` on model-space input) when set, else the
    architecture from the tensors (``threshold`` for "jumprelu", ``k`` for "topk", ``b_gate``/``r_mag``
    for "gated"). ``release``, ``sae_id``, ``normalization`` (its ``normalize_activations``) and
    ``scaling_factor`` describe where it came from (None when unknown).
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
    architecture: str = "standard"
    threshold: Tensor | None = None  # jumprelu [n_out]
    k: int | None = None  # topk
    b_gate: Tensor | None = None  # gated [n_out]
    r_mag: Tensor | None = None  # gated [n_out]: W_enc = W_gate·exp(r_mag)
    apply_b_dec_to_input: bool = True
    sae_encode: Callable[[Tensor], Tensor] | None = None  # [..., d_in] (model space) -> [..., n_out]
    release: str | None = None
    sae_id: str | None = None
    normalization: str | None = None
    scaling_factor: float | None = None

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
        check_kind("OutputSAE", self.architecture, n_out, threshold=self.threshold, k=self.k, b_gate=self.b_gate,
                   r_mag=self.r_mag)

    @property
    def n_features(self) -> int:
        return self.W_enc.shape[1]

    @property
    def firing_threshold(self) -> Tensor:
        """``[n_out]``: the SAE's own threshold on a feature's pre-activation — JumpReLU's per-feature
        ``threshold``, 0 for the ReLU-based architectures (standard, TopK, gated)."""
        if self.threshold is not None:
            return self.threshold
        return torch.zeros_like(self.b_enc)

    def surrogate_gate(self, feature: int) -> Callable[[Tensor], Tensor]:
        """The SAE's own "active" decision on the paper surrogate's output ``pred = Σ_i α_i V_i·u`` (REF's
        "post_activation" loss, which adds the encoder bias and keeps exemplars where the activation is
        open): standard ``pred + b_enc > 0`` (REF); JumpReLU ``pred + b_enc > threshold`` (and > 0, the
        relu it applies); gated: the gate ``pred·exp(−r_mag) + b_gate > 0`` (the gate encoder is the
        magnitude one over exp(r_mag)) and ``pred + b_mag > 0``; TopK: ``pred + b_enc > 0``, the relu
        sae_lens applies to the k kept values — whether a feature is among the k largest depends on
        every other feature, which the one-feature surrogate does not model."""
        b = self.b_enc[feature]
        if self.architecture == "jumprelu":
            floor = torch.clamp(self.threshold[feature], min=0)
            return lambda pred: pred + b.to(pred.dtype) > floor.to(pred.dtype)
        if self.architecture == "gated":
            scale, b_gate = torch.exp(-self.r_mag[feature]), self.b_gate[feature]
            return lambda pred: (pred * scale.to(pred.dtype) + b_gate.to(pred.dtype) > 0) & (pred + b.to(pred.dtype) > 0)
        return lambda pred: pred + b.to(pred.dtype) > 0

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
        """``[d_head]``: the part of ``b_dec`` subtracted from this head's ``z`` before encoding (zeros
        when not ``apply_b_dec_to_input``)."""
        rows = self.b_dec[self._rows]
        return rows if self.apply_b_dec_to_input else torch.zeros_like(rows)

    def encode(self, z: Tensor) -> Tensor:
        """``hook_z [..., n_heads, d_head] -> [..., n_out]``: the SAE's own encode of ``z_sel``
        (``z[..., head, :]`` or ``z.flatten(-2)``), e.g. ``relu((z_sel - b_dec) @ W_enc + b_enc)`` for a
        standard SAE."""
        if z.dim() < 2 or z.shape[-1] != self.d_head or z.shape[-2] <= self.head:
            raise ValueError(
                f"z must be hook_z of shape [..., n_heads, d_head={self.d_head}] with head {self.head} "
                f"in range, got shape {list(z.shape)}"
            )
        if self.n_heads is not None and z.shape[-2] != self.n_heads:
            raise ValueError(f"z must have n_heads={self.n_heads} heads (dim -2), got shape {list(z.shape)}")
        z_sel = z[..., self.head, :] if self.per_head else z.flatten(-2)
        if self.sae_encode is not None:
            return self.sae_encode(z_sel)
        sae_in = z_sel - self.b_dec if self.apply_b_dec_to_input else z_sel
        return activate(sae_in, self.W_enc, self.b_enc, self.architecture, threshold=self.threshold, k=self.k,
                        b_gate=self.b_gate, r_mag=self.r_mag)

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
        architecture: str = "standard",
        threshold: Tensor | None = None,
        k: int | None = None,
        b_gate: Tensor | None = None,
        r_mag: Tensor | None = None,
        apply_b_dec_to_input: bool = True,
        scaling_factor: float | None = None,
        release: str | None = None,
        sae_id: str | None = None,
    ) -> OutputSAE:
        """Build from the SAE's own tensors; per-head when ``W_enc`` has ``d_head`` rows (or ``d_head`` is
        not given), layer-level when it has ``n_heads * d_head`` rows. By default a standard ReLU SAE;
        the other architectures and ``scaling_factor`` as :meth:`InputSAE.from_tensors` (for "gated",
        ``W_enc`` is the shared gate/magnitude matrix and ``b_enc`` is ``b_mag``)."""
        d_in = W_enc.shape[0]
        owner = f"OutputSAE ({sae_name(None, release, sae_id)})" if release or sae_id else "OutputSAE"
        if d_head is None or d_in == d_head:
            per_head, d_head = True, d_in
        elif n_heads is None or d_in != n_heads * d_head:
            raise ValueError(
                f"{owner}: W_enc has {d_in} rows, expected d_head={d_head} (per-head SAE) or "
                f"n_heads*d_head={'?' if n_heads is None else n_heads * d_head} (layer-level SAE)"
            )
        else:
            per_head = False
        parts, _ = _tensor_encode(owner, W_enc, b_enc, W_dec, b_dec, architecture=architecture, threshold=threshold,
                                  k=k, b_gate=b_gate, r_mag=r_mag, apply_b_dec_to_input=apply_b_dec_to_input,
                                  scaling_factor=scaling_factor)
        return cls(parts["W_enc"], b_enc, parts["W_dec"], parts["b_dec"], layer, head, n_heads, d_head,
                   per_head=per_head, architecture=architecture, threshold=threshold, k=k, b_gate=b_gate,
                   r_mag=r_mag, apply_b_dec_to_input=apply_b_dec_to_input, release=release, sae_id=sae_id,
                   normalization="none" if scaling_factor is None else "expected_average_only_in",
                   scaling_factor=None if scaling_factor is None else float(scaling_factor))

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], *, layer: int, head: int, architecture: str = "standard",
                        k: int | None = None, name: str | None = None, **options: Any) -> OutputSAE:
        """From a sae_lens-format state dict (see :func:`~attnrules.sources.sae_kinds.state_dict_parts`);
        ``name`` (e.g. the file) names the SAE in errors; ``options`` as :meth:`from_tensors`."""
        tensors = state_dict_parts(state, architecture, name or "output SAE")
        return cls.from_tensors(**tensors, layer=layer, head=head, architecture=architecture, k=k, **options)

    @classmethod
    def from_sae_lens(
        cls, sae: Any, layer: int | None = None, head: int | None = None, n_heads: int | None = None,
        d_head: int | None = None, *, scaling_factor: float | None = None, release: str | None = None,
        sae_id: str | None = None,
    ) -> OutputSAE:
        """Wrap a sae_lens SAE on ``blocks.{L}.attn.hook_z`` (symmetric to :meth:`InputSAE.from_sae_lens`).

        Per-head when its ``d_in`` is ``d_head`` (the head from ``head`` or its ``hook_head_index``),
        layer-level when ``d_in = n_heads * d_head`` (then ``head`` is required); its layer comes from
        ``layer`` or its hook name, which must agree. Activity is the SAE's own ``encode`` (on
        ``scaling_factor·z_sel``, unflattened for an SAE that reshapes ``hook_z`` itself)."""
        parts = lens_parts(sae, scaling_factor=scaling_factor, release=release, sae_id=sae_id)
        name, meta = parts["name"], sae.cfg.metadata
        hook_name = getattr(meta, "hook_name", None)
        match = _HOOK_Z.fullmatch(hook_name or "")
        if hook_name and match is None:
            raise ValueError(f"{name}: its hook_name {hook_name!r} is not 'blocks.<L>.attn.hook_z': an output SAE "
                             "must read a head's z")
        if match is not None and layer is not None and int(match.group(1)) != layer:
            raise ValueError(f"{name}: layer={layer} does not match the SAE's hook_name {hook_name!r}")
        if layer is None:
            if match is None:
                raise ValueError(f"{name}: no hook_name says which layer's hook_z it reads: pass layer=")
            layer = int(match.group(1))
        head = getattr(meta, "hook_head_index", None) if head is None else head
        if head is None:
            raise ValueError(f"{name} does not say which head it reads (no hook_head_index): pass head=")
        d_in = parts["W_enc"].shape[0]
        if d_head is None or d_in == d_head:
            per_head, d_head = True, d_in
        elif n_heads is None or d_in != n_heads * d_head:
            raise ValueError(
                f"{name}: d_in is {d_in}, expected d_head={d_head} (a per-head SAE) or "
                f"n_heads*d_head={'?' if n_heads is None else n_heads * d_head} (an SAE over the layer's heads)")
        else:
            per_head = False
        reshaping = bool(getattr(parts["sae"], "hook_z_reshaping_mode", False))
        scale = parts["scaling_factor"]
        encode = parts["sae"].encode
        if scale is not None or reshaping:
            encode = LensEncode(parts["sae"], scale, d_head if reshaping else None).encode
        return cls(parts["W_enc"], parts["b_enc"], parts["W_dec"], parts["b_dec"], layer, head, n_heads, d_head,
                   per_head=per_head, architecture=parts["architecture"], threshold=parts["threshold"], k=parts["k"],
                   b_gate=parts["b_gate"], r_mag=parts["r_mag"], apply_b_dec_to_input=parts["apply_b_dec_to_input"],
                   sae_encode=encode, release=release, sae_id=sae_id, normalization=parts["normalization"],
                   scaling_factor=scale)


def as_sources(
    model: HookedTransformer, input_sae: Any, output_sae: Any, *, layer: int | None = None, head: int | None = None
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
    if not all(hasattr(output_sae, a) for a in ("W_enc", "W_dec", "b_dec", "cfg")):
        raise TypeError(f"output_sae must be an OutputSAE or a sae_lens SAE, got {type(output_sae).__name__}")
    return input_sae, OutputSAE.from_sae_lens(output_sae, layer, head, model.cfg.n_heads, model.cfg.d_head)


def check_compatible(
    model: HookedTransformer, input_sae: InputSAE | None = None, output_sae: OutputSAE | None = None,
) -> None:
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
