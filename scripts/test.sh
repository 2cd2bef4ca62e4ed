#!/usr/bin/env bash
# Set up the environment, then run the default test suite (no network, no GPU needed).
# Extra arguments go to pytest, e.g. scripts/test.sh -k engine
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Once per run, install the package as a user would (a wheel) and import it from outside the tree.
bash scripts/check_install.sh
# tests/test_report.py opens the HTML report in headless Chromium (Debian's package); install it if missing.
export DEBIAN_FRONTEND=noninteractive
command -v chromium >/dev/null || (apt-get install -y chromium || (apt-get update && apt-get install -y chromium)) \
    || echo "warning: could not install chromium with apt-get; tests/test_report.py will skip its browser check" >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# pytest exit code 5 means "no tests ran": that is a failure here, as any other non-zero code.
.venv/bin/pytest tests "$@"
