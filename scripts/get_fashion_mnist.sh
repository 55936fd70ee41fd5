#!/usr/bin/env bash
# Make the real Fashion-MNIST available from Debian's `dataset-fashion-mnist` package (gzip IDX
# files, 31 MB). As root: apt-get install, which puts them in /usr/share/datasets/fashion-mnist,
# where flatmin looks after its data dir. Without root (or with FLATMIN_APT_DOWNLOAD=1):
# apt-get download + dpkg -x, and the four files are copied into flatmin's data dir
# ($FLATMIN_DATA, else the user cache). Without apt: say how to download from the mirror instead.
# Exits non-zero when it could not make the files present, so CI cannot silently skip the
# real-data tests; the README's main job (MNIST-1D) never calls it.
set -euo pipefail
PKG=dataset-fashion-mnist
IN_DEB=usr/share/datasets/fashion-mnist  # where the package puts the files
SYS=/$IN_DEB
DATA=${FLATMIN_DATA:-${FLATMIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flatmin}/data}/fashion-mnist
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

present() { for f in $FILES; do [ -f "$1/$f" ] || return 1; done; }

if present "$SYS" || present "$DATA"; then
    echo "Fashion-MNIST already present ($(present "$DATA" && echo "$DATA" || echo "$SYS"))"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "no apt-get here: get Fashion-MNIST with 'flatmin train --dataset fashion-mnist --download'" \
         "(needs the network) or put its four .gz files in $DATA" >&2
    exit 1
fi
if [ "$(id -u)" = 0 ] && [ -z "${FLATMIN_APT_DOWNLOAD:-}" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PKG" >/dev/null
    present "$SYS" && { echo "installed $PKG: $SYS"; exit 0; }
else
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download "$PKG" >/dev/null)
    dpkg -x "$tmp"/"$PKG"_*.deb "$tmp/root"
    mkdir -p "$DATA"
    for f in $FILES; do cp "$tmp/root/$IN_DEB/$f" "$DATA/$f"; done
    present "$DATA" && { echo "extracted $PKG into $DATA"; exit 0; }
fi
echo "could not make Fashion-MNIST present" >&2
exit 1
