"""Two more planted transformer_lens models for the tests: ``build_glyph()`` and ``build_rune()``.

They are built unlike :mod:`attnrules.toy` and :mod:`attnrules.toy.layernorm` on purpose (invented
vocabularies, BOS not at id 0 or with another string, explained heads in a later layer behind layers
that write nothing, LNPre / RMSPre, an attention scale that is not sqrt(d_head), input SAEs with a
decoder bias or with rotated decoder rows), so that code that silently assumes one of those
properties fails on them.

Every attention logit below is a *real* logit: what ``hook_attn_scores`` holds after LayerNorm /
RMSNorm and the model's ``attn_scale``, up to a constant per query (b_K adds ``q·b_K`` to every key
of a query; softmax ignores it). The residual stream entering the explained layer is
``token direction + position direction`` (two orthonormal unit vectors), so the normalization
multiplies it by the same ``c = 1/sqrt(2/d_model + eps)`` at every position, and

- a weight channel with ``W_Q = a·d_query`` and ``W_K = b·d_key`` gives logit ``c²·a·b / attn_scale``,
- a bias channel with ``b_Q = β`` and ``W_K = d_key`` gives *every* query logit ``β·c / attn_scale``,
- a value ``W_V[:, i] = d_key·v/c`` writes ``v`` on value direction ``i``.

Paper-mode scores (``attnrules.circuit``) see ``a·b`` and ``v/c`` only: no bias, no c, no scale.

Every non-rule key carries logit 0, so each query also attends a BOS sink (through its own W_Q row)
that keeps a value-carrying key's share small at queries that do not look for it. Each head's
output SAE feature i reads value direction i with bias −θ_i. Ground truth (``.fires``) is computed
from the tokens alone; the thresholds were chosen so that the worst case of every rule, with all the
other planted keys and all the filler present, keeps a clear margin on both sides (≥ 2× for a
single key's share, ≈ 0.045 either side of 0.494 for the counting features).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from attnrules.circuit import HeadCircuit
from attnrules.sources import InputSAE, OutputSAE

__all__ = [
    "PlantedRule",
    "PlantedModel",
    "build_glyph",
    "build_rune",
    "GLYPH_VOCAB",
    "GLYPH_BOS",
    "GLYPH_RATES",
    "RUNE_VOCAB",
    "RUNE_BOS",
    "RUNE_RATES",
]


# --------------------------------------------------------------------------------------------------
# Shared pieces


@dataclass(frozen=True)
class PlantedRule:
    """One planted output feature ``L{layer}H{head}.{index}`` and its rule.

    kind: ``skipgram`` (query after any of ``keys``), ``disjunction`` (same, several keys, the
    first one strong and the others weak), ``absence`` (query after key unless ``distractor``
    came first), ``false_distractor`` (a skip-gram whose ``distractor`` only *looks* like one to
    paper mode: it does not change the feature), ``query_bias`` (every position at or after a key;
    ``query`` is None), ``counting`` (query with at least ``min_count`` keys at or before it),
    ``noise`` (fires at random; no ground truth) or ``dead`` (never fires).
    """

    layer: int
    head: int
    index: int
    kind: str
    query: Optional[str] = None
    keys: tuple = ()
    distractor: Optional[str] = None
    min_count: Optional[int] = None
    note: str = ""

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}.{self.index}"

    @property
    def key(self) -> Optional[str]:
        return self.keys[0] if self.keys else None


@dataclass(frozen=True, eq=False)
class PlantedModel:
    """A planted model, its SAEs, its ground truth and its corpus (like :class:`attnrules.toy.Toy`)."""

    name: str
    model: "object"  # transformer_lens.HookedTransformer, eval mode, processed
    input_sae: InputSAE  # reads blocks.{layer}.hook_resid_pre
    output_saes: dict  # head -> OutputSAE
    features: tuple  # PlantedRule, in (head, index) order
    vocab: tuple
    bos: str
    layer: int
    seq_len: int
    rates: dict
    logits: dict = field(default_factory=dict)  # (head, query, key) -> real logit; query "*": b_Q, any query
    fillers: tuple = ()  # words planted by no rule
    _generate: Optional[Callable] = None

    @property
    def bos_id(self) -> int:
        return self.vocab.index(self.bos)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def token_id(self, word: str) -> int:
        return self.vocab.index(word)

    def feature(self, name: str) -> PlantedRule:
        return next(f for f in self.features if f.name == name)

    def circuit(self, head: int) -> HeadCircuit:
        return HeadCircuit.from_model(self.model, self.input_sae, self.output_saes[head], layer=self.layer, head=head)

    def corpus(self, n_sequences: int = 2000, *, seed: int = 0) -> torch.Tensor:
        """Token ids ``[n_sequences, seq_len]``, BOS at position 0, patterns planted at ``rates``."""
        return self._generate(n_sequences, self.seq_len, seed)

    def fires(self, tokens: torch.Tensor) -> dict:
        """Ground truth ``{feature name: bool [n, T]}`` from the tokens alone (noise feature left out)."""
        return {f.name: _truth(tokens, f, self.token_id) for f in self.features if f.kind != "noise"}

    def acts(self, tokens: torch.Tensor, head: int) -> torch.Tensor:
        """Output-SAE activations ``[n, T, n_out]`` of ``head`` from transformer_lens's forward pass."""
        hook = f"blocks.{self.layer}.attn.hook_z"
        with torch.no_grad():
            _, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n == hook)
        return self.output_saes[head].encode(cache[hook])


