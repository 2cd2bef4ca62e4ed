"""Resume: a run killed after n features resumes with only the rest (the scan read from the folder)
and equals an uninterrupted run; a folder never mixes runs (model, SAEs, corpus, settings); stale
temporaries go; a head folder is complete only with its marker, written last."""
import dataclasses
import json

import pytest
import torch

import attnrules.pipeline.extract as pipeline
import attnrules.pipeline.results as results_module
from attnrules.pipeline import ExtractSettings, IncompleteResultsError, RunMismatchError, extract_head, load_results
from attnrules.pipeline.resume import FEATURES_DIR, RUN_FILE, SCAN_FILE, hash_model
from attnrules.pipeline.results import CSV_FILES, MARKER_FILE, RESULTS_FILE
from attnrules.pipeline.sweep import run_sweep
from attnrules.pipeline.workload import toy_workload
from attnrules.toy import build_toy

SETTINGS = ExtractSettings(features=(0, 1), max_rules=8, exhaustive_k=4, show_exemplars=2, show_terms=4)
N_SEQUENCES = 1500
EXTRACT_ONE = pipeline.extract_one


@pytest.fixture(scope="module")
def tokens(toy):
    return toy.corpus(N_SEQUENCES)


@pytest.fixture(scope="module")
def uninterrupted(toy, tokens, tmp_path_factory):
    """The counting head run in one go: its folder and result."""
    out = tmp_path_factory.mktemp("whole")
    return out, extract_head(toy.model, toy.input_sae, toy.output_saes[1], tokens, settings=SETTINGS, out_dir=out,
                             progress=False)


class Counter:
    """Wraps extract_one: counts the features it computes; raises ``stop`` on call ``stop_at`` (1-based)."""

    def __init__(self, monkeypatch, stop_at=None, stop=KeyboardInterrupt):
        self.real, self.names, self.stop_at, self.stop = EXTRACT_ONE, [], stop_at, stop
        monkeypatch.setattr(pipeline, "extract_one", self)

    def __call__(self, model, input_sae, output_sae, circuit, g, *args, **kwargs):
        if self.stop_at is not None and len(self.names) + 1 == self.stop_at:
            raise self.stop("injected kill")
        self.names.append(circuit.feature_name(g))
        return self.real(model, input_sae, output_sae, circuit, g, *args, **kwargs)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_killed_run_resumes_with_the_rest_and_equals_an_uninterrupted_run(toy, tokens, uninterrupted, tmp_path,
                                                                           monkeypatch, stop):
    whole_dir, whole = uninterrupted
    assert whole.feature("L0H1.0").counting is not None  # the counting feature, fresh in the whole run
    killed = Counter(monkeypatch, stop_at=2, stop=stop)  # dies when it starts the second feature
    with pytest.raises(stop):
        extract_head(toy.model, toy.input_sae, toy.output_saes[1], tokens, settings=SETTINGS, out_dir=tmp_path,
                     progress=False)
    assert killed.names == ["L0H1.0"]
    assert sorted(p.name for p in (tmp_path / FEATURES_DIR).iterdir()) == ["L0H1.0.json"]
    assert (tmp_path / SCAN_FILE).exists() and (tmp_path / RUN_FILE).exists()
    assert not (tmp_path / MARKER_FILE).exists()
    with pytest.raises(IncompleteResultsError, match="not a complete head folder"):
        load_results(tmp_path)

    def no_scan(*args, **kwargs):
        raise AssertionError("the corpus was scanned again")

    monkeypatch.setattr(pipeline, "scan_output_features", no_scan)
    again = Counter(monkeypatch)
    result = extract_head(toy.model, toy.input_sae, toy.output_saes[1], tokens, settings=SETTINGS, out_dir=tmp_path,
                          progress=False)
    assert again.names == ["L0H1.1"]  # only the remaining feature is computed
    assert result.run.computed == ("L0H1.1",) and result.run.reused == ("L0H1.0",) and result.run.scan == "cached"
    assert result == whole and load_results(tmp_path) == whole
    for name in (RESULTS_FILE, *CSV_FILES):  # counting.csv included: a cached feature writes as a fresh one
        assert (tmp_path / name).read_text() == (whole_dir / name).read_text(), name
    assert "count([games]) ≥ 2 → L0H1.0" in (tmp_path / "counting.csv").read_text()
    marker = json.loads((tmp_path / MARKER_FILE).read_text())
    assert marker["inputs"] == whole.metadata["inputs"] and marker["run"]["computed"] == ["L0H1.1"]

    # a complete folder is read back, not recomputed
    third = Counter(monkeypatch)
    done = extract_head(toy.model, toy.input_sae, toy.output_saes[1], tokens, settings=SETTINGS, out_dir=tmp_path,
                        progress=False)
    assert third.names == [] and done == whole and done.run.scan == "none"


