"""The corpus pass's kept ``hook_resid_pre`` (``attnrules.resid_store``): exact-mode exemplar passes and
the exemplar views run the head's block alone from it, with the values of the whole pass, on every
attention kind."""
import dataclasses
import json
import warnings

import pytest
import torch

import attnrules.exemplars as exemplars
from attnrules.exemplars import exemplar_views, input_activations
from attnrules.importance import exact_importance_terms
from attnrules.pipeline import ExtractSettings, extract_head
from attnrules.pipeline.activations import SharedPasses
from attnrules.resid_store import ResidStore
from attnrules.sources.runner import hooked_forward
from attnrules.sparse_acts import SparseActs
from families import FAMILIES, LOCAL_LAYERS, build_family, family_saes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rows_read_back_bit_for_bit_and_the_bound_stops_at_whole_rows(dtype):
    resid = torch.randn(5, 7, 3).to(dtype)
    row_bytes = 7 * 3 * resid.element_size()
    store = ResidStore(max_bytes=3 * row_bytes + 1)
    store.add(torch.tensor([10, 11]), resid[:2])
    store.add(torch.tensor([11, 12, 13, 14]), resid[1:])  # 11 is held already: kept as it was
    assert store.full and set(store.rows) == {10, 11, 12} and store.nbytes == 3 * row_bytes
    assert torch.equal(store.read([12, 10, 11]), resid[[2, 0, 1]])
    other = ResidStore()
    other.add(torch.tensor([0]), resid[:1])
    with pytest.raises(ValueError, match="resid must be"):
        other.add(torch.tensor([1]), resid[:1, :3])
    with pytest.raises(ValueError, match="resid must be"):
        other.add(torch.tensor([1]), resid[:1].to(torch.float16))


def _cases():
    for name in sorted(FAMILIES):
        for layer in sorted({1, *LOCAL_LAYERS.get(name, ())}):
            yield name, layer


@pytest.mark.parametrize("name,layer", list(_cases()))
def test_the_block_alone_from_its_input_gives_the_whole_pass_hooks(name, layer):
    """Rotary, grouped-query, soft-capping, sliding windows, QK-norm, parallel attention (NeoX): block L's
    hooks from the stored hook_resid_pre equal those of blocks 0..L run on the tokens, bit for bit."""
    model = build_family(name)
    tokens = torch.randint(0, model.cfg.d_vocab, (6, 12), generator=torch.Generator().manual_seed(layer))
    attn = f"blocks.{layer}.attn"
    names = [f"blocks.{layer}.hook_resid_pre"] + [f"{attn}.hook_{x}" for x in ("q", "k", "v", "attn_scores", "pattern", "z")]
    full = hooked_forward(model, tokens, layer, names)
    alone = hooked_forward(model, tokens, layer, names, resid=full[names[0]].clone())
    for n in names:
        assert torch.equal(alone[n], full[n]), n


def test_toy_block_alone_gives_the_whole_pass_hooks(toy):
    tokens = toy.corpus(9, seed=4)
    layer = toy.input_sae.layer
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_z"]
    full = hooked_forward(toy.model, tokens, layer, names)
    alone = hooked_forward(toy.model, tokens, layer, names, resid=full[names[0]])
    assert all(torch.equal(alone[n], full[n]) for n in names)


