"""One forward pass per head serves every feature (attnrules.pipeline.activations): the results are
bit for bit those of the per-feature passes, and the model runs over fewer sequences."""
import json
import warnings
import sys
from pathlib import Path

import pytest
import torch

import attnrules.exemplars as exemplars_module
import attnrules.importance.exact as exact_module
import attnrules.pipeline.activations as activations
from attnrules.exemplars import input_activations
from attnrules.importance import exact_importance_terms
from attnrules.pipeline import ExtractSettings, extract_head
from attnrules.pipeline.activations import SharedPasses, group_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planted import build_glyph  # noqa: E402

SETTINGS = ExtractSettings(features=(0, 1, 2, 3), max_rules=8, exhaustive_k=5, show_exemplars=2, exact=True,
                           examples_per_bin=60)


@pytest.fixture(scope="module")
def glyph():
    return build_glyph()


class Passes:
    """Counts the model's hooked forward passes (calls and sequences) while installed: all of them, and
    those of the exemplar steps (input activations, exact importance, the shared pass)."""

    def __init__(self, model, monkeypatch):
        self.calls, self.sequences, real = 0, 0, model.forward
        self.exemplar_calls, self.exemplar_sequences = 0, 0
        self.exact_sequences = 0  # run by the exact-importance pass itself (desc "")

        def counted(tokens, *args, **kwargs):
            self.calls += 1
            self.sequences += tokens.shape[0]
            return real(tokens, *args, **kwargs)

        monkeypatch.setattr(model, "forward", counted)
        for module in (exemplars_module, exact_module, activations):
            monkeypatch.setattr(module, "run_batches", self.wrap(module.run_batches, module is not exemplars_module))

    def wrap(self, real, always):
        def counted(model, tokens, layer, names, **kwargs):
            counts = always or kwargs.get("desc") == "input features"
            for rows, cache in real(model, tokens, layer, names, **kwargs):
                if counts:
                    self.exemplar_calls += 1
                    self.exemplar_sequences += rows.stop - rows.start
                if kwargs.get("desc") == "":
                    self.exact_sequences += rows.stop - rows.start
                yield rows, cache

        return counted

    def __str__(self):
        return (f"{self.calls} passes over {self.sequences} sequences (exemplar steps: {self.exemplar_calls} "
                f"over {self.exemplar_sequences})")


def run(model, input_sae, output_sae, tokens, settings, monkeypatch, shared: bool):
    monkeypatch.setattr(activations, "SHARED_MAX_SEQUENCES", 4096 if shared else 0)
    with monkeypatch.context() as m:
        passes = Passes(model, m)
        result = extract_head(model, input_sae, output_sae, tokens, settings=settings, progress=False)
    return json.dumps(result.to_json(), sort_keys=True), passes


def both_ways(model, input_sae, output_sae, tokens, settings, monkeypatch):
    """The head without shared passes, then with them: (old result, new result, old passes, new passes)."""
    old, before = run(model, input_sae, output_sae, tokens, settings, monkeypatch, shared=False)
    new, after = run(model, input_sae, output_sae, tokens, settings, monkeypatch, shared=True)
    return old, new, before, after


@pytest.mark.parametrize("exact", [True, False])
def test_toy_shared_passes_give_identical_results_with_fewer_passes(toy, monkeypatch, exact):
    settings = ExtractSettings(**{**SETTINGS.__dict__, "exact": exact})
    tokens = toy.corpus(1500)
    old, new, before, after = both_ways(toy.model, toy.input_sae, toy.output_saes[0], tokens, settings, monkeypatch)
    assert new == old
    print(f"toy exact={exact}: {before} -> {after}")
    assert after.sequences < before.sequences and after.calls < before.calls
    assert after.exemplar_sequences < before.exemplar_sequences
    # the exact pass reads the stored hooks: no pass of its own
    assert after.exact_sequences == 0 and (before.exact_sequences > 0) == settings.exact


def test_planted_glyph_shared_passes_give_identical_results(glyph, monkeypatch):
    head = glyph.features[0].head
    settings = ExtractSettings(**{**SETTINGS.__dict__, "features": (0, 1, 2)})
    tokens = glyph.corpus(1200)
    old, new, before, after = both_ways(glyph.model, glyph.input_sae, glyph.output_saes[head], tokens, settings, monkeypatch)
    assert new == old
    print(f"glyph: {before} -> {after}")
    assert after.sequences < before.sequences and after.calls < before.calls
    assert after.exemplar_sequences < before.exemplar_sequences
    # the exact pass reads the stored hooks: no pass of its own
    assert after.exact_sequences == 0 and (before.exact_sequences > 0) == settings.exact


