"""The settings of one extraction: REF's defaults (reference-behaviour §8) and ours, each a knob.

Every field documents itself in its ``dataclasses.field`` metadata, and the ``attnrules extract`` /
``sweep`` options are generated from it (:mod:`attnrules.cli`), so a default, a help text or an
allowed range is written once, here. The metadata keys:

``help`` (required)
    What the setting does: the CLI help text of its option.
``group`` (required)
    The title of the CLI option group it is listed under (one of :data:`GROUPS`).
``choices``
    The allowed values (checked here; the CLI offers exactly these).
``min``
    The smallest allowed value of an int setting, or of each element of a tuple setting.
``none``
    For an ``Optional`` setting: the word that means None on the command line (e.g. ``all``).
``flag``
    The CLI option name when it is not ``--`` + the name in kebab case (``absolute`` is ``--signed``).
``flag_help``
    For a bool setting: the help of its CLI flag, which turns the default off (``--no-exact``) or on
    (``--negative-values``) — the setting's own ``help`` describes it when True.

Types come from the annotations: int, float, str, bool, ``tuple[int, ...]`` (a comma list on the
command line) and ``Optional`` of them. A bool that defaults to False is switched on by ``--name``;
one that defaults to True is switched off by ``--no-name`` unless ``flag`` names another option.

Values are checked when the settings are made (:meth:`ExtractSettings.__post_init__`): a bad one
raises :class:`InvalidSetting` (a ValueError) naming the setting, what was expected and what was given.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import typing
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Optional

from attnrules.files import plain
from attnrules.rules.matches import AGGREGATIONS

METHOD = "method (REF defaults)"
BEYOND = "absence and counting rules"
HARD = "hard negatives"
RUN = "run"
GROUPS = (METHOD, BEYOND, HARD, RUN)  # the CLI lists its option groups in this order

POSITIVES = ("top", "quantiles")
LOSS_TYPES = ("activation", "post_activation")
BACKENDS = ("auto", "torch", "cpu", "triton")
PREDICTION_THRESHOLDS = ("ref", "sae")
AGGREGATION_CHOICES = ("ref", *AGGREGATIONS)


class InvalidSetting(ValueError):
    """A setting outside what it allows: ``setting`` (the field name), ``expected`` (in words) and ``got``."""

    def __init__(self, setting: str, expected: str, got: Any) -> None:
        self.setting, self.expected, self.got = setting, expected, got
        super().__init__(f"ExtractSettings.{setting} must be {expected}, got {got!r}")


def setting(default: Any, help: str, *, group: str, choices: Optional[tuple] = None, min: Optional[int] = None,
            none: Optional[str] = None, flag: Optional[str] = None, flag_help: Optional[str] = None) -> Any:
    """A dataclass field documented by its metadata (see the module docstring for the keys)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    meta = {"help": help, "group": group, "choices": choices, "min": min, "none": none, "flag": flag,
            "flag_help": flag_help}
    return dataclasses.field(default=default, metadata=MappingProxyType({k: v for k, v in meta.items() if v is not None}))


