#!/usr/bin/env bash
# Refresh docs/report.png: the planted model's report (both heads: the whole-model view, then head L0H0)
# rendered by headless Chromium, offline, in a throwaway profile. Needs the venv (scripts/setup.sh) and chromium.
# Usage: bash scripts/report_screenshot.sh [OUT_PNG]   (default docs/report.png; 1280 × 2400 pixels)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/report.png}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/attnrules extract --max-rules 64 --exhaustive-k 0 --quiet --out "$work/extract" >/dev/null
.venv/bin/attnrules report "$work/extract" --out "$work/report.html" >/dev/null
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$work/profile" \
    --screenshot="$work/shot.png" --window-size=1280,2400 "file://$work/report.html" 2>/dev/null
mkdir -p "$(dirname "$out")"
mv "$work/shot.png" "$out.tmp" && mv "$out.tmp" "$out"  # atomically
echo "wrote $out"
