#!/usr/bin/env bash
# The GPU check (issue 13), on a GPU machine with no network, from the bundle
# `make gpu-build` prepares (gpu-bundle/: this script, the stripped CUDA
# binary compressed with xz, input/preprocess (a 128 px shard), input/lite0.safetensors
# (ImageNet weights), and the PyTorch half: gpu_check_torch.py and
# cyclegan_step_torch.py). Needs an NVIDIA driver, bash, and python3 with
# torch (CUDA wheels: their nvidia/*/lib folders supply the CUDA libraries the
# binary links to) and torchvision. Nothing is installed or downloaded.
#
#   gpu-bundle/gpu-check.sh            (from the folder holding gpu-bundle/)
#
# Steps: print the GPU, driver and CUDA versions (nvidia-smi); decompress the
# binary; `melanoflow gpu-check grads` (CPU vs cuda:0: every parameter
# gradient of one CycleGAN, EfficientNet-B0 and Lite0 step, then the weights
# after 3 steps); `melanoflow gpu-check bench` (the paper's shapes in f32,
# tf32, bf16, exporting the weights and probes) and the same steps in
# PyTorch; then one markdown table. Results go to $OUT (the device tool's
# folder) or else gpu-bundle/out/, six files: table.md, grads.json,
# candle.json, torch.json, nvidia-smi.txt and log.txt (everything printed);
# the binary and the exported weights stay in a temporary folder, removed at
# the end. Exits 1 when the gradients do not match
# (after the timings, so the table is still written), 2 when a step could
# not run.
#
# Env: PYTHON (python3), STEPS (5) and WARMUP (2) timed/untimed steps,
# GRAD_ARGS / BENCH_ARGS / TORCH_ARGS extra arguments for the two melanoflow
# commands and the PyTorch script (the CPU smoke test shrinks every shape with
# them; DEVICE=cpu runs both sides on the CPU, without nvidia-smi).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bundle=$here
[ -f "$bundle/melanoflow-cuda.xz" ] || bundle=$(cd "$here/.." && pwd)/gpu-bundle
out=${OUT:-$bundle/out}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
exec > >(tee "$out/log.txt") 2>&1
PY=${PYTHON:-python3}
steps=${STEPS:-5}
device=${DEVICE:-cuda}
warmup=${WARMUP:-2}
t_start=$SECONDS
say() { echo "gpu-check [$((SECONDS - t_start)) s]: $*" >&2; }
die() { say "ERROR: $*"; exit 2; }

[ -f "$bundle/melanoflow-cuda.xz" ] || die "no $bundle/melanoflow-cuda.xz: run make gpu-build on a build machine and carry gpu-bundle"

# 1. The machine.
if [ "$device" = cpu ]; then
    echo "DEVICE=cpu: no GPU used (a smoke test of this script)" >"$out/nvidia-smi.txt"
else {
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
    nvidia-smi | grep -m1 'CUDA Version'
} >"$out/nvidia-smi.txt" 2>&1 || die "nvidia-smi failed: $(cat "$out/nvidia-smi.txt")"
fi
cat "$out/nvidia-smi.txt" >&2

# 2. The CUDA libraries of the installed torch wheels.
site=$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))') \
    || die "$PY cannot import torch (set PYTHON to a python with torch)"
"$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "CUDA", torch.version.cuda, "torchvision", torchvision.__version__, "GPU available:", torch.cuda.is_available())' >&2 \
    || die "$PY cannot import torchvision"
libs=$(ls -d "$site"/nvidia/*/lib 2>/dev/null | paste -sd:)
[ -n "$libs" ] || die "no CUDA libraries under $site/nvidia/*/lib (torch without CUDA wheels?)"
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# 3. The binary (MELANOFLOW_BIN: another one, e.g. the CPU build for DEVICE=cpu).
bin=$work/melanoflow-cuda
if [ -n "${MELANOFLOW_BIN:-}" ]; then
    cp "$MELANOFLOW_BIN" "$bin" || die "cannot copy $MELANOFLOW_BIN"
elif command -v xz >/dev/null; then
    xz -dc "$bundle/melanoflow-cuda.xz" >"$bin" || die "xz -d failed"
else
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$bundle/melanoflow-cuda.xz" "$bin" || die "decompressing with python's lzma failed"
fi
chmod +x "$bin"
missing=$(ldd "$bin" | grep 'not found')
[ -z "$missing" ] || die "libraries not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH): $missing"
say "binary ready; CUDA libraries from $site/nvidia"

# 4. Gradients: CPU vs GPU.
device_rs=$device
[ "$device" = cuda ] && device_rs=cuda:0
# shellcheck disable=SC2086
timeout 300 "$bin" gpu-check grads --data "$bundle/input/preprocess" \
    --weights "$bundle/input/lite0.safetensors" --reference cpu --device "$device_rs" \
    --json "$out/grads.json" ${GRAD_ARGS:-}
grads_rc=$?
say "gradient check exit code $grads_rc"

# 5. Timings: candle (exporting weights and probes), then PyTorch.
# shellcheck disable=SC2086
timeout 240 "$bin" gpu-check bench --device "$device_rs" --warmup "$warmup" --steps "$steps" \
    --weights "$bundle/input/lite0.safetensors" --export "$work/weights" \
    --json "$out/candle.json" ${BENCH_ARGS:-}
candle_rc=$?
say "candle timings exit code $candle_rc"
timeout 180 "$PY" "$bundle/gpu_check_torch.py" bench --device "$device" --warmup "$warmup" --steps "$steps" \
    --weights-dir "$work/weights" --json "$out/torch.json" ${TORCH_ARGS:-}
torch_rc=$?
say "PyTorch timings exit code $torch_rc"

# 6. The table.
[ -f "$out/candle.json" ] || echo '{"rows": []}' >"$out/candle.json"
[ -f "$out/torch.json" ] || echo '{"rows": []}' >"$out/torch.json"
grads_opt=()
[ -f "$out/grads.json" ] && grads_opt=(--grads "$out/grads.json")
{
    echo "# GPU check"
    echo
    sed 's/^/    /' "$out/nvidia-smi.txt"
    echo
    "$PY" "$bundle/gpu_check_torch.py" table --candle "$out/candle.json" --torch "$out/torch.json" "${grads_opt[@]}"
} >"$out/table.md" || die "writing the table failed"
cat "$out/table.md"
say "done: $out/table.md"

if [ "$grads_rc" = 1 ]; then
    say "FAILED: CPU and GPU gradients or weights differ (see $out/grads.json)"
    exit 1
fi
[ "$grads_rc" = 0 ] && [ "$candle_rc" = 0 ] && [ "$torch_rc" = 0 ] || exit 2
