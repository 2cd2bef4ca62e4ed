"""The planted heads whose whole-pipeline results were saved from the pipeline before the batched
and deduplicated passes of issue 14 (commit b8dd736): ``tests/fixtures/old_path/<case>.json``.

``tests/test_batched_passes.py`` runs the same cases with today's code and compares. The fixtures
were written once, from that commit, with ``python tests/old_path_cases.py`` (they are an old
pipeline's outputs, never the code under test's)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "old_path"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _toy(variant: str, head: int):
    from attnrules.pipeline.workload import toy_workload

    work = toy_workload(variant=variant, heads=[head], n_sequences=1500)
    return work.model, work.input_sae(0), work.output_sae(0, head), work.tokens


def _planted(name: str, head: int):
    from planted import build_glyph, build_rune

    planted = {"glyph": build_glyph, "rune": build_rune}[name]()
    return planted.model, planted.input_sae, planted.output_saes[head], planted.corpus(2000, seed=1)


def _features(name: str, head: int) -> tuple:
    from planted import build_glyph, build_rune

    planted = {"glyph": build_glyph, "rune": build_rune}[name]()
    return tuple(f.index for f in planted.features if f.head == head and f.kind != "dead")


# case -> (inputs, ExtractSettings fields); every case runs exact mode, absence and counting rules and
# the distractor evidence as the defaults do
CASES = {
    "toy_h0": (lambda: _toy("toy", 0), {"features": None, "num_features": 6, "min_count": 30}),
    "toy_h1": (lambda: _toy("toy", 1), {"features": None, "num_features": 6, "min_count": 30}),
    "toy_rope": (lambda: _toy("toy-rope", 0), {"features": None, "num_features": 6, "min_count": 30}),
    "glyph_h0": (lambda: _planted("glyph", 0), {"features": "planted"}),
    "glyph_h1": (lambda: _planted("glyph", 1), {"features": "planted"}),
    "rune_h2": (lambda: _planted("rune", 2), {"features": "planted"}),
    "rune_h2_no_screen": (lambda: _planted("rune", 2), {"features": "planted", "counting_screen": False}),
}


def run_case(name: str) -> dict:
    """The head's results (``HeadResult.to_json``) of one case, with today's code."""
    import warnings

    from attnrules.pipeline import ExtractSettings, extract_head

    build, fields = CASES[name]
    model, input_sae, output_sae, tokens = build()
    fields = dict(fields)
    if fields.get("features") == "planted":
        planted = "glyph" if name.startswith("glyph") else "rune"
        fields["features"] = _features(planted, output_sae.head)
    fields = {k: v for k, v in fields.items() if not (k == "features" and v is None)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_head(model, input_sae, output_sae, tokens, settings=ExtractSettings(**fields), progress=False)
    return json.loads(json.dumps(result.to_json(), sort_keys=True))


if __name__ == "__main__":
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for case in sys.argv[1:] or CASES:
        data = run_case(case)
        (FIXTURES / f"{case}.json").write_text(json.dumps(data, sort_keys=True, indent=0))
        print(case, len(data["features"]), "features")
