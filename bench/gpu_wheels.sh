#!/usr/bin/env bash
# Prepare, here (with network access to PyPI), the wheels that bench/gpu_check.sh installs on a GPU
# machine that has Python 3.12, torch, triton and numpy but no network: everything `import attnrules`
# and bench/bench_pipeline.py import beyond those, as manylinux x86-64 wheels for CPython 3.12, with
# no dependency resolution there (--no-deps both here and there).
#
#   bash bench/gpu_wheels.sh [OUT_DIR]       # default bench/wheels/ (gitignored; never commit wheels)
#
# What to fetch is read from this checkout's .venv: the distributions whose modules are loaded by
# importing what the pipeline benchmark imports (transformer_lens, the GPT-2 conversion of
# transformers, attnrules.pipeline, attnrules.sources.runner), at the versions installed here, minus
# what the GPU machine brings (torch and its dependencies, triton, numpy, nanobind, scikit-build-core,
# cmake, ninja) and test-only packages. The total must stay under the 64 MiB that may travel with the
# repository (repository included): the script prints the sizes and exits 1 when they do not fit
# (ATTNRULES_WHEELS_MIB, default 60). Measured 2026-11-30: about 90 MiB, 52.5 of them pyarrow, which
# transformer_lens needs through `datasets` — so the pipeline benchmark's wheels do not fit, and
# gpu_check.sh records that step as not run unless transformer_lens is installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/wheels}
LIMIT_MIB=${ATTNRULES_WHEELS_MIB:-60}
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_wheels: needs this checkout's .venv (bash scripts/setup.sh)" >&2; exit 2; }
mkdir -p "$OUT"
rm -f "$OUT"/*.whl   # the folder holds exactly this run's wheels (gpu_check.sh installs them all)
SPECS=$(HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" - <<'EOF'
import importlib.metadata as md
import sys

before = {m.split(".")[0] for m in sys.modules}
import attnrules  # noqa: F401  (what bench_triton needs beyond torch, triton and numpy)
import attnrules.pipeline.extract  # noqa: F401
import attnrules.sources.runner  # noqa: F401
import transformer_lens  # noqa: F401
from transformer_lens import HookedTransformer  # noqa: F401
import transformers.models.gpt2.modeling_gpt2  # noqa: F401  (the random GPT-2 the benchmark converts)

loaded = {m.split(".")[0] for m in sys.modules} - before
owners = md.packages_distributions()
on_gpu_machine = {"torch", "triton", "numpy", "nanobind", "scikit-build-core", "cmake", "ninja", "filelock",
                  "typing-extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec",
                  "setuptools", "pip", "wheel"}
test_only = {"pytest", "pluggy", "iniconfig", "pytest-benchmark", "py-cpuinfo", "attnrules"}
# Imported here only because they are installed: transformers and pandas import them when present
# (checked through package metadata), and do without them.
optional = {"scipy", "pillow", "sentencepiece", "truststore"}
names = sorted({d for top in loaded for d in owners.get(top, [])})
for name in names:
    key = name.lower().replace("_", "-")
    if key in on_gpu_machine or key in test_only or key in optional or key.startswith("nvidia-"):
        continue
    print(f"{name}=={md.version(name)}")
EOF
)
echo "gpu_wheels: $(echo "$SPECS" | wc -l) distributions: $(echo $SPECS)"
# shellcheck disable=SC2086  # one argument per spec
"$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$OUT" $SPECS 2>&1 | grep -v "^WARNING: Location" || true
ls -l "$OUT"/*.whl | awk '{printf "%8.1f MiB  %s\n", $5 / 1048576, $9}' | sort -n
TOTAL=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
TOTAL_MIB=$(( (TOTAL + 1048575) / 1048576 ))
echo "gpu_wheels: ${TOTAL_MIB} MiB in $OUT (limit ${LIMIT_MIB} MiB, repository excluded)"
if [ "$TOTAL_MIB" -gt "$LIMIT_MIB" ]; then
  echo "gpu_wheels: too large to travel with the repository: drop the largest wheels above or raise" \
       "ATTNRULES_WHEELS_MIB if the transfer allows it" >&2
  exit 1
fi
