"""The ``attnrules`` command. Every subcommand is a thin layer over the library API.

The method options of ``extract`` and ``sweep`` are generated from :class:`ExtractSettings` (names,
types, defaults, choices and help all come from its fields' metadata; see
:mod:`attnrules.pipeline.settings`). Bad input of any kind ends the command with one line,
``attnrules <command>: error: ...``, and exit status 2, before any long work starts; notes (e.g. a
setting capped to what exists) are said once, as ``attnrules <command>: note: ...`` on stderr, and not
at all with ``--quiet``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from attnrules.pipeline import ExtractSettings, extract_head
from attnrules.pipeline.settings import GROUPS as SETTING_GROUPS
from attnrules.pipeline.settings import RUN, InvalidSetting, field_type
from attnrules.pipeline.sweep import run_sweep as sweep
from attnrules.pipeline.workload import TOY, TOY_LN, TOY_ROPE, TOYS, CorpusError, Workload, pretrained_workload, read_token_file, toy_workload
from attnrules.report import write_report
from attnrules.sources import SourceUnavailableError, find_head_sae_checkpoint

PROG = "attnrules"
DEFAULT_SAE_IN = "gpt2-small-res-jb"


class UsageError(Exception):
    """Bad input from the command line: said as ``attnrules <command>: error: <message>``, exit status 2."""


# ----------------------------------------------------------------------------------------------------------
# Option types


def _int_arg(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int ≥ {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an int ≥ {least}, got {text!r}")
        return value
    parse.__name__ = "int"
    return parse


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def _head_list(text: str) -> tuple[int, ...]:
    values = _int_list(text)
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected head indices ≥ 0, got {text!r}")
    return values


def _setting_type(scalar: type, is_tuple: bool, none: Optional[str]) -> Callable[[str], Any]:
    """The argparse ``type`` of a setting: its scalar type or a comma list of it; ``none`` → None."""
    def parse(text: str) -> Any:
        if none is not None and text.strip().lower() == none:
            return None
        if is_tuple:
            return _int_list(text)
        try:
            return scalar(text)
        except ValueError:
            what = {int: "an int", float: "a number"}.get(scalar, scalar.__name__)
            alt = f" or {none!r}" if none is not None else ""
            raise argparse.ArgumentTypeError(f"expected {what}{alt}, got {text!r}") from None
    parse.__name__ = scalar.__name__
    return parse


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults as they are typed (tuples as comma lists); none for flags, for None, or when the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (action.option_strings == [] or action.nargs == 0 or action.default in (None, argparse.SUPPRESS)
                or "(default" in help_text):
            return help_text
        default = action.default
        text = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        return f"{help_text} (default: {text.replace('%', '%%')})"


# ----------------------------------------------------------------------------------------------------------
# Options generated from ExtractSettings


def setting_flag(f: dataclasses.Field) -> str:
    """The CLI option of setting ``f``: metadata ``flag``, else ``--name`` (``--no-name`` for a bool that defaults to True)."""
    if "flag" in f.metadata:
        return f.metadata["flag"]
    kebab = f.name.replace("_", "-")
    return f"--no-{kebab}" if f.default is True else f"--{kebab}"


def setting_flags() -> dict[str, str]:
    """Setting name → its CLI option, for every field of :class:`ExtractSettings`."""
    return {f.name: setting_flag(f) for f in dataclasses.fields(ExtractSettings)}


def _add_setting_options(group_of: Callable[[str], Any]) -> None:
    """One option per :class:`ExtractSettings` field, in field order, in the group its metadata names."""
    hints = typing.get_type_hints(ExtractSettings)
    for f in dataclasses.fields(ExtractSettings):
        meta, flag = f.metadata, setting_flag(f)
        group = group_of(meta["group"])
        scalar, is_tuple, _ = field_type(hints[f.name])
        if scalar is bool and not is_tuple:
            group.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", default=f.default,
                               help=meta.get("flag_help", meta["help"]))
            continue
        group.add_argument(flag, dest=f.name, type=_setting_type(scalar, is_tuple, meta.get("none")),
                           default=f.default, choices=meta.get("choices"), help=meta["help"],
                           metavar=f"{f.name.upper()}[,...]" if is_tuple else None)


def settings_from_args(args: argparse.Namespace) -> ExtractSettings:
    """The :class:`ExtractSettings` the options give; a bad value is a :class:`UsageError` naming its option."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExtractSettings)}
    try:
        return ExtractSettings(**values)
    except InvalidSetting as err:
        flags = setting_flags()
        expected = err.expected
        for name, flag in flags.items():  # "at least min_count (150)" → "at least --min-count (150)"
            expected = expected.replace(f"{name} (", f"{flag} (")
        if expected.endswith(" or None"):  # None as it is typed: "all", "auto", ...
            expected = expected[: -len("None")] + repr(_cli_text(err.setting, None))
        raise UsageError(f"argument {flags[err.setting]}: expected {expected}, got {_cli_text(err.setting, err.got)}") from None


