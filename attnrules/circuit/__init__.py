"""One head seen through SAEs: :class:`HeadCircuit` (paper mode's projections D·W_Q, D·W_K, D·W_V and the
output encoder; :class:`Rotary`, a rotary head's offsets) and the exact decomposition of the head's
real logits (:func:`reconstruct`)."""
from attnrules.circuit.exact import (
    COMPONENTS,
    GROUPS,
    PAPER_GROUP,
    PSEUDO,
    SCALE_GROUP,
    LogitDecomposition,
    exact_projections,
    pseudo_name,
    reconstruct,
)
from attnrules.circuit.head import HeadCircuit
from attnrules.circuit.rotary import Rotary

__all__ = ["COMPONENTS", "GROUPS", "PAPER_GROUP", "PSEUDO", "SCALE_GROUP", "HeadCircuit", "LogitDecomposition", "Rotary",
           "exact_projections", "pseudo_name", "reconstruct"]
