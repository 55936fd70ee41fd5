#!/usr/bin/env bash
# Create .venv/ at the repo root and install flatmin with the tested torch pinned
# (constraints.txt), so that no dependency pulls the multi-GB CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[${FLATMIN_EXTRAS:-dev}]"
