#!/usr/bin/env bash
# Create .venv/ at the repo root and install flatmin with the tested torch pinned
# (constraints.txt), so that no dependency pulls the multi-GB CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[${FLATMIN_EXTRAS:-dev}]"
# Byte-compile flatmin's own sources once (a stale .pyc is ignored): where PYTHONDONTWRITEBYTECODE is set,
# every process (each CLI command, each test subprocess) would otherwise compile them again (~0.2 s).
.venv/bin/python -m compileall -q src > /dev/null
