#!/usr/bin/env bash
# The CUDA build on a machine without a GPU (`make cuda-smoke`, run by CI), so
# that the GPU build cannot rot where no GPU is at hand:
#   1. the binary starts (the toolkit's stub libcuda stands in for the driver)
#      and `--help` and `kinds` work; `kinds` prints the same code identities
#      as the CPU build's (so both builds give the same fingerprints);
#   2. the small CI pipeline (data/ci_small.toml) with `device = "auto"` in
#      every training stage runs to the end on the CPU, saying once that no
#      GPU is usable, with no panic or backtrace;
#   3. it writes the bytes the CPU build writes for the same pipeline file:
#      the two runs' lock files (fingerprints, output digests, every file's
#      digest) are identical. (Not data/ci_small.lock: that one says
#      `device = "cpu"`, and train_classifier's config.json records the device.)
#   4. `device = "cuda:0"` fails with an error that names the device.
#
# Usage: scripts/cuda/smoke.sh [CUDA_BIN [CPU_BIN]]
#   defaults: target/release/melanoflow-cuda, target/release/melanoflow
# The toolkit is $MELANOFLOW_CUDA_HOME, else .tools/cu13 (scripts/cuda-toolkit.sh).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(realpath -m "${1:-$root/target/release/melanoflow-cuda}")
cpu_bin=$(realpath -m "${2:-$root/target/release/melanoflow}")
toolkit=${MELANOFLOW_CUDA_HOME:-$root/.tools/cu13}

fail() {
    echo "cuda-smoke: FAILED: $*" >&2
    exit 1
}
[ -x "$bin" ] || fail "$bin is missing (make build-cuda)"
[ -x "$cpu_bin" ] || fail "$cpu_bin is missing (make build)"
[ -f "$toolkit/env.sh" ] || fail "no CUDA toolkit in $toolkit (scripts/cuda-toolkit.sh)"
# shellcheck source=/dev/null
. "$toolkit/env.sh"
# The stub first: on this machine no driver's libcuda.so.1 is to be used.
export LD_LIBRARY_PATH="$MELANOFLOW_CUDA_STUBS:$MELANOFLOW_CUDA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# A backtrace must not appear even where one is asked for.
export RUST_BACKTRACE=1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
t0=$SECONDS

# 1. It starts; --help and kinds work.
"$bin" --help >"$tmp/help" || fail "--help exited with $?"
grep -q '^Usage: melanoflow' "$tmp/help" || fail "--help printed no usage"
"$bin" kinds >"$tmp/kinds" || fail "kinds exited with $?"
grep -q '^train_cyclegan ' "$tmp/kinds" || fail "kinds does not list train_cyclegan"
"$cpu_bin" kinds >"$tmp/kinds.cpu"
diff "$tmp/kinds.cpu" "$tmp/kinds" >&2 || fail "the CUDA and CPU builds print different code identities"
echo "cuda-smoke: --help and kinds work ($(wc -l <"$tmp/kinds") kinds, identities as in the CPU build)" >&2

# 2. The small pipeline, device = "auto", each build from an empty store of its own.
mkdir "$tmp/cuda" "$tmp/cpu"
cp "$root/data/ci_small.toml" "$tmp/cuda/ci_small.toml"
cp "$root/data/ci_small.toml" "$tmp/cpu/ci_small.toml"
auto=()
for stage in $(awk '/^\[stages\.[^].]+\]/ { s = substr($1, 9, length($1) - 9) } /^device *=/ { print s }' "$tmp/cuda/ci_small.toml"); do
    auto+=(--set "$stage.device=auto")
done
[ ${#auto[@]} -gt 0 ] || fail "data/ci_small.toml sets no stage's device"
echo "cuda-smoke: melanoflow-cuda run ${auto[*]}" >&2
if ! "$bin" run --config "$tmp/cuda/ci_small.toml" "${auto[@]}" >"$tmp/run.log" 2>&1; then
    cat "$tmp/run.log" >&2
    fail "the pipeline with device = \"auto\" failed"
fi
cat "$tmp/run.log" >&2
notices=$(grep -c 'no usable CUDA GPU' "$tmp/run.log" || true)
[ "$notices" = 1 ] || fail "expected one 'no usable CUDA GPU' notice, got $notices"
if grep -nE 'panicked|stack backtrace' "$tmp/run.log" >&2; then
    fail "a panic or a backtrace in the output"
fi

# 3. The same bytes as the CPU build.
"$cpu_bin" run --config "$tmp/cpu/ci_small.toml" "${auto[@]}" -q || fail "the CPU build's run failed"
if ! diff "$tmp/cpu/ci_small.lock" "$tmp/cuda/ci_small.lock" >&2; then
    fail "the lock files differ (left: the CPU build, right: the CUDA build on the CPU)"
fi
echo "cuda-smoke: lock files identical ($(grep -c '^output = ' "$tmp/cuda/ci_small.lock") stage outputs): the CUDA build on the CPU writes the CPU build's bytes" >&2

# 4. An explicit GPU is an error, not a silent CPU run.
gan=$(awk '/^\[stages\./ { s = substr($1, 9, length($1) - 9) } /^kind *= *"train_cyclegan"/ { print s; exit }' "$tmp/cuda/ci_small.toml")
if "$bin" run --config "$tmp/cuda/ci_small.toml" "${auto[@]}" --set "$gan.device=cuda:0" "$gan" >"$tmp/cuda0.log" 2>&1; then
    cat "$tmp/cuda0.log" >&2
    fail "device = \"cuda:0\" ran without a GPU"
fi
grep -q 'device `cuda:0`: cannot open CUDA GPU 0' "$tmp/cuda0.log" || {
    cat "$tmp/cuda0.log" >&2
    fail "device = \"cuda:0\" failed without naming the device"
}
if grep -nE 'panicked|stack backtrace' "$tmp/cuda0.log" >&2; then
    fail "a panic or a backtrace for device = \"cuda:0\""
fi
echo "cuda-smoke: device = \"cuda:0\" fails: $(grep -m1 'cuda:0' "$tmp/cuda0.log")" >&2
echo "cuda-smoke: OK in $((SECONDS - t0)) s" >&2
