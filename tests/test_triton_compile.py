"""The streaming kernel compiled for sm_90 (H100/H200) and sm_80 (A100) without a GPU.

Triton compiles for any target; the ptxas that ships inside the triton wheel assembles the PTX and
reports registers and spills (``attnrules.kernels.resources``). At the default configuration of
every benchmark case at the default precision the kernel must not spill: spilled registers go to
local memory, which costs far more than the arithmetic of a tile. Run in a subprocess, because the test session imports the
kernels for Triton's interpreter (TRITON_INTERPRET=1), which compiles nothing.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _ptxas_runs() -> bool:
    code = "import subprocess, triton; subprocess.run([triton.knobs.nvidia.ptxas.path, '--version'], check=True)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=env).returncode == 0


@pytest.fixture(scope="module")
def reports():
    if not _ptxas_runs():
        pytest.skip("the ptxas shipped with triton does not run on this machine")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "attnrules.kernels.resources", "--arch", "90", "80", "--jobs", "2"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_every_case_compiles_for_sm90_and_sm80(reports):
    from attnrules.kernels.resources import CASES

    assert {(r["name"], r["arch"]) for r in reports} == {(c.name, a) for c in CASES for a in (90, 80)}
    assert all(0 < r["registers"] <= 255 for r in reports)


def test_no_register_spills_at_the_default_configuration(reports):
    # The default precision's cases; fp32-only ("ieee") is compiled and reported (docs/engine.md) too.
    from attnrules.kernels.plan import DEFAULT_PRECISION

    spilled = [(r["name"], r["arch"], r["registers"], r["spill_stores"]) for r in reports
               if r["precision"] == DEFAULT_PRECISION and (r["spill_stores"] or r["spill_loads"])]
    assert len([r for r in reports if r["precision"] == DEFAULT_PRECISION]) == 6
    assert not spilled, f"register spills (case, arch, registers, spill-store bytes): {spilled}"
