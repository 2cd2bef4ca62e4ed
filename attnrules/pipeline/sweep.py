"""Whole-model sweeps: extraction for many heads, sharded by (layer, head), resumable, on torchrun.

Every process (one per ``torchrun`` rank; gloo on CPU, nccl on GPU) takes a contiguous run of the shards
(:func:`rank_shards`), so that it works through as few layers as it can: each layer costs a rank one
vocabulary pass and one distractor-evidence pass, shared by its heads of the layer, and the corpus pass
is one forward pass through the model for all its layers (``layers_per_pass``, default all: blocks
0..11 once for GPT-2 small instead of blocks 0..L for each L, 12 block-passes a sequence instead of 78),
which scans every head and measures each layer's statistics and kept activations; the scans and the
kept activations wait in temporary files until their layer's turn (:func:`_corpus_pass`).
A shard is one head: its results go to ``OUT/shards/L{l}H{h}/`` (a head folder, see
:mod:`attnrules.pipeline.resume`: features written one by one and the corpus scan cached, so a killed
shard resumes where it stopped) and, when complete, a manifest entry ``OUT/manifest/L{l}H{h}.json``
is written atomically. A restarted sweep skips shards whose manifest entry names the same inputs
(content hashes of model, SAEs, corpus and settings) and stops on shards of other inputs unless
``overwrite``. When all ranks are done, rank 0 merges the shards into one Parquet
dataset (``OUT/merged/{metrics,features,rules,distractors,heads}.parquet``; ``heads``: each head's attention
metrics from the corpus pass) and a summary table (``OUT/summary.csv``).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from attnrules.exemplars import position_dtype, scan_heads_deferred
from attnrules.files import clean_temporaries, write_csv, write_json, write_with
from attnrules.pipeline.extract import (
    TokenLookup,
    bos_token,
    corpus_observers,
    distractor_evidence,
    extract_head,
    resid_bytes,
    with_evidence,
)
from attnrules.pipeline.resume import (
    HeadFolder,
    InputHashes,
    RunMismatchError,
    hash_corpus,
    hash_input_sae,
    hash_model,
    hash_output_sae,
    read_head,
)
from attnrules.pipeline.results import MARKER_FILE, HeadResult, StepError
from attnrules.pipeline.settings import ExtractSettings
from attnrules.pipeline.workload import Workload
from attnrules.sparse_acts import SparseActs
from attnrules.sources import as_sources


def shard_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int


def _start_distributed(device: str) -> Rank:
    """This process's rank under torchrun (RANK / WORLD_SIZE), or rank 0 of 1 when run directly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return Rank(rank, world)


def rank_shards(shards: list, rank: Rank) -> list:
    """The shards ``rank`` runs: the ``rank``-th of ``world_size`` contiguous runs of ``shards`` (sizes
    differing by at most one), so that a rank's heads share as few layers as possible."""
    per, extra = divmod(len(shards), rank.world_size)
    start = rank.rank * per + min(rank.rank, extra)
    return shards[start:start + per + (rank.rank < extra)]


def _manifest(out: Path, name: str) -> Path:
    return out / "manifest" / f"{name}.json"


def _is_done(out: Path, name: str, inputs: InputHashes) -> bool:
    """The shard's manifest entry names these inputs and its head folder is complete."""
    try:
        entry = json.loads(_manifest(out, name).read_text())
    except (OSError, json.JSONDecodeError):
        return False  # no entry (a torn one cannot happen: atomic writes)
    return entry.get("inputs") == inputs.to_json() and (out / "shards" / name / MARKER_FILE).exists()