def _cli_text(name: str, value: Any) -> str:
    """``value`` of setting ``name`` as it is typed on the command line."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if value is None:
        f = next(f for f in dataclasses.fields(ExtractSettings) if f.name == name)
        return f.metadata.get("none", "None")
    return str(value)


# ----------------------------------------------------------------------------------------------------------
# Parser


def _add_corpus_options(group: argparse._ArgumentGroup) -> None:
    """--corpus, --n-sequences, --seq-len: the corpus options extract, sweep and train-head-saes share."""
    group.add_argument("--corpus", type=Path, default=None, help="token ids (.pt tensor [n, seq_len], seq_len ≥ 2) "
                       "or text (.txt, one document per line); required for real models (the toy generates its own)")
    group.add_argument("--n-sequences", type=_int_arg(1), default=None,
                       help="sequences to use (default: 3000 for the toy, 50000 otherwise)")
    group.add_argument("--seq-len", type=_int_arg(2), default=None, help="tokens per sequence for text corpora "
                       "(default: 32 for the toy, or the .pt corpus's; 64 otherwise)")


def _add_run_options(p: argparse.ArgumentParser, default_out: str) -> argparse.ArgumentParser:
    """The options extract and sweep share: sources, corpus, method (from ExtractSettings), run."""
    src = p.add_argument_group("model and SAEs")
    src.add_argument("--model", default=TOY, help=f"'{TOY}' (embedded planted model), '{TOY_LN}' (its variant with "
                     f"LayerNorm and biases), '{TOY_ROPE}' (a planted rotary model), a transformer_lens model name, e.g. gpt2-small, or a model folder")
    src.add_argument("--layer", type=_int_arg(0), default=None,
                     help="layer of the head(s) (default: 0 for the toy; all layers for sweep)")
    src.add_argument("--head", type=_head_list, default=None,
                     help="head index or comma list (default: all planted heads of the toy; required otherwise)")
    src.add_argument("--sae-in", default=None, help="input SAE: a sae_lens release id (e.g. gemma-scope-2b-pt-res-canonical, "
                     "llama_scope_lxr_8x; the SAE of --layer unless --sae-in-id or RELEASE/SAE_ID names one), or a "
                     "folder or file in a release's format (sae_lens, Gemma Scope params.npz, Llama Scope) "
                     f"(default: {DEFAULT_SAE_IN}; not used with the toy)")
    src.add_argument("--sae-in-id", default=None, help="sae_id of --sae-in within its release")
    src.add_argument("--sae-out-dir", type=Path, default=None,
                     help="directory of per-head output-SAE checkpoints (REF's .pt + _cfg.json)")
    src.add_argument("--sae-out", default=None,
                     help="instead: an output SAE on hook_z: a sae_lens release id (e.g. gpt2-small-hook-z-kk, "
                     "gemma-scope-2b-pt-att-canonical; the SAE of --layer unless --sae-out-id or RELEASE/SAE_ID "
                     "names one), or a folder or file (sae_lens, Gemma Scope params.npz, Kissane .pt); a "
                     "layer-level SAE is sliced to each (query) head")
    src.add_argument("--sae-out-id", default=None, help="sae_id of --sae-out within its release")
    src.add_argument("--sae-out-z", default=None, help="the earlier name of --sae-out")
    src.add_argument("--sae-out-z-id", default=None, help="sae_id of --sae-out-z within its release")
    src.add_argument("--device", default="cpu", help="torch device for the model and SAEs: cpu, cuda or cuda:N "
                     "(the toy runs on the CPU)")
    _add_corpus_options(p.add_argument_group("corpus"))
    groups = {title: p.add_argument_group(title) for title in SETTING_GROUPS}
    _add_setting_options(groups.__getitem__)
    run = groups[RUN]
    run.add_argument("--out", type=Path, default=Path(default_out),
                     help="output directory (one subfolder per head); finished work is reused on rerun")
    run.add_argument("--overwrite", action="store_true", help="an --out folder holding results of a run with other "
                     "inputs (model, SAEs, corpus or settings) is cleared and run afresh, instead of an error")
    run.add_argument("--quiet", action="store_true", help="no progress output and no notes: only results and errors")
    return p


def _add_extract(sub) -> argparse.ArgumentParser:
    return _add_run_options(sub.add_parser(
        "extract",
        help="explain the features of attention heads as rules (embedded planted model by default)",
        description="Run scores → candidates → importances → rules → evaluation for one or more heads; print "
        "the top rules and the P/R/F1 table; write results.json, rules.csv, metrics.csv and pairs.csv per head "
        "into --out. Defaults follow the paper's code (REF); without --model it runs on the embedded planted model.",
        formatter_class=_Formatter,
    ), "out/extract")


def _add_sweep(sub) -> argparse.ArgumentParser:
    return _add_run_options(sub.add_parser(
        "sweep",
        help="extract rules for many heads (a whole model by default), resumable, on torchrun",
        description="Run extraction for every (layer, head) (all heads of the model unless --layer/--head), "
        "sharded by head over torchrun ranks (e.g. `torchrun --nproc-per-node 2 -m attnrules.cli sweep ...`; "
        "gloo on CPU, nccl on GPU). Finished shards are skipped on restart. Results merge into OUT/merged/*.parquet "
        "and OUT/summary.csv (mean P/R/F1 by layer and N, share of features with distractors, counting features).",
        formatter_class=_Formatter,
    ), "out/sweep")


def _add_report(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "report",
        help="write one self-contained HTML report of extraction results",
        description="Read the results of `attnrules extract` (a head folder with results.json, or a folder of them) "
        "and write one self-contained HTML file with rules, plots and highlighted exemplars.",
        formatter_class=_Formatter,
    )
    p.add_argument("results_dir", type=Path, help="folder written by `attnrules extract --out` (or one of its L{l}H{h} folders)")
    p.add_argument("--out", type=Path, default=None, help="HTML file to write (default: RESULTS_DIR/report.html)")
    return p


def _whole_number(text: str) -> int:
    """An int, also written as 2e9 or 2_000_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}")
    return int(value)


