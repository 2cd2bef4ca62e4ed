#!/usr/bin/env bash
# Prepare, here (with network access to PyPI), the wheels that bench/gpu_check.sh installs on a GPU
# machine that has Python 3.12, torch, triton and numpy but no network: manylinux x86-64 (or pure)
# wheels for CPython 3.12, with no dependency resolution there (--no-deps both here and there).
#
#   bash bench/gpu_wheels.sh [OUT_DIR]       # default bench/wheels/ (gitignored; never commit wheels)
#
# What to fetch is read from this checkout's .venv, at the versions installed here, in two sets:
# - core: the distributions `import attnrules` loads (bench_triton.py and the GPU tests need them;
#   measured 2026-11-30: pandas, python-dateutil, tqdm, dill, cloudpickle) and the test runner
#   (pytest, pluggy, iniconfig, packaging, pygments): about 14 MiB;
# - pipeline: what bench/bench_pipeline.py loads on top (transformer_lens, the GPT-2 conversion of
#   transformers, attnrules.pipeline), with Hugging Face `datasets` replaced by the stand-in in
#   bench/standins/ (transformer_lens imports it; the real one needs pyarrow, ≈ 53 MiB alone, which
#   does not fit; the benchmark loads no dataset): about 25 MiB.
# Both leave out what the GPU machine brings (torch and its dependencies, triton, numpy, nanobind,
# scikit-build-core, cmake, ninja), test-only packages, and packages that transformers and pandas
# import only when installed (scipy, pillow, sentencepiece; pyarrow for pandas). Everything that
# travels must fit in 64 MiB with the repository (ATTNRULES_WHEELS_MIB, default 60): the core set
# always goes to OUT_DIR (exit 1 if even it does not fit); the pipeline set only when both fit —
# otherwise the script says so, and gpu_check.sh records bench_pipeline.py as not run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/wheels}
LIMIT_MIB=${ATTNRULES_WHEELS_MIB:-60}
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_wheels: needs this checkout's .venv (bash scripts/setup.sh)" >&2; exit 2; }
mkdir -p "$OUT"
rm -f "$OUT"/*.whl   # the folder holds exactly this run's wheels (gpu_check.sh installs them all)
SCAN=$(mktemp)
TRY=$(mktemp -d)
trap 'rm -rf "$SCAN" "$TRY"' EXIT
cat > "$SCAN" <<'PYEOF'
import importlib.metadata as md
import sys

owners = md.packages_distributions()
on_gpu_machine = {"torch", "triton", "numpy", "nanobind", "scikit-build-core", "cmake", "ninja", "filelock",
                  "typing-extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec",
                  "setuptools", "pip", "wheel"}
test_only = {"pytest-benchmark", "py-cpuinfo", "attnrules"}
optional = {"scipy", "pillow", "sentencepiece", "pyarrow"}


def loaded_by(imports) -> set:
    before = {m.split(".")[0] for m in sys.modules}
    imports()
    tops = {m.split(".")[0] for m in sys.modules} - before
    names = {d for top in tops for d in owners.get(top, [])}
    return {n for n in names if n.lower().replace("_", "-") not in on_gpu_machine | test_only
            and n.lower() not in optional and not n.lower().startswith("nvidia-")}


def core():
    import attnrules  # noqa: F401
    import attnrules.benchmark  # noqa: F401


def pipeline():
    sys.path.insert(0, "bench/standins")  # `datasets` as gpu_check.sh provides it there
    import attnrules.pipeline.extract  # noqa: F401
    import attnrules.sources.runner  # noqa: F401
    import transformer_lens  # noqa: F401
    from transformer_lens import HookedTransformer  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401


def test_runner() -> set:
    """pytest and what it requires on CPython 3.12 / Linux (gpu_check.sh runs the GPU tests with it)."""
    from packaging.requirements import Requirement

    env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "extra": ""}
    names = {"pytest"}
    for text in md.requires("pytest") or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            names.add(req.name)
    return {md.metadata(n)["Name"] for n in names}


first = loaded_by(core) | test_runner()
second = loaded_by(pipeline) - first - {"datasets"}
for kind, names in (("core", first), ("pipeline", second)):
    for name in sorted(names):
        print(kind, f"{name}=={md.version(name)}")
PYEOF
SPECS=$(HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" "$SCAN")

download() {  # download DIR SPEC...
  local dir=$1
  shift
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d "$dir" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
mib() { du -cb "$1"/*.whl 2>/dev/null | tail -1 | awk '{print int(($1 + 1048575) / 1048576)}'; }

mapfile -t CORE < <(echo "$SPECS" | awk '$1 == "core" {print $2}')
mapfile -t PIPELINE < <(echo "$SPECS" | awk '$1 == "pipeline" {print $2}')
echo "gpu_wheels: core (import attnrules): ${CORE[*]}"
download "$OUT" "${CORE[@]}"
CORE_MIB=$(mib "$OUT")
echo "gpu_wheels: pipeline (bench_pipeline.py): ${PIPELINE[*]}"
download "$TRY" "${PIPELINE[@]}"
PIPE_MIB=$(mib "$TRY")
ls -l "$OUT"/*.whl "$TRY"/*.whl | awk '{printf "%8.1f MiB  %s\n", $5 / 1048576, $9}' | sort -n
echo "gpu_wheels: core ${CORE_MIB} MiB, pipeline ${PIPE_MIB} MiB (limit ${LIMIT_MIB} MiB, repository excluded)"
if [ "$CORE_MIB" -gt "$LIMIT_MIB" ]; then
  echo "!! gpu_wheels: the core wheels alone exceed ${LIMIT_MIB} MiB" >&2
  exit 1
fi
if [ $((CORE_MIB + PIPE_MIB)) -le "$LIMIT_MIB" ]; then
  mv "$TRY"/*.whl "$OUT"/
  echo "gpu_wheels: $OUT holds the core and pipeline wheels ($(mib "$OUT") MiB)"
else
  echo "!! gpu_wheels: the pipeline wheels do not fit beside the core ones in ${LIMIT_MIB} MiB: $OUT holds" \
       "the core wheels only (${CORE_MIB} MiB), and gpu_check.sh will not run bench_pipeline.py" >&2
fi