def _truth(tokens: torch.Tensor, f: PlantedRule, token_id: Callable) -> torch.Tensor:
    at = lambda w: tokens == token_id(w)  # noqa: E731
    count = lambda w: torch.cumsum(at(w).long(), dim=1)  # noqa: E731  copies at or before each position
    seen = lambda w: count(w) > 0  # noqa: E731
    if f.kind in ("skipgram", "disjunction", "false_distractor"):
        return at(f.query) & torch.stack([seen(k) for k in f.keys]).any(0)
    if f.kind == "absence":
        return at(f.query) & seen(f.key) & ~seen(f.distractor)
    if f.kind == "query_bias":
        return seen(f.key)
    if f.kind == "counting":
        return at(f.query) & (count(f.key) >= f.min_count)
    if f.kind == "dead":
        return torch.zeros_like(tokens, dtype=torch.bool)
    raise ValueError(f"{f.name} ({f.kind}) has no ground truth")


def _word_tokenizer(vocab: tuple, bos: str, name: str):
    """A word-level HF tokenizer over ``vocab`` that prepends BOS (like attnrules.toy._tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=bos))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=bos, pad_token=bos, unk_token=bos,
        add_bos_token=True, name_or_path=name,
    )


def _generate(n_sequences, seq_len, seed, *, vocab, bos, fillers, patterns, zib, zib_counts):
    """Filler words, then each pattern planted independently (at random free positions, in the
    listed order), then ``k`` copies of ``zib`` with probability ``zib_counts[k]``.

    ``patterns``: (rate, sampler) where ``sampler(rng)`` returns the words to plant in order.
    A pattern that no longer fits in the free positions is skipped.
    """
    if n_sequences < 1:
        raise ValueError(f"need n_sequences >= 1, got {n_sequences}")
    rng = np.random.default_rng(seed)
    ids = {w: i for i, w in enumerate(vocab)}
    filler = np.array([ids[w] for w in fillers])
    tokens = filler[rng.integers(0, len(filler), size=(n_sequences, seq_len))]
    tokens[:, 0] = ids[bos]
    counts, probs = zip(*sorted(zib_counts.items()))
    for row in tokens:
        free = list(range(1, seq_len))
        plan = [sampler(rng) for rate, sampler in patterns if rng.random() < rate]
        plan.append([zib] * int(rng.choice(counts, p=probs)))
        for words in plan:
            if not words or len(free) < len(words):
                continue
            chosen = np.sort(rng.choice(free, size=len(words), replace=False))
            for pos, word in zip(chosen, words):
                row[pos] = ids[word]
                free.remove(pos)
    return torch.from_numpy(tokens).long()


def _set_weights(model, W_E, W_pos, layer: int, head_weights: tuple, random_seed: Optional[int] = None) -> None:
    """Embeddings (unembedding = W_Eᵀ), ``head_weights`` = (W_Q, W_K, W_V, b_Q, b_K) in ``layer``; every
    other layer writes nothing (W_O = 0), and attends at random (``random_seed``) or not at all."""
    g = torch.Generator().manual_seed(random_seed or 0)
    with torch.no_grad():
        model.embed.W_E.copy_(W_E)
        model.pos_embed.W_pos.copy_(W_pos)
        model.unembed.W_U.copy_(W_E.T)
        model.unembed.b_U.zero_()
        for index, block in enumerate(model.blocks):
            attn = block.attn
            for i, p in enumerate((attn.W_Q, attn.W_K, attn.W_V, attn.b_Q, attn.b_K)):
                if index == layer:
                    p.copy_(head_weights[i])
                elif random_seed is not None and i < 3:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.zero_()
            for p in (attn.W_O, attn.b_O, attn.b_V):
                p.zero_()
    model.eval()


def _pinv(W_dec: torch.Tensor) -> torch.Tensor:
    """The encoder ``[d_model, n_in]``: the pseudo-inverse of the decoder rows (numpy: fast at this size)."""
    return torch.from_numpy(np.linalg.pinv(W_dec.double().numpy())).float().contiguous()


def _lone(word):
    return lambda rng: [word]


def _calibrate_noise(model, layer, head, direction, corpus, quantile):
    """The value of z[direction] that a fraction ``1 − quantile`` of the sequences exceed somewhere."""
    hook = f"blocks.{layer}.attn.hook_z"
    with torch.no_grad():
        _, cache = model.run_with_cache(corpus, names_filter=lambda n: n == hook)
    per_sequence = cache[hook][:, :, head, direction].amax(dim=1)
    return float(torch.quantile(per_sequence.double(), quantile))


def _noise_column(d_model, avoid, seed):
    """Random ~1e-7 entries, orthogonal to the ``avoid`` directions (BOS and position 0, so that the
    sequence-independent sink at BOS carries no noise)."""
    g = torch.Generator().manual_seed(seed)
    col = 1e-7 * torch.randn(d_model, generator=g)
    for d in avoid:
        col = col - (col @ d) * d
    return col


# --------------------------------------------------------------------------------------------------
# Glyph: 2 layers, LNPre, attn_scale 2, heads in layer 1, BOS = last id


GLYPH_BOS = "<glyph>"
GLYPH_PLANTED = ("zorp", "blick", "wug", "dax", "fep", "mip", "tov", "gleb", "krel", "vosh", "snib", "plon", "zib")
GLYPH_FILLER = (
    "quib", "narf", "yoth", "plim", "drev", "skag", "thun", "bap", "frell", "mook", "wix", "grum", "tisk",
    "lorp", "chev", "nim", "jub", "vask", "ploo", "kesh", "drom", "fip", "gorb", "huz", "yem",
)
GLYPH_VOCAB = GLYPH_PLANTED + GLYPH_FILLER + (GLYPH_BOS,)  # BOS is the last id
GLYPH_LAYER = 1
GLYPH_D_HEAD = 16
GLYPH_ATTN_SCALE = 2.0  # not sqrt(16) = 4
GLYPH_SEQ_LEN = 20
GLYPH_N_CTX = GLYPH_SEQ_LEN + 4  # room to insert a few tokens in front

GLYPH_FEATURES = (
    PlantedRule(1, 0, 0, "skipgram", query="blick", keys=("zorp",)),
    PlantedRule(1, 0, 1, "disjunction", query="fep", keys=("wug", "dax"),
                note="wug writes 1.6, dax 0.8: dax-only activations stay below every wug activation"),
    PlantedRule(1, 0, 2, "absence", query="tov", keys=("mip",), distractor="gleb"),
    PlantedRule(1, 0, 3, "false_distractor", query="vosh", keys=("krel",), distractor="snib",
                note="paper A(vosh, snib) > A(vosh, krel) > 0, V(snib) < 0, but the real logit of krel "
                     "(6.5, mostly from b_Q) beats snib's (1) by 5.5"),
    PlantedRule(1, 0, 4, "query_bias", keys=("plon",),
                note="b_Q makes every query attend plon, the plon position itself included"),
    PlantedRule(1, 0, 5, "noise", note="written only by ~1e-7 noise in W_V; bias calibrated"),
    PlantedRule(1, 0, 6, "dead"),
    PlantedRule(1, 1, 0, "counting", query="zib", keys=("zib",), min_count=3),
)

# Head L1H0. Sinks: every word attends BOS with logit 9 through its W_Q row, except vosh (3). The
# 9 must beat the b_Q logit of krel (6) by 3, so that krel carries < 0.05 of any other query's
# attention (feature 3 needs 0.2); vosh keeps a small sink (3) so that a stray key at logit 0 gets
# < 0.05 of it. Rule keys get 10 (> sink + 1: > 0.7 of the attention with everything else present).
GLYPH_SINK, GLYPH_VOSH_SINK = 9.0, 3.0
GLYPH_RULES = {  # (query, key) -> real logit, through one W_Q/W_K channel each
    ("blick", "zorp"): 10.0,
    ("fep", "wug"): 10.0,
    ("fep", "dax"): 10.0,
    ("tov", "mip"): 10.0,
    ("tov", "gleb"): 10.5,  # gleb out-pulls mip and writes −1.5: tov's feature 2 goes negative
    ("vosh", "snib"): 1.0,  # the false distractor: a positive paper score, a small real logit
    ("vosh", "krel"): 0.5,  # the skip-gram's own paper score: positive, below snib's (krel's real pull is b_Q's)
}
# b_Q logits, the same at every query. krel only wins at vosh (no strong sink). plon's 6 leaves
# every query > 0.0038 of its attention on plon even against a sink and rule keys (worst: tov after
# mip, krel and two glebs; feature 4 needs 0.001: nothing else writes its direction, so z is exactly
# 0 without plon), and leaves krel ≥ 0.46 of vosh's attention when both are there (feature 3 needs 0.2).
GLYPH_BIAS = {"krel": 6.0, "plon": 6.0}
GLYPH_VALUES = {  # word -> (value direction = output feature, real value)
    "zorp": (0, 1.0), "wug": (1, 1.6), "dax": (1, 0.8), "mip": (2, 1.0), "gleb": (2, -1.5),
    "krel": (3, 1.0), "snib": (3, -1.0), "plon": (4, 1.0),
}
GLYPH_NOISE_DIRECTION, GLYPH_NOISE_QUANTILE = 5, 0.6  # fires in ~40% of sequences
GLYPH_THRESHOLDS = {0: 0.3, 1: 0.2, 2: 0.3, 3: 0.2, 4: 0.001, 6: 0.1}
# Head L1H1: count([zib]) ≥ 3. zib attends BOS with logit 8 and each zib (itself included) with
# 8 − ln(√6): n copies take n·r/(1 + n·r) with r = 1/√6 — 0.449 for two, 0.551 for three (the r
# that maximises the gap); threshold 0.494. Other words attend BOS with logit 6.
GLYPH_COUNT_SINK, GLYPH_COUNT_OTHER_SINK = 8.0, 6.0
GLYPH_COUNT_LOGIT = GLYPH_COUNT_SINK - 0.5 * math.log(6.0)
GLYPH_COUNT_THRESHOLD = 0.494

GLYPH_RATES = {
    "zorp_blick": 0.15, "lone_blick": 0.06, "lone_zorp": 0.05,
    "wug_fep": 0.25, "dax_fep": 0.09, "lone_fep": 0.05, "lone_wug": 0.04, "lone_dax": 0.04,
    "mip_tov": 0.17, "gleb_in_mip_tov": 0.4, "lone_tov": 0.05, "lone_mip": 0.04, "lone_gleb": 0.05,
    "krel_vosh": 0.15, "snib_in_krel_vosh": 0.3, "lone_vosh": 0.05, "lone_krel": 0.05, "lone_snib": 0.08,
    "plon": 0.15,
    "zib": {0: 0.5, 1: 0.13, 2: 0.12, 3: 0.15, 4: 0.10},  # copies of zib per sequence
}


def _glyph_patterns(r):
    def with_distractor(key, distractor, query, rate):
        def sample(rng):
            if rng.random() >= rate:
                return [key, query]
            return [key, distractor, query] if rng.random() < 0.5 else [distractor, key, query]
        return sample

    return [
        (r["zorp_blick"], lambda rng: ["zorp", "blick"]), (r["lone_blick"], _lone("blick")),
        (r["lone_zorp"], _lone("zorp")),
        (r["wug_fep"], lambda rng: ["wug", "fep"]), (r["dax_fep"], lambda rng: ["dax", "fep"]),
        (r["lone_fep"], _lone("fep")), (r["lone_wug"], _lone("wug")), (r["lone_dax"], _lone("dax")),
        (r["mip_tov"], with_distractor("mip", "gleb", "tov", r["gleb_in_mip_tov"])),
        (r["lone_tov"], _lone("tov")), (r["lone_mip"], _lone("mip")), (r["lone_gleb"], _lone("gleb")),
        (r["krel_vosh"], with_distractor("krel", "snib", "vosh", r["snib_in_krel_vosh"])),
        (r["lone_vosh"], _lone("vosh")), (r["lone_krel"], _lone("krel")), (r["lone_snib"], _lone("snib")),
        (r["plon"], _lone("plon")),
    ]


def _pair_direction(d_model: int, j: int) -> torch.Tensor:
    """Unit, mean-zero direction j: (e_2j − e_2j+1)/√2, so LayerNorm only rescales."""
    v = torch.zeros(d_model)
    v[2 * j], v[2 * j + 1] = 2**-0.5, -(2**-0.5)
    return v


def build_glyph(*, rates: Optional[dict] = None) -> PlantedModel:
    """Glyph: 2 attn-only layers, LNPre, b_Q/b_K ≠ 0, d_head 16 with attn_scale 2, heads in layer 1.

    Layer 0 computes attention but writes nothing (W_O = b_O = 0), so resid_pre of layer 1 is
    token + position embedding. L1H0 carries features 0–6 (skip-gram, key disjunction, real
    distractor, false distractor, query bias, noise, dead), L1H1 counting (``GLYPH_FEATURES``).
    Feature L1H0.4 fires at every position at or after a plon, plon's own position included, at
    every query (also the strong-sink ones: there plon's value gets > 0.0038, the threshold is 0.001).
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    rates = {**GLYPH_RATES, **(rates or {})}
    vocab, n_vocab, n_ctx = GLYPH_VOCAB, len(GLYPH_VOCAB), GLYPH_N_CTX
    d_model, d_head, scale = 2 * (n_vocab + n_ctx), GLYPH_D_HEAD, GLYPH_ATTN_SCALE
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=d_model, n_ctx=n_ctx, d_head=d_head, n_heads=2, d_vocab=n_vocab, attn_only=True,
        normalization_type="LNPre", use_attn_scale=True, attn_scale=scale, act_fn="relu",
        positional_embedding_type="standard", default_prepend_bos=True, seed=0,
    )
    model = HookedTransformer(cfg)
    model.set_tokenizer(_word_tokenizer(vocab, GLYPH_BOS, "attnrules-glyph"))
    tok = lambda w: _pair_direction(d_model, vocab.index(w))  # noqa: E731
    W_E = torch.stack([_pair_direction(d_model, j) for j in range(n_vocab)])
    W_pos = torch.stack([_pair_direction(d_model, n_vocab + p) for p in range(n_ctx)])
    c = 1.0 / math.sqrt(2.0 / d_model + cfg.eps)  # LNPre's factor on token + position
    qk = lambda logit: logit * scale / (c * c)  # noqa: E731  W_Q weight of a channel whose W_K is d_key
    bias = lambda logit: logit * scale / c  # noqa: E731  b_Q of a channel whose W_K is d_key

    W_Q, W_K, W_V = (torch.zeros(2, d_model, d_head) for _ in range(3))
    b_Q, b_K = torch.zeros(2, d_head), torch.zeros(2, d_head)
    # L1H0 channels: 0 sink, 1–7 rules, 8–9 b_Q keys; b_K on channels 1 and 9 adds q·b_K, the same for every key of a query.
    for w in vocab:
        W_Q[0, :, 0] += tok(w) * qk(GLYPH_VOSH_SINK if w == "vosh" else GLYPH_SINK)
    W_K[0, :, 0] = tok(GLYPH_BOS)
    for channel, ((query, key), logit) in enumerate(GLYPH_RULES.items(), start=1):
        W_Q[0, :, channel] = tok(query) * qk(logit)
        W_K[0, :, channel] = tok(key)
    for channel, (key, logit) in enumerate(GLYPH_BIAS.items(), start=1 + len(GLYPH_RULES)):
        b_Q[0, channel] = bias(logit)
        W_K[0, :, channel] = tok(key)
    b_K[0, 1], b_K[0, 9] = 0.25, -0.4  # q·b_K is the same for every key of a query
    for word, (direction, value) in GLYPH_VALUES.items():
        W_V[0, :, direction] += tok(word) * value / c
    avoid = (tok(GLYPH_BOS), _pair_direction(d_model, n_vocab))
    W_V[0, :, GLYPH_NOISE_DIRECTION] = _noise_column(d_model, avoid, seed=5)
    # L1H1 channels: 0 sink, 1 zib -> zib, 2 a b_Q·b_K constant.
    for w in vocab:
        W_Q[1, :, 0] += tok(w) * qk(GLYPH_COUNT_SINK if w == "zib" else GLYPH_COUNT_OTHER_SINK)
    W_K[1, :, 0] = tok(GLYPH_BOS)
    W_Q[1, :, 1] = tok("zib") * qk(GLYPH_COUNT_LOGIT)
    W_K[1, :, 1] = tok("zib")
    b_Q[1, 2], b_K[1, 2] = 0.5, 0.7
    W_V[1, :, 0] = tok("zib") / c

    _set_weights(model, W_E, W_pos, GLYPH_LAYER, (W_Q, W_K, W_V, b_Q, b_K), random_seed=0)

    # Input SAE: one feature per token and per position; encoder = pseudo-inverse, decoder bias ≠ 0
    # (b_enc = b_dec @ W_enc, so the features are exactly 1 on the token and the position).
    W_dec = torch.cat([W_E, W_pos])
    W_enc = _pinv(W_dec)
    b_dec = 0.05 * W_dec.T @ torch.linspace(-1, 1, W_dec.shape[0])  # in the decoder's span: error = −b_dec
    input_sae = InputSAE.from_tensors(W_enc, b_dec @ W_enc, W_dec, b_dec, layer=GLYPH_LAYER)

    def generate(n, seq_len, seed):
        return _generate(n, seq_len, seed, vocab=vocab, bos=GLYPH_BOS, fillers=GLYPH_FILLER,
                         patterns=_glyph_patterns(rates), zib="zib", zib_counts=rates["zib"])

    noise = _calibrate_noise(model, GLYPH_LAYER, 0, GLYPH_NOISE_DIRECTION, generate(256, GLYPH_SEQ_LEN, 10_001),
                             GLYPH_NOISE_QUANTILE)
    thresholds0 = [GLYPH_THRESHOLDS.get(i, noise) for i in range(7)]
    output_saes = {
        0: _per_head_sae(thresholds0, d_head, GLYPH_LAYER, 0, 2, unread_bias=0.1),
        1: _per_head_sae([GLYPH_COUNT_THRESHOLD], d_head, GLYPH_LAYER, 1, 2),
    }
    logits = {(0, q, k): v for (q, k), v in GLYPH_RULES.items()}
    logits.update({(0, "*", k): v for k, v in GLYPH_BIAS.items()})
    logits.update({(0, w, GLYPH_BOS): GLYPH_VOSH_SINK if w == "vosh" else GLYPH_SINK for w in vocab})
    logits.update({(1, w, GLYPH_BOS): GLYPH_COUNT_SINK if w == "zib" else GLYPH_COUNT_OTHER_SINK for w in vocab})
    logits[(1, "zib", "zib")] = GLYPH_COUNT_LOGIT
    return PlantedModel("glyph", model, input_sae, output_saes, GLYPH_FEATURES, vocab, GLYPH_BOS, GLYPH_LAYER,
                        GLYPH_SEQ_LEN, rates, logits, GLYPH_FILLER, generate)