def _add_train_head_saes(sub) -> argparse.ArgumentParser:
    """``train-head-saes``: model and corpus options as extract's, the training options from
    :class:`~attnrules.pipeline.train.HeadSAETrainSettings` (defaults: the paper's per-head SAEs)."""
    from attnrules.pipeline.train import HELP, HeadSAETrainSettings

    p = sub.add_parser(
        "train-head-saes",
        help="train a per-head output SAE (hook_z of one head) for each head of a layer, through sae_lens",
        description="Train, for each head of --layer, a standard ReLU SAE on blocks.L.attn.hook_z at that head "
        "(d_in = d_head) with sae_lens's LanguageModelSAETrainingRunner, the paper's settings by default. Each head "
        "goes to OUT/L{layer}H{head}/ as a sae_lens SAE folder (cfg.json with hook_name and hook_head_index, "
        "sae_weights.safetensors) plus TRAIN.json; `attnrules extract --sae-out OUT/L{l}H{h}` reads it. Finished "
        "heads are skipped on rerun.",
        formatter_class=_Formatter,
    )
    src = p.add_argument_group("model and corpus")
    src.add_argument("--model", default=TOY, help=f"'{TOY}', '{TOY_LN}', '{TOY_ROPE}' (planted models), a "
                     "transformer_lens model name, e.g. gpt2-small, or a model folder")
    src.add_argument("--layer", type=_int_arg(0), default=0, help="layer of the heads")
    src.add_argument("--head", "--heads", dest="head", type=_head_list, default=None,
                     help="head index or comma list (default: every head of the layer)")
    src.add_argument("--device", default="cpu", help="torch device for the model and the SAEs: cpu, cuda or cuda:N")
    _add_corpus_options(src)
    train = p.add_argument_group("training (defaults: the paper's per-head SAEs)")
    for f in dataclasses.fields(HeadSAETrainSettings):
        if f.name == "seed":
            continue
        default = f.default
        kind = float if isinstance(default, float) else int
        shown = "none" if default is None else f"{default:g}" if kind is float else f"{default:,}"
        train.add_argument("--" + f.name.replace("_", "-"), dest=f"train_{f.name}", type=float if kind is float
                           else _whole_number, default=default, metavar=kind.__name__.upper(),
                           help=f"{HELP[f.name]} (default: {shown})")
    run = p.add_argument_group("run")
    run.add_argument("--out", type=Path, default=Path("out/head-saes"), help="output folder (one L{l}H{h} per head)")
    run.add_argument("--overwrite", action="store_true", help="retrain heads whose folders hold SAEs trained from "
                     "other inputs (model, corpus or settings), instead of an error")
    run.add_argument("--seed", type=_int_arg(0), default=0, help="seed of the toy corpus and of training")
    run.add_argument("--quiet", action="store_true", help="no progress output: only results and errors")
    return p


