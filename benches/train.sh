#!/usr/bin/env bash
# Training speed on CPU: candle before (melanoflow's fast kernels switched off,
# candle's own ops), candle after (switch on) and PyTorch, same thread count,
# same architecture, same input, in one run. Rows:
#   1. CycleGAN training step (2 G + 2 D, forward + backward + Adam), 128 px,
#      ngf 64, 9 blocks, ndf 64, batch 1          (example cyclegan_step)
#   2. one ResNet generator, 128 px, ngf 64, 9 blocks: forward, backward
#   3. EfficientNet-B0, 224 px, batch 8: forward + backward + Adam (one logit, BCE)
#   4. depthwise conv, 96 ch, 112x112, k3 s2 p1, batch 8: forward, backward
#                                                  (2-4: example train_step)
# The switch is process-wide and read at every op, so "after" measures whatever
# kernels are wired into the models at the time of the run.
#
# Env: THREADS (default nproc) for both frameworks; STEPS / WARMUP override the
# per-row step counts (candle-before gets few steps by default: it takes
# seconds to tens of seconds per step on rows 1-3); SMOKE=1 shrinks every
# size so the whole script runs in a couple of minutes (a check, not a result).
# PyTorch comes from pip into benches/.venv-torch (as in cyclegan.sh); if that
# fails the PyTorch column says n/a.
# Report: stdout and benches/out/train.md (raw JSON lines: benches/out/train.jsonl).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
. benches/lib.sh
OUT=$ROOT/benches/out
mkdir -p "$OUT"

# One build for both examples, before anything is timed (a build competing for
# the cores would skew the first runs).
cargo build --release --example train_step --example cyclegan_step 2>&1 | tail -1
TRAIN=$ROOT/target/release/examples/train_step
CYCLE=$ROOT/target/release/examples/cyclegan_step

THREADS=${THREADS:-$(nproc)}
# candle's CPU ops and gemm run on rayon's global pool; this sizes it.
export RAYON_NUM_THREADS=$THREADS

PY=$ROOT/$BENCH_VENV_TORCH/bin/python
HAVE_TORCH=0; pip_peer "$ROOT/$BENCH_VENV_TORCH" "import torch" torch && HAVE_TORCH=1
# Row 3 needs torchvision's efficientnet_b0 (pillow is a torchvision import).
HAVE_TV=0
[ $HAVE_TORCH = 1 ] && pip_peer "$ROOT/$BENCH_VENV_TORCH" "import torchvision" torchvision pillow && HAVE_TV=1
[ $HAVE_TORCH = 1 ] || echo "PyTorch could not be installed with pip: the PyTorch column will be n/a" >&2

# Sizes: the real rows, or tiny ones for SMOKE=1.
if [ "${SMOKE:-0}" = 1 ]; then
  GAN="--size 64 --ngf 16 --ndf 16 --blocks 2 --batch 1"
  GEN="--size 64 --ngf 16 --blocks 2 --batch 1"
  EFF="--variant b0 --size 64 --batch 2"
  DW="--channels 96 --size 28 --k 3 --stride 2 --batch 8"
else
  GAN="--size 128 --ngf 64 --ndf 64 --blocks 9 --batch 1"
  GEN="--size 128 --ngf 64 --blocks 9 --batch 1"
  EFF="--variant b0 --size 224 --batch 8"
  DW="--channels 96 --size 112 --k 3 --stride 2 --batch 8"
fi

# Timed steps: "fast" for PyTorch and candle-after, "slow" for candle-before.
# STEPS / WARMUP, when set, apply to every run.
steps() {  # fast-default slow-default which
  local n; if [ "$3" = slow ]; then n=$2; else n=$1; fi
  echo "--steps ${STEPS:-$n} --warmup ${WARMUP:-1}"
}

# Other work on the machine skews every column, PyTorch's most: its OpenMP
# threads spin at barriers, and with a core taken by someone else a step can
# take many times longer (seen: 8.5 s instead of ~0.1 s with a pipeline
# running). The load before the runs goes into the report; warn when busy.
LOAD=$(cut -d' ' -f1 /proc/loadavg)
if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) >= 1.0 else 1)" "$LOAD"; then
  echo "warning: load average $LOAD before the runs: other work is running, timings will be skewed" >&2
fi

RAW=$OUT/train.jsonl
: > "$RAW"
# Runs one measurement and appends "row column steps json" to $RAW; a failed run
# (crash, out of memory) is reported and leaves its cell empty instead of
# stopping the other rows.
measure() {  # row column command...
  local row=$1 col=$2; shift 2
  echo "[$row / $col] $*" >&2
  local line n=? a prev=
  for a in "$@"; do [ "$prev" = --steps ] && n=$a; prev=$a; done
  if line=$("$@" | tail -1) && [ -n "$line" ]; then
    echo "$row $col $n $line" >> "$RAW"
  else
    echo "  failed: $row / $col" >&2
  fi
}

torch_run() { "$PY" "$ROOT/benches/train_step_torch.py" "$@" --threads "$THREADS"; }

# Interleaved per row (PyTorch, before, after) so a drift in the machine's
# load hits all three columns of a row alike. The size strings are unquoted on
# purpose: they split into arguments.
if [ $HAVE_TORCH = 1 ]; then
  measure cyclegan pytorch "$PY" "$ROOT/benches/cyclegan_step_torch.py" $GAN $(steps 3 2 fast) --threads "$THREADS"
