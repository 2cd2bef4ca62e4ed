"""What of the prepared GPU check can be checked without a GPU: its scripts parse, it exits 2 at once
without a GPU, the benchmark script's GPU-less paths, and that the engine imports without the
pipeline's heavy dependencies (the GPU machine has torch, triton and numpy, not transformer_lens)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "bench" / "gpu_check.sh", ROOT / "bench" / "gpu_wheels.sh"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        done = subprocess.run(["shellcheck", "-S", "warning", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


def test_gpu_check_exits_2_at_once_without_a_gpu(tmp_path):
    # A stand-in nvidia-smi that finds no GPU, whatever this machine has.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    fake.chmod(0o755)
    results = sorted((ROOT / "bench" / "results").glob("*"))
    t = time.perf_counter()
    done = subprocess.run(["bash", str(SCRIPTS[0])], capture_output=True, text=True,
                          env=_env(PATH=f"{tmp_path}:{os.environ['PATH']}"))
    assert done.returncode == 2, done.stderr
    assert "no CUDA GPU here" in done.stderr
    assert time.perf_counter() - t < 5
    assert sorted((ROOT / "bench" / "results").glob("*")) == results  # nothing written


def test_bench_triton_exits_2_without_a_gpu(tmp_path):
    out = tmp_path / "triton.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_triton.py"), "--out", str(out)],
                          capture_output=True, text=True, env=_env(CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 2 and "no CUDA GPU here" in done.stderr
    assert not out.exists()


@pytest.mark.interpreter
def test_bench_triton_dry_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "triton.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_triton.py"), "--dry-run", "--n", "32",
                           "--precision", "tf32", "--precision", "ieee", "--out", str(out)],
                          capture_output=True, text=True, env=_env(TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["precisions"] == ["tf32", "ieee"]
    providers = {r["provider"] for r in report["rows"]}
    assert providers == {"triton-tf32", "triton-ieee", "cublas-gemm-tf32", "cublas-gemm-fp32",
                         "torch-materialised-tf32", "torch-chunked-tf32"}
    assert len(report["rows"]) == 4 * len(providers)
    triton_rows = [r for r in report["rows"] if r["provider"].startswith("triton")]
    assert all(r["equals_fp32_answer"] for r in triton_rows)
    assert all(r["max_abs_score_diff_vs_materialised_fp32"] < 1e-4 for r in triton_rows)
    assert set(report["goals"]) >= {"global_time_vs_tf32_gemm", "global_speedup_vs_materialised"}


def test_engine_and_benchmark_import_without_the_pipeline_stack():
    # The GPU machine has torch, triton and numpy (and, carried as a wheel, pandas, which
    # `import attnrules` needs); transformer_lens, sae_lens, transformers and datasets must not be needed.
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"transformer_lens", "sae_lens", "transformers", "datasets", "scipy", "faiss"}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import attnrules, attnrules.benchmark, attnrules.engine.triton_backend, attnrules.kernels.pair_topk
import attnrules.kernels.dual_topk, attnrules.kernels.plan
print("imported")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(TRITON_INTERPRET="1"))
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-3000:]


@pytest.mark.interpreter
def test_block_sweep_records_times_answers_and_refused_shapes(monkeypatch):
    from attnrules import benchmark

    # (16, 24) is no power of two: the backend refuses it, and the sweep records that instead of stopping.
    monkeypatch.setattr(benchmark, "BLOCK_SWEEP", {"global": [(16, 32), (16, 24)], "key": [(32, 16)]})
    report = benchmark.run_gpu_block_sweep(dry_run=True)
    rows = {(r["by"], r["block_q"], r["block_k"]): r for r in report["rows"]}
    assert set(rows) == {("global", 16, 32), ("global", 16, 24), ("key", 32, 16)}
    for key in (("global", 16, 32), ("key", 32, 16)):
        assert rows[key]["equals_default_answer"] is True and rows[key]["median_ms"] > 0
    assert "block_k must be a power of two" in rows[("global", 16, 24)]["error"]
