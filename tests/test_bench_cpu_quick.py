"""The CPU engine benchmark script runs end to end on tiny shapes and writes the JSON it promises."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from attnrules.engine import cpu_backend

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_cpu_engine.py"


@pytest.mark.skipif(not cpu_backend.is_available(), reason="attnrules._C was not built")
def test_quick_benchmark_writes_its_results(tmp_path):
    out = tmp_path / "cpu_engine.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--inline", "--n", "200", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| case | provider |" in done.stdout
    report = json.loads(out.read_text())
    assert report["sgemm_peak_gflops"] > 0
    assert {"cpu_model", "physical_cores", "versions", "isa"} <= set(report["machine"])
    assert [c["case"] for c in report["cases"]] == ["global", "per_key", "per_query", "dual"]
    for case in report["cases"]:
        assert case["gemm_at_peak_s"] > 0 and case["cpu_vs_gemm_at_peak"] > 0
        assert {"cpu", "gemm", "torch", "torch_chunked"} <= set(case["results"])
        for r in case["results"].values():
            assert {"median_s", "gflops", "fraction_of_peak", "time_vs_cpu", "peak_rss_over_inputs_mib"} <= set(r)
    assert "faiss" in report["cases"][2]["results"]
    assert list(tmp_path.iterdir()) == [out], "the results file is written atomically, no temporary left"