def test_a_folder_never_mixes_runs(toy, tokens, uninterrupted, tmp_path, monkeypatch):
    whole_dir, whole = uninterrupted
    out = tmp_path / "L0H1"
    out.mkdir()
    for name in ("RUN.json", "scan.pt"):
        (out / name).write_bytes((whole_dir / name).read_bytes())
    (out / FEATURES_DIR).mkdir()
    (out / FEATURES_DIR / "L0H1.0.json").write_text((whole_dir / FEATURES_DIR / "L0H1.0.json").read_text())

    def rerun(**changes):
        args = {"model": toy.model, "input_sae": toy.input_sae, "output_sae": toy.output_saes[1], "tokens": tokens,
                "settings": SETTINGS, **changes}
        return extract_head(args.pop("model"), args.pop("input_sae"), args.pop("output_sae"), args.pop("tokens"),
                            out_dir=out, progress=False, **args)

    other = build_toy()
    with torch.no_grad():
        other.model.blocks[0].attn.W_V[1, 0, 0] += 1e-3
    assert hash_model(other.model) != hash_model(toy.model)
    cases = {
        "model": {"model": other.model},
        "input SAE": {"input_sae": dataclasses.replace(toy.input_sae, W_dec=toy.input_sae.W_dec * 1.01)},
        "output SAE": {"output_sae": toy.output_saes[0]},
        "corpus": {"tokens": toy.corpus(N_SEQUENCES, seed=1)},
        "settings": {"settings": dataclasses.replace(SETTINGS, max_rules=16)},
    }
    before = sorted(p.name for p in out.rglob("*"))
    for what, change in cases.items():
        with pytest.raises(RunMismatchError, match=f"{what} differs") as error:
            rerun(**change)
        assert error.value.differences == [what] and "overwrite=True" in str(error.value)
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing was touched

    counter = Counter(monkeypatch)
    fresh = rerun(overwrite=True, tokens=toy.corpus(N_SEQUENCES, seed=1))
    assert counter.names == ["L0H1.0", "L0H1.1"] and fresh.run.reused == () and fresh.run.scan == "computed"
    assert fresh.metadata["inputs"]["corpus"] != whole.metadata["inputs"]["corpus"]
    assert load_results(out) == fresh
    with pytest.raises(RunMismatchError, match="corpus differs"):  # the folder now belongs to the new run
        rerun()


def test_a_folder_of_an_unknown_run_is_not_reused(toy, tokens, tmp_path):
    (tmp_path / FEATURES_DIR).mkdir()
    (tmp_path / FEATURES_DIR / "L0H1.0.json").write_text(json.dumps({"settings": "0123456789abcdef"}))
    with pytest.raises(RunMismatchError, match="no input hashes"):
        extract_head(toy.model, toy.input_sae, toy.output_saes[1], tokens, settings=SETTINGS, out_dir=tmp_path,
                     progress=False)


