#!/usr/bin/env bash
# Wall time of the README's main job (`flatmin compare`, no arguments), start to exit, N times back to back
# into fresh folders, then the median: the issue-25 target (<= 60 s on the project's idle 2-core machine).
# Run it with nothing else on the machine; the numbers are the machine's, not a promise for another.
#   bash benchmarks/compare_wall.sh [N=3]          (FLATMIN=... to time another install)
set -euo pipefail
N=${1:-3}
FLATMIN=${FLATMIN:-flatmin}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ms=()
for i in $(seq "$N"); do
  t0=$(date +%s%N)
  $FLATMIN compare --out "$tmp/run$i" > "$tmp/log$i"
  ms+=($(( ($(date +%s%N) - t0) / 1000000 )))
  echo "run $i: $(( ms[-1] / 1000 )).$(( ms[-1] % 1000 / 100 )) s wall"
done
sorted=($(printf '%s\n' "${ms[@]}" | sort -n))
mid=${sorted[$(( (N - 1) / 2 ))]}
echo "median of $N: $(( mid / 1000 )).$(( mid % 1000 / 100 )) s (range $(( sorted[0] / 1000 )).$(( sorted[0] % 1000 / 100 ))-$(( sorted[-1] / 1000 )).$(( sorted[-1] % 1000 / 100 )) s)"