fi
measure cyclegan before "$CYCLE" $GAN $(steps 3 2 slow) --kernels candle
measure cyclegan after  "$CYCLE" $GAN $(steps 3 2 fast) --kernels fast

if [ $HAVE_TORCH = 1 ]; then measure generator pytorch torch_run generator $GEN $(steps 5 2 fast); fi
measure generator before "$TRAIN" generator $GEN $(steps 5 2 slow) --kernels candle
measure generator after  "$TRAIN" generator $GEN $(steps 5 2 fast) --kernels fast

if [ $HAVE_TV = 1 ]; then measure efficientnet pytorch torch_run efficientnet $EFF $(steps 5 2 fast); fi
measure efficientnet before "$TRAIN" efficientnet $EFF $(steps 5 2 slow) --kernels candle
measure efficientnet after  "$TRAIN" efficientnet $EFF $(steps 5 2 fast) --kernels fast

if [ $HAVE_TORCH = 1 ]; then measure depthwise pytorch torch_run depthwise $DW $(steps 20 3 fast); fi
measure depthwise before "$TRAIN" depthwise $DW $(steps 20 3 slow) --kernels candle
measure depthwise after  "$TRAIN" depthwise $DW $(steps 20 3 fast) --kernels fast

TORCH_VERSION="n/a (could not be installed with pip)"
[ $HAVE_TORCH = 1 ] && TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
[ $HAVE_TV = 1 ] && TORCH_VERSION="$TORCH_VERSION, torchvision $("$PY" -c 'import torchvision; print(torchvision.__version__)')"
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"

# The table: one line per timed quantity, ms (median of the timed steps).
CPU="$CPU" THREADS="$THREADS" TORCH_VERSION="$TORCH_VERSION" COMMIT="$COMMIT" SMOKE="${SMOKE:-0}" WARMUP="${WARMUP:-1}" LOAD="$LOAD" \
python3 - "$RAW" <<'EOF' | tee "$OUT/train.md"
import datetime, json, os, sys

res = {}
for line in open(sys.argv[1]):
    row, col, n, js = line.split(" ", 3)
    res[(row, col)] = dict(json.loads(js), timed_steps=n)

def cfg(row):
    d = next((res[(row, c)] for c in ("after", "before", "pytorch") if (row, c) in res), None)
    return d or {}

def label(row, part):
    d = cfg(row)
    g = lambda k: d.get(k, "?")
    if row == "cyclegan":
        return f"CycleGAN train step (2 G + 2 D, fwd+bwd+Adam), {g('size')} px, ngf {g('ngf')}, {g('blocks')} blocks, batch {g('batch')}"
    if row == "generator":
        return f"ResNet generator {part}, {g('size')} px, ngf {g('ngf')}, {g('blocks')} blocks, batch {g('batch')}"
    if row == "efficientnet":
        return f"EfficientNet-{str(g('variant')).upper()} fwd+bwd+Adam, {g('size')} px, batch {g('batch')}"
    return f"depthwise conv {part}, {g('channels')} ch, {g('size')}x{g('size')}, k{g('k')} s{g('stride')}, batch {g('batch')}"

def val(row, col, key):
    v = res.get((row, col), {}).get(key)
    return float(v) if v is not None else None

def fmt(v):
    return "n/a" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}")

def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"

def steps(row):
    return "/".join(res[(row, c)]["timed_steps"] if (row, c) in res else "-" for c in ("pytorch", "before", "after"))

lines = [("cyclegan", "ms_per_step", "step"), ("generator", "fwd_ms", "forward"), ("generator", "bwd_ms", "backward"),
         ("efficientnet", "ms_per_step", "step"), ("depthwise", "fwd_ms", "forward"), ("depthwise", "bwd_ms", "backward")]
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
print(f"## Training speed on CPU, ms (median), {os.environ['THREADS']} threads, {os.environ['CPU']}")
print()
if os.environ["SMOKE"] == "1":
    print("**SMOKE run: shrunken sizes and few steps; these numbers are a check of the script, not a result.**")
    print()
print(f"{now}; PyTorch {os.environ['TORCH_VERSION']}; melanoflow {os.environ['COMMIT']}; "
      f"load average before the runs {os.environ['LOAD']}"
      + (" (**busy machine: timings skewed**)" if float(os.environ["LOAD"]) >= 1.0 else "") + ".")
print("candle before = melanoflow's fast kernels switched off (candle's own ops); candle after = switched on.")
print()
print("| work | PyTorch | candle before | candle after | after/PyTorch | before/after |")
print("|---|---|---|---|---|---|")
for row, key, part in lines:
    t, b, a = val(row, "pytorch", key), val(row, "before", key), val(row, "after", key)
    print(f"| {label(row, part)} | {fmt(t)} | {fmt(b)} | {fmt(a)} | {ratio(a, t)} | {ratio(b, a)} |")
print()
print(f"Timed steps (PyTorch/before/after), each after {os.environ['WARMUP']} warmup: "
      + ", ".join(f"{r} {steps(r)}" for r in ("cyclegan", "generator", "efficientnet", "depthwise")) + ".")
EOF
