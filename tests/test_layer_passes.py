"""What the heads of one layer share (issue 14): the pattern pool and the input-feature statistics ride
on the corpus pass with one input-SAE encode; the tokens that stand for input features come from one
vocabulary pass a layer; the distractor evidence of a layer's heads from one corpus pass; ranks take
contiguous runs of shards. Each shared result equals what the head computed on its own."""
import dataclasses
import json
import shutil
import tempfile
from types import SimpleNamespace

import pytest
import torch

import attnrules.evaluation.insertion as insertion
import attnrules.pipeline.extract as extract
from attnrules.evaluation.negatives import PatternPool
from attnrules.exemplars import scan_heads, scan_output_features
from attnrules.pipeline import ExtractSettings, extract_head
from attnrules.exemplars import input_activations
from attnrules.pipeline.activations import SharedPasses
from attnrules.pipeline.corpus_stats import CorpusObservers
from attnrules.sparse_acts import SparseActs
from attnrules.pipeline.sweep import Rank, rank_shards, run_sweep
from attnrules.pipeline.workload import Workload
from attnrules.rules.descriptions import InputStatsObserver
from families import build_family, family_saes, family_tokens

SETTINGS = ExtractSettings(max_rules=8, exhaustive_k=0, counting=False, exact=False, show_exemplars=0)


