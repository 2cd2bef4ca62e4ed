#!/usr/bin/env bash
# The one GPU check, ready to run in the few minutes a GPU is lent: on a machine with one CUDA GPU,
# Python 3 with torch, triton, numpy, nanobind, scikit-build-core, cmake and ninja, and this
# repository's files (no network needed), within about 5 minutes it
#   1. builds the package with the machine's own compiler into build/gpu_check/site (offline), and
#      installs the wheels of bench/wheels/ there when that folder exists (bash bench/gpu_wheels.sh);
#   2. runs tests/test_triton_gpu.py with the kernels compiled for this GPU (not the interpreter):
#      default (real) block sizes, shapes that are not multiples of the blocks, every precision;
#   3. reports registers and spills of the kernel compiled for this GPU's architecture;
#   4. runs bench/bench_triton.py (24,576², d 64: global top-10,000, per-key and per-query top-100,
#      dual importance; every precision; cuBLAS GEMM, GEMM + torch.topk materialised and chunked;
#      fractions of the TF32 and FP32 peaks), and its block-shape sweep (--blocks: global and per-key
#      cases at several block_q × block_k, → triton_blocks.json);
#   5. runs bench/bench_pipeline.py --device cuda --quick on one head, when transformer_lens imports
#      (with bench/standins/ for Hugging Face `datasets` when that does not import: see gpu_wheels.sh);
# and writes everything as JSON under bench/results/ (triton.json, triton_gpu_check.json with the GPU
# name, clocks, driver, versions and each step's outcome, triton_gpu_resources.jsonl,
# pipeline_cuda.json). It fails loudly (exit 1) if the build or any GPU test fails; without a GPU it
# exits 2 at once.
#
#   bash bench/gpu_check.sh            # PYTHON=python3 by default; .venv/bin/python when it exists
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU here (nvidia-smi finds none): nothing to check" >&2
  exit 2
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
case "$PYTHON" in  # an absolute path (commands run from another folder); a venv's symlink is kept
  /*) ;;
  */*) PYTHON="$PWD/$PYTHON" ;;
  *) PYTHON=$(command -v "$PYTHON") || { echo "gpu_check: no $PYTHON here" >&2; exit 2; } ;;
esac
START=$(date +%s)
ROOT=$PWD
WORK=$ROOT/build/gpu_check   # Python runs from here, so that the source folder attnrules/ (no _C, no
SITE=$WORK/site              # kernels/ mapping) does not shadow the package built into $SITE
LOGS=$WORK/logs
RESULTS=$ROOT/bench/results
mkdir -p "$SITE" "$LOGS" "$RESULTS"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRITON_INTERPRET=0
STEPS=()   # "name status seconds" for the summary
FAILED=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record; a failure is loud
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "== gpu_check: $name" >&2
  timeout "$limit" bash -c 'cd "$0" && exec "$@"' "$WORK" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  STEPS+=("$name $rc $(( $(date +%s) - t0 ))")
  if [ "$rc" -ne 0 ]; then
    echo "!! gpu_check: step '$name' FAILED (exit $rc; log: $LOGS/$name.log)" >&2
    FAILED=1
  fi
  return "$rc"
}

# 1. Build (C++ core with this machine's cmake/ninja; no index, no build isolation, no dependencies).
if ! step build 240 "$PYTHON" -m pip install --disable-pip-version-check -q --no-index --no-build-isolation \
    --no-deps --upgrade --config-settings=build-dir="$WORK/cmake" --target "$SITE" "$ROOT"; then
  echo "gpu_check: the package did not build; stopping" >&2
  exit 1
fi
if compgen -G "$ROOT/bench/wheels/*.whl" >/dev/null; then
  step wheels 120 "$PYTHON" -m pip install --disable-pip-version-check -q --no-index --no-deps --upgrade \
    --target "$SITE" "$ROOT"/bench/wheels/*.whl
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: nvidia-smi sees a GPU but torch.cuda.is_available() is False" >&2
  exit 2
fi

# 2. The Triton tests, compiled for this GPU (ATTNRULES_REQUIRE_GPU=1: a missing GPU fails, never skips).
ATTNRULES_REQUIRE_GPU=1 step tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" \
  "$ROOT/tests/test_triton_gpu.py"

# 3. Registers and spills of the default configuration for this GPU's architecture.
ARCH=$("$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(p.major * 10 + p.minor)")
step resources 120 bash -c "'$PYTHON' -m attnrules.kernels.resources --arch $ARCH --jobs 8 \
  > '$RESULTS/triton_gpu_resources.jsonl'"

# 4. The kernel benchmark.
step bench_triton 200 "$PYTHON" "$ROOT/bench/bench_triton.py" --out "$RESULTS/triton.json"

# 4b. Block shapes at the default precision (evidence for the plan's defaults).
step blocks 150 "$PYTHON" "$ROOT/bench/bench_triton.py" --blocks --out "$RESULTS/triton_blocks.json"

# 5. One head through the pipeline on the GPU (its options as bench_pipeline.py has them now).
if ! (cd "$WORK" && "$PYTHON" -c "import datasets") >/dev/null 2>&1; then
  export PYTHONPATH="$PYTHONPATH:$ROOT/bench/standins"   # transformer_lens imports it; see its docstring
fi
if TL_ERROR=$(cd "$WORK" && "$PYTHON" -c "import transformer_lens" 2>&1); then
  EXTRA=()
  if (cd "$WORK" && "$PYTHON" "$ROOT/bench/bench_pipeline.py" --help 2>/dev/null) | grep -q -- "--baseline-features"; then
    EXTRA+=(--baseline-features 0)   # the old pipeline needs git history, which does not travel
  fi
  step pipeline 240 "$PYTHON" "$ROOT/bench/bench_pipeline.py" --device cuda --quick ${EXTRA[@]+"${EXTRA[@]}"} \
    --out "$RESULTS/pipeline_cuda.json"
else
  echo "!! gpu_check: bench_pipeline.py not run: transformer_lens does not import here (no wheels in" \
       "bench/wheels/? see bench/gpu_wheels.sh):" >&2
  echo "$TL_ERROR" | tail -5 >&2
  STEPS+=("pipeline not-run 0")
fi

# Summary: GPU, clocks, driver, versions and every step's outcome.
cd "$WORK" && "$PYTHON" - "$RESULTS/triton_gpu_check.json" "$(( $(date +%s) - START ))" "$FAILED" "${STEPS[@]}" <<'EOF'
import json
import sys

from attnrules.benchmark import gpu_machine, write_report

out, seconds, failed, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
report = {"benchmark": "gpu_check", "machine": gpu_machine(), "seconds": seconds, "failed": failed,
          "steps": [dict(zip(("step", "exit", "seconds"), s.split())) for s in steps]}
write_report(out, report)
print(json.dumps(report["steps"]))
EOF
echo "gpu_check: $(( $(date +%s) - START )) s; results in $RESULTS/ (logs in $LOGS/)" >&2
if [ "$FAILED" -ne 0 ]; then
  echo "!! gpu_check: FAILED — see the steps marked FAILED above" >&2
  exit 1
fi
echo "gpu_check: all steps passed" >&2
