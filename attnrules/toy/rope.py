"""A planted rotary model: one rule that holds only at offset 1, and one that holds at any offset.

Same vocabulary and tokenizer as :mod:`attnrules.toy`, one layer, one head (L0H0) with rotary
positions (rotary_dim 16 of d_head 20, base 100, GPT-NeoX pairing) and no attention scaling, so
paper mode's attn-scores are the real logits. The residual stream is the token's
one-hot (no position embedding: positions enter only through the rotation) and the input SAE is the
identity, so input feature j is token j.

- L0H0.0 ``[Harry] …(δ=1)… [Potter]``: Potter's query and Harry's key align in every frequency pair
  at offset 1, A_δ = α(Σ_i w_i cos((δ − 1)θ_i) − c): real logit 7 when Harry is the token right before
  Potter and at most −1 at any other offset (w is the most offset-selective non-negative mix of the
  frequencies over 32 positions; c is a constant added through the unrotated dimensions). So the
  feature fires only for the bigram "Harry Potter", not for "Harry … Potter".
- L0H0.1 ``[If] … [then]``: real logit 5 through an unrotated dimension, the same at every offset.
- Every query attends to BOS with logit 3 (the sink), through an unrotated dimension.
- L0H0.2 reads a direction nothing writes: it never fires.

Scored without offsets (:meth:`HeadCircuit.offset_blind`, A = A_0), the Harry–Potter pair has a
negative attn-score and its rule never fires: the comparison the offset-aware scoring is built for.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from attnrules.sources import InputSAE, OutputSAE
from attnrules.toy.planted import BOS, FILLER_WORDS, VOCAB, PlantedFeature, Toy, _tokenizer

ROTARY_DIM = 16
D_HEAD = ROTARY_DIM + 4  # unrotated: sink, If→then, the offset-1 rule's constant, one unused
BASE = 100.0
# The most offset-selective non-negative mix of the 8 frequencies over offsets 0..31 (a linear program:
# maximise the smallest f(1) − f(δ), δ ≠ 1, with Σ w = 1); gap = that smallest difference.
WEIGHTS = (0.717, 0.105, 0.054, 0.061, 0.063, 0.0, 0.0, 0.0)
SINK_LOGIT, BIGRAM_LOGIT, ELSEWHERE_LOGIT, SKIPGRAM_LOGIT = 3.0, 7.0, -1.0, 5.0
FEATURES = (
    PlantedFeature(0, 0, "skipgram", query="Potter", key="Harry"),  # offset 1 only
    PlantedFeature(0, 1, "skipgram", query="then", key="If"),
    PlantedFeature(0, 2, "dead"),
)
OFFSET_ONE = "L0H0.0"  # the feature whose rule holds at offset 1 only
THRESHOLD = 0.3
RATES = {"bigram": 0.15, "far_pair": 0.15, "lone_potter": 0.05, "lone_harry": 0.05, "if_then": 0.15,
         "lone_then": 0.08}


def _profile(offsets: np.ndarray) -> np.ndarray:
    """f(δ) = Σ_i w_i cos((δ − 1)θ_i), the offset profile of the Harry–Potter pair (before α and c)."""
    theta = BASE ** (-np.arange(ROTARY_DIM // 2) / (ROTARY_DIM // 2))
    return (np.array(WEIGHTS)[None, :] * np.cos((offsets[:, None] - 1) * theta[None, :])).sum(-1)


def build_toy_rope(*, seq_len: int = 32) -> Toy:
    """Build the planted rotary model (1 layer, 1 head, no LayerNorm) with its SAEs."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    n_vocab = len(VOCAB)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=n_vocab, n_ctx=seq_len, d_head=D_HEAD, n_heads=1, d_vocab=n_vocab, attn_only=True,
        normalization_type=None, act_fn="relu", positional_embedding_type="rotary", rotary_dim=ROTARY_DIM,
        rotary_base=BASE, rotary_adjacent_pairs=False, use_attn_scale=False, default_prepend_bos=True, seed=0,
    )
    model = HookedTransformer(cfg)
    model.set_tokenizer(_tokenizer())
    profile = _profile(np.arange(seq_len))
    gap = profile[1] - np.delete(profile, 1).max()
    alpha = (BIGRAM_LOGIT - ELSEWHERE_LOGIT) / gap  # real logit per unit of f
    const = profile[1] - BIGRAM_LOGIT / alpha
    p = ROTARY_DIM // 2
    theta = BASE ** (-np.arange(p) / p)
    sink, skip, offset_const = ROTARY_DIM, ROTARY_DIM + 1, ROTARY_DIM + 2
    idx = VOCAB.index
    W_Q, W_K, W_V = torch.zeros(n_vocab, D_HEAD), torch.zeros(n_vocab, D_HEAD), torch.zeros(n_vocab, D_HEAD)
    W_Q[:, sink] = SINK_LOGIT
    W_K[idx(BOS), sink] = 1.0
    for i, (w, th) in enumerate(zip(WEIGHTS, theta)):  # the query rotated by δ meets the key at angle (δ − 1)θ_i
        W_Q[idx("Potter"), i] = alpha * w * math.cos(th)
        W_Q[idx("Potter"), p + i] = -alpha * w * math.sin(th)
        W_K[idx("Harry"), i] = 1.0
    W_Q[idx("Potter"), offset_const] = -alpha * const
    W_K[idx("Harry"), offset_const] = 1.0
    W_Q[idx("then"), skip] = SKIPGRAM_LOGIT
    W_K[idx("If"), skip] = 1.0
    W_V[idx("Harry"), 0] = 1.0
    W_V[idx("If"), 1] = 1.0
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        eye = torch.eye(n_vocab)
        model.embed.W_E.copy_(eye)
        model.unembed.W_U.copy_(eye)
        attn = model.blocks[0].attn
        for param, value in ((attn.W_Q, W_Q), (attn.W_K, W_K), (attn.W_V, W_V)):
            param.copy_(value[None])
    model.eval()
    input_sae = InputSAE.from_tensors(torch.eye(n_vocab), torch.zeros(n_vocab), torch.eye(n_vocab),
                                      torch.zeros(n_vocab), layer=0)
    n_out = len(FEATURES)
    enc = torch.eye(D_HEAD)[:, :n_out].contiguous()
    enc[:, 2] = 0.0
    enc[D_HEAD - 1, 2] = 1.0  # the unused dimension: nothing writes there
    output_sae = OutputSAE.from_tensors(enc, torch.full((n_out,), -THRESHOLD), enc.T.contiguous(), torch.zeros(D_HEAD),
                                        layer=0, head=0, n_heads=1, d_head=D_HEAD)
    return Toy(model, input_sae, {0: output_sae}, FEATURES, seq_len, generate_rope_corpus)