def _comma_choices(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)}, got {text!r}")
        return values
    parse.__name__ = "list"
    return parse


def _add_bench(sub) -> argparse.ArgumentParser:
    from attnrules.benchmark import CASES, PROVIDERS

    p = sub.add_parser(
        "bench",
        help="benchmark the all-pairs engine on this machine (CPU, and the GPU when present)",
        description="Time the all-pairs top-k engine on this machine on GPT-2-small shapes (24,576 × 24,576 pairs, "
        "d = 64): the cpu backend against the bare GEMM, materialised and chunked torch.topk and faiss, with the "
        "CPU's sgemm peak measured in the same run; and, when a CUDA GPU is present, the triton backend against "
        "cuBLAS + torch.topk (triton.testing.do_bench), with the GPU's GEMM peak. Prints a table (fractions of "
        "peak, ratios to the engine) and writes the figures as JSON.",
        formatter_class=_Formatter,
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cpu: the CPU benchmark; cuda: the GPU benchmark; auto: the CPU one, and the GPU one too "
                   "when a CUDA GPU is present")
    p.add_argument("--quick", action="store_true", help="small shapes (1,024² on the CPU, 4,096² on the GPU) and "
                   "1 repeat: under a minute; its figures are not the full-size ones")
    p.add_argument("--size", type=_int_arg(2), default=None, help="queries = keys (default 24,576; with --quick "
                   "1,024 on the CPU, 4,096 on the GPU)")
    p.add_argument("--repeats", type=_int_arg(1), default=None, help="CPU: timed runs per measurement, after a "
                   "warm-up (default 3; 1 with --quick)")
    p.add_argument("--threads", type=_int_arg(1), default=None, help="CPU engine threads (default: all cores)")
    p.add_argument("--cases", type=_comma_choices(CASES), default=CASES, help=f"CPU cases: a comma list of "
                   f"{', '.join(CASES)} (default: all)")
    p.add_argument("--providers", type=_comma_choices(PROVIDERS), default=PROVIDERS, help=f"CPU providers: a "
                   f"comma list of {', '.join(PROVIDERS)} (default: all; faiss only if installed)")
    p.add_argument("--isolated", action="store_true", help="CPU: each measurement in its own process, so that "
                   "its peak memory is its own (slower to start)")
    p.add_argument("--precision", choices=("ieee", "tf32", "tf32x3"), default=None,
                   help="GPU: one precision of the triton kernels (default: all three side by side; every "
                   "one returns the fp32 answer, the engine's default is tf32)")
    p.add_argument("--out", type=Path, default=Path("attnrules-bench.json"), help="JSON file to write")
    p.add_argument("--quiet", action="store_true", help="no progress output: only results and errors")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Explain the features of transformer attention heads as human-readable rules.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = [_add_extract(sub), _add_sweep(sub), _add_report(sub), _add_train_head_saes(sub), _add_bench(sub)]
    parser.epilog = "Commands and all their options:\n\n" + "\n".join(c.format_help() for c in commands)
    return parser


# ----------------------------------------------------------------------------------------------------------
# Checks before any long work


