#!/usr/bin/env bash
# Installs a CUDA 13 toolkit from PyPI wheels (nvcc, cudart, cuBLAS, cuRAND, NVRTC;
# no root, no driver) so that `cargo build --release --features cuda` (candle 0.11,
# cudarc linking the CUDA libraries at build time) compiles and links on any
# x86_64 Linux machine, with or without a GPU. `make build-cuda` runs it.
#
#   scripts/cuda-toolkit.sh [DEST]      DEST defaults to $MELANOFLOW_CUDA_HOME,
#                                       else .tools/cu13 in this checkout
#   source DEST/env.sh                  then build: cargo build --release --features cuda
#
# Idempotent: when DEST already holds this exact toolkit (DEST/.installed matches
# the pinned wheel list and the stub's symbol list) it prints DEST and does
# nothing else. About 1.2 GB on disk; needs python3 with pip, and gcc.
#
# What lands in DEST:
#   env.sh        build environment (CUDA_ROOT, nvcc on PATH, LIBRARY_PATH) plus
#                 MELANOFLOW_CUDA_LIB (the runtime libraries) and
#                 MELANOFLOW_CUDA_STUBS (the stub libcuda, see below)
#   lib/          libcudart.so.13, libcublas(Lt).so.13, libcurand.so.10, libnvrtc.so.13
#   lib/stubs/    libcuda.so(.1): every driver-API entry point cudarc links to,
#                 each returning an error (999, CUDA_ERROR_UNKNOWN). The linker needs
#                 it where no driver is installed; at run time it lets the CUDA
#                 binary start on a machine without a GPU, where melanoflow then
#                 finds no usable GPU (`device = "auto"` falls back to the CPU).
#                 Never put it on LD_LIBRARY_PATH on a GPU machine: the driver's
#                 own libcuda.so.1 must be the one loaded there.
#
# Running the CUDA binary needs the runtime libraries on LD_LIBRARY_PATH:
#   GPU machine:  LD_LIBRARY_PATH=$MELANOFLOW_CUDA_LIB target/release/melanoflow-cuda ...
#   no GPU:       LD_LIBRARY_PATH=$MELANOFLOW_CUDA_STUBS:$MELANOFLOW_CUDA_LIB ...
# The kernels are compiled for compute capability $CUDA_COMPUTE_CAP (default 90:
# H100/H200); set it before building for another GPU (80: A100, 89: L40/RTX 4090).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-${MELANOFLOW_CUDA_HOME:-$root/.tools/cu13}}
symbols="$root/scripts/cuda/libcuda-symbols.txt"

# Pinned: CUDA 13.0 (the toolkit release candle 0.11's kernels and cudarc's
# cuda-13000 bindings are built against). nvidia-cuda-cccl comes in a separate
# folder because its headers (<nv/target>, needed by cuda_fp16.h) are merged into
# the toolkit's include/ below.
pkgs=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-nvrtc==13.0.88
    nvidia-curand==10.4.0.35
    nvidia-cublas==13.0.2.14
)
cccl=nvidia-cuda-cccl==13.0.85

[ -f "$symbols" ] || { echo "error: $symbols is missing" >&2; exit 1; }
stamp="layout 2: ${pkgs[*]} $cccl $(cksum <"$symbols")"
if [ -f "$dest/env.sh" ] && [ "$(cat "$dest/.installed" 2>/dev/null)" = "$stamp" ]; then
    echo "CUDA 13 toolkit already in $dest" >&2
    exit 0
fi

command -v python3 >/dev/null || { echo "error: python3 with pip is needed (the toolkit comes as PyPI wheels)" >&2; exit 1; }
command -v gcc >/dev/null || { echo "error: gcc is needed (to build the stub libcuda.so)" >&2; exit 1; }
[ "$(uname -sm)" = "Linux x86_64" ] || { echo "error: the pinned wheels are for x86_64 Linux, not $(uname -sm)" >&2; exit 1; }

echo "installing the CUDA 13 toolkit from PyPI wheels into $dest (about 1.2 GB)" >&2
mkdir -p "$dest"
# Only what this script writes: DEST may be a folder shared with other things.
(cd "$dest" && rm -rf wheels cccl lib env.sh .installed libcuda_stub.c)
dest=$(cd "$dest" && pwd)
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target "$dest/wheels" "${pkgs[@]}"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target "$dest/cccl" "$cccl"

cu="$dest/wheels/nvidia/cu13"
cp -rn "$dest/cccl/nvidia/cu13/include/"* "$cu/include/"
rm -rf "$dest/cccl"
# Unversioned names for the linker (the wheels ship only the sonames).
(cd "$cu/lib" && for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done && ln -sf libcurand.so.10 libcurand.so)
# nvcc.profile looks for headers and libraries under targets/x86_64-linux.
mkdir -p "$cu/targets/x86_64-linux" "$cu/lib/stubs"
ln -sfn ../../include "$cu/targets/x86_64-linux/include"
ln -sfn ../../lib "$cu/targets/x86_64-linux/lib"

# The stub driver library: one `int f(void) { return 999; }` per symbol.
sed 's/.*/int &(void){return 999;}/' "$symbols" >"$dest/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$dest/libcuda_stub.c"
ln -sf libcuda.so "$cu/lib/stubs/libcuda.so.1"
ln -sfn "$cu/lib" "$dest/lib"

cat >"$dest/env.sh" <<ENV
# CUDA 13 toolkit from PyPI wheels (scripts/cuda-toolkit.sh). Source it before
# \`cargo build --features cuda\`; see the script's header for running the binary.
export CUDA_ROOT=$cu CUDA_HOME=$cu CUDA_PATH=$cu
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export PATH=$cu/bin:\$PATH
export LIBRARY_PATH=$cu/lib:$cu/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}
# candle-kernels compiles its CUDA sources (about 25, mostly GGUF kernels
# melanoflow never calls) with this many nvcc processes; cudaforge's default
# is half the cores, one on a 2-core machine.
export CUDAFORGE_THREADS=\${CUDAFORGE_THREADS:-\$(nproc)}
export MELANOFLOW_CUDA_LIB=$cu/lib
export MELANOFLOW_CUDA_STUBS=$cu/lib/stubs
ENV
printf '%s\n' "$stamp" >"$dest/.installed"
echo "CUDA 13 toolkit in $dest; now: source $dest/env.sh" >&2