def generate_rope_corpus(n_sequences: int, *, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    """Token ids ``[n_sequences, seq_len]``: BOS, filler words, and at random places (rates ``RATES``)
    the bigram "Harry Potter", "Harry … Potter" two or more tokens apart, lone Harry or Potter, and
    "If … then" at any distance (or a lone then)."""
    if n_sequences < 1 or seq_len < 8:
        raise ValueError(f"need n_sequences >= 1 and seq_len >= 8, got {n_sequences}, {seq_len}")
    rng = np.random.default_rng(seed)
    filler = np.array([VOCAB.index(w) for w in FILLER_WORDS])
    tokens = filler[rng.integers(0, len(filler), size=(n_sequences, seq_len))]
    tokens[:, 0] = VOCAB.index(BOS)
    ids = {w: VOCAB.index(w) for w in ("Harry", "Potter", "If", "then")}
    for row in tokens:
        free = np.ones(seq_len, dtype=bool)
        free[0] = False

        def place(words: list[str], gap: int | None) -> None:
            """Put ``words`` in order at free places (``gap``: distance between the two; None: any)."""
            starts = [s for s in range(1, seq_len) if free[s]]
            rng.shuffle(starts)
            for s in starts:
                if len(words) == 1:
                    spots = [s]
                else:
                    d = gap if gap is not None else int(rng.integers(1, seq_len - 1))
                    spots = [s, s + d]
                if spots[-1] < seq_len and free[spots].all():
                    for pos, word in zip(spots, words):
                        row[pos], free[pos] = ids[word], False
                    return

        if rng.random() < RATES["bigram"]:
            place(["Harry", "Potter"], 1)
        if rng.random() < RATES["far_pair"]:
            place(["Harry", "Potter"], int(rng.integers(2, seq_len // 2)))
        for word in ("Potter", "Harry"):
            if rng.random() < RATES[f"lone_{word.lower()}"]:
                place([word], None)
        if rng.random() < RATES["if_then"]:
            place(["If", "then"], None)
        if rng.random() < RATES["lone_then"]:
            place(["then"], None)
    return torch.from_numpy(tokens).long()