def test_shared_passes_from_the_kept_input_run_no_earlier_block_and_give_the_same_exact_terms(toy, shared_pass_sequences):
    tokens = toy.corpus(200, seed=2)
    layer, sae_out = toy.input_sae.layer, toy.output_saes[0]
    rows = torch.arange(0, 120, 2)
    train = rows[:20]
    known = SparseActs(tokens.shape[1], toy.input_sae.n_features)
    known.add(torch.arange(200), input_activations(toy.model, toy.input_sae, tokens))
    store = ResidStore()
    resid_name = f"blocks.{layer}.hook_resid_pre"
    store.add(torch.arange(200), hooked_forward(toy.model, tokens, layer, [resid_name])[resid_name])
    full_passes = shared_pass_sequences
    own = SharedPasses(toy.model, toy.input_sae, sae_out, tokens, rows.tolist(), train.tolist(), known=known)
    assert sum(full_passes) == len(train)
    full_passes.clear()
    kept = SharedPasses(toy.model, toy.input_sae, sae_out, tokens, rows.tolist(), train.tolist(), known=known,
                        resid=store)
    assert sum(full_passes) == 0 and kept.covers(train, exact=True)
    assert all(resid_name not in kept.hooks[int(r)] for r in train) and kept.nbytes < own.nbytes  # read back, not held
    full_passes.clear()
    partial = ResidStore(max_bytes=7 * store.nbytes // 200)  # the first 7 rows of the corpus
    partial.add(torch.arange(200), store.read(range(200)))
    mixed = SharedPasses(toy.model, toy.input_sae, sae_out, tokens, rows.tolist(), train.tolist(), known=known,
                         resid=partial)
    assert partial.full and sum(full_passes) == len(train) - 4  # rows 0, 2, 4, 6 from the kept input
    positions = torch.randint(1, tokens.shape[1], (len(train),), generator=torch.Generator().manual_seed(1))
    every = torch.arange(toy.input_sae.n_features)
    for feature in range(2):
        terms = [exact_importance_terms(toy.model, toy.input_sae, sae_out, feature, every, every, tokens[train],
                                        positions, batch_size=8, runner=s.runner(train)) for s in (own, kept, mixed)]
        for other in terms[1:]:
            for a, b in zip(terms[0].__dict__.values(), other.__dict__.values()):
                assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("name", ["toy", "gemma2", "qwen3"])
def test_exemplar_views_from_the_kept_input_equal_a_pass_of_their_own(name, toy, monkeypatch):
    """Views of rows the store holds run the head's block alone (no earlier block); a row it lacks makes
    the views run their own pass; both give the same views."""
    if name == "toy":
        model, sae_out, tokens = toy.model, toy.output_saes[1], toy.corpus(100, seed=4)
    else:
        model = build_family(name)
        _, sae_out = family_saes(model, 1, model.cfg.n_heads - 1, seed=3)
        tokens = torch.randint(0, model.cfg.d_vocab, (100, 12), generator=torch.Generator().manual_seed(5))
    resid_name = f"blocks.{sae_out.layer}.hook_resid_pre"
    store = ResidStore()
    for start in range(0, 100, 64):  # as the corpus pass keeps it: batches of 64
        rows = torch.arange(start, min(start + 64, 100))
        store.add(rows, hooked_forward(model, tokens[rows], sae_out.layer, [resid_name])[resid_name])
    partial = ResidStore(max_bytes=50 * store.nbytes // 100)  # rows 0..49
    partial.add(torch.arange(100), store.read(range(100)))
    from_resid, real = [], exemplars.run_batches

    def counted(*args, resid=None, **kwargs):
        from_resid.append(resid is not None)
        return real(*args, resid=resid, **kwargs)

    monkeypatch.setattr(exemplars, "run_batches", counted)
    sequences = torch.tensor([3, 97, 41, 60, 12, 88, 7])
    positions = torch.randint(1, tokens.shape[1], (7,), generator=torch.Generator().manual_seed(6))
    views = [exemplar_views(model, sae_out, 1, tokens, sequences, positions, resid=r) for r in (None, store, partial)]
    assert from_resid == [False, True, False]
    assert views[0] == views[1] == views[2] and len(views[0]) == 7


def test_exemplar_views_from_the_kept_input_equal_a_pass_of_their_own_at_gpt2_small_widths():
    """GPT-2-small shapes (bench_pipeline's random model): the input kept from batches of 64 gives the views
    of a pass of their own over 10 other rows, bit for bit (the README's identity claim)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from bench_pipeline import build, corpus

    model, _, sae_out = build(False, 2, "cpu")
    tokens = corpus(80, model.cfg.d_vocab)
    store, name = ResidStore(), "blocks.2.hook_resid_pre"
    for start in range(0, 80, 64):
        rows = torch.arange(start, min(start + 64, 80))
        store.add(rows, hooked_forward(model, tokens[rows], 2, [name])[name])
    sequences = torch.tensor([5, 70, 17, 64, 3, 79, 40, 33, 41, 12])
    positions = torch.randint(1, 64, (10,), generator=torch.Generator().manual_seed(0))
    for feature in (0, 7):
        own = exemplar_views(model, sae_out, feature, tokens, sequences, positions)
        assert own == exemplar_views(model, sae_out, feature, tokens, sequences, positions, resid=store)


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_extract_head_results_do_not_depend_on_the_kept_input(family):
    """Nothing kept or every row: the same head results; exact mode off keeps nothing."""
    from families import family_saes

    from attnrules.pipeline.extract import corpus_observers

    model = build_family(family)
    sae_in, sae_out = family_saes(model, 1, model.cfg.n_heads - 1, seed=1)
    tokens = torch.randint(0, model.cfg.d_vocab, (160, 12), generator=torch.Generator().manual_seed(0))
    settings = ExtractSettings(features=(0, 1, 2), examples_per_bin=6, num_values=8, num_queries=8, max_rules=8,
                               exhaustive_k=10, counting=False, show_exemplars=1)
    results = []
    for mib in (0, 12288):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = extract_head(model, sae_in, sae_out, tokens, progress=False,
                                  settings=dataclasses.replace(settings, corpus_resid_mib=mib))
        assert result.metadata["failed_steps"] == 0
        results.append(json.dumps({k: v for k, v in result.to_json().items() if k in ("features", "distractors")},
                                  sort_keys=True))
    assert results[0] == results[1]
    assert corpus_observers(sae_in, tokens, settings).resid is not None
    assert corpus_observers(sae_in, tokens, dataclasses.replace(settings, exact=False)).resid is None


def test_the_store_takes_at_most_its_share_of_the_free_disk_and_stops_on_a_failed_write(monkeypatch):
    import shutil
    from types import SimpleNamespace

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    assert ResidStore(max_bytes=10**9).max_bytes == 500 and ResidStore().max_bytes == 500
    monkeypatch.undo()
    store = ResidStore()
    resid = torch.randn(3, 4, 2)
    calls = []

    def append(x):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("could not write to the temporary file (disk full?)")
        return 0

    monkeypatch.setattr(store.file, "append", append)
    with pytest.warns(RuntimeWarning, match="kept for 1 corpus rows only"):
        store.add(torch.tensor([0, 1, 2]), resid)
    assert store.full and set(store.rows) == {0} and store.nbytes == 4 * 2 * 4
