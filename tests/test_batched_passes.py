"""Batched, deduplicated and early-stopped forward passes (issue 14) give the old pipeline's results:
every planted case of ``tests/old_path_cases.py`` is compared with the head results saved from the
pipeline before the change (``tests/fixtures/old_path``; written at commit b8dd736)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from old_path_cases import CASES, FIXTURES, run_case  # noqa: E402


def _differences(old, new, where="") -> list[str]:
    """Where ``new`` differs from ``old``; a key that only ``new`` has (a field added since) is ignored."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in old for d in (_differences(old[k], new[k], f"{where}.{k}") if k in new
                                          else [f"{where}.{k}: missing"])]
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