def test_stale_temporaries_go_and_the_marker_comes_last(toy, tokens, uninterrupted, tmp_path, monkeypatch):
    whole_dir, whole = uninterrupted
    for name in ("RUN.json", "scan.pt"):
        (tmp_path / name).write_bytes((whole_dir / name).read_bytes())
    (tmp_path / FEATURES_DIR).mkdir()
    for f in (whole_dir / FEATURES_DIR).iterdir():
        (tmp_path / FEATURES_DIR / f.name).write_text(f.read_text())
    stale = [tmp_path / ".results.json.tmp-ab12cd34", tmp_path / ".results.json.k2j3h4g5",
             tmp_path / ".scan.pt.tmp-zz99yy88", tmp_path / FEATURES_DIR / ".L0H1.1.json.tmp-0a1b2c3d"]
    for path in stale:
        path.write_text("half a file")
    mine = tmp_path / ".notes.txt"
    mine.write_text("not ours")

    # killed after results.json, before the CSVs
    real_write_csv = results_module.write_csv

    def killed_write_csv(path, frame):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(results_module, "write_csv", killed_write_csv)
    with pytest.raises(KeyboardInterrupt):
        extract_head(toy.model, toy.input_sae, toy.output_saes[1], tokens, settings=SETTINGS, out_dir=tmp_path,
                     progress=False)
    assert not any(p.exists() for p in stale) and mine.exists()
    assert (tmp_path / RESULTS_FILE).exists() and not (tmp_path / MARKER_FILE).exists()
    with pytest.raises(IncompleteResultsError, match="results.json but no completion marker"):
        load_results(tmp_path)

    monkeypatch.setattr(results_module, "write_csv", real_write_csv)
    counter = Counter(monkeypatch)
    result = extract_head(toy.model, toy.input_sae, toy.output_saes[1], tokens, settings=SETTINGS, out_dir=tmp_path,
                          progress=False)
    assert counter.names == [] and result == whole and result.run.scan == "cached"
    assert load_results(tmp_path) == whole

    # a rewrite that dies leaves no marker behind
    (tmp_path / RESULTS_FILE).unlink()
    monkeypatch.setattr(results_module, "write_csv", killed_write_csv)
    with pytest.raises(KeyboardInterrupt):
        extract_head(toy.model, toy.input_sae, toy.output_saes[1], tokens, settings=SETTINGS, out_dir=tmp_path,
                     progress=False)
    assert not (tmp_path / MARKER_FILE).exists()


def test_sweep_stops_on_other_inputs_and_reads_back(tmp_path):
    settings = ExtractSettings(features=(0,), max_rules=8, exhaustive_k=0, counting=False, show_exemplars=1,
                               exact=False)
    work = toy_workload(heads=(0,), n_sequences=800)
    run_sweep(work, tmp_path, settings, progress=False)
    (head,) = load_results(tmp_path).values()
    assert head.layer == 0 and head.head == 0 and [f.name for f in head.features] == ["L0H0.0"]
    manifest = json.loads((tmp_path / "manifest" / "L0H0.json").read_text())
    assert manifest["inputs"] == head.metadata["inputs"]

    other = dataclasses.replace(settings, max_rules=16)
    with pytest.raises(RunMismatchError, match="L0H0: settings"):
        run_sweep(work, tmp_path, other, progress=False)
    (tmp_path / "manifest" / ".L0H0.json.tmp-abcdefgh").write_text("{")
    summary = run_sweep(work, tmp_path, other, progress=False, overwrite=True)
    assert set(summary["num_rules"]) == {4, 8, 16}
    assert not (tmp_path / "manifest" / ".L0H0.json.tmp-abcdefgh").exists()
    assert load_results(tmp_path)[0, 0].metadata["settings"]["max_rules"] == 16


def test_hashes_see_content_and_sample_big_tensors(monkeypatch):
    import attnrules.pipeline.resume as resume

    a = torch.arange(1000, dtype=torch.float32)
    assert resume.hash_tensors({"w": a}) == resume.hash_tensors({"w": a.clone()})
    assert resume.hash_tensors({"w": a}) != resume.hash_tensors({"w": a.double()})  # dtype
    assert resume.hash_tensors({"w": a}) != resume.hash_tensors({"w": a.view(10, 100)})  # shape
    assert resume.hash_tensors({"w": a}) != resume.hash_tensors({"v": a})  # name
    b = a.clone()
    b[500] += 1
    assert resume.hash_tensors({"w": a}) != resume.hash_tensors({"w": b})
    # above the limit: a sample (the edges and a fixed stride) is hashed, deterministically
    monkeypatch.setattr(resume, "FULL_HASH_LIMIT", 100)
    monkeypatch.setattr(resume, "SAMPLE_EDGE", 10)
    monkeypatch.setattr(resume, "SAMPLE_STRIDED", 50)
    assert resume.hash_tensors({"w": a}) == resume.hash_tensors({"w": a.clone()})
    sampled, skipped = a.clone(), a.clone()
    sampled[20 * 7] += 1  # stride 20: element 140 is in the sample
    skipped[141] += 1  # element 141 is not
    assert resume.hash_tensors({"w": a}) != resume.hash_tensors({"w": sampled})
    assert resume.hash_tensors({"w": a}) == resume.hash_tensors({"w": skipped})
    assert resume.hash_corpus(torch.ones(2, 3, dtype=torch.long)) != resume.hash_corpus(torch.ones(3, 2, dtype=torch.long))