class _Hashes:
    """The inputs' hashes of each head, hashing the model and the corpus once and each SAE once."""

    def __init__(self, work: Workload, settings: ExtractSettings, mine: list) -> None:
        self.work, self.settings, self.mine = work, settings, set(mine)
        self.model, self.corpus = hash_model(work.model), hash_corpus(work.tokens)
        self._input: dict[int, str] = {}
        self._heads: dict[tuple[int, int], InputHashes] = {}

    def __call__(self, layer: int, head: int) -> InputHashes:
        if (layer, head) not in self._heads:
            # another rank's output SAE is loaded to be hashed, not kept
            load = self.work.output_sae if (layer, head) in self.mine else self.work.load_output
            input_sae, output_sae = as_sources(self.work.model, self.work.input_sae(layer), load(layer, head))
            if layer not in self._input:
                self._input[layer] = hash_input_sae(input_sae)
            self._heads[layer, head] = InputHashes(self.model, self._input[layer], hash_output_sae(output_sae),
                                                   self.corpus, self.settings.fingerprint())
        return self._heads[layer, head]


def _mismatches(out: Path, shards: list, hashes: _Hashes) -> dict[tuple[int, int], list[str]]:
    """Shards with a manifest entry or a head folder from a run with other inputs: what differs."""
    found = {}
    for layer, head in shards:
        name = shard_name(layer, head)
        folder = out / "shards" / name
        entry_path = _manifest(out, name)
        if not entry_path.exists() and not folder.exists():
            continue
        inputs = hashes(layer, head)
        differs = HeadFolder(folder, inputs).mismatch() if folder.exists() else None
        problem = differs[0] if differs else None
        if problem is None and entry_path.exists():
            try:
                theirs = json.loads(entry_path.read_text()).get("inputs")
            except (OSError, json.JSONDecodeError):
                theirs = None
            if theirs != inputs.to_json():
                diff = inputs.differences(InputHashes.from_json(theirs)) if isinstance(theirs, dict) else []
                problem = diff or ["its inputs (unknown)"]
        if problem:
            found[layer, head] = problem
    return found


def _log(rank: Rank, message: str) -> None:
    print(f"[rank {rank.rank}/{rank.world_size}] {message}", file=sys.stderr, flush=True)


class _Clock:
    """Writes each finished shard's manifest entry and logs it with the overall count and the time left."""

    def __init__(self, out: Path, mine: list, hashes: "_Hashes", rank: Rank, n_shards: int) -> None:
        self.out, self.mine, self.hashes, self.rank, self.n_shards = out, mine, hashes, rank, n_shards
        self.start, self.finished_here = time.time(), 0

    def finished(self, layer: int, head: int, result: HeadResult, seconds: float) -> None:
        name = shard_name(layer, head)
        inputs = self.hashes(layer, head)
        write_json(_manifest(self.out, name), {
            "shard": name, "layer": layer, "head": head, "settings": inputs.settings, "inputs": inputs.to_json(),
            "rank": self.rank.rank, "seconds": round(seconds, 3), "n_features": len(result.features),
            "scan": result.run.scan if result.run else None,
        })
        self.finished_here += 1
        left = sum(1 for lh in self.mine if not _is_done(self.out, shard_name(*lh), self.hashes(*lh)))
        eta = (time.time() - self.start) / self.finished_here * left
        overall = len(list((self.out / "manifest").glob("*.json")))
        _log(self.rank, f"{name}: done in {seconds:.1f}s; overall {overall}/{self.n_shards} shards; "
                        f"this rank {left} left, about {eta:.0f}s")