def _same_pool(a: PatternPool, b: PatternPool) -> None:
    """The same rows and active entries; values equal up to the SAE encode's rounding, which on small
    shapes depends on how many rows one matmul takes (the pool's rows are encoded in other batches)."""
    assert torch.equal(a.sequences, b.sequences) and a.seq_len == b.seq_len and a.n_inputs == b.n_inputs
    order_a = torch.argsort(a.row * 10**6 + a.position * 10**3 + a.feature)
    order_b = torch.argsort(b.row * 10**6 + b.position * 10**3 + b.feature)
    for field in ("row", "position", "feature"):
        assert torch.equal(getattr(a, field)[order_a], getattr(b, field)[order_b]), field
    torch.testing.assert_close(a.value[order_a], b.value[order_b], rtol=1e-5, atol=1e-6)
    assert a.act_scale == pytest.approx(b.act_scale, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_pool_and_statistics_from_the_corpus_pass_equal_their_own_passes(family):
    """On rotary/GQA (Llama) and soft-capped (Gemma 2) models: the pool built on the scan equals
    PatternPool.build's pass; statistics capped to the first rows equal an observer fed only those rows."""
    model = build_family(family)
    sae_in, sae_out = family_saes(model, 1, 0, n_in=40)
    tokens = family_tokens(model, n=23, t=10, seed=3)
    observers = CorpusObservers(sae_in, tokens, stats_sequences=9, pool_size=7, pool_seed=5)
    scan_output_features(model, sae_out, tokens, batch_size=4, observers=observers.observers)
    stats = observers.result()
    _same_pool(stats.pool, PatternPool.build(model, sae_in, tokens, 7, seed=5, batch_size=3))
    alone = InputStatsObserver(sae_in)
    scan_output_features(model, sae_out, tokens[:9], batch_size=4, observers=[alone])
    expected = alone.result()
    assert stats.inputs.n_tokens == expected.n_tokens == 9 * 9
    for field in ("active", "top_seq", "top_pos"):
        assert torch.equal(getattr(stats.inputs, field), getattr(expected, field)), field
    torch.testing.assert_close(stats.inputs.top_act, expected.top_act, rtol=1e-5, atol=1e-6)


def test_statistics_over_every_row_and_no_pool(toy):
    tokens = toy.corpus(50, seed=2)
    observers = CorpusObservers(toy.input_sae, tokens)
    scan_output_features(toy.model, toy.output_saes[0], tokens, batch_size=16, observers=observers.observers)
    alone = InputStatsObserver(toy.input_sae)
    scan_output_features(toy.model, toy.output_saes[0], tokens, batch_size=16, observers=[alone])
    stats, expected = observers.result(), alone.result()
    assert stats.pool is None and stats.inputs.n_tokens == 50 * (tokens.shape[1] - 1)
    assert torch.equal(stats.inputs.active, expected.active) and torch.equal(stats.inputs.top_seq, expected.top_seq)
    torch.testing.assert_close(stats.inputs.top_act, expected.top_act, rtol=1e-5, atol=1e-6)


def test_extract_head_builds_no_pool_of_its_own_after_scanning(toy, monkeypatch):
    tokens = toy.corpus(2000, seed=0)
    built = []
    real = PatternPool.build.__func__
    monkeypatch.setattr(PatternPool, "build", classmethod(lambda cls, *a, **k: built.append(1) or real(cls, *a, **k)))
    settings = dataclasses.replace(SETTINGS, pattern_pool=120)
    shared = extract_head(toy.model, toy.input_sae, toy.output_saes[1], tokens, settings=settings, progress=False)
    assert not built
    scan = scan_output_features(toy.model, toy.output_saes[1], tokens, batch_size=64)
    own = extract_head(toy.model, toy.input_sae, toy.output_saes[1], tokens, settings=settings, progress=False, scan=scan)
    assert built == [1]  # a given scan brings no pool: the head builds it with a pass of its own
    assert len(shared.features) >= 2 and all(f.predictions for f in shared.features)
    assert [f.to_json() for f in shared.features] == [f.to_json() for f in own.features]


def test_natural_prevalence_of_several_heads_in_one_pass_equals_one_pass_each():
    model = build_family("qwen3")
    sae_in, out0 = family_saes(model, 1, 0, n_in=12)
    _, out1 = family_saes(model, 1, 1, seed=4, n_in=12)
    tokens = family_tokens(model, n=30, t=9, seed=1)
    checks0, checks1 = [(0, 1, 2, 3), (4, 0, 5, 6)], [(2, 3, 1, 0)]
    own = (insertion.natural_prevalence(model, sae_in, out0, tokens, checks0, batch_size=8)
           + insertion.natural_prevalence(model, sae_in, out1, tokens, checks1, batch_size=8))
    together = insertion.natural_prevalence(model, sae_in, [out0, out0, out1], tokens, checks0 + checks1, batch_size=8)
    assert [repr(p.to_dict()) for p in together] == [repr(p.to_dict()) for p in own]  # repr: NaN means equal
    assert any(p.kq_count + p.kkq_count for p in own)  # the checks find sequences: the comparison has content
    with pytest.raises(ValueError, match="one SAE per check"):
        insertion.natural_prevalence(model, sae_in, [out0], tokens, checks0)


def test_a_sweep_shares_the_layer_passes_and_equals_each_head_on_its_own(toy, tmp_path, monkeypatch):
    """Both heads of the planted model: one vocabulary pass, one prevalence pass and no pool pass for the
    layer, and every result (rules, sweeps, distractor evidence) as extract_head gives it per head."""
    tokens = toy.corpus(2000, seed=0)
    settings = dataclasses.replace(SETTINGS, pattern_pool=200)
    heads = tuple((0, h) for h in range(len(toy.output_saes)))
    own = {h: extract_head(toy.model, toy.input_sae, toy.output_saes[h], tokens, settings=settings, progress=False)
           for _, h in heads}
    assert sum(len(r.distractors) for r in own.values()), "the planted absence feature gives distractor evidence"
    calls = {"feature_tokens": 0, "natural_prevalence": 0, "pool": 0}

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(extract, "feature_tokens", counted("feature_tokens", extract.feature_tokens))
    monkeypatch.setattr(extract, "natural_prevalence", counted("natural_prevalence", extract.natural_prevalence))
    real_build = PatternPool.build.__func__
    monkeypatch.setattr(PatternPool, "build", classmethod(counted("pool", real_build)))
    work = Workload("toy", toy.model, tokens, heads, lambda layer: toy.input_sae, lambda layer, head: toy.output_saes[head])
    run_sweep(work, tmp_path / "sweep", settings, progress=False)
    assert calls == {"feature_tokens": 1, "natural_prevalence": 1, "pool": 0}
    from attnrules.pipeline.resume import read_head
    for _, h in heads:
        swept = read_head(tmp_path / "sweep" / "shards" / f"L0H{h}")
        assert [f.to_json() for f in swept.features] == [f.to_json() for f in own[h].features]
        assert [repr(d.to_json()) for d in swept.distractors] == [repr(d.to_json()) for d in own[h].distractors]
        assert swept.metadata["failed_steps"] == own[h].metadata["failed_steps"] == 0


def test_ranks_take_contiguous_runs_of_shards():
    shards = [(layer, head) for layer in range(12) for head in range(12)]
    for world in (1, 2, 5, 8, 144, 200):
        runs = [rank_shards(shards, Rank(r, world)) for r in range(world)]
        assert [s for run in runs for s in run] == shards  # each shard once, in order
        sizes = [len(run) for run in runs]
        assert max(sizes) - min(sizes) <= 1
    eight = [rank_shards(shards, Rank(r, 8)) for r in range(8)]
    assert max(len({layer for layer, _ in run}) for run in eight) == 2  # 18 heads: 2 layers, not 12


def test_scan_heads_hands_each_observer_every_row(toy):
    tokens = toy.corpus(37, seed=4)
    observers = CorpusObservers(toy.input_sae, tokens, pool_size=37)
    scan_heads(toy.model, list(toy.output_saes.values()), tokens, batch_size=10, observers=observers.observers)
    pool = observers.result().pool
    assert torch.equal(pool.sequences, torch.arange(37)) and int(pool.row.max()) == 36


@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sparse_store_rebuilds_bit_for_bit_and_stops_whole_rows_at_its_bound(on_disk, dtype):
    acts = torch.relu(torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(0))).to(dtype)
    acts[0, 0, 0] = -0.0  # kept: the rebuilt tensor is bit for bit the one added
    acts[1, 2, 3] = float("nan")
    acts[4] = 0.0  # a row with no entry
    store = SparseActs(5, 7, on_disk=on_disk)
    assert (store.file is not None) == on_disk
    store.add(torch.tensor([10, 3, 7, 0, 1, 2]), acts)
    rows = torch.tensor([7, 10, 2, 3, 1])
    back = store.dense(rows)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8) if dtype == torch.bfloat16 else back.nan_to_num(7.0),
                                               acts[[2, 0, 5, 1, 4]].view(torch.uint8) if dtype == torch.bfloat16
                                               else acts[[2, 0, 5, 1, 4]].nan_to_num(7.0))
    assert bool(torch.signbit(back[1, 0, 0])) and bool(torch.isnan(back[3, 2, 3]))
    entry = 4 + acts.element_size()
    assert store.nbytes == entry * int(((acts != 0) | torch.signbit(acts)).sum())
    col_of = torch.full((7,), -1, dtype=torch.long)
    col_of[[5, 1]] = torch.tensor([0, 1])
    assert torch.equal(store.columns(2, col_of, 2).float().nan_to_num(7.0), acts[5][:, [5, 1]].float().nan_to_num(7.0))
    small = SparseActs(5, 7, max_bytes=store.nbytes // 2, on_disk=on_disk)
    small.add(torch.arange(6), acts)
    assert small.full and 0 < len(small.rows) < 6 and small.nbytes <= store.nbytes // 2
    kept = sorted(small.rows)
    assert torch.equal(small.dense(torch.tensor(kept)).float().nan_to_num(7.0), acts[kept].float().nan_to_num(7.0))


def test_corpus_store_serves_the_exemplar_steps_with_identical_results(toy, shared_pass_sequences):
    """The corpus pass keeps every row's input activations: the shared pass then runs over the train rows
    only (for the exact hooks); the results are those of a run without the store."""
    tokens = toy.corpus(1500, seed=0)
    settings = ExtractSettings(features=(0, 1), max_rules=8, exhaustive_k=0, show_exemplars=2, exact=True,
                               corpus_resid_mib=0)
    passes = shared_pass_sequences
    results = {}
    for mib in (0, 2048):  # none kept; every row
        passes.clear()
        result = extract_head(toy.model, toy.input_sae, toy.output_saes[0], tokens, progress=False,
                              settings=dataclasses.replace(settings, corpus_acts_mib=mib))
        found = {k: v for k, v in result.to_json().items() if k in ("features", "distractors")}
        results[mib] = (json.dumps(found, sort_keys=True), sum(passes))
        assert result.metadata["failed_steps"] == 0
    assert results[0][0] == results[2048][0]
    assert results[2048][1] < results[0][1]  # sequences the shared pass ran over


def test_shared_passes_look_up_what_a_partial_store_holds(toy):
    """A store that holds some rows (its bound reached): those are looked up, the others encoded by the
    shared pass; exact rows are run whatever the store holds (their hooks)."""
    tokens = toy.corpus(300, seed=2)
    rows, exact = torch.arange(0, 120, 2), torch.arange(0, 40, 2)
    own = SharedPasses(toy.model, toy.input_sae, toy.output_saes[0], tokens, rows.tolist(), exact.tolist())
    store = SparseActs(tokens.shape[1], toy.input_sae.n_features)
    store.add(torch.arange(60), input_activations(toy.model, toy.input_sae, tokens[:60]))
    looked_up = SharedPasses(toy.model, toy.input_sae, toy.output_saes[0], tokens, rows.tolist(), exact.tolist(),
                             known=store)
    assert torch.equal(own.input_activations(rows), looked_up.input_activations(rows))
    assert looked_up.acts.rows.keys() == set(range(60, 120, 2))  # encoded by the pass: what the store lacks
    assert own.covers(exact, exact=True) and looked_up.covers(exact, exact=True)
    assert looked_up.passes < own.passes


def _same_prevalence(a, b, exact: bool) -> None:
    """The same hits (sequences, positions, kinds, counts); activations bit for bit, or up to rounding."""
    for x, y in zip(a, b):
        dx, dy = x.to_dict(), y.to_dict()
        acts = ("mean_act_without", "mean_act_with")
        assert {k: v for k, v in dx.items() if k not in acts + ("examples",)} == \
            {k: v for k, v in dy.items() if k not in acts + ("examples",)}
        assert [{**e, "act_out": 0} for e in dx["examples"]] == [{**e, "act_out": 0} for e in dy["examples"]]
        got = torch.tensor([e["act_out"] for e in dx["examples"]] + [dx[k] for k in acts], dtype=torch.float64)
        want = torch.tensor([e["act_out"] for e in dy["examples"]] + [dy[k] for k in acts], dtype=torch.float64)
        if exact:
            assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_natural_prevalence_from_the_kept_activations_equals_its_own_pass(family):
    """With the corpus's input activations kept, presence is read from them and the model runs over the
    sequences with a hit only; the prevalences are the pass's (on these tiny widths a matmul's rounding
    depends on its row count, so activations agree up to rounding)."""
    model = build_family(family)
    sae_in, out0 = family_saes(model, 1, 0, n_in=12)
    _, out1 = family_saes(model, 1, 1, seed=4, n_in=12)
    tokens = family_tokens(model, n=30, t=9, seed=1)
    checks, saes = [(0, 1, 2, 3), (4, 0, 5, 6), (2, 3, 1, 0)], [out0, out0, out1]
    observers = CorpusObservers(sae_in, tokens, acts_max_bytes=2**30)
    scan_output_features(model, out0, tokens, batch_size=8, observers=observers.observers)
    kept = observers.result().acts
    own = insertion.natural_prevalence(model, sae_in, saes, tokens, checks, batch_size=8)
    looked_up = insertion.natural_prevalence(model, sae_in, saes, tokens, checks, batch_size=8, known=kept)
    _same_prevalence(looked_up, own, exact=False)
    assert sum(p.kq_count + p.kkq_count for p in own) >= 5


def test_natural_prevalence_from_the_kept_activations_is_bit_for_bit_at_gpt2_widths():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from bench_pipeline import build

    model, sae_in, sae_out = build(False, 0, "cpu")  # 24,576 input features, 2,048 output features
    tokens = torch.randint(0, model.cfg.d_vocab, (40, 64), generator=torch.Generator().manual_seed(3))
    observers = CorpusObservers(sae_in, tokens, acts_max_bytes=2**30)
    scan_output_features(model, sae_out, tokens, batch_size=16, observers=observers.observers)
    kept = observers.result().acts
    common = torch.argsort(observers.result().inputs.active, descending=True)[:6].tolist()
    checks = [(5, common[0], common[1], common[2]), (9, common[3], common[4], common[5]),
              (11, common[2], common[5], common[0])]
    own = insertion.natural_prevalence(model, sae_in, sae_out, tokens, checks, batch_size=16)
    looked_up = insertion.natural_prevalence(model, sae_in, sae_out, tokens, checks, batch_size=16, known=kept)
    _same_prevalence(looked_up, own, exact=True)
    assert sum(p.kq_count + p.kkq_count for p in own) >= 5


def test_scans_of_several_layers_in_one_pass_equal_each_layers_own_and_read_back_from_disk():
    """A Llama-family model (rotary, GQA): heads of layers 0 and 1 scanned in one pass through blocks 0..1
    equal each layer's own scan, bit for bit; the scans spilled to disk read back the same (twice)."""
    from attnrules.exemplars import scan_heads_deferred

    model = build_family("llama")
    saes = [family_saes(model, layer, head, seed=layer)[1] for layer, head in ((1, 1), (0, 0), (1, 0))]
    tokens = family_tokens(model, n=21, t=10, seed=5)
    together = scan_heads(model, saes, tokens, batch_size=4)
    spilled = scan_heads_deferred(model, saes, tokens, on_disk=True, batch_size=4)
    for sae, scan, file in zip(saes, together, spilled):
        alone = scan_output_features(model, sae, tokens, batch_size=4)
        for back in (scan, file.scan(), file.scan()):
            for field in ("counts", "act_max", "act_argmax"):
                a, b = getattr(back, field), getattr(alone, field)
                assert a.dtype == b.dtype and torch.equal(a, b), field


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_a_whole_model_corpus_pass_gives_the_per_layer_sweeps_results(family, tmp_path, monkeypatch):
    """A sweep over heads of both layers of a 2-layer family model: one corpus pass through the model
    (layers_per_pass all) or one a layer; the same results either way."""
    import attnrules.pipeline.sweep as sweep
    from attnrules.pipeline.resume import read_head

    model = build_family(family)
    tokens = family_tokens(model, n=160, t=10, seed=7)
    heads = ((0, 0), (0, 1), (1, 0))
    inputs = {layer: family_saes(model, layer, 0, seed=layer, n_in=40)[0] for layer in (0, 1)}
    outputs = {(layer, head): family_saes(model, layer, head, seed=layer)[1] for layer, head in heads}
    work = Workload(family, model, tokens, heads, inputs.__getitem__, lambda layer, head: outputs[layer, head])
    settings = dataclasses.replace(SETTINGS, features=(0, 1, 2, 3, 4), min_count=5, examples_per_bin=8,
                                   pattern_pool=50)
    passes = []
    real = sweep.scan_heads_deferred

    def counted(model, saes, *args, on_disk, **kwargs):
        passes.append((sorted({sae.layer for sae in saes}), on_disk))
        return real(model, saes, *args, on_disk=on_disk, **kwargs)

    monkeypatch.setattr(sweep, "scan_heads_deferred", counted)
    found = {}
    free = shutil.disk_usage(tempfile.gettempdir()).free
    # all layers; one a layer (asked); all asked but TMPDIR too small for two layers' temporary files
    for run, per_pass, disk in (("all", None, free), ("one", 1, free), ("full disk", None, 2**20)):
        passes.clear()
        monkeypatch.setattr(sweep.shutil, "disk_usage", lambda path: SimpleNamespace(total=disk, used=0, free=disk))
        out = tmp_path / run.replace(" ", "_")
        run_sweep(work, out, dataclasses.replace(settings, layers_per_pass=per_pass), progress=False)
        found[run] = {(l, h): read_head(out / "shards" / f"L{l}H{h}") for l, h in heads}
        assert passes == ([([0, 1], True)] if run == "all" else [([0], False), ([1], False)]), run
    assert sum(len(r.features) for r in found["all"].values()) > 0
    for run in ("one", "full disk"):
        for lh in heads:
            a, b = found["all"][lh], found[run][lh]
            assert [f.to_json() for f in a.features] == [f.to_json() for f in b.features]
            assert [repr(d.to_json()) for d in a.distractors] == [repr(d.to_json()) for d in b.distractors]
            assert a.metadata["failed_steps"] == b.metadata["failed_steps"] == 0
