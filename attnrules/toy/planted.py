"""The embedded default: a small transformer_lens model whose heads implement known rules.

Everything is set by construction, deterministic and built in well under a second, so the whole
pipeline runs without a download and the tests know the right answer:

- The vocabulary is real words. The residual stream entering layer 0 is one-hot: token t sets
  coordinate t, position p sets coordinate ``n_vocab + p``. The input SAE's features are exactly
  these coordinates (identity encoder and decoder), so input feature j *is* a token or a position.
- Head L0H0 (skip-grams): ``[If] … [then]`` (L0H0.0), ``[http] … [com]`` unless ``[twitter]``
  (L0H0.1, absence: twitter pulls com's attention harder and writes a negative value),
  ``[Harry] … [Potter]`` (L0H0.2), and ``[night]`` attending to itself (L0H0.3, unrelated).
  L0H0.4 reads a direction nothing writes: it never fires.
- Head L0H1: ``count([games]) ≥ 2`` (L0H1.0, counting: games competes with a BOS attention sink,
  one copy takes < 1/2 of the attention, two take > 0.65), and ``[time] … [day]`` (L0H1.1, unrelated).
- Every query of both heads also attends to BOS (a weaker sink), so that a key's share of an early
  query's attention stays small when the query does not look for it.
- Each planted head has an output SAE whose features read one value direction with bias −θ.

:func:`generate_corpus` plants the patterns at set rates among filler words (which include the
words of the unrelated features, so those fire naturally).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from attnrules.circuit import HeadCircuit
from attnrules.sources import InputSAE, OutputSAE

BOS = "<|endoftext|>"
PLANTED_WORDS = ("If", "then", "http", "com", "twitter", "Harry", "Potter", "games")
FILLER_WORDS = (
    "the", "a", "of", "and", "to", "in", "is", "was", "it", "for", "on", "with", "as", "at", "by",
    "from", "we", "they", "said", "new", "people", "year", "music", "world", "city", "data", "water",
    "food", "house", "school", "team", "story", "book", "car", "road", "friend", "idea", "night",
    "time", "day",
)
VOCAB = (BOS,) + PLANTED_WORDS + FILLER_WORDS
D_HEAD = 8
N_HEADS = 2


@dataclass(frozen=True)
class PlantedFeature:
    """One output feature of the toy model and the rule it implements."""

    head: int
    index: int
    kind: str  # "skipgram" | "absence" | "counting" | "unrelated" | "dead"
    query: Optional[str] = None
    key: Optional[str] = None
    distractor: Optional[str] = None
    min_count: Optional[int] = None

    @property
    def name(self) -> str:
        return f"L0H{self.head}.{self.index}"


FEATURES = (
    PlantedFeature(0, 0, "skipgram", query="then", key="If"),
    PlantedFeature(0, 1, "absence", query="com", key="http", distractor="twitter"),
    PlantedFeature(0, 2, "skipgram", query="Potter", key="Harry"),
    PlantedFeature(0, 3, "unrelated", query="night", key="night"),
    PlantedFeature(0, 4, "dead"),
    PlantedFeature(1, 0, "counting", query="games", key="games", min_count=2),
    PlantedFeature(1, 1, "unrelated", query="day", key="time"),
)

# Real attention logits (after the model's 1/sqrt(d_head)) of each planted (head, query, key);
# every other pair has logit 0, except that every query gives BOS the head's sink logit (an
# attention sink: without it an early query would spread 1/(t+1) of its attention on any key).
# Values: (head, token) -> (value direction, value).
_SINK = {0: 3.0, 1: 3.0}
_LOGITS = {
    (0, "then", "If"): 5.0,
    (0, "com", "http"): 5.0,
    (0, "com", "twitter"): 7.0,
    (0, "Potter", "Harry"): 5.0,
    (0, "night", "night"): 5.0,
    (1, "games", BOS): 6.0,  # a stronger sink that each copy of games competes with
    (1, "games", "games"): 6.0,
    (1, "day", "time"): 5.0,
}
_VALUES = {
    (0, "If"): (0, 1.0),
    (0, "http"): (1, 1.0),
    (0, "twitter"): (1, -1.5),
    (0, "Harry"): (2, 1.0),
    (0, "night"): (3, 1.0),
    (1, "games"): (0, 1.0),
    (1, "time"): (1, 1.0),
}
# Output SAE of each head: feature i reads value direction i with bias -threshold.
_THRESHOLDS = {0: (0.3, 0.3, 0.3, 0.3, 0.1), 1: (0.575, 0.3)}


def _tokenizer():
    """A word-level HF tokenizer over VOCAB that prepends BOS, as GPT-2's does in transformer_lens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=BOS))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=BOS, pad_token=BOS, unk_token=BOS,
        add_bos_token=True, name_or_path="attnrules-toy",
    )


@dataclass(frozen=True)
class Toy:
    """The planted model, its SAEs and the ground truth."""

    model: "object"  # transformer_lens.HookedTransformer
    input_sae: InputSAE
    output_saes: dict  # head -> OutputSAE
    features: tuple = FEATURES
    seq_len: int = 32
    generator: Optional[Callable[..., torch.Tensor]] = None  # the corpus generator (None: generate_corpus)

    def token_id(self, word: str) -> int:
        return VOCAB.index(word)

    def circuit(self, head: int) -> HeadCircuit:
        return HeadCircuit.from_model(self.model, self.input_sae, self.output_saes[head], layer=0, head=head)

    def feature(self, name: str) -> PlantedFeature:
        return next(f for f in self.features if f.name == name)

    def corpus(self, n_sequences: int = 3000, *, seed: int = 0) -> torch.Tensor:
        return (self.generator or generate_corpus)(n_sequences, seq_len=self.seq_len, seed=seed)


