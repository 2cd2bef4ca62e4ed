"""Batched, deduplicated and early-stopped forward passes (issue 14) give the old pipeline's results:
every planted case of ``tests/old_path_cases.py`` is compared with the head results saved from the
pipeline before the change (``tests/fixtures/old_path``; written at commit b8dd736)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from bench_pipeline import differences  # noqa: E402
from old_path_cases import CASES, FIXTURES, run_case  # noqa: E402


@pytest.mark.parametrize("case", sorted(CASES))
def test_results_equal_the_old_pipeline(case):
    old = json.loads((FIXTURES / f"{case}.json").read_text())
    new = run_case(case)
    old["metadata"].pop("inputs", None)  # the settings' fingerprint may gain fields; the values are compared
    found = differences(old, new)
    assert not found, found[:10]


@pytest.mark.parametrize("names", [["blocks.1.hook_resid_pre"], ["blocks.1.attn.hook_z"],
                                   ["blocks.1.attn.hook_v", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern"]])
def test_hooked_forward_stops_after_the_last_hook_with_the_full_pass_values(names):
    """The early-stopped pass gives transformer_lens's full-pass activations bit for bit, and the
    model computes nothing after the last hook asked for (block 1's MLP never runs)."""
    import torch

    from attnrules.sources.runner import hooked_forward
    from tiny_gpt2 import build_tiny_gpt2

    model = build_tiny_gpt2(seed=1)
    tokens = torch.randint(0, model.cfg.d_vocab, (6, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, full = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        later = []
        with model.hooks(fwd_hooks=[("blocks.1.mlp.hook_post", lambda t, hook: later.append(hook.name))]):
            got = hooked_forward(model, tokens, 1, names)
    assert later == [] and sorted(got) == sorted(names)
    for name in names:
        assert torch.equal(got[name], full[name])
    with pytest.raises(KeyError, match="no hook"):
        hooked_forward(model, tokens, 0, ["blocks.1.hook_resid_pre"])


def test_differences_catch_changed_numbers_and_ignore_added_fields_and_wording():
    old = {"a": 1.5, "key_desc": "x", "points": [{"n": 1, "f1": 0.5}], "rows": [1, 2]}
    assert differences(old, {**old, "key_desc": "y", "new": 3, "points": [{"n": 1, "f1": 0.5, "neg": "pattern"},
                                                                          {"n": 1, "f1": 0.2}]}) == []
    assert differences(old, {**old, "a": 1.5000001}) == [".a: 1.5 != 1.5000001"]
    assert differences(old, {**old, "points": [{"n": 1, "f1": 0.4}, {"n": 2, "f1": 0.5}]}) == [".points[0]: not found"]
    assert differences(old, {**old, "rows": [1, 3]}) == [".rows[1]: 2 != 3"]
    assert differences(old, {"a": 1.5}) == [".points: missing", ".rows: missing"]
