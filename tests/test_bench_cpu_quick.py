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


@pytest.mark.skipif(not cpu_backend.is_available(), reason="attnrules._C was not built")
def test_multi_topk_and_interleaved_scripts_write_their_results(tmp_path):
    root = BENCH.parent
    out = tmp_path / "multi.json"
    done = subprocess.run([sys.executable, str(root / "bench_multi_topk.py"), "--quick", "--n", "300", "--features",
                           "20", "--k", "400", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["benchmark"] == "multi_topk" and report["config"]["n"] == 300 and report["native"] is True
    assert report["identical_to_pair_topk"] == "8/8" and len(report["round_ratios"]) == 1
    assert report["multi_topk_s"] > 0 and report["vs_one_single_pass"] > 0 and "load_average" in report["machine"]
    out = tmp_path / "inter.json"
    done = subprocess.run([sys.executable, str(root / "bench_cpu_interleaved.py"), "--n", "200", "--rounds", "2",
                           "--isa", "avx2" if "avx2" in cpu_backend.supported_isas() else "generic", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["rounds"] == 2 and all(len(v) == 2 for v in report["times_s"].values())
    assert report["per_key_vs_global"] > 0 and "load_average" in report["machine"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inter.json", "multi.json"]
