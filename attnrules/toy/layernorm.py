"""A planted model with LayerNorm and biases, where paper mode is misled and exact mode is not.

Same vocabulary, corpus and tokenizer as :mod:`attnrules.toy`, one head (L0H0), but built like a
processed GPT-2: LNPre before the head, centred writing weights, non-zero b_Q and b_K, and an input
SAE with a decoder bias (so a non-zero error term). Tokens and positions write orthogonal mean-zero
directions ``(e_2j − e_2j+1)/√2``, so LayerNorm only rescales: x̃ = x / σ.

- L0H0.0 ``[If] … [then]`` and L0H0.1 ``[Harry] … [Potter]``: skip-grams with real logit 5 and value 1.
- The **loud** token ``music`` has an embedding ``LOUD`` times longer than the others (its decoder
  row too). ``then`` attends to it with real logit 3 and it carries value 0.25 on L0H0.0's
  direction: too weak to make L0H0.0 fire. LayerNorm divides its position by a σ about LOUD/√2 times
  larger, so its real logit and value are ordinary, but paper mode, which ignores σ, inflates its
  attn-score and value-score about that much, and ranks ``(then, music)`` above ``(then, If)``.
- b_Q makes every query attend to BOS with logit 4 (an attention sink through a bias term that paper
  mode never sees); b_K adds a query-only constant that softmax ignores.
"""
from __future__ import annotations

import math

import torch

from attnrules.sources import InputSAE, OutputSAE
from attnrules.toy.planted import BOS, VOCAB, PlantedFeature, Toy, _tokenizer

D_HEAD = 8
LOUD = 20.0
LOUD_WORD = "music"
FEATURES = (
    PlantedFeature(0, 0, "skipgram", query="then", key="If"),
    PlantedFeature(0, 1, "skipgram", query="Potter", key="Harry"),
)
# Real logits (after LayerNorm and 1/sqrt(d_head)) of (query, key) per channel; BOS gets SINK from b_Q.
_LOGITS = {("then", "If"): 5.0, ("Potter", "Harry"): 5.0, ("then", LOUD_WORD): 3.0}
SINK = 4.0
# Real values: token -> (value direction, value after LayerNorm).
_VALUES = {"If": (0, 1.0), "Harry": (1, 1.0), LOUD_WORD: (0, 0.25)}
THRESHOLD = 0.3


def _direction(d_model: int, j: int) -> torch.Tensor:
    """Unit, mean-zero direction j: (e_2j − e_2j+1)/√2."""
    v = torch.zeros(d_model)
    v[2 * j], v[2 * j + 1] = 2**-0.5, -(2**-0.5)
    return v


def build_toy_ln(*, seq_len: int = 32, loud: float = LOUD) -> Toy:
    """Build the LayerNorm planted model (1 layer, 1 head, LNPre, biases) with its SAEs."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    n_vocab = len(VOCAB)
    d_model = 2 * (n_vocab + seq_len)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=d_model, n_ctx=seq_len, d_head=D_HEAD, n_heads=1, d_vocab=n_vocab,
        attn_only=True, normalization_type="LNPre", act_fn="relu", positional_embedding_type="standard",
        default_prepend_bos=True, seed=0,
    )
    model = HookedTransformer(cfg)
    model.set_tokenizer(_tokenizer())
    tok_scale = torch.ones(n_vocab)
    tok_scale[VOCAB.index(LOUD_WORD)] = loud
    W_E = torch.stack([tok_scale[j] * _direction(d_model, j) for j in range(n_vocab)])
    W_pos = torch.stack([_direction(d_model, n_vocab + p) for p in range(seq_len)])

    def x_hat(word: str) -> float:
        """The word's coordinate after LayerNorm: c / σ, σ² = (c² + 1)/d_model + eps (token + position)."""
        c = tok_scale[VOCAB.index(word)].item()
        return c / math.sqrt((c * c + 1) / d_model + cfg.eps)

    scale = math.sqrt(D_HEAD)
    W_Q, W_K, W_V = (torch.zeros(d_model, D_HEAD) for _ in range(3))
    b_Q, b_K = torch.zeros(D_HEAD), torch.zeros(D_HEAD)
    for channel, ((query, key), logit) in enumerate(_LOGITS.items()):
        W_Q[:, channel] = _direction(d_model, VOCAB.index(query)) * logit * scale / (x_hat(query) * x_hat(key))
        W_K[:, channel] = _direction(d_model, VOCAB.index(key))
    sink = len(_LOGITS)
    W_K[:, sink] = _direction(d_model, VOCAB.index(BOS))
    b_Q[sink] = SINK * scale / x_hat(BOS)
    b_K[sink + 1] = 1.5  # read by no query weight: adds q·b_K, the same for every key
    for word, (direction, value) in _VALUES.items():
        W_V[:, direction] = W_V[:, direction] + _direction(d_model, VOCAB.index(word)) * value / x_hat(word)
    with torch.no_grad():
        model.embed.W_E.copy_(W_E)
        model.pos_embed.W_pos.copy_(W_pos)
        model.unembed.W_U.copy_(W_E.T)
        attn = model.blocks[0].attn
        for param, value in ((attn.W_Q, W_Q), (attn.W_K, W_K), (attn.W_V, W_V)):
            param.copy_(value[None])
        attn.b_Q.copy_(b_Q[None])
        attn.b_K.copy_(b_K[None])
        for param in (attn.W_O, attn.b_O, attn.b_V, model.unembed.b_U):
            param.zero_()
    model.eval()

    # Input SAE: one feature per token and per position (decoder row = embedding row, encoder its
    # pseudo-inverse), with a decoder bias, so the error term is −b_dec.
    W_dec = torch.cat([W_E, W_pos])
    W_enc = (W_dec / W_dec.pow(2).sum(-1, keepdim=True)).T.contiguous()
    b_dec = 0.05 * torch.stack([_direction(d_model, j) for j in range(d_model // 2)]).T @ torch.linspace(-1, 1, d_model // 2)
    input_sae = InputSAE.from_tensors(W_enc, b_dec @ W_enc, W_dec, b_dec, layer=0)
    n_out = len(FEATURES)
    enc = torch.eye(D_HEAD)[:, :n_out].contiguous()
    b_dec_out = torch.zeros(D_HEAD)
    b_dec_out[-1] = 0.1  # a direction no feature reads
    output_sae = OutputSAE.from_tensors(
        enc, torch.full((n_out,), -THRESHOLD), enc.T.contiguous(), b_dec_out, layer=0, head=0, n_heads=1, d_head=D_HEAD
    )
    return Toy(model, input_sae, {0: output_sae}, FEATURES, seq_len)