def test_stored_hooks_rebuild_each_step_bit_for_bit(glyph):
    """The lookups themselves: input activations and exact terms equal (torch.equal) the per-feature passes."""
    head = glyph.features[0].head
    sae_out = glyph.output_saes[head]
    tokens = glyph.corpus(300)
    rows = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:70]
    train = rows[:40]
    shared = SharedPasses(glyph.model, glyph.input_sae, sae_out, tokens, rows.tolist(), train.tolist(), batch_size=8)
    assert shared.passes == 9  # 70 sequences, batches of 8
    assert torch.equal(shared.input_activations(rows), input_activations(glyph.model, glyph.input_sae, tokens[rows]))
    positions = torch.randint(1, tokens.shape[1], (40,), generator=torch.Generator().manual_seed(1))
    queries, keys = torch.arange(glyph.input_sae.n_features), torch.arange(glyph.input_sae.n_features)
    for feature in range(3):
        want = exact_importance_terms(glyph.model, glyph.input_sae, sae_out, feature, queries, keys, tokens[train],
                                      positions, batch_size=8)
        got = exact_importance_terms(glyph.model, glyph.input_sae, sae_out, feature, queries, keys, tokens[train],
                                     positions, batch_size=8, runner=shared.runner(train))
        for a, b in zip(want.__dict__.values(), got.__dict__.values()):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.equal(a.isnan(), b.isnan())


def test_memory_bound_falls_back_and_groups_are_bounded(toy, monkeypatch):
    assert group_features([(torch.arange(5), torch.arange(5, 10)), (torch.arange(8, 12), torch.arange(3)),
                           (torch.arange(100), torch.arange(0)), (torch.arange(20, 25), torch.arange(0))], 12) \
        == [[0, 1], [3]]  # feature 2 alone passes the bound: its own passes
    tokens = toy.corpus(200)
    with pytest.raises(MemoryError):
        SharedPasses(toy.model, toy.input_sae, toy.output_saes[0], tokens, range(100), range(50), max_bytes=1000)
    monkeypatch.setattr(activations, "SHARED_MAX_BYTES", 1000)  # every group dropped: per-feature passes
    settings = ExtractSettings(**{**SETTINGS.__dict__, "features": (0, 1)})
    tokens = toy.corpus(1500)
    old, new, before, after = both_ways(toy.model, toy.input_sae, toy.output_saes[0], tokens, settings, monkeypatch)
    assert new == old
    # the dropped groups' passes (stopped at the bound) come on top of the per-feature ones
    assert after.exemplar_sequences >= before.exemplar_sequences


def test_gpt2_shapes_forward_is_row_independent():
    """What the identity rests on, at GPT-2-small widths on this machine: a sequence's input-SAE
    activations do not depend on the other sequences of its batch."""
    bench = Path(__file__).resolve().parent.parent / "bench"
    sys.path.insert(0, str(bench))
    from bench_pipeline import build

    model, sae_in, _ = build(True, 2, "cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (24, 64), generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    a = input_activations(model, sae_in, tokens[:16], batch_size=8)
    b = input_activations(model, sae_in, tokens[perm], batch_size=8)
    assert torch.equal(a, b[torch.argsort(perm)][:16])


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen3"])
def test_every_attention_kind_gives_identical_results(name, monkeypatch):
    """Rotary, grouped-query (a head of the last key/value group), soft-capping, sliding windows, QK-norm."""
    from families import FAMILIES, LOCAL_LAYERS, build_family, family_saes

    assert name in FAMILIES
    model = build_family(name)
    layer = LOCAL_LAYERS.get(name, (1,))[0]
    head = model.cfg.n_heads - 1
    sae_in, sae_out = family_saes(model, layer, head, seed=1)
    tokens = torch.randint(0, model.cfg.d_vocab, (160, 12), generator=torch.Generator().manual_seed(0))
    settings = ExtractSettings(features=(0, 1, 2, 3, 4), examples_per_bin=6, num_values=8, num_queries=8, max_rules=8,
                               exhaustive_k=10, counting_bases=8, counting_min_bases=4, counting_max=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old, new, before, after = both_ways(model, sae_in, sae_out, tokens, settings, monkeypatch)
    assert new == old and '"failed_steps": 0' in new
    assert after.exemplar_sequences < before.exemplar_sequences
    # the exact pass reads the stored hooks: no pass of its own
    assert after.exact_sequences == 0 and (before.exact_sequences > 0) == settings.exact


@pytest.mark.parametrize("arch,per_head", [("gated", True), ("topk", False), ("jumprelu", True)])
def test_sae_lens_architectures_give_identical_results(arch, per_head, monkeypatch):
    """sae_lens SAEs (parameters that require grad), a layer-level output SAE reading every head's z."""
    import dataclasses

    from test_sae_families import HEAD, SETTINGS as FAMILY_SETTINGS, pair, viable
    from tiny_gpt2 import build_tiny_gpt2

    from attnrules.sources import as_sources

    model = build_tiny_gpt2(seed=3)
    tokens = torch.randint(0, model.cfg.d_vocab, (120, 10), generator=torch.Generator().manual_seed(0))
    sae_in, sae_out = as_sources(model, *pair(model, arch, per_head=per_head), head=HEAD)
    settings = dataclasses.replace(FAMILY_SETTINGS, features=viable(model, sae_out, tokens))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old, new, before, after = both_ways(model, sae_in, sae_out, tokens, settings, monkeypatch)
    assert new == old and '"failed_steps": 0' in new
    assert after.exemplar_sequences < before.exemplar_sequences
    # the exact pass reads the stored hooks: no pass of its own
    assert after.exact_sequences == 0 and (before.exact_sequences > 0) == settings.exact
