"""The ``attnrules`` command. Every subcommand is a thin layer over the library API."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from attnrules.pipeline import ExtractSettings, extract_head
from attnrules.pipeline.sweep import run_sweep as sweep
from attnrules.pipeline.workload import TOY, TOY_LN, Workload, pretrained_workload, toy_workload
from attnrules.report import write_report
from attnrules.sources import SourceUnavailableError


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_run_options(p: argparse.ArgumentParser, default_out: str) -> argparse.ArgumentParser:
    """The options extract and sweep share: sources, corpus, method, run."""
    src = p.add_argument_group("model and SAEs")
    src.add_argument("--model", default=TOY, help=f"'{TOY}' (embedded planted model), '{TOY_LN}' (its variant with LayerNorm and biases) or a transformer_lens model name, e.g. gpt2-small")
    src.add_argument("--layer", type=int, default=None, help="layer of the head(s) (default: 0 for the toy; all layers for sweep)")
    src.add_argument("--head", type=_int_list, default=None, help="head index or comma list (default: all planted heads of the toy; required otherwise)")
    src.add_argument("--sae-in", default="gpt2-small-res-jb", help="input SAE: sae_lens release (with blocks.{L}.hook_resid_pre) or a local sae_lens folder")
    src.add_argument("--sae-out-dir", type=Path, default=None, help="directory of per-head output-SAE checkpoints (REF's .pt + _cfg.json)")
    src.add_argument("--sae-out-z", default=None, help="instead: a layer-level hook_z SAE (sae_lens release or folder) sliced to each head")
    src.add_argument("--sae-out-z-id", default=None, help="sae_id of --sae-out-z within its release")
    src.add_argument("--device", default="cpu", help="torch device for the model and SAEs")
    data = p.add_argument_group("corpus")
    data.add_argument("--corpus", type=Path, default=None, help="token ids (.pt tensor [n, seq_len]) or text (.txt, one document per line); required for real models")
    data.add_argument("--n-sequences", type=int, default=None, help="sequences to use (default: 3000 for the toy, 50000 otherwise)")
    data.add_argument("--seq-len", type=int, default=None, help="tokens per sequence for text corpora (default: 32 for the toy, 64 otherwise)")
    ref = p.add_argument_group("method (REF defaults)")
    ref.add_argument("--features", type=_int_list, default=None, help="output features to explain (default: sample as REF)")
    ref.add_argument("--num-features", type=int, default=100, help="features sampled per head")
    ref.add_argument("--min-count", type=int, default=150, help="a sampled feature is active in at least this many sequences ...")
    ref.add_argument("--max-count", type=int, default=None, help="... and at most this many (default: n_sequences - min_count)")
    ref.add_argument("--examples-per-bin", type=int, default=150, help="positive and negative exemplars per feature (split 1/3 each into train/val/test)")
    ref.add_argument("--positives", choices=("top", "quantiles"), default="top", help="positive exemplars: the top-activating sequences (REF) or spread over activation quantiles")
    ref.add_argument("--num-values", type=int, default=100, help="candidate keys by value score (capped to the number of input features)")
    ref.add_argument("--num-queries", type=int, default=100, help="candidate queries per key by attention score (capped likewise)")
    ref.add_argument("--max-rules", type=int, default=4096, help="largest number of terms in the N = 4, 8, ... sweep")
    ref.add_argument("--negative-values", action="store_true", help="rank candidate keys by |value score|")
    ref.add_argument("--signed", action="store_true", help="select importance terms by relu(I) instead of |I|")
    ref.add_argument("--loss-type", choices=("activation", "post_activation"), default="activation", help="surrogate output for the importance gradient")
    ref.add_argument("--threshold", type=float, default=0.0, help="activation threshold for truth and prediction")
    ref.add_argument("--seed", type=int, default=0, help="seed for feature and exemplar sampling")
    beyond = p.add_argument_group("absence and counting rules")
    beyond.add_argument("--max-distractors", type=int, default=100, help="distractor keys kept per skip-gram term")
    beyond.add_argument("--distractor-checks", type=int, default=3, help="distractors per term tested by insertion (unconfirmed ones are not reported as rules)")
    beyond.add_argument("--counting-bases", type=int, default=64, help="base sequences for the counting detector (silent corpus sequences, then filler)")
    beyond.add_argument("--counting-min-bases", type=int, default=16, help="fewer base sequences than this: counting is 'undetermined'")
    beyond.add_argument("--no-exact", action="store_true", help="skip exact mode (the exact-importance ordering and the logit decomposition)")
    beyond.add_argument("--no-counting", action="store_true", help="skip the counting detector")
    beyond.add_argument("--counting-max", type=int, default=8, help="largest number of key copies the counting detector tries")
    beyond.add_argument("--insertion-counts", type=_int_list, default=(0, 1, 2, 3), help="copies of the distractor inserted (REF: 0,1,2,3)")
    run = p.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=64, help="sequences per model forward pass")
    run.add_argument("--backend", choices=("auto", "torch", "cpu", "triton"), default="auto", help="engine backend")
    run.add_argument("--exhaustive-k", type=int, default=100, help="also rank all n_in x n_in pairs by A×V and by importance, keeping this many (0: skip)")
    run.add_argument("--show-exemplars", type=int, default=5, help="top-activating validation exemplars stored per feature (with activations and DFA)")
    run.add_argument("--show-terms", type=int, default=8, help="rule terms printed and stored per feature and method")
    run.add_argument("--out", type=Path, default=Path(default_out), help="output directory (one subfolder per head); finished work is reused on rerun")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _add_extract(sub) -> argparse.ArgumentParser:
    return _add_run_options(sub.add_parser(
        "extract",
        help="explain the features of attention heads as rules (embedded planted model by default)",
        description="Run scores → candidates → importances → rules → evaluation for one or more heads; print "
        "the top rules and the P/R/F1 table; write results.json, rules.csv, metrics.csv and pairs.csv per head "
        "into --out. Defaults follow the paper's code (REF); without --model it runs on the embedded planted model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    ), "out/extract")


def _add_sweep(sub) -> argparse.ArgumentParser:
    return _add_run_options(sub.add_parser(
        "sweep",
        help="extract rules for many heads (a whole model by default), resumable, on torchrun",
        description="Run extraction for every (layer, head) (all heads of the model unless --layer/--head), "
        "sharded by head over torchrun ranks (e.g. `torchrun --nproc-per-node 2 -m attnrules.cli sweep ...`; "
        "gloo on CPU, nccl on GPU). Finished shards are skipped on restart. Results merge into OUT/merged/*.parquet "
        "and OUT/summary.csv (mean P/R/F1 by layer and N, share of features with distractors, counting features).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    ), "out/sweep")


def _add_report(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "report",
        help="write one self-contained HTML report of extraction results",
        description="Read the results of `attnrules extract` (a head folder with results.json, or a folder of them) "
        "and write one self-contained HTML file with rules, plots and highlighted exemplars.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("results_dir", type=Path, help="folder written by `attnrules extract --out` (or one of its L{l}H{h} folders)")
    p.add_argument("--out", type=Path, default=None, help="HTML file to write (default: RESULTS_DIR/report.html)")
    return p


def run_sweep(args) -> int:

    summary = sweep(workload_from_args(args, whole_model=True), args.out, settings_from_args(args),
                    device=args.device, progress=not args.quiet)
    if summary is not None:
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"wrote {args.out}/merged/*.parquet and {args.out}/summary.csv")
    return 0


def run_report(args) -> int:

    path = write_report(args.results_dir, args.out)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnrules",
        description="Explain the features of transformer attention heads as human-readable rules.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = [_add_extract(sub), _add_sweep(sub), _add_report(sub)]
    parser.epilog = "Commands and all their options:\n\n" + "\n".join(c.format_help() for c in commands)
    return parser


def workload_from_args(args, *, whole_model: bool) -> Workload:
    """The workload the source arguments describe; bad arguments end the command with their message."""
    try:
        if args.model in (TOY, TOY_LN):
            return toy_workload(layer=args.layer if args.layer is not None else 0, heads=args.head,
                                n_sequences=args.n_sequences or 3000, seq_len=args.seq_len or 32, seed=args.seed,
                                corpus=args.corpus, variant=args.model)
        if not whole_model and (not args.head or args.layer is None):
            raise ValueError("--layer and --head are required with a real model")
        if args.corpus is None:
            raise ValueError("--corpus is required with a real model (a .txt file, one document per line, e.g. "
                             "OpenWebText; or a .pt tensor of token ids)")
        layers = None if args.layer is None else (args.layer,)
        return pretrained_workload(
            args.model, corpus=args.corpus, layers=layers, heads=args.head, sae_in=args.sae_in,
            sae_out_dir=args.sae_out_dir, sae_out_z=args.sae_out_z, sae_out_z_id=args.sae_out_z_id,
            n_sequences=args.n_sequences or 50_000, seq_len=args.seq_len or 64, device=args.device)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def settings_from_args(args) -> ExtractSettings:
    return ExtractSettings(
        features=args.features, num_features=args.num_features, min_count=args.min_count, max_count=args.max_count,
        examples_per_bin=args.examples_per_bin, positives=args.positives, num_values=args.num_values, num_queries=args.num_queries,
        max_rules=args.max_rules, negative_values=args.negative_values, absolute=not args.signed,
        loss_type=args.loss_type, threshold=args.threshold, seed=args.seed, batch_size=args.batch_size,
        backend=args.backend, show_terms=args.show_terms, exhaustive_k=args.exhaustive_k,
        max_distractors=args.max_distractors, distractor_checks=args.distractor_checks, counting=not args.no_counting,
        counting_max=args.counting_max, counting_bases=args.counting_bases, counting_min_bases=args.counting_min_bases,
        insertion_counts=args.insertion_counts, show_exemplars=args.show_exemplars, exact=not args.no_exact,
    )


def run_extract(args) -> int:
    settings = settings_from_args(args)
    work = workload_from_args(args, whole_model=False)
    for layer, head in work.heads:
        out_dir = args.out / f"L{layer}H{head}"
        result = extract_head(work.model, work.input_sae(layer), work.output_sae(layer, head), work.tokens,
                              settings=settings, out_dir=out_dir, progress=not args.quiet)
        print(result.summary())
        for note in result.metadata["notes"]:
            print(f"note: {note}")
        print(f"wrote {out_dir}/results.json and rules, metrics, pairs, absence, counting .csv\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2

    try:
        return {"extract": run_extract, "sweep": run_sweep, "report": run_report}[args.command](args)
    except (ValueError, OSError, SourceUnavailableError) as err:  # bad input: one clear line, no traceback
        print(f"attnrules {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