def _finish_layer(work: Workload, out: Path, settings: ExtractSettings, layer: int, pending: list, clock: _Clock,
                  progress: bool, kept: Optional[SparseActs]) -> None:
    """The distractor evidence of this rank's pending heads of ``layer`` from one corpus pass (``kept``: the
    layer's corpus input activations, when the corpus pass kept them); each head is then written complete
    and its manifest entry made (:func:`~attnrules.pipeline.extract.with_evidence`)."""
    if not pending:
        return
    t0 = time.time()
    input_sae = as_sources(work.model, work.input_sae(layer), work.output_sae(layer, pending[0][0]))[0]
    heads = [(as_sources(work.model, work.input_sae(layer), work.output_sae(layer, h))[1], r) for h, r, _ in pending]
    errors: list[StepError] = []
    try:
        evidence = distractor_evidence(work.model, input_sae, heads, work.tokens, settings, progress, kept)
    except Exception as error:  # noqa: BLE001 - recorded in each head's metadata, the sweep goes on
        errors = [StepError("distractor_evidence", f"{type(error).__name__}: {error}")]
        evidence = [None] * len(pending)
    share = (time.time() - t0) / len(pending)  # the layer pass's time, split among its heads
    for (head, result, seconds), found in zip(pending, evidence):
        done = with_evidence(result, found, errors, out / "shards" / shard_name(layer, head))
        clock.finished(layer, head, done, seconds + share)


def _corpus_pass(work: Workload, out: Path, settings: ExtractSettings, rest: list, hashes: "_Hashes", rank: Rank,
                 progress: bool) -> tuple[set, dict, dict]:
    """One forward pass for the unfinished, unscanned heads of the next layers of ``rest`` (this rank's
    shards from the current one on): through blocks 0..the deepest, scanning every head and measuring each
    layer's statistics, head metrics, pattern pool and kept input activations on the same pass. It takes
    up to ``settings.layers_per_pass`` layers (None: all), as many as the temporary files of their scans
    and kept activations leave a fifth of ``TMPDIR``'s free space (:func:`_pass_layers`); a one-layer pass
    keeps its scans in memory. Returns the layers it covers, ({(layer, head): scan}, {layer: CorpusStats})
    (a layer without such a head has no entry: its heads read their scans and statistics from their folders)."""
    layers = list(dict.fromkeys(layer for layer, _ in rest))[: settings.layers_per_pass]
    todo = [(l, h) for l, h in rest if l in layers and not _is_done(out, shard_name(l, h), hashes(l, h))
            and not HeadFolder(out / "shards" / shard_name(l, h), hashes(l, h)).has_scan()]
    layers = _pass_layers(work, settings, layers, todo, rank)
    todo = [(l, h) for l, h in todo if l in layers]
    observers = {}  # one a layer
    for l, h in todo:
        if l not in observers:
            input_sae = as_sources(work.model, work.input_sae(l), work.output_sae(l, h))[0]
            observers[l] = corpus_observers(input_sae, work.tokens, settings)
    found = scan_heads_deferred(work.model, [work.output_sae(l, h) for l, h in todo], work.tokens,
                                on_disk=len(layers) > 1, batch_size=settings.batch_size, progress=progress,
                                observers=[o for obs in observers.values() for o in obs.observers]) if todo else []
    return set(layers), dict(zip(todo, found)), {l: obs.result() for l, obs in observers.items()}


def _pass_layers(work: Workload, settings: ExtractSettings, layers: list, todo: list, rank: Rank) -> list:
    """The first of ``layers`` whose pass's temporary files fit in 80 % of ``TMPDIR``'s free space (at least
    one layer): each head's scan (its maxima and positions, a sequence and output feature each) and each
    layer's kept activations (at most ``corpus_acts_mib``) and, in exact mode, its kept ``hook_resid_pre``
    (at most ``corpus_resid_mib``, and no more than the corpus's rows take); logged."""
    n = work.tokens.shape[0]
    position = torch.empty(0, dtype=position_dtype(work.tokens.shape[1])).element_size()
    resid = min(resid_bytes(settings), n * work.tokens.shape[1] * work.model.cfg.d_model * work.model.cfg.dtype.itemsize)
    need = {l: settings.corpus_acts_mib * 2**20 + resid for l in layers}
    for l, h in todo:
        sae = work.output_sae(l, h)
        need[l] += n * sae.W_enc.shape[-1] * (sae.W_enc.element_size() + position)
    tmp = tempfile.gettempdir()
    free = shutil.disk_usage(tmp).free
    taken, total = [], 0
    for l in layers:
        if taken and total + need[l] > 0.8 * free:
            break
        taken.append(l)
        total += need[l]
    if len(taken) > 1 or len(layers) > 1:
        _log(rank, f"corpus pass: layer(s) {', '.join(map(str, taken))} of {len(layers)} in one forward pass "
                   f"(temporary files up to {total / 2**30:.1f} GiB in {tmp}, {free / 2**30:.1f} GiB free)")
    return taken


