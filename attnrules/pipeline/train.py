"""Per-head output SAEs trained on demand, through sae_lens's own training runner.

:func:`train_head_saes` trains, for each head h of one layer, a standard ReLU SAE on that head's
``blocks.{L}.attn.hook_z[..., h, :]`` (``d_in = d_head``) with
``sae_lens.LanguageModelSAETrainingRunner`` (``LanguageModelSAERunnerConfig`` with
``hook_head_index = h``), fed an in-memory model (``override_model``) and the token corpus as an
in-memory ``datasets.Dataset`` of token ids (``override_dataset``): nothing is downloaded.

Defaults are the paper's per-head SAEs (reference-behaviour §1.4, paper App. A.1; Kissane et al.'s
training code as forked by the authors), as far as sae_lens's config has them:

=========================  ===========================  =============================================
paper                      :class:`HeadSAETrainSettings`  sae_lens
=========================  ===========================  =============================================
dict size 2048 (×32 d_head) ``expansion_factor=32``      ``StandardTrainingSAEConfig.d_sae``
L1 coefficient 1.0          ``l1_coefficient=1.0``       ``l1_coefficient`` (see below)
Adam, lr 1.2e-3             ``lr``                       ``lr``, constant schedule
β1 0.9, β2 0.99             ``adam_beta1/2``             ``adam_beta1/2``
batch 4096 tokens           ``batch_size_tokens``        ``train_batch_size_tokens``
2e9 tokens                  ``training_tokens``          ``training_tokens``
64-token contiguous chunks  the corpus's ``seq_len``     ``context_size`` (REF's chunks: ``load_corpus``)
unit-norm decoder rows      ``decoder_init_norm=1.0``    ``decoder_init_norm`` (at initialisation only)
fp32                                                     ``dtype="float32"``
=========================  ===========================  =============================================

What does not map:

- **L1 penalty**: the paper's is ``l1 · Σ_j f_j`` with decoder rows renormalised to unit norm after
  every step; sae_lens's standard SAE penalises ``l1 · Σ_j f_j ‖W_dec[j]‖`` and does not renormalise.
  At unit-norm rows the two are equal, and sae_lens's form is invariant to moving scale between a
  feature and its decoder row, so it optimises the same objective without the constraint. The MSE
  term is the same (squared error summed over ``d_head``, mean over tokens).
- **Neuron resampling** (Anthropic's scheme every 25k steps ×4, dead cutoff 1e-6 over 12,500 steps):
  sae_lens 6 has none. Features silent for ``dead_feature_window`` (12,500) steps are counted and
  saved as ``num_dead_features`` in the SAE's metadata, not re-initialised.
- **Initialisation**: sae_lens sets ``W_enc = W_decᵀ`` and ``b_dec = 0``; Kissane's code draws the
  encoder separately (and may set ``b_dec`` to the geometric median). sae_lens clips gradients to
  norm 1.
- **Data order**: sae_lens reads the corpus in order and shuffles within a mixing buffer of
  ``buffer_tokens`` activations; a corpus smaller than ``training_tokens`` is repeated (epochs).

Output, per head: ``out_dir/L{layer}H{head}/`` — a sae_lens SAE folder (``cfg.json`` with
``metadata.hook_name = blocks.{L}.attn.hook_z`` and ``metadata.hook_head_index = h``,
``sae_weights.safetensors``, ``sparsity.safetensors``, ``runner_cfg.json``) and ``TRAIN.json``
(what was trained from: content hashes of the model and corpus, the settings, and how training went).
``sae_lens.SAE.load_from_disk(folder)`` reads it, and any attnrules function that takes an output SAE
accepts that object (:func:`attnrules.sources.as_sources`: per-head through ``hook_head_index``).

Resume: a head whose folder is complete (those files present) is skipped, provided its ``TRAIN.json``
names the same model, corpus, layer, head and settings (else :class:`TrainingMismatchError`, unless
``overwrite``). A head is trained into ``out_dir/.L{l}H{h}.partial`` and renamed into place when
done, so a folder under its final name is always complete. With ``n_checkpoints > 0`` sae_lens
saves training checkpoints into ``out_dir/.L{l}H{h}.checkpoints/``; a rerun after a kill resumes
from the newest complete one of the same inputs (sae_lens's ``resume_from_checkpoint``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch

from attnrules.files import write_json
from attnrules.pipeline.resume import hash_corpus, hash_model
from attnrules.sources import check_head, check_tokens

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

TRAIN_FILE = "TRAIN.json"  # written last into a head's folder, with what it was trained from
SAE_FILES = ("cfg.json", "sae_weights.safetensors")  # sae_lens's inference SAE files
PARTIAL = ".partial"  # out_dir/.L{l}H{h}.partial: a head being trained
CHECKPOINTS = ".checkpoints"  # out_dir/.L{l}H{h}.checkpoints: sae_lens's training checkpoints
FORMAT = "attnrules.head_sae_training"


class TrainingMismatchError(ValueError):
    """A finished head folder that was trained from other inputs (model, corpus, head or settings)."""


@dataclass(frozen=True)
class HeadSAETrainSettings:
    """How each per-head SAE is trained; defaults are the paper's (see the module docstring)."""

    expansion_factor: int = 32  # d_sae = expansion_factor * d_head (paper: 32 * 64 = 2048)
    d_sae: Optional[int] = None  # the dictionary size, instead of expansion_factor * d_head
    l1_coefficient: float = 1.0
    lr: float = 1.2e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    batch_size_tokens: int = 4096
    training_tokens: int = 2_000_000_000
    context_size: Optional[int] = None  # tokens per sequence read from the corpus (default: its seq_len)
    decoder_init_norm: float = 1.0  # unit-norm decoder rows at initialisation
    lr_warm_up_steps: int = 0
    l1_warm_up_steps: int = 0
    dead_feature_window: int = 12_500  # steps without firing after which a feature counts as dead
    buffer_tokens: Optional[int] = None  # activations shuffled together (default: 8 batches)
    store_batch_size_prompts: int = 32  # sequences per model forward pass
    n_checkpoints: int = 0  # training checkpoints per head, for resuming a killed run mid-head
    seed: int = 0

    def __post_init__(self) -> None:
        ints = {"expansion_factor": 1, "batch_size_tokens": 1, "training_tokens": 1, "lr_warm_up_steps": 0,
                "l1_warm_up_steps": 0, "dead_feature_window": 1, "store_batch_size_prompts": 1,
                "n_checkpoints": 0, "seed": 0}
        optional = {"d_sae": 1, "context_size": 2, "buffer_tokens": 1}
        for name, least in {**ints, **optional}.items():
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int ≥ {least}, got {value!r}")
        for name in ("l1_coefficient", "lr", "decoder_init_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if self.training_tokens < self.batch_size_tokens:
            raise ValueError(f"training_tokens ({self.training_tokens}) must be at least batch_size_tokens "
                             f"({self.batch_size_tokens}): one training step")
        if self.buffer_tokens is not None and self.buffer_tokens < self.batch_size_tokens:
            raise ValueError(f"buffer_tokens ({self.buffer_tokens}) must be at least batch_size_tokens "
                             f"({self.batch_size_tokens})")

    @property
    def steps(self) -> int:
        """Training steps: sae_lens trains until it has seen training_tokens, in whole batches."""
        return -(-self.training_tokens // self.batch_size_tokens)

    def dictionary_size(self, d_head: int) -> int:
        return self.d_sae if self.d_sae is not None else self.expansion_factor * d_head

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# One line of help per setting (the ``train-head-saes`` options are generated from these).
HELP = {
    "expansion_factor": "dictionary size as a multiple of d_head (paper: 32 × 64 = 2048)",
    "d_sae": "dictionary size (instead of --expansion-factor × d_head)",
    "l1_coefficient": "L1 coefficient (sae_lens: on f·‖W_dec‖; paper 1.0)",
    "lr": "Adam learning rate, constant (paper 1.2e-3)",
    "adam_beta1": "Adam β1 (paper 0.9)",
    "adam_beta2": "Adam β2 (paper 0.99)",
    "batch_size_tokens": "activations per training step (paper 4096)",
    "training_tokens": "activations seen per head (paper 2e9); the corpus is repeated when smaller",
    "context_size": "tokens per sequence read from the corpus (default: its seq_len; paper 64)",
    "decoder_init_norm": "norm of the decoder rows at initialisation (paper: unit norm)",
    "lr_warm_up_steps": "learning-rate warm-up steps",
    "l1_warm_up_steps": "L1-coefficient warm-up steps",
    "dead_feature_window": "steps without firing after which a feature counts as dead (paper 12,500; "
                           "counted, not resampled)",
    "buffer_tokens": "activations shuffled together before batching (default: 8 batches)",
    "store_batch_size_prompts": "sequences per model forward pass",
    "n_checkpoints": "training checkpoints per head, so that a killed run resumes mid-head (0: none)",
    "seed": "seed of the initialisation and the shuffling",
}


def head_folder(out_dir: Path | str, layer: int, head: int) -> Path:
    """Where :func:`train_head_saes` puts the SAE of (layer, head)."""
    return Path(out_dir) / f"L{layer}H{head}"


def is_complete(folder: Path | str) -> bool:
    """Whether ``folder`` holds a finished head SAE (the sae_lens files and ``TRAIN.json``)."""
    folder = Path(folder)
    return all((folder / name).is_file() for name in (*SAE_FILES, TRAIN_FILE))


def train_head_saes(
    model: HookedTransformer,
    tokens: torch.Tensor,
    layer: int,
    heads: Optional[Sequence[int]] = None,
    out_dir: Path | str = "out/head-saes",
    *,
    settings: HeadSAETrainSettings = HeadSAETrainSettings(),
    device: Optional[str] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[int, Path]:
    """Train a per-head ``hook_z`` SAE for each head of ``layer`` (all heads when ``heads`` is None) on
    ``tokens`` ``[n_sequences, seq_len]`` (token ids, BOS first, as :func:`attnrules.pipeline.workload.load_corpus`
    gives them) through sae_lens's ``LanguageModelSAETrainingRunner``; returns ``{head: folder}``.

    ``model`` is any transformer_lens ``HookedTransformer`` in memory (processed as ``from_pretrained``
    does, so that ``hook_z`` is what the SAE will be applied to). ``device``: where the SAE trains
    (default: the model's device). Finished heads are skipped (see the module docstring for resume
    and ``overwrite``). ``progress``: a line per head on stderr and sae_lens's progress bar."""
    if not isinstance(settings, HeadSAETrainSettings):
        raise TypeError(f"settings must be a HeadSAETrainSettings, got {type(settings).__name__}")
    n_heads = model.cfg.n_heads
    heads = tuple(range(n_heads)) if heads is None else tuple(heads)
    if not heads:
        raise ValueError("heads is empty: give at least one head, or None for all heads of the layer")
    for head in heads:
        check_head(model, layer, head)
    if len(set(heads)) != len(heads):
        raise ValueError(f"heads has repeats: {list(heads)}")
    tokens = check_tokens(tokens, model)
    context = settings.context_size or int(tokens.shape[1])
    if context > tokens.shape[1]:
        raise ValueError(f"context_size ({context}) is longer than the corpus's sequences ({tokens.shape[1]} tokens)")
    device = str(device) if device is not None else str(next(model.parameters()).device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    identity = {"model": hash_model(model), "corpus": hash_corpus(tokens), "layer": layer,
                "settings": settings.to_json()}
    say = _Say(progress)
    dataset = None
    done: dict[int, Path] = {}
    for i, head in enumerate(heads):
        name = f"L{layer}H{head}"
        folder = head_folder(out_dir, layer, head)
        want = {**identity, "head": head}
        if folder.exists():
            if is_complete(folder) and not _differs(folder, want):
                say(f"{name} ({i + 1}/{len(heads)}): finished SAE in {folder}, skipped")
                done[head] = folder
                continue
            if is_complete(folder) and not overwrite:
                raise TrainingMismatchError(
                    f"{folder} holds an SAE trained from other inputs ({', '.join(_differs(folder, want))} "
                    "differ); pass overwrite=True (--overwrite) to retrain it, or choose another out_dir")
            shutil.rmtree(folder)  # retrained (overwrite), or an incomplete folder someone left
        if dataset is None:
            dataset = _token_dataset(tokens)
        done[head] = _train_one(model, dataset, tokens, layer, head, out_dir, want, settings, context, device,
                                say, f"{name} ({i + 1}/{len(heads)})", overwrite)
    return done


# --------------------------------------------------------------------------------------------------


class _Say:
    def __init__(self, on: bool) -> None:
        self.on = on

    def __call__(self, text: str) -> None:
        if self.on:
            print(f"train-head-saes: {text}", file=sys.stderr, flush=True)


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _differs(folder: Path, want: dict) -> list[str]:
    """The inputs in which ``folder``'s TRAIN.json differs from ``want`` (all of them if unreadable)."""
    have = _read_json(folder / TRAIN_FILE) or {}
    return [k for k in ("model", "corpus", "layer", "head", "settings") if have.get(k) != json.loads(json.dumps(want[k]))]


def _token_dataset(tokens: torch.Tensor):
    """An in-memory ``datasets.Dataset`` with one ``tokens`` row per sequence (sae_lens's pretokenized form)."""
    from datasets import Dataset

    return Dataset.from_dict({"tokens": tokens.cpu().numpy()})


@contextlib.contextmanager
def _quiet_sae_lens(progress: bool) -> Iterator[None]:
    """sae_lens's messages that say nothing here (the in-memory overrides, its rows-versus-tokens epoch
    warning, a copy warning, one warning per epoch) are dropped; its progress bar only with ``progress``;
    its SIGINT/SIGTERM handlers are undone afterwards."""
    from sae_lens.training import activations_store, sae_trainer

    lib_logger = logging.getLogger("sae_lens")
    level = lib_logger.level
    bars = {module: module.tqdm for module in (sae_trainer, activations_store)}
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with warnings.catch_warnings():
        for text in ("The training dataset contains fewer samples", "To copy construct from a tensor",
                     "All samples in the training dataset have been exhausted", "pretokenized dataset has context_size"):
            warnings.filterwarnings("ignore", message=text)
        lib_logger.setLevel(logging.ERROR)
        if not progress:  # tqdm reads TQDM_DISABLE only at import: the bars are switched off where sae_lens makes them
            for module, bar in bars.items():
                module.tqdm = functools.partial(bar, disable=True)
        try:
            yield
        finally:
            lib_logger.setLevel(level)
            for module, bar in bars.items():
                module.tqdm = bar
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def _latest_checkpoint(folder: Path, want: dict) -> Optional[Path]:
    """The newest complete sae_lens checkpoint of the same inputs: the SAE's weights, the trainer's and the
    activation store's state, and runner_cfg.json (written last) readable. (The checkpoint sae_lens writes
    when interrupted holds only the last two: it is not one to resume from.)"""
    from sae_lens.constants import (
        ACTIVATION_SCALER_CFG_FILENAME,
        ACTIVATIONS_STORE_STATE_FILENAME,
        RUNNER_CFG_FILENAME,
        SAE_WEIGHTS_FILENAME,
        TRAINER_STATE_FILENAME,
    )

    if not folder.is_dir() or _differs(folder, want):
        return None
    files = (SAE_WEIGHTS_FILENAME, TRAINER_STATE_FILENAME, ACTIVATION_SCALER_CFG_FILENAME, ACTIVATIONS_STORE_STATE_FILENAME)
    found = []
    for path in folder.iterdir():
        if (path.is_dir() and path.name.isdigit() and all((path / f).is_file() for f in files)
                and _read_json(path / RUNNER_CFG_FILENAME) is not None):
            found.append((int(path.name), path))
    return max(found)[1] if found else None


def _store_state_into_checkpoints(save):
    """sae_lens 6.54's runner adds its activation-store state to the checkpoint folder the trainer has just
    written; on SIGINT/SIGTERM it is also called for a folder nobody made (and fails writing into it). Such a
    checkpoint would hold no weights: it is skipped, so that the interruption reaches the caller."""
    def save_checkpoint(checkpoint_path):
        if checkpoint_path is not None and not Path(checkpoint_path).is_dir():
            return None
        return save(checkpoint_path)
    return save_checkpoint


def _train_one(model, dataset, tokens: torch.Tensor, layer: int, head: int, out_dir: Path, want: dict,
               settings: HeadSAETrainSettings, context: int, device: str, say: _Say, label: str,
               overwrite: bool) -> Path:
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
    )

    name = f"L{layer}H{head}"
    folder = head_folder(out_dir, layer, head)
    partial = out_dir / f".{name}{PARTIAL}"
    checkpoints = out_dir / f".{name}{CHECKPOINTS}"
    if partial.exists():
        shutil.rmtree(partial)  # a killed run's half-written output
    if overwrite and checkpoints.exists():
        shutil.rmtree(checkpoints)
    resume = _latest_checkpoint(checkpoints, want) if settings.n_checkpoints else None
    if resume is None and checkpoints.exists():
        shutil.rmtree(checkpoints)  # another run's, or no complete one
    if settings.n_checkpoints:
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_json(checkpoints / TRAIN_FILE, {"format": FORMAT, **want})

    d_head = model.cfg.d_head
    d_sae = settings.dictionary_size(d_head)
    buffer_tokens = settings.buffer_tokens or 8 * settings.batch_size_tokens
    corpus_tokens = int(tokens.shape[0]) * context
    hook = f"blocks.{layer}.attn.hook_z"
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(
            d_in=d_head, d_sae=d_sae, l1_coefficient=settings.l1_coefficient, l1_warm_up_steps=settings.l1_warm_up_steps,
            decoder_init_norm=settings.decoder_init_norm, apply_b_dec_to_input=True, normalize_activations="none",
            dtype="float32", device=device),
        model_name=str(getattr(model.cfg, "model_name", "model")),
        hook_name=hook,
        hook_head_index=head,
        dataset_path=f"attnrules-corpus-{want['corpus']}",  # a label: the dataset is passed in memory
        is_dataset_tokenized=True,
        streaming=False,
        context_size=context,
        training_tokens=settings.training_tokens,
        train_batch_size_tokens=settings.batch_size_tokens,
        store_batch_size_prompts=settings.store_batch_size_prompts,
        n_batches_in_buffer=max(1, math.ceil(buffer_tokens / context)),  # sae_lens 6.54: buffer = this × context tokens
        lr=settings.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=settings.lr_warm_up_steps,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        dead_feature_window=settings.dead_feature_window,
        feature_sampling_window=max(settings.dead_feature_window, 1),
        device=device,
        dtype="float32",
        prepend_bos=True,  # the corpus's sequences start with BOS (they are used as they are)
        model_from_pretrained_kwargs={},
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=settings.n_checkpoints,
        checkpoint_path=None,
        output_path=str(partial),
        resume_from_checkpoint=None if resume is None else str(resume),
        seed=settings.seed,
        verbose=False,
    )
    cfg.checkpoint_path = str(checkpoints) if settings.n_checkpoints else None  # no random suffix: a rerun finds them

    epochs = settings.training_tokens / corpus_tokens
    start = f", resuming at {int(resume.name):,} tokens" if resume is not None else ""
    say(f"{label}: training a {d_sae}-feature SAE on {hook}[{head}] (d_in {d_head}): {settings.steps:,} steps of "
        f"{settings.batch_size_tokens:,} tokens = {epochs:.3g} passes over the corpus ({corpus_tokens:,} tokens){start}")
    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    from sae_lens.training._interruption import InterruptedException

    with _quiet_sae_lens(say.on):
        runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
        runner.save_checkpoint = _store_state_into_checkpoints(runner.save_checkpoint)
        try:
            sae = runner.run()
        except InterruptedException:  # sae_lens's SIGINT/SIGTERM handler: a plain interruption to callers
            say(f"{label}: interrupted; a rerun continues" + (" from the last checkpoint" if settings.n_checkpoints
                                                              else " (this head from the start)"))
            raise KeyboardInterrupt from None
    seconds = time.perf_counter() - t0
    meta = sae.cfg.metadata
    report = {"format": FORMAT, **want, "d_in": d_head, "d_sae": d_sae, "hook_name": hook, "hook_head_index": head,
              "steps": settings.steps, "training_tokens": settings.training_tokens, "corpus_tokens": corpus_tokens,
              "epochs": epochs, "seconds": round(seconds, 3), "resumed_from": None if resume is None else int(resume.name),
              "l0": getattr(meta, "l0", None), "num_dead_features": getattr(meta, "num_dead_features", None),
              "sae_lens_version": getattr(meta, "sae_lens_training_version", None)}
    write_json(partial / TRAIN_FILE, report)
    os.replace(partial, folder)  # the folder appears complete, or not at all
    if checkpoints.exists():
        shutil.rmtree(checkpoints)
    l0 = f"L0 {report['l0']:.3g}, " if report["l0"] is not None else ""
    say(f"{label}: done in {seconds:.1f} s ({l0}{report['num_dead_features']} dead features) → {folder}")
    return folder