def check_device(device: str, model: str) -> None:
    """``--device`` names a torch device that exists here and that the model uses."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"argument --device: expected a torch device such as cpu, cuda or cuda:0, got {device!r}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"argument --device: expected cpu, cuda, cuda:N or mps, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"argument --device: {device!r} asked for, but CUDA is not available here "
                             f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"argument --device: {device!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"argument --device: {device!r} asked for, but MPS is not available here; use --device cpu")
    if model in TOYS and dev.type != "cpu":
        raise UsageError(f"argument --device: the planted model (--model {model}) runs on the CPU; "
                         f"--device {device} is not used with it")


def check_backend(backend: str) -> None:
    """An explicit ``--backend`` can run here (triton: a CUDA GPU, or TRITON_INTERPRET=1 for its CPU interpreter)."""
    if backend == "auto":
        return
    from attnrules.engine import available_backends

    if backend == "triton":
        import torch

        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("argument --backend: triton needs a CUDA GPU and none is available here; use --backend "
                             "auto, cpu or torch (or set TRITON_INTERPRET=1 to run the kernels in Triton's slow CPU "
                             "interpreter)")
    usable = available_backends()
    if backend not in usable:
        raise UsageError(f"argument --backend: {backend} is not available here (available: {', '.join(usable)})")


def check_out_dir(out: Path) -> list[Path]:
    """``--out`` is a folder this process can write: created if missing, and a probe file written and removed.
    Returns the folders it created, deepest first."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {out} is a file, expected a folder")
    created = [p for p in (out, *out.parents) if not p.exists()]
    probe = out / f".attnrules-write-probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"argument --out: cannot write to {out} ({err.strerror or err}); expected a folder "
                         "that can be created and written") from None
    return created


def check_sources(args: argparse.Namespace, *, whole_model: bool) -> None:
    """Model, SAE and corpus options that fit together, and files that exist, checked without loading anything."""
    toy = args.model in TOYS
    if toy:
        for flag, value in (("--sae-in", args.sae_in), ("--sae-in-id", args.sae_in_id),
                            ("--sae-out-dir", args.sae_out_dir), ("--sae-out-id", args.sae_out_id),
                            ("--sae-out-z", args.sae_out_z), ("--sae-out-z-id", args.sae_out_z_id)):
            if value is not None:
                raise UsageError(f"argument {flag}: not used with the planted model (--model {args.model}), which "
                                 "brings its own SAEs (only --sae-out may replace a head's output SAE, e.g. one "
                                 "trained by train-head-saes); drop it, or give a real model with --model")
        if args.sae_out is not None and (not args.head or len(args.head) != 1):
            raise UsageError("argument --sae-out: with the planted model, name the one head it explains (--head H)")
    else:
        if not whole_model and (not args.head or args.layer is None):
            raise UsageError("--layer and --head are required with a real model (e.g. --layer 0 --head 0)")
        if sum(x is not None for x in (args.sae_out_dir, args.sae_out, args.sae_out_z)) != 1:
            raise UsageError("give exactly one of --sae-out-dir (a folder of per-head output-SAE checkpoints), "
                             "--sae-out (an output SAE: release id, folder or file) or --sae-out-z (its earlier "
                             "name) with a real model")
        if args.sae_out_z_id is not None and args.sae_out_z is None:
            raise UsageError("argument --sae-out-z-id: only used with --sae-out-z")
        if args.sae_out_id is not None and args.sae_out is None:
            raise UsageError("argument --sae-out-id: only used with --sae-out")
        for flag, value in (("--sae-in-id", args.sae_in_id), ("--sae-out-id", args.sae_out_id),
                            ("--sae-out-z-id", args.sae_out_z_id)):
            if value is not None and args.layer is None:
                raise UsageError(f"argument {flag}: names the SAE of one layer; give --layer (without it, each "
                                 "layer's SAE comes from its layer)")
        if args.sae_out_dir is not None and not args.sae_out_dir.is_dir():
            what = "is not a folder" if args.sae_out_dir.exists() else "does not exist"
            raise UsageError(f"argument --sae-out-dir: {args.sae_out_dir} {what}; expected the folder of per-head "
                             "output-SAE checkpoints (REF's .pt + _cfg.json)")
        if args.sae_out_dir is not None and args.layer is not None and args.head:
            for head in args.head:  # the checkpoints asked for exist (before the model loads)
                try:
                    find_head_sae_checkpoint(args.sae_out_dir, args.layer, head)
                except (FileNotFoundError, ValueError) as err:
                    raise UsageError(f"argument --sae-out-dir: {err}") from None
        if args.corpus is None:
            raise UsageError("--corpus is required with a real model (a .txt file, one document per line, e.g. "
                             "OpenWebText; or a .pt tensor of token ids)")
    if args.corpus is not None:
        if not args.corpus.exists():
            raise UsageError(f"argument --corpus: {args.corpus} does not exist")
        if not args.corpus.is_file():
            raise UsageError(f"argument --corpus: {args.corpus} is not a file; expected a .pt tensor of token ids "
                             "or a .txt file (one document per line)")


