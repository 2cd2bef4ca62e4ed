"""Batched, deduplicated and early-stopped forward passes (issue 14) give the old pipeline's results:
every planted case of ``tests/old_path_cases.py`` is compared with the head results saved from the
pipeline before the change (``tests/fixtures/old_path``; written at commit b8dd736)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from old_path_cases import CASES, FIXTURES, run_case  # noqa: E402


def _wording(key: str) -> bool:
    """Text made from the input features' descriptions, whose wording changed on purpose since the
    fixtures (issue 15: features described from the corpus); every number, id and status is compared."""
    return key.endswith("_desc") or key == "text"


def _differences(old, new, where="") -> list[str]:
    """Where ``new`` differs from ``old``; a key that only ``new`` has (a field added since) is ignored."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in old if not _wording(k)
                for d in (_differences(old[k], new[k], f"{where}.{k}") if k in new else [f"{where}.{k}: missing"])]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {str(old)[:120]} != {str(new)[:120]}"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_results_equal_the_old_pipeline(case):
    old = json.loads((FIXTURES / f"{case}.json").read_text())
    new = run_case(case)
    old["metadata"].pop("inputs", None)  # the settings' fingerprint may gain fields; the values are compared
    differences = _differences(old, new)
    assert not differences, differences[:10]


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