def _per_head_sae(thresholds, d_head, layer, head, n_heads, unread_bias=0.0):
    """Output SAE of one head: feature i reads value direction i with bias −thresholds[i]."""
    n_out = len(thresholds)
    enc = torch.eye(d_head)[:, :n_out].contiguous()
    b_dec = torch.zeros(d_head)
    b_dec[-1] = unread_bias  # a direction no feature reads
    return OutputSAE.from_tensors(enc, -torch.tensor(thresholds, dtype=torch.float32), enc.T.contiguous(), b_dec,
                                  layer=layer, head=head, n_heads=n_heads, d_head=d_head)


# --------------------------------------------------------------------------------------------------
# Rune: 3 layers, RMSPre, no attention scale, head L2H2, rotated input SAE, BOS = id 0 "<bos>"


RUNE_BOS = "<bos>"
RUNE_PLANTED = ("thrum", "vell", "quor", "nabe", "skell", "yip", "drell")
RUNE_FILLER = (
    "brap", "clem", "dorf", "fumb", "gazz", "hobb", "ixle", "jarn", "kupp", "lemb", "morv", "nurk",
    "oskel", "pesk", "rilt", "sabb", "tukk", "ulm", "vapp", "wolp", "yuzz", "zeff", "crob", "threb",
)
RUNE_VOCAB = (RUNE_BOS,) + RUNE_PLANTED + RUNE_FILLER
RUNE_LAYER, RUNE_HEAD, RUNE_N_HEADS = 2, 2, 3
RUNE_D_HEAD = 6
RUNE_SEQ_LEN = 18
RUNE_N_CTX = RUNE_SEQ_LEN + 4

