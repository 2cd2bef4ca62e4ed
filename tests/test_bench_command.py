"""`attnrules bench` runs end to end on tiny shapes: its table, its JSON and its errors (never its speed)."""
import json
import math
import subprocess
import sys

import pytest
import torch

from attnrules.benchmark import CASES
from attnrules.cli import main
from attnrules.engine import cpu_backend

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(), reason="attnrules._C was not built")
NO_GPU = not torch.cuda.is_available()


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_bench_prints_the_table_and_writes_the_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "attnrules.cli", "bench", "--quick", "--size", "64", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "quick run: 64 × 64 pairs" in text and "not the full-size ones" in text
    assert "sgemm peak" in text and "| case | provider | median s | GFLOP/s | % sgemm peak | × vs cpu |" in text
    assert f"wrote {out}" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {r[0].strip() for r in rows} == set(CASES)
    for r in rows:
        float(r[2]), float(r[3]), float(r[4].strip().rstrip("%")), float(r[5])

    report = json.loads(out.read_text())
    assert report["benchmark"] == "attnrules bench" and report["quick"] is True
    assert report["command"].startswith("attnrules bench --quick")
    cpu = report["cpu"]
    assert number(cpu["sgemm_peak_gflops"]) and cpu["sgemm_peak_gflops"] > 0
    assert cpu["config"]["n"] == 64 and cpu["config"]["repeats"] == 1
    assert {"cpu_model", "physical_cores", "isa", "versions"} <= set(cpu["machine"])
    assert [c["case"] for c in cpu["cases"]] == list(CASES)
    for case in cpu["cases"]:
        assert number(case["gemm_at_peak_s"]) and number(case["cpu_vs_gemm_at_peak"])
        assert {"cpu", "gemm", "torch", "torch_chunked"} <= set(case["results"])
        for r in case["results"].values():
            for key in ("median_s", "gflops", "fraction_of_peak", "time_vs_cpu"):
                assert number(r[key]), key
    # the engine's goals, measured side by side in the same run
    inter = cpu["interleaved"]
    assert inter["rounds"] >= 3 and number(inter["per_key_vs_global"]) and number(inter["per_query_vs_global"])
    assert all(len(v) == inter["rounds"] for v in inter["times_s"].values())
    assert "side by side (3 rounds, medians): per-key top-20 ÷ global" in text
    if "avx2" in cpu_backend.supported_isas():
        avx2 = cpu["avx2"]
        assert number(avx2["sgemm_avx2_peak_gflops"]) and avx2["avx2_env"]["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
        assert number(avx2["avx2_fraction_of_avx2_sgemm_peak"]) and number(avx2["gflops"]["avx2"])
        assert "AVX2 kernel, global case:" in text and "of the AVX2-only sgemm peak" in text
    multi = cpu["multi_topk"]
    assert multi["config"]["n_features"] == 64 and multi["identical_to_pair_topk"] == "8/8"
    assert number(multi["vs_one_single_pass"]) and number(multi["multi_topk_s"])
    assert "multi_topk: 64 features × global top-500 of 1,024² pairs in" in text
    assert report["gpu"] is None  # --device cpu: the GPU benchmark is not asked for
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"], "written atomically, nothing else"


@pytest.mark.skipif(not NO_GPU, reason="a CUDA GPU is present")
def test_without_a_gpu_auto_skips_it_and_cuda_is_an_error(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["bench", "--quick", "--size", "32", "--cases", "global", "--providers", "cpu", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "GPU: skipped (no CUDA GPU here)" in stdout
    report = json.loads(out.read_text())
    assert report["gpu"] == {"skipped": "no CUDA GPU here"}
    assert list(report["cpu"]["cases"][0]["results"]) == ["cpu"]

    assert main(["bench", "--device", "cuda", "--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnrules bench: error: argument --device: cuda: no CUDA GPU here") and "Traceback" not in err
    assert not (tmp_path / "c.json").exists()


def test_isolated_measurements_run_in_their_own_process(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["bench", "--quick", "--size", "32", "--device", "cpu", "--cases", "per_key", "--providers", "cpu,torch",
            "--isolated", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())["cpu"]["cases"][0]["results"]
    assert set(results) == {"cpu", "torch"} and all(number(r["median_s"]) for r in results.values())


@pytest.mark.parametrize("argv,message", [
    (["--cases", "global,nope"], "argument --cases: expected a comma list of global, per_key, per_query, dual"),
    (["--providers", "gpu"], "argument --providers: expected a comma list of cpu, gemm, torch"),
    (["--size", "1"], "argument --size: expected an int ≥ 2"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"attnrules bench: error: {message}" in err


def test_out_that_is_a_folder_is_an_error(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 2
    assert "attnrules bench: error: argument --out:" in capsys.readouterr().err