@dataclass(frozen=True)
class ExtractSettings:
    """REF's defaults (reference-behaviour §8), each a knob; see each field's ``metadata["help"]``."""

    features: Optional[tuple[int, ...]] = setting(
        None, "output features to explain (default: sample as REF)", group=METHOD, min=0, none="sample")
    num_features: Optional[int] = setting(
        100, "features sampled per head ('all': every eligible feature)", group=METHOD, min=1, none="all")
    min_count: int = setting(
        150, "a sampled feature is active in at least this many sequences ...", group=METHOD, min=0)
    max_count: Optional[int] = setting(
        None, "... and at most this many (default: n_sequences - min_count)", group=METHOD, min=0, none="auto")
    examples_per_bin: int = setting(
        150, "positive and negative exemplars per feature (split 1/3 each into train/val/test)", group=METHOD, min=1)
    positives: str = setting(
        "top", "positive exemplars: the top-activating sequences (REF) or spread over activation quantiles",
        group=METHOD, choices=POSITIVES)
    num_values: int = setting(
        100, "candidate keys by value score (capped to the number of input features)", group=METHOD, min=1)
    num_queries: int = setting(
        100, "candidate queries per key by attention score (capped likewise)", group=METHOD, min=1)
    max_rules: int = setting(
        4096, "largest number of terms in the N = 4, 8, ... sweep", group=METHOD, min=4)
    negative_values: bool = setting(
        False, "rank candidate keys by |value score| instead of by value score", group=METHOD)
    absolute: bool = setting(
        True, "select importance terms by |I| (False: by relu(I))", group=METHOD, flag="--signed",
        flag_help="select importance terms by relu(I) instead of |I|")
    loss_type: str = setting(
        "activation", "surrogate output for the importance gradient", group=METHOD, choices=LOSS_TYPES)
    offsets: Optional[tuple[int, ...]] = setting(
        None, "rotary heads: the query-key offsets pairs are scored over, a comma list (default: every offset "
        "the corpus shows, 0 … seq_len − 1)", group=METHOD, min=0, none="all")
    max_offset: Optional[int] = setting(
        None, "rotary heads: score pairs at offsets up to max_offset only (a window; default: seq_len − 1)",
        group=METHOD, min=0, none="all")
    offset_blind: bool = setting(
        False, "rotary heads: score pairs as if positions did not rotate queries and keys (A = A_0), the "
        "scoring of attnrules before rotary support — wrong for rotary heads, kept for comparison", group=METHOD,
        flag_help="score rotary heads without offsets (A = A_0; for comparison only)")
    threshold: float = setting(0.0, "activation threshold for truth and prediction", group=METHOD)
    prediction_threshold: str = setting(
        "ref", "a rule predicts the feature active when its score exceeds: 'ref' threshold (REF), 'sae' the output "
        "SAE's own threshold of that feature (JumpReLU's per-feature threshold; 0 for standard, TopK, gated)",
        group=METHOD, choices=PREDICTION_THRESHOLDS)
    aggregation: str = setting(
        "ref", "how an exemplar's rule matches make its predicted score, REF's --aggregation_type: 'ref' REF's "
        "default per ordering (kqv_max for importance, max otherwise), or one of REF's types for every ordering",
        group=METHOD, choices=AGGREGATION_CHOICES)
    unigram: bool = setting(
        False, "also evaluate REF's unigram baseline (method 'unigram': the top-N value keys, no query)", group=METHOD)
    seed: int = setting(0, "seed for feature and exemplar sampling", group=METHOD, min=0)
    batch_size: int = setting(64, "sequences per model forward pass", group=RUN, min=1)
    backend: str = setting("auto", "engine backend", group=RUN, choices=BACKENDS)
    show_terms: int = setting(8, "rule terms printed and stored per feature and method", group=RUN, min=0)
    exhaustive_k: int = setting(
        100, "also rank all n_in x n_in pairs by A×V and by importance, keeping this many (0: skip)", group=RUN, min=0)
    max_distractors: int = setting(100, "distractor keys kept per skip-gram term", group=BEYOND, min=0)
    distractor_checks: int = setting(
        3, "distractors per term tested by insertion (unconfirmed ones are not reported as rules)", group=BEYOND, min=0)
    counting: bool = setting(
        True, "run the counting detector on each feature's top term", group=BEYOND,
        flag_help="skip the counting detector")
    counting_max: int = setting(8, "largest number of key copies the counting detector tries", group=BEYOND, min=0)
    counting_bases: int = setting(
        64, "base sequences for the counting detector (silent corpus sequences, then filler)", group=BEYOND, min=1)
    counting_min_bases: int = setting(
        16, "fewer base sequences than this: counting is 'undetermined'", group=BEYOND, min=1)
    counting_screen: bool = setting(
        True, "screen each feature on 8 base sequences at 1, 2 and counting_max key copies first; run the full "
        "count sweep only when the activation changes with the count (else: 'screened out')", group=BEYOND,
        flag_help="always run the full count sweep (no cheap screen first)")
    insertion_counts: tuple[int, ...] = setting(
        (0, 1, 2, 3), "copies of the distractor inserted (REF: 0,1,2,3)", group=BEYOND, min=0)
    show_exemplars: int = setting(
        5, "top-activating validation exemplars stored per feature (with activations and DFA)", group=RUN, min=0)
    input_labels: Optional[str] = setting(
        None, "a CSV of your own input-feature labels (header: id,label), shown in rule text before the corpus "
        "descriptions", group=RUN)
    exact: bool = setting(
        True, "add the exact-mode ordering (exact importance) and the head's logit decomposition", group=BEYOND,
        flag_help="skip exact mode (the exact-importance ordering and the logit decomposition)")
    pattern_negatives: bool = setting(
        True, "beside REF's evaluation, evaluate the combined rule sets (skip-gram terms with their absence and "
        "counting conditions) and every rule set on the top-activating exemplars and pattern negatives: positions "
        "where the shown rule terms fire but the feature does not", group=HARD,
        flag_help="REF's evaluation only (no pattern negatives, no combined rule sets)")
    pattern_pool: int = setting(
        2048, "corpus sequences searched for pattern negatives (encoded on the corpus pass; a pass of their own "
        "only when the scan was read from a cache)", group=HARD, min=1)
    corpus_acts_mib: int = setting(
        2048, "MiB of the corpus's input-SAE activations kept sparse from the corpus pass, in a temporary file "
        "(TMPDIR), so exemplar steps look them up instead of running passes of their own (rows past the bound "
        "run their own; 0: none kept)",
        group=RUN, min=0)
    corpus_resid_mib: int = setting(
        12288, "exact mode: MiB of the corpus's hook_resid_pre (the head's layer input) kept from the corpus pass in a "
        "temporary file (TMPDIR; 196 kB a 64-token row of GPT-2 small: 9.8 GB for 50,000 rows), so exact importance "
        "runs the head's block alone on its exemplars instead of every block before it (rows past the bound run "
        "those blocks; 0: none kept)",
        group=RUN, min=0)
    layers_per_pass: Optional[int] = setting(
        None, "sweeps: layers whose corpus pass is one forward pass through the model ('all': the whole model "
        "once; each layer of a pass keeps its scans and input activations in temporary files until it is done)",
        group=RUN, min=1, none="all")
    corpus_stats_sequences: Optional[int] = setting(
        8192, "corpus sequences (the first ones) the input-feature descriptions are measured on ('all': every "
        "one; each costs an input-SAE encode on the corpus pass)", group=RUN, min=1, none="all")

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _checked(f, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # e.g. a list given for a tuple, a numpy int for an int
        if not math.isfinite(self.threshold):
            raise InvalidSetting("threshold", "a finite number", self.threshold)
        if self.max_count is not None and self.max_count < self.min_count:
            raise InvalidSetting("max_count", f"at least min_count ({self.min_count}) or None", self.max_count)
        if self.counting_min_bases > self.counting_bases:
            raise InvalidSetting("counting_min_bases", f"at most counting_bases ({self.counting_bases})",
                                 self.counting_min_bases)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(plain(dataclasses.asdict(self)), sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_type(hint: Any) -> tuple[type, bool, bool]:
    """(scalar type, is a tuple of it, is Optional) of a setting's annotation."""
    optional = False
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, (hint,) = True, args
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _checked(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """``value`` of setting ``f`` in its canonical type, or :class:`InvalidSetting`."""
    scalar, is_tuple, optional = field_type(hint)
    if value is None:
        if optional:
            return None
        raise InvalidSetting(f.name, describe(f, hint), value)
    if is_tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or not value:
            raise InvalidSetting(f.name, describe(f, hint), value)
        return tuple(_scalar(f, hint, scalar, v, value) for v in value)
    return _scalar(f, hint, scalar, value, value)


def _scalar(f: dataclasses.Field, hint: Any, scalar: type, v: Any, whole: Any) -> Any:
    expected = describe(f, hint)
    if scalar is bool:
        if not isinstance(v, bool):
            raise InvalidSetting(f.name, expected, whole)
        return v
    if scalar is int:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise InvalidSetting(f.name, expected, whole)
        v = int(v)
        if "min" in f.metadata and v < f.metadata["min"]:
            raise InvalidSetting(f.name, expected, whole)
        return v
    if scalar is float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise InvalidSetting(f.name, expected, whole)
        return float(v)
    if scalar is str:
        if not isinstance(v, str) or ("choices" in f.metadata and v not in f.metadata["choices"]):
            raise InvalidSetting(f.name, expected, whole)
        return v
    raise TypeError(f"setting {f.name}: unsupported type {scalar!r}")  # pragma: no cover - a new field's type


def describe(f: dataclasses.Field, hint: Any) -> str:
    """What setting ``f`` (annotated ``hint``) allows, in words: "an int ≥ 1", "one of 'top', 'quantiles'", ..."""
    scalar, is_tuple, optional = field_type(hint)
    at_least = f" ≥ {f.metadata['min']}" if "min" in f.metadata else ""
    if "choices" in f.metadata:
        what = "one of " + ", ".join(repr(c) for c in f.metadata["choices"])
    elif is_tuple:
        what = f"a non-empty tuple of ints{at_least}"
    else:
        what = {bool: "True or False", int: "an int", float: "a number", str: "a string"}[scalar] + at_least
    return what + (" or None" if optional else "")