RUNE_FEATURES = (
    PlantedRule(2, 2, 0, "skipgram", query="vell", keys=("thrum",)),
    PlantedRule(2, 2, 1, "absence", query="nabe", keys=("quor",), distractor="skell"),
    PlantedRule(2, 2, 2, "counting", query="yip", keys=("yip",), min_count=3,
                note="same head: yip's own strong BOS sink (8) makes drell's b_Q logit (5) negligible"),
    PlantedRule(2, 2, 3, "query_bias", keys=("drell",),
                note="b_Q makes every query attend drell, the drell position itself included"),
    PlantedRule(2, 2, 4, "noise", note="written only by ~1e-7 noise in W_V; bias calibrated"),
    PlantedRule(2, 2, 5, "dead"),
)

# All in L2H2 (d_head 6: six q/k channels, six value directions). Other words attend BOS with 4
# (a stray key at logit 0 gets < 0.02). yip attends BOS with 8 and each yip with 8 − ln(√6), as in
# glyph's counting head; the large sink keeps drell (b_Q logit 5) at < 0.05 of yip's attention, so
# that the count margin (0.449 / 0.537 around 0.494) holds with drell present, while drell still
# gets > 0.0045 at every query (worst: nabe after quor and two skells; threshold 0.001).
RUNE_SINK, RUNE_COUNT_SINK = 4.0, 8.0
RUNE_COUNT_LOGIT = RUNE_COUNT_SINK - 0.5 * math.log(6.0)
RUNE_RULES = {("vell", "thrum"): 8.0, ("nabe", "quor"): 8.0, ("nabe", "skell"): 9.5}
RUNE_BIAS = {"drell": 5.0}
RUNE_VALUES = {"thrum": (0, 1.0), "quor": (1, 1.0), "skell": (1, -1.5), "yip": (2, 1.0), "drell": (3, 1.0)}
RUNE_NOISE_DIRECTION, RUNE_NOISE_QUANTILE = 4, 0.6
RUNE_THRESHOLDS = {0: 0.3, 1: 0.3, 2: 0.494, 3: 0.001, 5: 0.1}
RUNE_ROTATION_SEED = 7