def run_sweep(
    work: Workload, out_dir: Path | str, settings: ExtractSettings, *, device: str = "cpu", progress: bool = True,
    overwrite: bool = False,
) -> Optional[pd.DataFrame]:
    """Run (or resume) the sweep over ``work.heads``; rank 0 returns the summary table, others None.

    Each shard is bound to the content hashes of the model, its SAEs, the corpus and the settings
    (:mod:`attnrules.pipeline.resume`): a restarted sweep skips finished shards and resumes the
    others; an output folder with shards of a run with other inputs raises
    :class:`~attnrules.pipeline.resume.RunMismatchError` naming them, unless ``overwrite`` (their
    files and manifest entries are removed and they are run afresh)."""
    out = Path(out_dir)
    rank = _start_distributed(device)
    shards = list(work.heads)
    mine = rank_shards(shards, rank)
    hashes = _Hashes(work, settings, mine)
    # every rank checks every shard, so that all of them stop (or none does)
    stale = _mismatches(out, shards, hashes)
    if stale and not overwrite:
        what = list(dict.fromkeys(w for lh in sorted(stale) for w in stale[lh]))
        listed = "; ".join(f"{shard_name(*lh)}: {', '.join(stale[lh])}" for lh in sorted(stale))
        raise RunMismatchError(out, what, f" (shards {listed})")
    for lh in stale:
        if lh in mine:  # only the owner touches a shard
            _manifest(out, shard_name(*lh)).unlink(missing_ok=True)
    clock = _Clock(out, mine, hashes, rank, len(shards))
    covered, scans, layer_stats, lookups = set(), {}, {}, {}
    pending: list = []  # this rank's heads of the current layer whose distractor evidence is still to come
    for i, (layer, head) in enumerate(mine):
        name = shard_name(layer, head)
        inputs = hashes(layer, head)
        if _is_done(out, name, inputs):
            _log(rank, f"{name}: already done, skipped")
            continue
        t0 = time.time()
        if layer not in covered:  # one corpus pass for the next layers_per_pass layers
            covered, scans, layer_stats = _corpus_pass(work, out, settings, mine[i:], hashes, rank, progress)
        if layer not in lookups:  # one vocabulary pass a layer for the tokens that stand for input features
            lookups = {layer: TokenLookup(work.model, as_sources(work.model, work.input_sae(layer),
                                                                 work.output_sae(layer, head))[0], bos_token(work.model, work.tokens))}
        scan = scans.pop((layer, head), None)
        result = extract_head(work.model, work.input_sae(layer), work.output_sae(layer, head), work.tokens,
                              settings=settings, out_dir=out / "shards" / name, progress=progress,
                              scan=scan.scan() if scan is not None else None, overwrite=overwrite, inputs=inputs,
                              corpus_stats=layer_stats.get(layer), token_lookup=lookups[layer], defer_evidence=True)
        if result.run is not None and result.run.scan == "none":  # read back complete: nothing left to do
            clock.finished(layer, head, result, time.time() - t0)
        else:
            pending.append((head, result, time.time() - t0))
        if i + 1 == len(mine) or mine[i + 1][0] != layer:  # the layer's last head: its evidence, then done
            stats = layer_stats.pop(layer, None)  # the layer's kept activations: their file goes after this
            _finish_layer(work, out, settings, layer, pending, clock, progress, stats.acts if stats is not None else None)
            pending = []
    if rank.world_size > 1:
        torch.distributed.barrier()
    if rank.rank == 0:  # every rank is done writing: temporaries left by killed writers can go
        for folder, names in ((out / "manifest", None), (out / "merged", None), (out, ("summary.csv",))):
            clean_temporaries(folder, names)
    summary = merge_sweep(out, shards) if rank.rank == 0 else None
    if rank.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _frames(out: Path, shards: list) -> dict[str, pd.DataFrame]:
    metrics, features, rules, distractors, heads = [], [], [], [], []
    for layer, head in shards:
        folder = out / "shards" / shard_name(layer, head)
        if not _manifest(out, shard_name(layer, head)).exists() or not (folder / MARKER_FILE).exists():
            raise FileNotFoundError(f"shard {shard_name(layer, head)} is not finished: no manifest entry or "
                                    f"no {folder / MARKER_FILE}")
        result = read_head(folder)
        metrics_of_head = result.metadata.get("head_metrics") or {}  # attention metrics from the corpus pass
        heads.append({"layer": layer, "head": head, "n_features": len(result.features),
                      **{k: v for k, v in metrics_of_head.items() if k not in ("layer", "head")}})
        for f in result.features:
            key = {"layer": layer, "head": head, "feature": f.name}
            metrics += [{**key, **p.to_json()} for p in f.sweep]
            features.append({"layer": layer, "head": head, **f.summary_row()})
            rules += [{**key, "method": r.method, "rank": i, "text": t} for r in f.rules for i, t in enumerate(r.text)]
        for d in result.distractors:
            row = {"layer": layer, "head": head, "feature": d.feature, "kq_count": d.kq_count,
                   "kkq_count": d.kkq_count, "mean_act_without": d.mean_act_without, "mean_act_with": d.mean_act_with}
            if d.insertion is not None:
                row.update({f"insert_{n}": a for n, a in zip(d.insertion.counts, d.insertion.mean_act)})
            distractors.append(row)
    return {"metrics": pd.DataFrame(metrics), "features": pd.DataFrame(features), "rules": pd.DataFrame(rules),
            "distractors": pd.DataFrame(distractors), "heads": pd.DataFrame(heads)}


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)  # an older attnrules' temporary
    write_with(path, lambda f: frame.to_parquet(f, index=False))