def test_output_sae_hash_sees_the_activation_parameters():
    """Two output SAEs with the same weights but another JumpReLU threshold, TopK k or architecture
    give other features, so other hashes (a results folder of one is never reused for the other)."""
    from attnrules.pipeline.resume import hash_output_sae
    from attnrules.sources import OutputSAE

    g = torch.Generator().manual_seed(0)
    w = dict(W_enc=torch.randn(4, 6, generator=g), b_enc=torch.zeros(6), W_dec=torch.randn(6, 4, generator=g),
             b_dec=torch.zeros(4), layer=0, head=0)
    hashes = {hash_output_sae(OutputSAE.from_tensors(**w)),
              hash_output_sae(OutputSAE.from_tensors(**w, architecture="jumprelu", threshold=torch.full((6,), 0.1))),
              hash_output_sae(OutputSAE.from_tensors(**w, architecture="jumprelu", threshold=torch.full((6,), 0.2))),
              hash_output_sae(OutputSAE.from_tensors(**w, architecture="topk", k=2)),
              hash_output_sae(OutputSAE.from_tensors(**w, architecture="topk", k=3))}
    assert len(hashes) == 5
    assert hash_output_sae(OutputSAE.from_tensors(**w, architecture="topk", k=2)) == hash_output_sae(
        OutputSAE.from_tensors(**w, architecture="topk", k=2))


def test_scan_positions_are_int16_and_older_int64_caches_load_as_such(toy, tokens, tmp_path):
    """The scan holds argmax positions as int16 (a quarter of int64's memory); a cache written with int64
    positions (before) loads with the same values as int16."""
    from attnrules.exemplars import position_dtype, scan_output_features
    from attnrules.pipeline.resume import HeadFolder, InputHashes

    scan = scan_output_features(toy.model, toy.output_saes[0], tokens[:200])
    assert scan.act_argmax.dtype == torch.int16 and position_dtype(2**15) == torch.int16
    assert position_dtype(2**15 + 1) == torch.int32
    inputs = InputHashes("m", "i", "o", "c", "s")
    HeadFolder(tmp_path, inputs).save_scan(dataclasses.replace(scan, act_argmax=scan.act_argmax.long()))
    back = HeadFolder(tmp_path, inputs).load_scan()
    assert back.act_argmax.dtype == torch.int16 and torch.equal(back.act_argmax.long(), scan.act_argmax.long())


def test_scan_cache_is_exact_and_keyed(toy, tokens, tmp_path):
    from attnrules.exemplars import scan_output_features
    from attnrules.pipeline.resume import HeadFolder, InputHashes

    scan = scan_output_features(toy.model, toy.output_saes[1], tokens[:300])
    inputs = InputHashes("m", "i", "o", "c", "s")
    HeadFolder(tmp_path, inputs).save_scan(scan)
    back = HeadFolder(tmp_path, inputs).load_scan()
    for name in ("counts", "act_max", "act_argmax"):
        assert torch.equal(getattr(back, name), getattr(scan, name)) and getattr(back, name).dtype == getattr(scan, name).dtype
    # another model, output SAE or corpus: no cached scan; the input SAE and settings do not matter to it
    assert HeadFolder(tmp_path, dataclasses.replace(inputs, settings="t", input_sae="j")).has_scan()
    for field in ("model", "output_sae", "corpus"):
        assert HeadFolder(tmp_path, dataclasses.replace(inputs, **{field: "x"})).load_scan() is None
