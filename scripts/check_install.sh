#!/usr/bin/env bash
# Install attnrules as a user would (a built wheel, not the editable checkout) into a scratch folder and
# import it from outside the source tree: the C++ core, the Triton kernels and the public API must load.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
.venv/bin/python -m pip --disable-pip-version-check -q wheel --no-deps --no-build-isolation . -w "$SCRATCH/wheel" \
  2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip --disable-pip-version-check -q install --no-deps --target "$SCRATCH/site" "$SCRATCH"/wheel/attnrules-*.whl \
  2>&1 | grep -v "^WARNING: Location" || true
# A scratch interpreter that sees the wheel first and the project's dependencies from .venv, but not
# .venv's own site hooks (the editable install would redirect `import attnrules` to the checkout).
"$ROOT/.venv/bin/python" -m venv --without-pip "$SCRATCH/venv"
DEPS=$("$ROOT/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
SITE=$("$SCRATCH/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
printf '%s\n%s\n' "$SCRATCH/site" "$DEPS" > "$SITE/attnrules-check.pth"
(cd / && "$SCRATCH/venv/bin/python" - "$SCRATCH/site" <<'PY'
import sys
import attnrules, attnrules._C, attnrules.kernels
site = sys.argv[1]
assert attnrules.__file__.startswith(site), f"imported {attnrules.__file__}, not the installed wheel in {site}"
assert callable(attnrules.extract_head) and attnrules.load_results is not None
print(f"installed wheel imports from {site}: attnrules._C, attnrules.kernels, the public API")
PY
)
