"""One whole head through the pipeline on GPT-2-small shapes (random weights), end to end and per
step, side by side with the pipeline as it was when issue 14 was filed, and the projected cost of a
whole-model run (144 heads, 50,000 × 64 tokens).

The model: GPT-2-small-shaped (d_model 768, 12 heads × 64, LNPre, blocks 0..layer) with random
weights, a random 24,576-feature input SAE whose encoder bias leaves about 50 features active a
token, and a random 2,048-feature output SAE whose per-feature biases make each feature fire on
about 0.5 % of tokens (a quarter of the sequences), over a corpus of random tokens.

- **new**: :func:`attnrules.extract_head` over ``--features`` output features (REF settings:
  sampled features, 50 + 50 exemplars a split, exact mode, absence and counting rules, distractor
  evidence), timed as a whole and per step (every step function the pipeline calls, timed where
  it is called; nested calls count once, in the outer step), with the process's largest resident size during
  the run (sampled every 5 ms; and projected to a 50,000-sequence corpus: plus the corpus's tokens and
  the kept stores' indexes there, and the head's scan — whole up to the end of the corpus pass, then the
  columns of the features run: both phases are projected, :func:`peak_at_50k`);
- **old**: the same head, model and corpus through the pipeline at commit ``--baseline`` (default
  f7b4c2b, the last one before issue 14's pipeline changes), run in a subprocess from that commit's
  sources (``git archive``) on ``--baseline-features`` of the same features (the first ones): its
  per-head steps (corpus scan, descriptions, token lookup, distractor evidence) are measured once and
  its per-feature steps are projected to ``--features`` from the features measured — the JSON says
  which figures are measured and which projected. The features both runs explain are compared: their
  rules, sweeps, exhaustive pairs and absence rules must be identical;
- **corpus pass**: tokens per second through blocks 0..layer (a head's scan), and through the whole
  12-layer model with every layer's hooks (a sweep's one corpus pass, ``layers_per_pass``), projected to
  50,000 × 64 tokens: the new pipeline's whole-model projection counts that pass once and the scan's
  input-SAE encode once a layer; the old one ran blocks 0..L once a layer.

Corpus-sized steps (the scan and the natural-prevalence pass of the distractor evidence) are
scaled from ``--corpus`` sequences to 50,000 in the projection (the new scan's input-SAE encode to the
rows it reads there: every row while the kept activations fit ``corpus_acts_mib`` at the measured bytes a
sequence, else the kept ones, the statistics' first 8,192 and the pattern pool's; the statistics' and the
pool's own work, timed apart by :class:`CappedObservers`, to the 8,192 and 2,048 rows they read there); steps a sweep runs once a
layer for all its heads (:data:`LAYER_STEPS`: the old pipeline's scan; the new one's scan, vocabulary
pass, prevalence pass and pattern pool — ``tests/test_layer_passes.py`` checks that a sweep runs them
once a layer) count 12 times in the whole-model projection, the other per-head steps 144 times, and the
per-feature time 14,400 times. Steps are timed exclusively (a step called inside another is its own entry).

    python bench/bench_pipeline.py                          # 100 features, old path on 3: bench/results/pipeline.json
    python bench/bench_pipeline.py --features 10 --baseline-features 2
    python bench/bench_pipeline.py --quick                  # small shapes, a smoke test
    python bench/bench_pipeline.py --device cuda --quick    # on a GPU: bench/results/pipeline_cuda.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
BASELINE = "f7b4c2b"  # the pipeline when issue 14 was filed (before its shared passes, screen and dedup)
CORPUS_TOKENS = 50_000  # sequences of the whole-model run (REF), 64 tokens each
HEADS, LAYERS = 144, 12
# steps the pipeline calls from attnrules.pipeline.extract (those present in the measured version)
STEPS = ("scan_output_features", "describe_input_features", "feature_tokens", "SharedPasses", "input_activations",
         "candidate_table", "paper_importance", "exact_importance_terms", "sweep", "absence_rules",
         "check_distractors", "check_counting", "exhaustive_pairs", "exemplar_views", "unseen_keys",
         "distractor_evidence", "natural_prevalence", "pattern_pool", "reconstruct", "pairs_by_weight")
PER_HEAD_STEPS = ("scan_output_features", "describe_input_features", "feature_tokens", "distractor_evidence",
                  "natural_prevalence", "pattern_pool", "reconstruct", "pairs_by_weight")
CORPUS_STEPS = ("scan_output_features", "natural_prevalence")  # their cost grows with the corpus
# Per-head steps a sweep runs once a layer for all the layer's heads: the old pipeline shared only the scan;
# the new one also the vocabulary pass (token lookup), the prevalence pass of the distractor evidence and
# the pattern pool (which rides on the scan)
LAYER_STEPS = {"old": ("scan_output_features",),
               "new": ("scan_output_features", "feature_tokens", "natural_prevalence", "pattern_pool")}


def build(quick: bool, layer: int, device: str):
    """The random GPT-2-small-shaped model, input SAE and output SAE (deterministic)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from attnrules.sources import InputSAE, OutputSAE, process_model

    d_model, n_heads, d_head = (768, 12, 64) if not quick else (64, 4, 16)
    n_in, n_out, vocab = (24_576, 2_048, 50_257) if not quick else (2_048, 256, 1_000)
    cfg = HookedTransformerConfig(n_layers=layer + 1, d_model=d_model, n_heads=n_heads, d_head=d_head,
                                  d_mlp=4 * d_model, n_ctx=64, d_vocab=vocab, act_fn="gelu_new",
                                  normalization_type="LNPre", seed=0)
    model = process_model(HookedTransformer(cfg).eval()).to(device)  # centre writing weights, as from_pretrained does
    g = torch.Generator().manual_seed(0)
    w_enc = torch.randn(d_model, n_in, generator=g) / d_model**0.5
    sample = torch.randint(0, vocab, (8, 64), generator=g).to(device)
    resid, z = f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_z"
    with torch.no_grad():
        _, cache = model.run_with_cache(sample, stop_at_layer=layer + 1, names_filter=lambda n: n in (resid, z))
    # an encoder bias leaving ~50 features active a token, as in real SAEs (res-jb: L0 of a few tens)
    pre = (cache[resid].reshape(-1, d_model).cpu() @ w_enc).flatten()
    cut = torch.sort(pre[torch.randperm(pre.numel(), generator=g)[:1_000_000]]).values
    b_enc = torch.full((n_in,), -float(cut[int(len(cut) * (1 - 50 / n_in))]))
    w_enc, b_enc = w_enc.to(device), b_enc.to(device)
    sae_in = InputSAE.from_tensors(w_enc, b_enc, w_enc.T.contiguous(), torch.zeros(d_model, device=device), layer=layer)
    enc = torch.randn(d_head, n_out, generator=g) / d_head**0.5
    # per-feature biases: each feature fires on ~0.5 % of tokens (a quarter of the 64-token sequences)
    head_z = cache[z][:, :, 0].reshape(-1, d_head).cpu() @ enc
    b_out = -torch.quantile(head_z, 0.995, dim=0)
    enc = enc.to(device)
    sae_out = OutputSAE.from_tensors(enc, b_out.to(device), enc.T.contiguous(), torch.zeros(d_head, device=device),
                                     layer=layer, head=0, n_heads=n_heads, d_head=d_head)
    return model, sae_in, sae_out


