"""Per-head cost of the pipeline on GPT-2-small shapes (random weights), and the projected cost of a
whole-model run (144 heads), measured on this machine.

Times, on a random GPT-2-small-shaped model (12 layers, d_model 768, 12 heads × 64) with a random
24,576-feature input SAE (about 50 active features per token) and a random 2,048-feature output SAE:

- ``forward``: tokens per second through blocks 0..L (the corpus scan and the exemplar activations);
- per feature: its share of the head's one shared forward pass (:mod:`attnrules.pipeline.activations`:
  blocks 0..L once over the union of the features' train and val exemplars, keeping the input-SAE
  activations sparse and the exact pass's hooks of the train ones; timed over one feature's 200
  exemplars, i.e. no exemplar shared between features, the worst case), looking up its input-SAE
  activations there, REF's candidate table, the paper-mode
  importance on 100 train exemplars, the N = 4 … 4096 sweep of both orderings on 100 val exemplars,
  the exhaustive top-100 pairs of all 24,576² by A×V and by importance (engine), the exact-mode
  importance of feature pairs and pseudo-feature terms on the train exemplars (from the shared pass's
  hooks: no forward pass of its own), the distractor checks
  (8 terms × 3 distractors inserted into the exemplars where a term matches and the feature fires),
  and the counting detector (9 counts × 64 sequences);
- per head (above layer 0): the token that stands for every input feature (one vocabulary pass).

    python bench/bench_pipeline.py                # writes bench/results/pipeline.json
    python bench/bench_pipeline.py --quick        # small shapes, for a smoke test
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pipeline.json"


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(quick: bool, layer: int, device: str):
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
    # an encoder bias calibrated on a sample of the residual stream leaves ~50 features active per
    # token, as in real SAEs (res-jb: L0 of a few tens)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randint(0, vocab, (8, 64), generator=g).to(device), stop_at_layer=layer + 1,
                                        names_filter=f"blocks.{layer}.hook_resid_pre")
        pre = (cache[f"blocks.{layer}.hook_resid_pre"].reshape(-1, d_model).cpu() @ w_enc).flatten()
    cut = torch.sort(pre[torch.randperm(pre.numel(), generator=g)[:1_000_000]]).values
    b_enc = torch.full((n_in,), -float(cut[int(len(cut) * (1 - 50 / n_in))]))
    w_enc, b_enc = w_enc.to(device), b_enc.to(device)
    sae_in = InputSAE.from_tensors(w_enc, b_enc, w_enc.T.contiguous(), torch.zeros(d_model, device=device), layer=layer)
    enc = (torch.randn(d_head, n_out, generator=g) / d_head**0.5).to(device)
    sae_out = OutputSAE.from_tensors(enc, torch.zeros(n_out, device=device), enc.T.contiguous(),
                                     torch.zeros(d_head, device=device),
                                     layer=layer, head=0, n_heads=n_heads, d_head=d_head)
    return model, sae_in, sae_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--layer", type=int, default=5, help="layer of the measured head (cost grows with it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cpu", help="where the model and SAEs run (cpu or cuda)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    from attnrules.circuit import HeadCircuit
    from attnrules.evaluation.counts import count_response
    from attnrules.rules.absence import AbsenceRule
    from attnrules.evaluation.insertion import check_distractors, feature_tokens
    from attnrules.importance import exact_importance_terms
    from attnrules.evaluation import n_terms_grid, sweep
    from attnrules.importance import paper_importance
    from attnrules.pipeline.extract import _first_appearance
    from attnrules.pipeline import exhaustive_pairs
    from attnrules.pipeline.activations import SharedPasses
    from attnrules.files import write_json
    from attnrules.rules import rules_from_importance, rules_from_weights
    from attnrules.scoring import candidate_table

    torch.manual_seed(0)
    model, sae_in, sae_out = build(args.quick, args.layer, args.device)
    circuit = HeadCircuit.from_model(model, sae_in, sae_out).to("cpu")  # as the pipeline does
    seq_len, n_ex = 64, 100
    tokens = torch.randint(0, model.cfg.d_vocab, (2 * n_ex, seq_len))
    positions = torch.randint(1, seq_len, (2 * n_ex,))

    with torch.no_grad():
        forward_s = timed(lambda: model(tokens[:64].to(args.device), stop_at_layer=args.layer + 1), args.repeats)
    tokens_per_s = 64 * seq_len / forward_s
    acts_box = {}

    rows = torch.arange(2 * n_ex)  # train (exact hooks kept too), then val

    def shared_pass():
        acts_box["shared"] = SharedPasses(model, sae_in, sae_out, tokens, rows.tolist(), rows[:n_ex].tolist(),
                                          batch_size=8)

    results = {"shared_pass": timed(shared_pass, 1)}
    shared = acts_box["shared"]
    results["input_activations_lookup"] = timed(lambda: acts_box.update(acts=shared.input_activations(rows)), 1)
    acts = acts_box["acts"]
    train, val = (acts[:n_ex], positions[:n_ex]), (acts[n_ex:], positions[n_ex:])
    active_per_token = float((acts > 0).sum(-1).float().mean())
    k_cand = min(100, circuit.n_inputs)
    box = {}

    def candidates():
        box["table"] = candidate_table(circuit, 0, num_values=k_cand, num_queries=k_cand, backend=args.backend)

    results["candidate_table"] = timed(candidates, args.repeats)
    table = box["table"]
    keys, queries = _first_appearance(table.keys), _first_appearance(table.queries)

    def importance():
        box["imp"] = paper_importance(circuit, 0, queries, keys, *train)

    results["paper_importance"] = timed(importance, args.repeats)
    act_max = torch.rand(n_ex) * (torch.arange(n_ex) < n_ex // 2)
    grid = n_terms_grid(4096)
    results["sweep_both_orderings"] = timed(lambda: [
        sweep(lambda n: rules_from_weights(table, n), *val, act_max, grid),
        sweep(lambda n: rules_from_importance(circuit, 0, queries, keys, box["imp"], n), *val, act_max, grid),
    ], 1)
    results["exhaustive_top100"] = timed(
        lambda: exhaustive_pairs(circuit, 0, train, 100, args.backend, lambda j: str(j)), 1)
    train_tokens = tokens[:n_ex]
    results["exact_importance_terms"] = timed(lambda: exact_importance_terms(
        model, sae_in, sae_out, 0, queries, keys, train_tokens, positions[:n_ex], runner=shared.runner(rows[:n_ex])), 1)
    # distractor checks: 8 terms x 3 distractors inserted into the exemplars where each term matches
    # (the pair most often present in the train exemplars stands for every term)
    q_on = acts[torch.arange(n_ex), positions[:n_ex]] > 0
    q = int(q_on.sum(0).argmax())
    k = int((acts[:n_ex] > 0).sum((0, 1)).argmax())
    terms = [AbsenceRule("bench", q, k, 1.0, 1.0, (k, q, 0), (2.0,) * 3, (-1.0,) * 3) for _ in range(8)]
    results["distractor_checks"] = timed(lambda: check_distractors(
        model, sae_out, 0, terms, train_tokens, positions[:n_ex], acts[:n_ex], lambda j: j % model.cfg.d_vocab), 1)
    base = tokens[:64]
    results["counting_detector"] = timed(lambda: count_response(model, sae_out, 0, base, 1, 2), 1)
    per_feature = sum(results.values())
    # once per head above layer 0: the token that stands for every input feature (one vocabulary pass)
    token_lookup_s = timed(lambda: feature_tokens(model, sae_in, range(sae_in.n_features), mode="activation"), 1)
    scan_s = 50_000 * seq_len / tokens_per_s
    per_head = 100 * per_feature + token_lookup_s
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                "device": args.device,
                    "torch": torch.__version__, "python": platform.python_version()},
        "shapes": {"n_in": circuit.n_inputs, "n_out": circuit.n_outputs, "d_head": circuit.d_head,
                   "layer": args.layer, "exemplars": n_ex, "seq_len": seq_len, "quick": args.quick,
                   "active_input_features_per_token": round(active_per_token, 1),
                   "shared_pass_mb_per_feature": round(shared.nbytes / 2**20, 1)},
        "backend": args.backend,
        "forward_tokens_per_s": round(tokens_per_s),
        "per_feature_seconds": {k: round(v, 4) for k, v in results.items()},
        "per_feature_total_s": round(per_feature, 3),
        "per_head_feature_token_lookup_s": round(token_lookup_s, 3),
        "projection": {
            "scan_50k_sequences_per_layer_s": round(scan_s, 1),
            "per_head_100_features_s": round(per_head, 1),
            "whole_model_12_layers_144_heads_hours": round((12 * scan_s + 144 * per_head) / 3600, 2),
            "note": "the layer-5 forward cost stands for every layer (the mean depth of GPT-2's 12 layers is 6.5 "
                    "blocks, layer 5 runs 6); the sweep scans the corpus once per layer and rank",
        },
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
