"""The embedded defaults: small transformer_lens models with planted, known rules (no download).

:mod:`~attnrules.toy.planted` is the default (1 layer, 2 heads, one-hot residual, identity input SAE);
:mod:`~attnrules.toy.layernorm` its variant with LayerNorm and biases, where paper mode is misled;
:mod:`~attnrules.toy.rope` a rotary model with a rule that holds at offset 1 only.
"""
from attnrules.toy.layernorm import build_toy_ln
from attnrules.toy.rope import build_toy_rope
from attnrules.toy.planted import (
    BOS,
    FEATURES,
    PLANTED_WORDS,
    RATES,
    VOCAB,
    PlantedFeature,
    Toy,
    build_toy,
    generate_corpus,
)

__all__ = ["BOS", "FEATURES", "PLANTED_WORDS", "RATES", "VOCAB", "PlantedFeature", "Toy", "build_toy",
           "build_toy_ln", "build_toy_rope", "generate_corpus"]
