#!/usr/bin/env bash
# CycleGAN training step time: candle (this project) vs PyTorch on CPU, same
# architecture, same input size, same thread count, in the same run.
# Rows: the default preset (64 px, ngf 16, 3 blocks, batch 4) and the paper's
# architecture at 128 px, batch 1. PyTorch comes from pip into
# benches/.venv-torch; if that fails the table says so and shows candle alone.
# Report: stdout and benches/out/cyclegan.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
. benches/lib.sh
OUT=$ROOT/benches/out
mkdir -p "$OUT"
cargo build --release --example cyclegan_step 2>&1 | tail -1
RUST=$ROOT/target/release/examples/cyclegan_step
THREADS=$(nproc)
PY=$ROOT/$BENCH_VENV_TORCH/bin/python
HAVE_TORCH=0; pip_peer "$ROOT/$BENCH_VENV_TORCH" "import torch" torch && HAVE_TORCH=1

row() {  # label size ngf ndf blocks batch steps
  local label=$1; shift
  local args="--size $1 --ngf $2 --ndf $3 --blocks $4 --batch $5 --steps $6 --warmup 1"
  local c t
  c=$(RAYON_NUM_THREADS=$THREADS "$RUST" $args | python3 -c "import json,sys; print(json.loads(sys.stdin.read())['ms_per_step'])")
  if [ $HAVE_TORCH = 1 ]; then
    t=$("$PY" "$ROOT/benches/cyclegan_step_torch.py" $args --threads "$THREADS" | tail -1 | python3 -c "import json,sys; print(json.loads(sys.stdin.read())['ms_per_step'])")
    echo "| $label | $c | $t | $(python3 -c "print(f'{$c / $t:.1f}x')") |"
  else
    echo "| $label | $c | n/a | n/a |"
  fi
}

{
  echo "## CycleGAN training step, ms (median), $THREADS threads, $(cpu_model)"
  echo
  echo "| configuration | candle | PyTorch | candle / PyTorch |"
  echo "|---|---|---|---|"
  row "default preset: 64 px, ngf 8, 2 blocks, batch 4" 64 8 8 2 4 5
  row "paper architecture: 128 px, ngf 64, 9 blocks, batch 1" 128 64 64 9 1 3
  [ $HAVE_TORCH = 1 ] && echo "(PyTorch $("$PY" -c 'import torch; print(torch.__version__)'))" || echo "(PyTorch could not be installed with pip: baseline not measured)"
} | tee "$OUT/cyclegan.md"