RUNE_RATES = {
    "thrum_vell": 0.2, "lone_vell": 0.05, "lone_thrum": 0.05,
    "quor_nabe": 0.2, "skell_in_quor_nabe": 0.4, "lone_nabe": 0.05, "lone_skell": 0.05,
    "drell": 0.15,
    "yip": {0: 0.5, 1: 0.13, 2: 0.12, 3: 0.15, 4: 0.10},
}


def _rune_patterns(r):
    def quor_nabe(rng):
        if rng.random() >= r["skell_in_quor_nabe"]:
            return ["quor", "nabe"]
        return ["quor", "skell", "nabe"] if rng.random() < 0.5 else ["skell", "quor", "nabe"]

    return [
        (r["thrum_vell"], lambda rng: ["thrum", "vell"]), (r["lone_vell"], _lone("vell")),
        (r["lone_thrum"], _lone("thrum")),
        (r["quor_nabe"], quor_nabe), (r["lone_nabe"], _lone("nabe")), (r["lone_skell"], _lone("skell")),
        (r["drell"], _lone("drell")),
    ]


def build_rune(*, rates: Optional[dict] = None) -> PlantedModel:
    """Rune: 3 attn-only layers × 3 heads, RMSPre, no attention scale, d_head 6, explained head L2H2.

    Layers 0 and 1 write nothing; heads L2H0/L2H1 are silent. Tokens and positions write the rows of
    a fixed random orthogonal matrix, so the input SAE's decoder rows are not axis-aligned (encoder =
    their pseudo-inverse, zero decoder bias). L2H2 carries all six features (``RUNE_FEATURES``),
    counting included. Feature L2H2.3 fires at every position at or after a drell.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    rates = {**RUNE_RATES, **(rates or {})}
    vocab, n_vocab, n_ctx = RUNE_VOCAB, len(RUNE_VOCAB), RUNE_N_CTX
    d_model, d_head, h = n_vocab + n_ctx, RUNE_D_HEAD, RUNE_HEAD
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=d_model, n_ctx=n_ctx, d_head=d_head, n_heads=RUNE_N_HEADS, d_vocab=n_vocab,
        attn_only=True, normalization_type="RMSPre", use_attn_scale=False, act_fn="relu",
        positional_embedding_type="standard", default_prepend_bos=True, seed=0,
    )
    model = HookedTransformer(cfg)
    model.set_tokenizer(_word_tokenizer(vocab, RUNE_BOS, "attnrules-rune"))
    rotation, _ = np.linalg.qr(np.random.default_rng(RUNE_ROTATION_SEED).standard_normal((d_model, d_model)))
    rotation = torch.from_numpy(rotation).float()
    W_E, W_pos = rotation[:n_vocab].clone(), rotation[n_vocab:].clone()
    tok = lambda w: W_E[vocab.index(w)]  # noqa: E731
    c = 1.0 / math.sqrt(2.0 / d_model + cfg.eps)  # RMSPre's factor on token + position

    W_Q, W_K, W_V = (torch.zeros(RUNE_N_HEADS, d_model, d_head) for _ in range(3))
    b_Q, b_K = torch.zeros(RUNE_N_HEADS, d_head), torch.zeros(RUNE_N_HEADS, d_head)
    # L2H2 channels: 0 sink, 1 vell<-thrum, 2 nabe<-quor/skell, 3 yip<-yip, 4 b_Q drell, 5 b_K only.
    for w in vocab:
        W_Q[h, :, 0] += tok(w) * (RUNE_COUNT_SINK if w == "yip" else RUNE_SINK) / (c * c)
    W_K[h, :, 0] = tok(RUNE_BOS)
    W_Q[h, :, 1] = tok("vell") / (c * c)
    W_K[h, :, 1] = tok("thrum") * RUNE_RULES[("vell", "thrum")]
    W_Q[h, :, 2] = tok("nabe") / (c * c)
    W_K[h, :, 2] = tok("quor") * RUNE_RULES[("nabe", "quor")] + tok("skell") * RUNE_RULES[("nabe", "skell")]
    W_Q[h, :, 3] = tok("yip") * RUNE_COUNT_LOGIT / (c * c)
    W_K[h, :, 3] = tok("yip")
    b_Q[h, 4] = RUNE_BIAS["drell"] / c
    W_K[h, :, 4] = tok("drell")
    b_K[h, 1], b_K[h, 5] = 0.3, -0.6
    for word, (direction, value) in RUNE_VALUES.items():
        W_V[h, :, direction] += tok(word) * value / c
    W_V[h, :, RUNE_NOISE_DIRECTION] = _noise_column(d_model, (tok(RUNE_BOS), W_pos[0]), seed=11)

    _set_weights(model, W_E, W_pos, RUNE_LAYER, (W_Q, W_K, W_V, b_Q, b_K))

    W_dec = torch.cat([W_E, W_pos])
    W_enc = _pinv(W_dec)
    input_sae = InputSAE.from_tensors(W_enc, torch.zeros(d_model), W_dec, torch.zeros(d_model), layer=RUNE_LAYER)

    def generate(n, seq_len, seed):
        return _generate(n, seq_len, seed, vocab=vocab, bos=RUNE_BOS, fillers=RUNE_FILLER,
                         patterns=_rune_patterns(rates), zib="yip", zib_counts=rates["yip"])

    noise = _calibrate_noise(model, RUNE_LAYER, h, RUNE_NOISE_DIRECTION, generate(256, RUNE_SEQ_LEN, 10_002),
                             RUNE_NOISE_QUANTILE)
    thresholds = [RUNE_THRESHOLDS.get(i, noise) for i in range(6)]
    output_saes = {h: _per_head_sae(thresholds, d_head, RUNE_LAYER, h, RUNE_N_HEADS)}
    logits = {(h, q, k): v for (q, k), v in RUNE_RULES.items()}
    logits.update({(h, "*", k): v for k, v in RUNE_BIAS.items()})
    logits.update({(h, w, RUNE_BOS): RUNE_COUNT_SINK if w == "yip" else RUNE_SINK for w in vocab})
    logits[(h, "yip", "yip")] = RUNE_COUNT_LOGIT
    return PlantedModel("rune", model, input_sae, output_saes, RUNE_FEATURES, vocab, RUNE_BOS, RUNE_LAYER,
                        RUNE_SEQ_LEN, rates, logits, RUNE_FILLER, generate)