def corpus(n: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, 64), generator=torch.Generator().manual_seed(1))


class StepTimes:
    """Wall time of each step function of ``attnrules.pipeline.extract`` while installed; a step called
    inside another counts in its own entry, and the outer step counts its time less the inner step's."""

    def __init__(self, after: Optional[dict] = None) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.inner: list[float] = []  # per open step: the time of the steps called inside it
        self.after = after or {}  # step name -> called when the step returns

    @contextlib.contextmanager
    def installed(self):
        import attnrules.pipeline.extract as extract

        real = {name: getattr(extract, name) for name in STEPS if hasattr(extract, name)}
        for name, fn in real.items():
            setattr(extract, name, self._timed(name, fn))
        try:
            yield self
        finally:
            for name, fn in real.items():
                setattr(extract, name, fn)

    def _timed(self, name, fn):
        def run(*args, **kwargs):
            self.inner.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                own = took - self.inner.pop()
                if self.inner:
                    self.inner[-1] += took
                self.seconds[name] = self.seconds.get(name, 0.0) + own
                self.calls[name] = self.calls.get(name, 0) + 1
                if name in self.after:
                    self.after[name]()

        return run


class CappedObservers:
    """Seconds and sequences of the corpus pass's observers whose rows are capped (the input-feature
    statistics read the first ``corpus_stats_sequences``, the pattern pool ``pattern_pool`` random ones),
    so that the projection scales them by the rows they read at 50,000 sequences, not by the corpus."""

    def __init__(self) -> None:
        self.seconds = {"stats": 0.0, "pool": 0.0}
        self.sequences = {"stats": 0, "pool": 0}

    @contextlib.contextmanager
    def installed(self):
        from attnrules.evaluation.negatives import PoolObserver
        from attnrules.rules.descriptions import InputStatsObserver

        classes = {"stats": InputStatsObserver, "pool": PoolObserver}
        real = {name: cls.add for name, cls in classes.items()}
        for name, cls in classes.items():
            cls.add = self._timed(name, real[name])
        try:
            yield self
        finally:
            for name, cls in classes.items():
                cls.add = real[name]

    def _timed(self, name, add):
        def run(observer, sequences, acts):
            t0 = time.perf_counter()
            try:
                return add(observer, sequences, acts)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.sequences[name] += len(sequences)

        return run

    def to_json(self) -> dict:
        return {name: {"s": round(self.seconds[name], 3), "sequences": self.sequences[name]} for name in self.seconds}


