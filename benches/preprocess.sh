#!/usr/bin/env bash
# Preprocess throughput: melanoflow (zune-jpeg + fast_image_resize, rayon on
# every core) vs Pillow (multiprocessing pool, one worker per core), decode +
# resize + centre crop to 256 px, and each tool's decode-only ceiling, in the
# same run on the same files:
#   (a) the 100 real ISIC JPEGs in ../shared/realdata (722x540 .. 3072x2304)
#   (b) 1,000 synthetic 1024x768 JPEGs (drawn by the synth renderer)
# Also the peak memory (max RSS) of the real `preprocess` stage on 1,000 and
# 2,000 images, to show it does not grow with the image count.
# Report: stdout and benches/out/preprocess.md. Pillow comes from benches/.venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
. benches/lib.sh
OUT=$ROOT/benches/out
mkdir -p "$OUT"
cargo build --release --example preprocess_throughput --bin melanoflow 2>&1 | tail -1
RUST=$ROOT/target/release/examples/preprocess_throughput
BIN=$ROOT/target/release/melanoflow
REAL=$ROOT/../shared/realdata/isic_archive_uda1/images
SYN=$OUT/tmp/syn1024
if [ ! -d "$SYN" ] || [ "$(ls "$SYN" | wc -l)" -lt 1000 ]; then
  echo "generating 1,000 synthetic 1024x768 JPEGs in $SYN ..."
  "$RUST" --generate "$SYN" 1000 1024 768
fi

PY=$ROOT/$BENCH_VENV/bin/python
HAVE_PIL=0; pip_peer "$ROOT/$BENCH_VENV" "import PIL" pillow && HAVE_PIL=1

run_set() {  # name dir
  local name=$1 dir=$2
  [ -d "$dir" ] || { echo "| $name | skipped: $dir is absent | | | |"; return; }
  local r p
  r=$("$RUST" "$dir" 256 3)
  if [ $HAVE_PIL = 1 ]; then p=$("$PY" "$ROOT/benches/pillow_preprocess.py" "$dir" 256 3); else p=""; fi
  python3 - "$name" "$r" "$p" <<'PYEOF'
import json, sys
name, r, p = sys.argv[1], sys.argv[2], sys.argv[3]
rs = {d["work"]: d for d in map(json.loads, r.splitlines())}
ps = {d["work"]: d for d in map(json.loads, p.splitlines())} if p else {}
ips = lambda w: rs[w]["images_per_s"]
stage, ceil, full, lz = ips("dct_scaled_resize_crop"), ips("dct_scaled_decode_only"), ips("decode_resize_crop"), ips("decode_resize_crop_lanczos3")
pil = lambda w: ps.get(w, {}).get("images_per_s")
draft, draft_dec, pil_full = pil("draft_resize_crop"), pil("draft_decode_only"), pil("decode_resize_crop")
fmt = lambda v: f"{v:.0f}" if v else "n/a"
ratio = lambda a, b: f"{a / b:.2f}x" if b else "n/a"
print(f"| {name} | {rs['decode_only']['images']} | {fmt(stage)} | {fmt(ceil)} | {stage / ceil:.0%} | {fmt(draft)} | {fmt(draft_dec)} | **{ratio(stage, draft)}** | {fmt(full)} | {fmt(lz)} | {fmt(pil_full)} | {ratio(full, pil_full)} |")
PYEOF
}

peak_rss() {  # n -> max RSS (MiB) of `melanoflow run` preprocessing n of the synthetic images
  local n=$1
  local T=$OUT/tmp/rss$n
  rm -rf "$T"; mkdir -p "$T/data/src/jpeg"
  echo "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target" > "$T/data/src/train.csv"
  local i=0
  for f in $(ls "$SYN" | head -n "$n"); do
    ln -s "$SYN/$f" "$T/data/src/jpeg/$f" 2>/dev/null || true
    echo "${f%.jpg},IP_$((i / 16)),male,50,torso,unknown,benign,0" >> "$T/data/src/train.csv"; i=$((i + 1))
  done
  # Twice as many images: repeat the list under new names.
  if [ "$n" -gt 1000 ]; then
    for f in $(ls "$SYN"); do
      ln -s "$SYN/$f" "$T/data/src/jpeg/B${f}"; echo "B${f%.jpg},IP_B$((i / 16)),male,50,torso,unknown,benign,0" >> "$T/data/src/train.csv"; i=$((i + 1))
    done
  fi
  cat > "$T/data/pipeline.toml" <<TOML
[stages.ingest]
kind = "ingest"
metadata = "src/train.csv"
images = "src/jpeg"
[stages.preprocess]
kind = "preprocess"
inputs = ["ingest"]
size = 256
shard_mb = 64
TOML
  /usr/bin/time -f "%M" -o "$T/rss" "$BIN" -q run --config "$T/data/pipeline.toml" >/dev/null
  echo $(( $(cat "$T/rss") / 1024 ))
}

{
  echo "## preprocess throughput, $(nproc) cores ($(cpu_model))"
  echo
  echo "decode + resize + centre crop to 256 px, images/s (best of 3), files read inside the timed loop; Pillow in a pool of $(nproc) processes. The main comparison is each side's fast path: the stage's DCT-scaled decode against Pillow's \`draft()\` (libjpeg-turbo's scaled decode) with one crop-and-resize pass; each ceiling is its own reduced decode alone. The full-decode columns compare the same work without DCT scaling. Goals: >= 1.5x Pillow with draft, >= 80% of our ceiling."
  echo
  echo "| set | images | melanoflow stage (DCT-scaled decode + bicubic) | melanoflow ceiling (the same scaled decode alone) | stage / ceiling | Pillow draft + resize(box) | Pillow draft decode alone | **melanoflow / Pillow draft** | melanoflow full decode + bicubic | full decode + Lanczos3 | Pillow full decode + bicubic | full / Pillow full |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  run_set "real ISIC (722x540 .. 3072x2304)" "$REAL"
  run_set "synthetic 1024x768" "$SYN"
  [ $HAVE_PIL = 1 ] || echo "(Pillow could not be installed: baseline columns are n/a)"
  echo
  if [ -x /usr/bin/time ]; then
    echo "peak memory of \`melanoflow run\` (ingest + preprocess at 256 px, 64 MiB shards): 1,000 images $(peak_rss 1000) MiB, 2,000 images $(peak_rss 2000) MiB"
  else
    echo "peak memory: /usr/bin/time is not installed (apt-get install time)"
  fi
} | tee "$OUT/preprocess.md"
rm -rf "$OUT/tmp/rss1000" "$OUT/tmp/rss2000"