def _corpus_seq_len(args: argparse.Namespace) -> Optional[int]:
    """A ``.pt`` corpus read and checked now (its ids are checked against the model later); its seq_len."""
    if args.corpus is None or args.corpus.suffix != ".pt":
        return None
    try:
        return int(read_token_file(args.corpus).shape[1])
    except CorpusError as err:
        raise UsageError(f"argument --corpus: {err}") from None


def workload_from_args(args: argparse.Namespace, *, whole_model: bool) -> Workload:
    """The workload the source arguments describe (their options checked by :func:`check_sources` first)."""
    corpus_len = _corpus_seq_len(args)
    try:
        if args.model in TOYS:
            seq_len = args.seq_len or corpus_len or 32
            return toy_workload(layer=args.layer if args.layer is not None else 0, heads=args.head,
                                n_sequences=3000 if args.n_sequences is None else args.n_sequences, seq_len=seq_len,
                                seed=args.seed, corpus=args.corpus, variant=args.model, sae_out=args.sae_out)
        layers = None if args.layer is None else (args.layer,)
        return pretrained_workload(
            args.model, corpus=args.corpus, layers=layers, heads=args.head, sae_in=args.sae_in or DEFAULT_SAE_IN,
            sae_out_dir=args.sae_out_dir, sae_out_z=args.sae_out_z, sae_out_z_id=args.sae_out_z_id,
            sae_in_id=args.sae_in_id, sae_out=args.sae_out, sae_out_id=args.sae_out_id,
            n_sequences=50_000 if args.n_sequences is None else args.n_sequences, seq_len=args.seq_len or 64,
            device=args.device)
    except CorpusError as err:
        raise UsageError(f"argument --corpus: {err}") from None


def check_features(settings: ExtractSettings, work: Workload) -> None:
    """``--features`` are output features of every head asked for."""
    if settings.features is None:
        return
    for layer, head in work.heads:
        n_out = int(work.output_sae(layer, head).W_enc.shape[-1])
        bad = [f for f in settings.features if f >= n_out]
        if bad:
            raise UsageError(f"argument --features: L{layer}H{head} has output features 0..{n_out - 1}, "
                             f"got {','.join(map(str, bad))}")


def prepare_run(args: argparse.Namespace, *, whole_model: bool) -> tuple[ExtractSettings, Workload]:
    """Every check that needs no long work, then the workload (model, corpus, SAEs loaded)."""
    settings = settings_from_args(args)
    check_device(args.device, args.model)
    check_backend(settings.backend)
    check_sources(args, whole_model=whole_model)
    if settings.input_labels is not None:  # read now: a bad file stops the run before the model loads
        from attnrules.rules.descriptions import load_input_labels

        try:
            load_input_labels(settings.input_labels)
        except ValueError as err:
            raise UsageError(f"argument --input-labels: {err}") from None
    created = check_out_dir(args.out)
    try:
        with contextlib.redirect_stdout(io.StringIO() if args.quiet else sys.stderr):  # loaders' messages are not results
            work = workload_from_args(args, whole_model=whole_model)
        check_features(settings, work)
    except BaseException:
        for folder in created:  # nothing was written: leave no empty --out behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return settings, work


# ----------------------------------------------------------------------------------------------------------
# Notes


