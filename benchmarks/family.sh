#!/usr/bin/env bash
# The family benchmark (docs/family.md): every rule on MNIST-1D (cnn1d, 60 epochs) and digits (mlp, 30
# epochs), each radius tuned on validation over seeds 0-1 from a grid that brackets its authors' value,
# then 5 seeds, paired statistics with Holm against ERM (and, re-rendered, against SAM).
#   bash benchmarks/family.sh [OUT_ROOT]        # resumable: a re-run trains only what is missing
# Prints each data set's wall time and the total. Needs the data extra (mnist1d, scikit-learn).
set -euo pipefail
OUT=${1:-runs/family}
FLATMIN=${FLATMIN:-flatmin}
M=erm,amp,amp:variant=onepass,sam,asam,asam:eta=0.01,weights_only=true,gsam,gsam:rho_min=0.01,fsam,looksam
M=$M,wsam,bsam,esam,esam:esam_gamma=1.0,msam,sam:sam_splits=4,interval_sam,vasso,lookbehind,rwp
start=$(date +%s)
for ds in mnist1d digits; do
  t0=$(date +%s); mkdir -p "$OUT/$ds"
  $FLATMIN compare --dataset $ds --methods "$M" --seeds 5 --tune-seeds 2 --quiet --out "$OUT/$ds" \
    --tune rho=0.01,0.05,0.1,0.2,0.5 --tune asam:rho=0.1,0.2,0.5,1,2 --tune msam:rho=0.1,0.3,1,3 \
    --tune epsilon=0.05,0.1,0.2,0.5 --tune looksam_alpha=0.1,0.7 --tune rwp_sigma=0.005,0.01,0.02,0.05 \
    > "$OUT/$ds/vs_erm.txt"
  cat "$OUT/$ds/vs_erm.txt"
  # the same store re-rendered against SAM (no training; its summary files replace the ones vs ERM)
  $FLATMIN compare --dataset $ds --methods "$M" --seeds 5 --tune-seeds 2 --quiet --out "$OUT/$ds" \
    --tune rho=0.01,0.05,0.1,0.2,0.5 --tune asam:rho=0.1,0.2,0.5,1,2 --tune msam:rho=0.1,0.3,1,3 \
    --tune epsilon=0.05,0.1,0.2,0.5 --tune looksam_alpha=0.1,0.7 --tune rwp_sigma=0.005,0.01,0.02,0.05 \
    --baseline sam --cost-epochs 0 --no-figures > "$OUT/$ds/vs_sam.txt"
  echo "$ds: wall time $(( $(date +%s) - t0 )) s"
done
echo "family benchmark: wall time $(( $(date +%s) - start )) s"