class PeakRSS:
    """The process's largest resident size while installed, sampled every 5 ms from ``/proc/self/statm``
    (the process's lifetime maximum would count what ran before, e.g. the corpus-pass measurement's
    12-layer model)."""

    def __init__(self) -> None:
        self.peak, self.page = 0, os.sysconf("SC_PAGE_SIZE")
        self.stop = threading.Event()

    def sample(self) -> None:
        with open("/proc/self/statm") as f:
            self.peak = max(self.peak, int(f.read().split()[1]) * self.page)

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.sample()

    @contextlib.contextmanager
    def installed(self):
        self.sample()
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            thread.join()
            self.sample()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def run_head(args, features) -> dict:
    """The measured library's pipeline over ``features`` (None: sampled, ``args.features`` of them)."""
    import warnings

    from attnrules.pipeline import ExtractSettings, extract_head

    torch.manual_seed(0)
    model, sae_in, sae_out = build(args.quick, args.layer, args.device)
    tokens = corpus(args.corpus, model.cfg.d_vocab)
    fields = {"features": tuple(features)} if features is not None else {"num_features": args.features}
    if args.quick:
        fields.update(min_count=10, examples_per_bin=10)
    settings = ExtractSettings(**fields, backend=args.backend)
    peak, scanned = PeakRSS(), {}
    # the largest resident size up to the end of the scan (while it is held whole, before the features run)
    steps, capped = StepTimes({"scan_output_features": lambda: scanned.setdefault("peak", peak.peak)}), CappedObservers()
    t0 = time.perf_counter()
    # the old pipeline has none of the capped observers (its scan grows with the corpus as a whole)
    observing = capped.installed() if args.role == "main" else contextlib.nullcontext()
    with steps.installed(), observing, peak.installed(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_head(model, sae_in, sae_out, tokens, settings=settings, progress=True)
    total = time.perf_counter() - t0
    out = {"total_s": round(total, 2), "features": [f.feature for f in result.features],
           "step_seconds": {k: round(v, 3) for k, v in steps.seconds.items()}, "step_calls": steps.calls,
           "other_s": round(total - sum(steps.seconds.values()), 3), "peak_rss_gib": round(peak.gib, 2),
           "peak_rss_gib_to_scan_end": round(scanned.get("peak", 0) / 2**30, 2),
           "failed_steps": result.metadata.get("failed_steps"),
           "counting": [f.counting_check.status if f.counting_check else None for f in result.features],
           "flagged_distractor_features": len(result.distractors),
           **({"capped_observers": capped.to_json()} if args.role == "main" else {}), "corpus_acts": None if getattr(result.run, "corpus_acts", None) is None else result.run.corpus_acts.to_json()}
    if args.device.startswith("cuda"):
        out["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out["results"] = [f.to_json() for f in result.features]
    return out


def baseline_tree(commit: str, where: Path) -> Path:
    """The library's sources at ``commit`` (``git archive``) with this checkout's compiled core."""
    tree = where / f"attnrules-{commit}"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "attnrules"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    import attnrules._C as core

    shutil.copy(core.__file__, tree / "attnrules")
    return tree


def use_tree(tree: str) -> None:
    """Import ``attnrules`` from ``tree`` instead of the installed (editable) package."""
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
    sys.path[:] = [tree] + [p for p in sys.path if Path(p or ".").resolve() != REPO]
    for name in [m for m in sys.modules if m == "attnrules" or m.startswith("attnrules.")]:
        del sys.modules[name]


COMPARED = ("rules", "sweep", "pairs", "absence", "absence_dropped", "paper_distractor")


def _wording(key: str) -> bool:
    """Text made from the input features' descriptions, whose wording changed on purpose since the
    old pipeline (issue 15: features described from the corpus)."""
    return key.endswith("_desc") or key == "text"


def differences(old, new, where: str = "") -> list[str]:
    """Where the results ``new`` differ from ``old``: every number, id and status of ``old`` is
    compared; keys only ``new`` has (fields added since) and description wording are not, and a list
    that has grown (e.g. sweeps with evaluations added since) must hold each of ``old``'s entries."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in old if not _wording(k)
                for d in (differences(old[k], new[k], f"{where}.{k}") if k in new else [f"{where}.{k}: missing"])]
    if isinstance(old, list) and isinstance(new, list):
        if len(old) == len(new):
            return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}[{i}]")]
        if len(old) < len(new):
            return [f"{where}[{i}]: not found" for i, a in enumerate(old) if all(differences(a, b) for b in new)]
    return [] if old == new else [f"{where}: {str(old)[:120]} != {str(new)[:120]}"]


def same_results(old: list[dict], new: list[dict]) -> dict:
    """Whether the features both runs explain have the same rules, sweeps, pairs and absence rules
    (:func:`differences`)."""
    by_feature = {f["feature"]: f for f in new}
    differing = {}
    for f in old:
        other = by_feature.get(f["feature"], {})
        fields = [k for k in COMPARED if k in f and differences(f[k], other.get(k))]
        if fields:
            differing[f["name"]] = fields
    return {"features_compared": len(old), "identical": not differing, "differing_fields": differing}


def project(run: dict, n_features: int, corpus_n: int, measured_features: int, pipeline: str,
            scan_split: Optional[dict] = None) -> dict:
    """Per-head seconds at ``n_features`` features and a 50,000-sequence corpus, and the 144-head run
    (``pipeline``'s :data:`LAYER_STEPS` counted once a layer). ``scan_split``: the scan's forward seconds per
    sequence, the sequences its input-SAE encode reads at 50,000 (statistics cap and pattern pool), the
    capped observers' seconds as measured and at 50,000 (:class:`CappedObservers`) and,
    for a sweep's one pass through the whole model, that pass's seconds per sequence (its forward then
    counts once for the run, the encode once a layer); without it the scan grows in proportion to the
    corpus and runs once a layer."""
    steps = run["step_seconds"]
    per_head = sum(steps.get(s, 0.0) for s in PER_HEAD_STEPS)
    scale = CORPUS_TOKENS / corpus_n
    at_50k = {s: steps.get(s, 0.0) * (scale if s in CORPUS_STEPS else 1.0) for s in PER_HEAD_STEPS}
    model_pass = 0.0  # the sweep's forward pass through the whole model, once for the run
    if scan_split is not None:
        forward = scan_split["forward_s_per_sequence"] * corpus_n
        capped = scan_split.get("capped_observers_s", 0.0)
        encode = max(0.0, steps.get("scan_output_features", 0.0) - forward - capped)
        at_50k["scan_output_features"] = (forward * scale + encode * scan_split["encoded_sequences_50k"] / corpus_n
                                          + scan_split.get("capped_observers_s_50k", 0.0))
        if scan_split.get("whole_model_forward_s_per_sequence"):
            model_pass = scan_split["whole_model_forward_s_per_sequence"] * CORPUS_TOKENS
    per_feature = (run["total_s"] - per_head) / measured_features
    head_small = per_head + per_feature * n_features  # at the benchmark's corpus
    head_50k = sum(at_50k.values()) + per_feature * n_features  # one head alone: its own scan
    layer_50k = sum(at_50k[s] for s in LAYER_STEPS[pipeline])
    # a sweep runs the layer steps once a layer for its 12 heads, the rest once a head; with the whole-model
    # pass, the scan's forward through blocks 0..layer of each layer is one forward through the model instead
    layer_in_sweep = layer_50k - (scan_split["forward_s_per_sequence"] * CORPUS_TOKENS if model_pass else 0.0)
    whole = HEADS * (head_50k - layer_50k) + LAYERS * layer_in_sweep + model_pass
    return {"per_feature_s": round(per_feature, 2), "per_head_steps_s": round(per_head, 2),
            f"head_{n_features}_features_s": round(head_small, 1),
            f"head_{n_features}_features_50k_corpus_s": round(head_50k, 1),
            "layer_steps_50k_s": {s: round(at_50k[s], 1) for s in LAYER_STEPS[pipeline]}, "scan_split": scan_split,
            "whole_model_pass_50k_s": round(model_pass, 1) if model_pass else None,
            "whole_model_144_heads_hours": round(whole / 3600, 1)}


# the kept activations live in a temporary file; the process holds a dict entry (row -> offset, count) a
# row: 385 B measured (resident-size growth while 50,000 rows of 64 × 24,576 were added)
STORE_INDEX_BYTES_PER_SEQUENCE = 400
# the kept hook_resid_pre (exact mode) lives in a temporary file too; its index is a dict entry (row -> offset)
# a row: 123 B measured the same way
RESID_INDEX_BYTES_PER_SEQUENCE = 130


def scan_shape(args) -> tuple[int, int]:
    """The head's output features and the bytes its scan holds for one of them a sequence (its max
    activation and that position)."""
    from attnrules.exemplars import position_dtype

    _, _, sae_out = build(args.quick, args.layer, "cpu")
    return sae_out.W_enc.shape[1], sae_out.W_enc.element_size() + torch.empty(0, dtype=position_dtype(64)).element_size()


def peak_at_50k(run: dict, corpus_n: int, n_out: int, feature_bytes: int) -> dict:
    """The measured peaks plus what grows with the corpus from ``corpus_n`` to 50,000 sequences: the
    corpus's token ids (int64) and the in-memory indexes of the kept activations and the kept
    hook_resid_pre (their bytes are on disk), and the head's scan (``feature_bytes`` a sequence and output
    feature): while the corpus pass runs, its batches and their concatenation (twice; up to the end of
    the scan), then only the columns of the features run (:meth:`~attnrules.exemplars.FeatureScan.column`).
    Per-feature tensors do not grow with the corpus (the exemplar counts are fixed)."""
    grown = (CORPUS_TOKENS - corpus_n) * (64 * 8 + STORE_INDEX_BYTES_PER_SEQUENCE + RESID_INDEX_BYTES_PER_SEQUENCE)
    features = run["peak_rss_gib"] + (grown + (CORPUS_TOKENS - corpus_n) * len(run["features"]) * feature_bytes) / 2**30
    scan = run["peak_rss_gib_to_scan_end"] + (grown + (CORPUS_TOKENS - corpus_n) * 2 * n_out * feature_bytes) / 2**30
    return {"features": round(features, 2), "scan": round(scan, 2), "peak": round(max(features, scan), 2)}


def corpus_pass(args) -> dict:
    """Tokens per second through blocks 0..layer, as a head's scan runs them, and through the whole
    12-layer model with every layer's scan and statistics hooks, as a sweep's one corpus pass runs it."""
    from attnrules.sources.runner import hook_names, run_batches

    def rate(layer: int, names: list) -> float:
        model, _, _ = build(args.quick, layer, args.device)
        tokens = corpus(256, model.cfg.d_vocab)
        t0 = time.perf_counter()
        for _ in run_batches(model, tokens, layer, names, batch_size=64, desc="", progress=False):
            pass
        return tokens.numel() / (time.perf_counter() - t0)

    per_s = rate(args.layer, [f"blocks.{args.layer}.attn.hook_z"])
    whole = rate(LAYERS - 1, [name for layer in range(LAYERS)
                              for name in (*hook_names(layer), f"blocks.{layer}.attn.hook_pattern")])
    return {"tokens_per_s_blocks_0_to_layer": round(per_s), "layer": args.layer,
            "scan_50k_sequences_one_layer_s": round(CORPUS_TOKENS * 64 / per_s, 1),
            "tokens_per_s_whole_model": round(whole), "whole_model_pass_50k_s": round(CORPUS_TOKENS * 64 / whole, 1),
            "note": "the layer's forward cost stands for every layer (GPT-2's mean depth is 6.5 blocks, layer 5 "
                    "runs 6); a sweep scans every layer in one pass through the 12-layer model (layers_per_pass), "
                    "measured here with every layer's hook_resid_pre, hook_z and hook_pattern"}


def uptime() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few features (smoke test)")
    parser.add_argument("--features", type=int, default=None, help="output features of the head (default 100; quick 4)")
    parser.add_argument("--baseline-features", type=int, default=None,
                        help="features the old pipeline runs (default 3; quick 1; 0: no old run)")
    parser.add_argument("--baseline", default=BASELINE, help="commit of the old pipeline")
    parser.add_argument("--corpus", type=int, default=None, help="corpus sequences (default 2048; quick 256)")
    parser.add_argument("--layer", type=int, default=5, help="layer of the measured head (cost grows with it)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cpu", help="where the model and SAEs run (cpu or cuda)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default bench/results/pipeline.json, pipeline_cuda.json on cuda)")
    parser.add_argument("--role", choices=("main", "baseline"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--feature-list", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.features = args.features if args.features is not None else (4 if args.quick else 100)
    args.baseline_features = args.baseline_features if args.baseline_features is not None else (1 if args.quick else 3)
    args.corpus = args.corpus if args.corpus is not None else (256 if args.quick else 2048)
    for name in ("features", "corpus"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be ≥ 1, got {getattr(args, name)}")
    if args.baseline_features < 0 or args.baseline_features > args.features:
        parser.error(f"--baseline-features must be in [0, --features={args.features}], got {args.baseline_features}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    if args.role == "baseline":  # a subprocess: the old library on the given features; JSON on stdout's last line
        use_tree(args.tree)
        run = run_head(args, [int(f) for f in args.feature_list.split(",")])
        print(json.dumps(run))
        return

    from attnrules.files import write_json

    out = args.out or RESULTS / ("pipeline_cuda.json" if args.device.startswith("cuda") else "pipeline.json")
    load_before = uptime()
    print(f"corpus pass ({load_before})", file=sys.stderr)
    scan = corpus_pass(args)
    # the old pipeline first, on the features the new one samples (the first --baseline-features of
    # them; both sample the same ones from the same seed and scan)
    old, old_skipped = None, "--baseline-features 0"
    if args.baseline_features:
        from attnrules.exemplars import sample_features, scan_output_features
        from attnrules.pipeline import ExtractSettings

        model, _, sae_out = build(args.quick, args.layer, args.device)
        tokens = corpus(args.corpus, model.cfg.d_vocab)
        scanned = scan_output_features(model, sae_out, tokens, batch_size=64)
        ref = ExtractSettings(num_features=args.features, **({"min_count": 10} if args.quick else {}))
        subset = sample_features(scanned.counts, scanned.n_sequences, num_features=ref.num_features,
                                 min_count=ref.min_count, max_count=ref.max_count, seed=ref.seed)[: args.baseline_features]
        del model, sae_out, scanned
        print(f"old pipeline ({args.baseline}): {len(subset)} features", file=sys.stderr)
        try:  # needs the repository's git history (a bare copy of the tree has none: the old run is skipped)
            with tempfile.TemporaryDirectory() as tmp:
                tree = baseline_tree(args.baseline, Path(tmp))
                cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "baseline", "--tree", str(tree),
                       "--feature-list", ",".join(map(str, subset)), "--layer", str(args.layer), "--corpus",
                       str(args.corpus), "--device", args.device, "--backend", args.backend,
                       "--features", str(args.features)] + (["--quick"] if args.quick else [])
                done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=tmp,
                                      env={**os.environ, "PYTHONPATH": ""})
            old = json.loads(done.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.CalledProcessError) as err:
            old_skipped = f"the old pipeline could not run: {type(err).__name__}: {err}"
            print(old_skipped, file=sys.stderr)
    print(f"new pipeline: {args.features} features", file=sys.stderr)
    new = run_head(args, None)
    measured = len(new["features"])
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "device": args.device, "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_before": load_before},
        "command": "python bench/bench_pipeline.py " + " ".join(sys.argv[1:]),
        "shapes": {"quick": args.quick, "layer": args.layer, "corpus_sequences": args.corpus, "seq_len": 64,
                   "features_asked": args.features, "features_explained": measured},
        "corpus_pass": scan,
        "new": {k: v for k, v in new.items() if k != "results"},
    }
    from attnrules.pipeline import ExtractSettings

    ref = ExtractSettings()
    kept = new.get("corpus_acts") or {"rows": 0, "bytes": 0}
    per_row = kept["bytes"] / max(kept["rows"], 1)  # bytes of input activations the corpus pass keeps a sequence
    kept_50k = min(CORPUS_TOKENS, ref.corpus_acts_mib * 2**20 // per_row) if per_row else 0
    encoded = max(kept_50k, min(CORPUS_TOKENS, ref.corpus_stats_sequences or CORPUS_TOKENS))  # kept rows, statistics' rows
    encoded += ref.pattern_pool * (1 - encoded / CORPUS_TOKENS)  # pool rows beyond them (drawn at random)
    capped = new.get("capped_observers", {})
    caps = {"stats": ref.corpus_stats_sequences or CORPUS_TOKENS, "pool": ref.pattern_pool}  # rows read at 50k
    capped_50k = sum(c["s"] * min(CORPUS_TOKENS, caps[name]) / c["sequences"]
                     for name, c in capped.items() if c["sequences"])
    split = {"forward_s_per_sequence": 64 / scan["tokens_per_s_blocks_0_to_layer"], "encoded_sequences_50k": round(encoded),
             "capped_observers_s": round(sum(c["s"] for c in capped.values()), 3),
             "capped_observers_s_50k": round(capped_50k, 1),
             "whole_model_forward_s_per_sequence": 64 / scan["tokens_per_s_whole_model"],
             "kept_sequences_50k": int(kept_50k), "kept_gib_50k": round(kept_50k * per_row / 2**30, 2)}
    report["new"]["projection"] = project(new, 100, args.corpus, max(measured, 1), "new", split)
    at_50k = peak_at_50k(new, args.corpus, *scan_shape(args))
    report["new"]["projection"]["peak_rss_gib_50k"] = at_50k["peak"]
    report["new"]["projection"]["peak_rss_gib_50k_phases"] = at_50k
    if old is None:
        report["old"] = {"skipped": old_skipped}
    else:
        report["old"] = {"commit": args.baseline, **{k: v for k, v in old.items() if k != "results"},
                         "measured": f"{len(old['features'])} features ({', '.join(map(str, old['features']))}) and "
                                     f"the per-head steps; the other features of the head projected from them"}
        report["old"]["projection"] = project(old, 100, args.corpus, max(len(old["features"]), 1), "old")
        report["same_results"] = same_results(old["results"], new["results"])
        new_head = report["new"]["projection"]["head_100_features_50k_corpus_s"]
        old_head = report["old"]["projection"]["head_100_features_50k_corpus_s"]
        report["speedup"] = {"head_100_features_50k_corpus": round(old_head / new_head, 2),
                             "whole_model": round(report["old"]["projection"]["whole_model_144_heads_hours"]
                                                  / report["new"]["projection"]["whole_model_144_heads_hours"], 2)}
    report["machine"]["load_average_after"] = uptime()
    write_json(out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
