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

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


_RESID_PRE = re.compile(r"blocks\.(\d+)\.hook_resid_pre")
_HOOK_Z = re.compile(r"blocks\.(\d+)\.attn\.hook_z")


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
