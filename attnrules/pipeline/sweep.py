"""Whole-model sweeps: extraction for many heads, sharded by (layer, head), resumable, on torchrun.

Every process (one per ``torchrun`` rank; gloo on CPU, nccl on GPU) takes every world_size-th shard.
A shard is one head: its results go to ``OUT/shards/L{l}H{h}/`` (features written one by one, so a
killed shard resumes where it stopped) and, when complete, a manifest entry
``OUT/manifest/L{l}H{h}.json`` is written atomically. A restarted sweep skips shards whose manifest
entry has the same settings. When all ranks are done, rank 0 merges the shards into one Parquet
dataset (``OUT/merged/{metrics,features,rules,distractors}.parquet``) and a summary table (``OUT/summary.csv``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from attnrules.exemplars import scan_heads
from attnrules.pipeline import ExtractSettings, extract_head
from attnrules.files import write_csv, write_json
from attnrules.pipeline.workload import Workload


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


def _is_done(out: Path, name: str, fingerprint: str) -> bool:
    path = out / "manifest" / f"{name}.json"
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("settings") == fingerprint
    except json.JSONDecodeError:
        return False  # a torn manifest cannot happen (atomic writes) but would mean "redo"


def _log(rank: Rank, message: str) -> None:
    print(f"[rank {rank.rank}/{rank.world_size}] {message}", file=sys.stderr, flush=True)


def run_sweep(
    work: Workload, out_dir: Path | str, settings: ExtractSettings, *, device: str = "cpu", progress: bool = True
) -> Optional[pd.DataFrame]:
    """Run (or resume) the sweep over ``work.heads``; rank 0 returns the summary table, others None."""
    out = Path(out_dir)
    rank = _start_distributed(device)
    shards = list(work.heads)
    mine = shards[rank.rank:: rank.world_size]
    fingerprint = settings.fingerprint()
    start, finished_here, scans = time.time(), 0, {}
    for i, (layer, head) in enumerate(mine):
        name = shard_name(layer, head)
        if _is_done(out, name, fingerprint):
            _log(rank, f"{name}: already done, skipped")
            continue
        t0 = time.time()
        if (layer, head) not in scans:  # one corpus pass for all of this rank's unfinished heads of the layer
            todo = [h for l, h in mine if l == layer and not _is_done(out, shard_name(l, h), fingerprint)]
            found = scan_heads(work.model, [work.output_sae(layer, h) for h in todo], work.tokens,
                               batch_size=settings.batch_size, progress=progress)
            scans = {(layer, h): s for h, s in zip(todo, found)}
        result = extract_head(work.model, work.input_sae(layer), work.output_sae(layer, head), work.tokens,
                              settings=settings, out_dir=out / "shards" / name, progress=progress,
                              scan=scans.pop((layer, head)))
        write_json(out / "manifest" / f"{name}.json", {
            "shard": name, "layer": layer, "head": head, "settings": fingerprint, "rank": rank.rank,
            "seconds": round(time.time() - t0, 3), "n_features": len(result.features),
        })
        finished_here += 1
        left = sum(1 for lh in mine[i + 1:] if not _is_done(out, shard_name(*lh), fingerprint))
        eta = (time.time() - start) / finished_here * left
        overall = len(list((out / "manifest").glob("*.json")))
        _log(rank, f"{name}: done in {time.time() - t0:.1f}s; overall {overall}/{len(shards)} shards; "
                   f"this rank {left} left, about {eta:.0f}s")
    if rank.world_size > 1:
        torch.distributed.barrier()
    summary = merge_sweep(out, shards) if rank.rank == 0 else None
    if rank.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _frames(out: Path, shards: list) -> dict[str, pd.DataFrame]:
    metrics, features, rules, distractors = [], [], [], []
    for layer, head in shards:
        path = out / "shards" / shard_name(layer, head) / "results.json"
        if not (out / "manifest" / f"{shard_name(layer, head)}.json").exists() or not path.exists():
            raise FileNotFoundError(f"shard {shard_name(layer, head)} is not finished: no manifest entry or {path}")
        data = json.loads(path.read_text())
        for f in data["features"]:
            key = {"layer": layer, "head": head, "feature": f["name"]}
            metrics += [{**key, **row} for row in f["sweep"]]
            distractor = f.get("paper_distractor") or {}
            counting = f.get("counting") or {}
            features.append({**key, "has_distractor": bool(distractor.get("has_distractor")),
                             "n_absence_rules": len(f.get("absence", [])),
                             "counting_rule": counting.get("text"),
                             "counting_status": (f.get("counting_check") or {}).get("status"),
                             "failed_steps": "; ".join(e["step"] for e in f.get("errors", [])),
                             "n_train": f["n_train"], "n_val": f["n_val"]})
            rules += [{**key, "method": m, "rank": i, "text": t} for m, r in f["rules"].items() for i, t in enumerate(r["text"])]
        for d in data.get("distractors", []):
            insertion = d.get("insertion") or {}
            row = {"layer": layer, "head": head, "feature": d["feature"], "kq_count": d["kq_count"],
                   "kkq_count": d["kkq_count"], "mean_act_without": d["mean_act_without"],
                   "mean_act_with": d["mean_act_with"]}
            row.update({f"insert_{n}": a for n, a in zip(insertion.get("counts", []), insertion.get("mean_act", []))})
            distractors.append(row)
    return {"metrics": pd.DataFrame(metrics), "features": pd.DataFrame(features), "rules": pd.DataFrame(rules),
            "distractors": pd.DataFrame(distractors)}


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def merge_sweep(out_dir: Path | str, shards: list) -> pd.DataFrame:
    """Merge finished shards into ``merged/*.parquet`` and return (and write) the summary table:
    mean precision / recall / F1 by layer, method and N, with each layer's share of features with a
    distractor key, its counting features and how many of its features had a failed step."""
    out = Path(out_dir)
    frames = _frames(out, shards)
    for name, frame in frames.items():
        _write_parquet(out / "merged" / f"{name}.parquet", frame)
    metrics, features = frames["metrics"], frames["features"]
    if metrics.empty:
        summary = pd.DataFrame(columns=["layer", "method", "num_rules", "precision", "recall", "f1"])
    else:
        summary = metrics.groupby(["layer", "method", "num_rules"], as_index=False)[["precision", "recall", "f1"]].mean()
        by_layer = features.groupby("layer").agg(
            n_features=("feature", "size"), distractor_share=("has_distractor", "mean"),
            counting_features=("counting_rule", lambda s: "; ".join(x for x in s if isinstance(x, str))),
            features_with_failed_steps=("failed_steps", lambda s: int((s != "").sum())),
        ).reset_index()
        summary = summary.merge(by_layer, on="layer")
    write_csv(out / "summary.csv", summary)
    return summary
