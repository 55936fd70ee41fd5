#!/usr/bin/env sh
# The authors' optimizers that tests/test_authors_forms.py runs beside flatmin's, read at pinned commits
# into a folder of your choice (nothing of theirs is copied into flatmin; each file keeps its licence,
# written beside it). Then:  FLATMIN_AUTHORS_CODE=DIR pytest tests/test_authors_forms.py
#
#   SamsungLabs/ASAM               asam.py                      Apache-2.0
#   MarlonBecker/MSAM              optimizer/msam.py, adamW_msam.py   GPL-3.0
#   intelligent-machine-learning/atorch  atorch/optimizers/wsam.py    Apache-2.0 (dlrover's atorch until 2024)
#
# Usage: scripts/fetch_authors_code.sh DIR   (FLATMIN_GIT_BASE: where the repositories are, default GitHub)
set -eu
dest=${1:?usage: scripts/fetch_authors_code.sh DIR}
base=${FLATMIN_GIT_BASE:-https://github.com}
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fetch() {  # repository, commit, then pairs of (path in it, file name in DIR)
  repo=$1 commit=$2
  shift 2
  clone="$tmp/$(echo "$repo" | tr / +)"
  git clone --quiet --bare --filter=blob:none "$base/$repo" "$clone" 2>/dev/null \
    || git clone --quiet --bare "$base/$repo" "$clone"
  while [ $# -gt 1 ]; do
    git --git-dir="$clone" show "$commit:$1" > "$dest/$2"
    shift 2
  done
  echo "$repo @ $commit -> $dest"
}

fetch SamsungLabs/ASAM f156a680171db16d551c0d85cba2514fa3bff6a2 \
  asam.py asam.py LICENSE LICENSE.asam
fetch MarlonBecker/MSAM 780fa4f623fe0c99760fd7cfb1a94d14f00179ee \
  optimizer/msam.py msam.py optimizer/adamW_msam.py adamW_msam.py LICENSE LICENSE.msam
fetch intelligent-machine-learning/atorch 7fb7da86be5794c57440db5b96f3278c158f0c7a \
  atorch/optimizers/wsam.py wsam.py LICENSE LICENSE.wsam