def build_toy(*, seq_len: int = 32) -> Toy:
    """Build the planted model (1 layer, 2 heads, d_head 8, no LayerNorm) with its SAEs."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    n_vocab = len(VOCAB)
    d_model = n_vocab + seq_len
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=d_model, n_ctx=seq_len, d_head=D_HEAD, n_heads=N_HEADS, d_vocab=n_vocab,
        attn_only=True, normalization_type=None, act_fn="relu", positional_embedding_type="standard",
        default_prepend_bos=True, seed=0,
    )
    model = HookedTransformer(cfg)
    model.set_tokenizer(_tokenizer())
    state = {name: torch.zeros_like(p) for name, p in model.named_parameters()}  # buffers (causal mask) kept
    eye = torch.eye(d_model)
    state["embed.W_E"] = eye[:n_vocab].clone()
    state["pos_embed.W_pos"] = eye[n_vocab:].clone()
    state["unembed.W_U"] = eye[:, :n_vocab].clone()
    W_Q, W_K, W_V = state["blocks.0.attn.W_Q"], state["blocks.0.attn.W_K"], state["blocks.0.attn.W_V"]
    channel = {h: 1 for h in range(N_HEADS)}  # channel 0 of every head is the sink
    for h, logit in _SINK.items():
        W_Q[h, :n_vocab, 0] = logit * math.sqrt(D_HEAD)
        W_K[h, VOCAB.index(BOS), 0] = 1.0
    for (h, q, k), logit in _LOGITS.items():
        if k == BOS:
            W_Q[h, VOCAB.index(q), 0] = logit * math.sqrt(D_HEAD)
            continue
        c = channel[h]
        channel[h] += 1
        W_Q[h, VOCAB.index(q), c] = logit * math.sqrt(D_HEAD)
        W_K[h, VOCAB.index(k), c] = 1.0
    for (h, word), (direction, value) in _VALUES.items():
        W_V[h, VOCAB.index(word), direction] = value
    model.load_state_dict(state, strict=False)
    model.eval()

    input_sae = InputSAE.from_tensors(eye.clone(), torch.zeros(d_model), eye.clone(), torch.zeros(d_model), layer=0)
    output_saes = {}
    for h, thresholds in _THRESHOLDS.items():
        n_out = len(thresholds)
        enc = torch.eye(D_HEAD)[:, :n_out].contiguous()
        output_saes[h] = OutputSAE.from_tensors(
            enc, -torch.tensor(thresholds), enc.T.contiguous(), torch.zeros(D_HEAD), layer=0, head=h,
            n_heads=N_HEADS, d_head=D_HEAD,
        )
    return Toy(model, input_sae, output_saes, FEATURES, seq_len)


# Planting rates per sequence.
RATES = {
    "if_then": 0.15, "lone_then": 0.08, "lone_if": 0.05,
    "http_com": 0.15, "twitter_in_http_com": 0.4, "lone_com": 0.05, "lone_twitter": 0.05,
    "harry_potter": 0.12, "lone_potter": 0.05,
    "games_once": 0.12, "games_twice": 0.12, "games_thrice": 0.05,
}


def generate_corpus(
    n_sequences: int, *, seq_len: int = 32, seed: int = 0, rates: Optional[dict] = None
) -> torch.Tensor:
    """Token ids ``[n_sequences, seq_len]``: BOS, then filler words with planted patterns.

    Each pattern is planted independently with its rate (``RATES``, overridable), at random distinct
    positions in the right order (key before query; the distractor, when planted, before the query).
    """
    if n_sequences < 1 or seq_len < 8:
        raise ValueError(f"need n_sequences >= 1 and seq_len >= 8, got {n_sequences}, {seq_len}")
    rates = {**RATES, **(rates or {})}
    rng = np.random.default_rng(seed)
    filler = np.array([VOCAB.index(w) for w in FILLER_WORDS])
    tokens = filler[rng.integers(0, len(filler), size=(n_sequences, seq_len))]
    tokens[:, 0] = VOCAB.index(BOS)
    ids = {w: VOCAB.index(w) for w in PLANTED_WORDS}
    patterns = [
        ("if_then", ["If", "then"]), ("lone_then", ["then"]), ("lone_if", ["If"]),
        ("http_com", ["http", "com"]), ("lone_com", ["com"]), ("lone_twitter", ["twitter"]),
        ("harry_potter", ["Harry", "Potter"]), ("lone_potter", ["Potter"]),
        ("games_once", ["games"]), ("games_twice", ["games"] * 2), ("games_thrice", ["games"] * 3),
    ]
    for row in tokens:
        free = list(range(1, seq_len))
        for name, words in patterns:
            if rng.random() >= rates[name]:
                continue
            if name == "http_com" and rng.random() < rates["twitter_in_http_com"]:
                words = ["http", "twitter", "com"] if rng.random() < 0.5 else ["twitter", "http", "com"]
            if len(free) < len(words):
                break
            chosen = np.sort(rng.choice(free, size=len(words), replace=False))
            for pos, word in zip(chosen, words):
                row[pos] = ids[word]
                free.remove(pos)
    return torch.from_numpy(tokens).long()