def merge_sweep(out_dir: Path | str, shards: list) -> pd.DataFrame:
    """Merge finished shards into ``merged/*.parquet`` and return (and write) the summary table:
    mean precision / recall / F1 by layer, evaluation (``negatives``: "random" or "pattern"), method and N, with each layer's share of features with a
    distractor key, its counting features and how many of its features had a failed step."""
    out = Path(out_dir)
    frames = _frames(out, shards)
    for name, frame in frames.items():
        _write_parquet(out / "merged" / f"{name}.parquet", frame)
    metrics, features = frames["metrics"], frames["features"]
    if metrics.empty:
        summary = pd.DataFrame(columns=["layer", "negatives", "method", "num_rules", "precision", "recall", "f1"])
    else:  # by evaluation: REF's random negatives, or pattern negatives (shards from before them: random)
        negatives = metrics["negatives"].fillna("random") if "negatives" in metrics else "random"
        summary = metrics.assign(negatives=negatives).groupby(["layer", "negatives", "method", "num_rules"], as_index=False)[
            ["precision", "recall", "f1"]].mean()
        by_layer = features.groupby("layer").agg(
            n_features=("feature", "size"), distractor_share=("has_distractor", "mean"),
            counting_features=("counting_rule", lambda s: "; ".join(x for x in s if isinstance(x, str))),
            features_with_failed_steps=("failed_steps", lambda s: int((s != "").sum())),
        ).reset_index()
        summary = summary.merge(by_layer, on="layer")
    write_csv(out / "summary.csv", summary)
    return summary