class Notes:
    """Notes for the user, each said once on stderr as ``attnrules <command>: note: ...``; none when quiet."""

    def __init__(self, command: str, quiet: bool) -> None:
        self.command, self.quiet, self.said = command, quiet, set()

    def say(self, text: str) -> None:
        if self.quiet or text in self.said:
            return
        self.said.add(text)
        print(f"{PROG} {self.command}: note: {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def from_warnings(self) -> Iterator[None]:
        """Warnings raised inside become notes, without source lines (and without the category for
        attnrules' own UserWarnings); deprecation warnings, meant for developers, are not shown."""
        def show(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            own = category is UserWarning and "attnrules" in Path(filename).parts
            self.say(text if own else f"{category.__name__}: {text}")

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            warnings.showwarning = show
            yield

    @contextlib.contextmanager
    def quiet_logging(self) -> Iterator[None]:
        """With --quiet, library log records below ERROR are not shown."""
        if not self.quiet:
            yield
            return
        before = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(before)


# ----------------------------------------------------------------------------------------------------------
# Commands


def run_extract(args: argparse.Namespace, notes: Notes) -> int:
    settings, work = prepare_run(args, whole_model=False)
    for layer, head in work.heads:
        out_dir = args.out / f"L{layer}H{head}"
        result = extract_head(work.model, work.input_sae(layer), work.output_sae(layer, head), work.tokens,
                              settings=settings, out_dir=out_dir, progress=not args.quiet, overwrite=args.overwrite)
        print(result.summary())
        for note in result.metadata["notes"]:
            notes.say(note)
        print(f"wrote {out_dir}/results.json and rules, metrics, pairs, absence, distractor_checks, counting .csv\n")
    return 0


def run_sweep(args: argparse.Namespace, notes: Notes) -> int:
    settings, work = prepare_run(args, whole_model=True)
    summary = sweep(work, args.out, settings, device=args.device, progress=not args.quiet, overwrite=args.overwrite)
    if summary is not None:
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"wrote {args.out}/merged/*.parquet and {args.out}/summary.csv")
    return 0


def run_report(args: argparse.Namespace, notes: Notes) -> int:
    path = write_report(args.results_dir, args.out)
    print(f"wrote {path}")
    return 0


def run_train_head_saes(args: argparse.Namespace, notes: Notes) -> int:
    import dataclasses as _dc

    from attnrules.pipeline.train import HeadSAETrainSettings, train_head_saes
    from attnrules.pipeline.workload import _model_source, load_corpus
    from attnrules.sources import load_model

    values = {f.name: getattr(args, f"train_{f.name}") for f in _dc.fields(HeadSAETrainSettings) if f.name != "seed"}
    settings = HeadSAETrainSettings(**values, seed=args.seed)  # a bad value: ValueError, one line
    check_device(args.device, args.model)
    if args.model not in TOYS and args.corpus is None:
        raise UsageError("--corpus is required with a real model (a .txt file, one document per line, e.g. "
                         "OpenWebText; or a .pt tensor of token ids)")
    if args.corpus is not None and not args.corpus.is_file():
        what = "does not exist" if not args.corpus.exists() else "is not a file"
        raise UsageError(f"argument --corpus: {args.corpus} {what}; expected a .pt tensor of token ids or a .txt file "
                         "(one document per line)")
    corpus_len = _corpus_seq_len(args)
    check_out_dir(args.out)
    try:
        with contextlib.redirect_stdout(io.StringIO() if args.quiet else sys.stderr):  # loaders' messages
            if args.model in TOYS:
                toy = TOYS[args.model](seq_len=args.seq_len or corpus_len or 32)
                model = toy.model
                n = 3000 if args.n_sequences is None else args.n_sequences
                tokens = (toy.corpus(n, seed=args.seed) if args.corpus is None else
                          load_corpus(args.corpus, model, n_sequences=n, seq_len=toy.seq_len))
            else:
                model = load_model(_model_source(args.model), device=args.device)
                tokens = load_corpus(args.corpus, model, n_sequences=50_000 if args.n_sequences is None else
                                     args.n_sequences, seq_len=args.seq_len or 64)
    except CorpusError as err:
        raise UsageError(f"argument --corpus: {err}") from None
    try:
        folders = train_head_saes(model, tokens, args.layer, args.head, args.out, settings=settings,
                                  device=args.device, progress=not args.quiet, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"{PROG} train-head-saes: interrupted; finished heads are kept in {args.out}, and a rerun "
              "continues with the others", file=sys.stderr)
        return 130
    for head, folder in folders.items():
        print(f"L{args.layer}H{head}: {folder}")
    return 0


def run_bench(args: argparse.Namespace, notes: Notes) -> int:
    import time

    import attnrules
    from attnrules import benchmark

    gpu_reason = benchmark.no_gpu_reason()
    if args.device == "cuda" and gpu_reason:
        raise UsageError(f"argument --device: cuda: {gpu_reason}; use --device cpu (or auto)")
    if args.out.is_dir():
        raise UsageError(f"argument --out: {args.out} is a folder; expected a JSON file to write")
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    command = " ".join([PROG, *args.argv])
    result: dict[str, Any] = dict(benchmark="attnrules bench", version=getattr(attnrules, "__version__", None),
                                  command=command, date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), quick=args.quick,
                                  cpu=None, gpu=None)
    if args.device in ("auto", "cpu"):
        cfg = benchmark.shapes(args.quick, args.size)
        repeats = args.repeats or (1 if args.quick else 3)
        full = benchmark.FULL
        if args.quick or args.size:
            print(f"{'quick run' if args.quick else 'smaller run'}: {cfg['n']:,} × {cfg['n']:,} pairs, "
                  f"k = {cfg['k_global']:,} / {cfg['k_row']}, {cfg['n_ex']} exemplars, {repeats} repeat(s) — the "
                  f"full benchmark is {full['n']:,}² pairs, k = {full['k_global']:,} / {full['k_row']}, 3 repeats; "
                  "figures at this size are not the full-size ones")
        for provider in args.providers:
            if not benchmark.installed(provider):
                notes.say(f"{provider} is not installed: its baseline is skipped (pip install faiss-cpu)")
        report = benchmark.run_cpu_benchmark(cfg, repeats=repeats, threads=args.threads, cases=args.cases,
                                             providers=args.providers, isolated=args.isolated, quick=args.quick,
                                             command=command, progress=progress)
        m = report["machine"]
        print(f"CPU: {m['cpu_model']}, {m['logical_cores']} cores, kernel {m['isa']}, torch {m['versions']['torch']}")
        print(f"sgemm peak (torch, 2048³, measured in this run): {report['sgemm_peak_gflops']:.1f} GFLOP/s")
        print(benchmark.markdown(report))
        ratios = [f"{c['case']} {c['cpu_vs_gemm_at_peak']:.2f}×" for c in report["cases"] if c["cpu_vs_gemm_at_peak"]]
        if ratios:
            print("engine time ÷ a bare GEMM of the same flops at the measured peak: " + ", ".join(ratios))
        result["cpu"] = report
    if args.device in ("auto", "cuda"):
        if gpu_reason:
            print(f"GPU: skipped ({gpu_reason})")
            result["gpu"] = {"skipped": gpu_reason}
        else:
            if args.quick:
                n = args.size or benchmark.GPU_QUICK["n"]
                print(f"GPU quick run: {n:,} × {n:,} pairs (the full benchmark is {benchmark.GPU_FULL['n']:,}²), "
                      "shorter do_bench; figures at this size are not the full-size ones")
            gpu = benchmark.run_gpu_benchmark(precision=args.precision, quick=args.quick, n=args.size,
                                              progress=progress)
            sheet = "unknown" if gpu["peak_tflops"] is None else f"{gpu['peak_tflops']:.1f} TFLOP/s"
            measured = ", ".join(f"{p} {t:.1f}" for p, t in gpu["measured_gemm_peaks_tflops"].items())
            print(f"GPU: {gpu['machine']['gpu']}, GEMM peaks (cuBLAS, measured in this run): {measured} TFLOP/s; "
                  f"datasheet peak: {sheet}")
            print(benchmark.gpu_markdown(gpu))
            result["gpu"] = gpu
    benchmark.write_report(args.out, result)
    print(f"wrote {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse's own errors: "attnrules <command>: error: ...", exit 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: choose a command: extract, sweep or report, train-head-saes or bench (see {PROG} --help)", file=sys.stderr)
        return 2
    notes = Notes(args.command, getattr(args, "quiet", False))
    try:
        with notes.from_warnings(), notes.quiet_logging():
            return {"extract": run_extract, "sweep": run_sweep, "report": run_report,
                    "train-head-saes": run_train_head_saes, "bench": run_bench}[args.command](args, notes)
    except (UsageError, ValueError, OSError, SourceUnavailableError) as err:  # bad input: one clear line, no traceback
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
