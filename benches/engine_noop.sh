#!/usr/bin/env bash
# No-op wall time: melanoflow vs DVC on the same files, same run, same machine.
#
# A "no-op" is a run (or status) after everything is already up to date: the
# cost is deciding that nothing needs to run. For each configuration below the
# script populates once, then times, per tool, the no-op run and the status
# command: one warm-up, then the median of 5 runs (hyperfine if installed,
# else a python3 perf_counter loop; the same timer for both tools).
#
#   1. the default pipeline (a copy of data/pipeline.toml: synth's 3,000
#      JPEGs and every stage after it; CycleGANs cut to one epoch and
#      classifier arms to one seed with --set so that populating stays
#      short; the ImageNet weights from `make weights`); DVC: one stage
#      depending on the synth output folder.
#   2. an ingest-only pipeline over a source folder of N small images plus an
#      ISIC-format train.csv, N = 5,000, 33,126 (ISIC 2020) and 50,000; DVC:
#      one stage `ingest` whose deps are the CSV and the image folder.
#
# Timings go in the report (stdout and benches/out/engine_noop.md), never in
# asserts. Knobs (environment): MELANOFLOW (binary, default
# target/release/melanoflow), BENCH_SIZES ("5000 33126 50000"), BENCH_RUNS (5),
# BENCH_WARMUP (1), BENCH_TIMER (hyperfine|python), BENCH_KEEP_TMP=1 (keep the
# temp folder), BENCH_NO_DVC=1 (melanoflow alone), BENCH_DEFAULT_SET (the
# --set overrides for row 1, "" = none), BENCH_POPULATE_TIMEOUT (300 s per
# populating run), BENCH_SETTLE_S (3: pause after populating, see settle()).
# DVC comes from a venv at benches/.venv (created with pip if missing).

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
. benches/lib.sh
BIN=${MELANOFLOW:-target/release/melanoflow}
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
SIZES=${BENCH_SIZES:-"5000 33126 50000"}
RUNS=${BENCH_RUNS:-5}
WARMUP=${BENCH_WARMUP:-1}
OUTDIR="$ROOT/benches/out"
REPORT="$OUTDIR/engine_noop.md"
LOG="$OUTDIR/engine_noop.log"
W="$OUTDIR/tmp/engine_noop"
VENV="$ROOT/$BENCH_VENV"
export DVC_NO_ANALYTICS=1 PYTHONWARNINGS=ignore

die() { say "engine_noop: $*"; exit 1; }

[ -x "$BIN" ] || die "no melanoflow binary at $BIN (run \`make build\`, or set MELANOFLOW)"
command -v python3 >/dev/null || die "python3 is needed (data generation, timing, JSON)"

mkdir -p "$OUTDIR"
rm -rf "$W"
mkdir -p "$W"
: >"$LOG"
cleanup() {
    if [ "${BENCH_KEEP_TMP:-0}" != 1 ]; then
        say "cleaning up $W ..."
        rm -rf "$W"
        rmdir "$OUTDIR/tmp" 2>/dev/null || true
    fi
    say "engine_noop: ${SECONDS} s in all"
}
trap cleanup EXIT
log() { printf '%s\n' "$*" >>"$LOG"; }

# --------------------------------------------------------------------------
# Tools: timer and DVC.
TIMER=${BENCH_TIMER:-}
if [ -z "$TIMER" ]; then
    if ! command -v hyperfine >/dev/null; then
        say "hyperfine not found; trying apt-get install -y hyperfine"
        { apt-get install -y hyperfine || { apt-get update && apt-get install -y hyperfine; }; } >>"$LOG" 2>&1 || true
    fi
    if command -v hyperfine >/dev/null; then TIMER=hyperfine; else TIMER=python; fi
fi
if [ "$TIMER" = hyperfine ]; then
    TIMER_DESC="hyperfine $(hyperfine --version | awk '{print $2}') (-N, $WARMUP warm-up, $RUNS runs, median)"
else
    TIMER_DESC="python3 time.perf_counter around subprocess.run ($WARMUP warm-up, $RUNS runs, median)"
fi

DVC=""
DVC_WHY=""
if [ "${BENCH_NO_DVC:-0}" = 1 ]; then
    DVC_WHY="BENCH_NO_DVC=1"
elif pip_peer "$VENV" "import dvc" dvc && "$VENV/bin/dvc" --version >/dev/null 2>&1; then
    DVC="$VENV/bin/dvc"
else
    DVC_WHY=$(pip_why "pip install dvc into $VENV failed (see $LOG)")
fi
if [ -z "$DVC" ]; then
    say "DVC could not be installed: $DVC_WHY; reporting melanoflow alone"
elif ! command -v git >/dev/null; then
    DVC_WHY="git is not installed"; DVC=""
    say "DVC could not be installed: $DVC_WHY; reporting melanoflow alone"
fi

MF_VERSION=$("$BIN" --version 2>/dev/null || echo "melanoflow (unknown version)")
DVC_VERSION=${DVC:+$("$DVC" --version 2>/dev/null)}
MACHINE="$(machine_line) at start"

say "machine:    $MACHINE"
say "melanoflow: $MF_VERSION ($BIN)"
say "dvc:        ${DVC_VERSION:-not available}"
say "timer:      $TIMER_DESC"

# --------------------------------------------------------------------------
# measure NAME CWD CMD...  -> prints the median in ms; details go to the log
# and to $W/stats (name, min, median, max). Fails if the command fails.
measure() {
    local name=$1 cwd=$2
    shift 2
    local json="$W/hf.json" med
    if [ "$TIMER" = hyperfine ]; then
        local cmdline
        cmdline=$(printf '%q ' "$@")
        log "## $name (cwd $cwd)"
        if ! (cd "$cwd" && hyperfine -N --style basic --warmup "$WARMUP" --runs "$RUNS" \
                --export-json "$json" -- "$cmdline") >>"$LOG" 2>&1; then
            return 1
        fi
        python3 - "$json" "$name" "$W/stats" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
t = [x * 1000 for x in r["times"]]
with open(sys.argv[3], "a") as f:
    f.write(f"{sys.argv[2]}\t{min(t):.1f}\t{r['median'] * 1000:.1f}\t{max(t):.1f}\n")
print(f"{r['median'] * 1000:.1f}")
EOF
    else
        log "## $name (cwd $cwd): $*"
        python3 - "$cwd" "$name" "$W/stats" "$WARMUP" "$RUNS" "$@" <<'EOF' 2>>"$LOG"
import statistics, subprocess, sys, time
cwd, name, stats, warmup, runs, cmd = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:]
def once():
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{name}: exit {r.returncode}: {cmd}")
    return dt * 1000
for _ in range(warmup):
    once()
t = [once() for _ in range(runs)]
with open(stats, "a") as f:
    f.write(f"{name}\t{min(t):.1f}\t{statistics.median(t):.1f}\t{max(t):.1f}\n")
print(f"{statistics.median(t):.1f}")
EOF
    fi
}

# Results, one line per row: label, files, mf_run, mf_status, dvc_repro,
# dvc_status, goal text, goal ms (or -). "n/a" = not measured, "fail" = failed.
ROWS="$W/rows.tsv"
: >"$ROWS"
: >"$W/stats"
NOTES=()

# Runs a command once (populating or checking), logging its output; on
# failure records a note with the exact command and the tail of its output.
once() {
    local what=$1 cwd=$2
    shift 2
    local out="$W/once.out" rc=0
    (cd "$cwd" && "$@") >"$out" 2>&1 || rc=$?
    cat "$out" >>"$LOG"
    [ "$rc" = 0 ] && return 0
    [ "$rc" = 124 ] && [ "$1" = timeout ] && rc="124: timed out after $2 s; set BENCH_POPULATE_TIMEOUT"
    NOTES+=("$what failed (exit $rc): \`(cd $cwd && $*)\`: $(tail -3 "$out" | tr '\n' ' ' | cut -c1-400)")
    say "FAILED: $what: (cd $cwd && $*)"
    tail -5 "$out" >&2
    return 1
}

# After populating: wait out melanoflow's 2 s "racily clean" window (a file
# written less than 2 s before it is hashed is not remembered, so no-op runs
# right after a run re-hash the fresh outputs and rewrite the hash cache),
# then run once more, untimed, so the timed runs see the steady state a user
# sees. DVC gets the same treatment.
settle() {
    sleep "${BENCH_SETTLE_S:-3}"
    once "$@"
}

# Checks that a no-op really was one: melanoflow says every stage is cached.
check_mf_noop() {
    local label=$1 config=$2 out="$W/check.out"
    if "$BIN" run --config "$config" "${MF_ARGS[@]}" >"$out" 2>&1 && grep -qE '^[0-9]+ stage\(s\): [0-9]+ cached in ' "$out"; then
        return 0
    fi
    NOTES+=("$label: the timed melanoflow run was not a no-op: \`$BIN run --config $config\` printed: $(tr '\n' ' ' <"$out" | cut -c1-300)")
}
check_dvc_noop() {
    local label=$1 cwd=$2 out="$W/check.out"
    if (cd "$cwd" && "$DVC" status) >"$out" 2>&1 && grep -qi 'up to date' "$out"; then
        return 0
    fi
    NOTES+=("$label: the timed dvc repro was not a no-op: \`dvc status\` printed: $(tr '\n' ' ' <"$out" | cut -c1-300)")
}

# Sets up a DVC project (git + dvc) in DIR with one stage.
dvc_project() {
    local dir=$1 stage=$2 cmd=$3
    shift 3 # remaining: deps
    (
        cd "$dir"
        git init -q .
        "$DVC" init -q
        "$DVC" config core.analytics false
        "$DVC" config core.check_update false
        "$DVC" config core.site_cache_dir "$W/dvc-site-cache/$(basename "$dir")"
        {
            echo "stages:"
            echo "  $stage:"
            echo "    cmd: $cmd"
            echo "    deps:"
            for d in "$@"; do echo "      - $d"; done
            echo "    outs:"
            echo "      - out.txt"
        } >dvc.yaml
    ) >>"$LOG" 2>&1
}

# Times melanoflow run + status and DVC repro + status; appends a row.
bench_row() {
    local label=$1 files=$2 config=$3 dvcdir=$4 goal=$5 goal_ms=$6
    local mfr=fail mfs=fail dr=n/a ds=n/a
    settle "$label: melanoflow run (settle)" "$(dirname "$config")" "$BIN" run --config "$config" "${MF_ARGS[@]}" -q || true
    say "  timing melanoflow run (no-op) ..."
    mfr=$(measure "$label: melanoflow run -q" "$(dirname "$config")" "$BIN" run --config "$config" "${MF_ARGS[@]}" -q) || mfr=fail
    say "  timing melanoflow status ..."
    mfs=$(measure "$label: melanoflow status" "$(dirname "$config")" "$BIN" status --config "$config" "${MF_ARGS[@]}") || mfs=fail
    check_mf_noop "$label" "$config"
    if [ -n "$DVC" ] && [ -n "$dvcdir" ]; then
        dr=fail ds=fail
        say "  populating dvc (dvc repro) ..."
        if once "$label: dvc repro (populate)" "$dvcdir" "$DVC" repro \
            && settle "$label: dvc repro (settle)" "$dvcdir" "$DVC" repro; then
            say "  timing dvc repro (no-op) ..."
            dr=$(measure "$label: dvc repro" "$dvcdir" "$DVC" repro) || dr=fail
            say "  timing dvc status ..."
            ds=$(measure "$label: dvc status" "$dvcdir" "$DVC" status) || ds=fail
            check_dvc_noop "$label" "$dvcdir"
        fi
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$files" "$mfr" "$mfs" "$dr" "$ds" "$goal" "$goal_ms" >>"$ROWS"
    say "  melanoflow run $mfr ms, status $mfs ms; dvc repro $dr ms, status $ds ms"
}

T0=$SECONDS
# Extra arguments for every melanoflow command of the current row (--set ...).
MF_ARGS=()
POPULATE_TIMEOUT=${BENCH_POPULATE_TIMEOUT:-300}

# Start-up floors: what each tool costs before it looks at any file (process
# start, imports). No no-op can be faster than its floor.
FLOOR_MF=$(measure "start-up floor: melanoflow --version" "$W" "$BIN" --version || echo fail)
FLOOR_DVC=n/a
[ -n "$DVC" ] && FLOOR_DVC=$(measure "start-up floor: dvc --version" "$W" "$DVC" --version || echo fail)
say "start-up floor: melanoflow $FLOOR_MF ms, dvc $FLOOR_DVC ms"

# --------------------------------------------------------------------------
# Row 1: the default pipeline. Populating it runs every stage once; the
# training stages are cut short with --set (CycleGANs to one epoch, each
# classifier arm to one seed), passed to every melanoflow command of this
# row, so that populating fits in BENCH_POPULATE_TIMEOUT on 2 cores: the no-op
# cost does not depend on how long the training took.
# BENCH_DEFAULT_SET="STAGE.KEY=VALUE ..." replaces those overrides ("" = none).
say ""
say "== default pipeline (data/pipeline.toml) =="
T="$W/default"
mkdir -p "$T/data"
cp data/pipeline.toml "$T/data/pipeline.toml"
# The ImageNet weights the classifier arms and fidelity read (make weights),
# at the path the pipeline file names relative to itself.
[ -d data/weights ] && ln -s "$PWD/data/weights" "$T/data/weights"
IFS=$'\t' read -r STAGES TRAIN_SET < <(python3 - "$T/data/pipeline.toml" <<'EOF'
import sys, tomllib
stages = tomllib.load(open(sys.argv[1], "rb")).get("stages", {})
sets = [f"{n}.n_epochs=1 {n}.n_epochs_decay=0" for n, t in stages.items() if t.get("kind") == "train_cyclegan"]
sets += [f"{n}.seeds=[0]" for n, t in stages.items() if t.get("kind") == "train_classifier"]
print(" → ".join(stages) or "?", " ".join(sets), sep="\t")
EOF
) || STAGES="?"
DEFAULT_SET=${BENCH_DEFAULT_SET-${TRAIN_SET:-}}
MF_ARGS=()
for o in $DEFAULT_SET; do MF_ARGS+=(--set "$o"); done
label="default pipeline ($STAGES)${DEFAULT_SET:+ ¹}"
say "  stages: $STAGES${DEFAULT_SET:+ (--set $DEFAULT_SET)}"
say "  populating (melanoflow run, at most $POPULATE_TIMEOUT s) ..."
if once "default pipeline: melanoflow run (populate)" "$T" timeout "$POPULATE_TIMEOUT" "$BIN" run --config "$T/data/pipeline.toml" "${MF_ARGS[@]}"; then
    nfiles=$(find "$T/data/out/synth" -type f | wc -l)
    dvcdir=""
    if [ -n "$DVC" ]; then
        dvcdir="$T"
        dvc_project "$T" synth_check "ls data/out/synth/train | wc -l > out.txt" data/out/synth
        # The store and the engine's state are melanoflow's; a DVC-only
        # project would not have them, so DVC does not walk them.
        printf '/data/store/\n/data/.melanoflow/\n' >>"$T/.dvcignore"
    fi
    bench_row "$label" "$nfiles" "$T/data/pipeline.toml" "$dvcdir" "—" "-"
else
    printf '%s\t%s\tfail\tfail\tn/a\tn/a\t—\t-\n' "$label" "?" >>"$ROWS"
fi
MF_ARGS=()

# --------------------------------------------------------------------------
# Row 2: ingest over N small images. One project folder per N holds the
# files, the melanoflow pipeline file and (with DVC) the git + DVC project, so
# both tools check the very same files. The images of the largest N are
# written once and hard-linked into the smaller projects (fewer files to
# write and to delete: unlinking is slow on this disk).
MAXN=0
for n in $SIZES; do [ "$n" -gt "$MAXN" ] && MAXN=$n; done
say ""
say "== generating $MAXN small images + ISIC train.csv files =="
python3 - "$W" "$MAXN" $SIZES <<'EOF'
import os, random, sys
w, maxn, sizes = sys.argv[1], int(sys.argv[2]), sorted({int(s) for s in sys.argv[3:]}, reverse=True)
rng = random.Random(2020)
names = [f"ISIC_{i:07d}" for i in range(1, maxn + 1)]
pool = os.path.join(w, f"n{maxn}", "src", "images")
os.makedirs(pool)
for n in names:
    with open(os.path.join(pool, n + ".jpg"), "wb") as f:
        f.write(os.urandom(200))
sites = ["torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital", ""]
rows = []
for i, n in enumerate(names):
    patient = f"IP_{i // 16 + 1:07d}"
    sex = "male" if (i // 16) % 2 == 0 else "female"
    age = rng.choice(range(25, 90, 5))
    malignant = rng.random() < 0.02
    diagnosis = "melanoma" if malignant else rng.choice(["unknown", "unknown", "unknown", "nevus"])
    rows.append(f"{n},{patient},{sex},{age},{rng.choice(sites)},{diagnosis},"
                f"{'malignant' if malignant else 'benign'},{int(malignant)}\n")
header = "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target\n"
for n in sizes:
    src = os.path.join(w, f"n{n}", "src")
    if n != maxn:
        os.makedirs(os.path.join(src, "images"))
        for name in names[:n]:
            os.link(os.path.join(pool, name + ".jpg"), os.path.join(src, "images", name + ".jpg"))
    with open(os.path.join(src, "train.csv"), "w") as f:
        f.write(header)
        f.writelines(rows[:n])
EOF
say "  done in $((SECONDS - T0)) s since start"

for n in $SIZES; do
    label="ingest, $(commas "$n") images"
    say ""
    say "== $label =="
    P="$W/n$n"
    cat >"$P/pipeline.toml" <<'EOF'
[store]
url = "store"
[stages.ingest]
kind = "ingest"
metadata = "src/train.csv"
images = "src/images"
EOF
    case $n in
        5000) goal="melanoflow < 50 ms; DVC measured ~1.1 s"; goal_ms=50 ;;
        50000) goal="melanoflow < 150 ms (issue 18); DVC measured ~2.1 s"; goal_ms=150 ;;
        *) goal="—"; goal_ms=- ;;
    esac
    say "  populating (melanoflow run) ..."
    if ! once "$label: melanoflow run (populate)" "$P" timeout "$POPULATE_TIMEOUT" "$BIN" run --config "$P/pipeline.toml"; then
        printf '%s\t%s\tfail\tfail\tn/a\tn/a\t%s\t%s\n' "$label" "$((n + 1))" "$goal" "$goal_ms" >>"$ROWS"
        continue
    fi
    dvcdir=""
    if [ -n "$DVC" ]; then
        dvcdir="$P"
        dvc_project "$P" ingest "wc -l src/train.csv > out.txt" src/train.csv src/images
        # melanoflow's own files are not part of a DVC-only project.
        printf '/store/\n/out/\n/.melanoflow/\n' >>"$P/.dvcignore"
    fi
    bench_row "$label" "$((n + 1))" "$P/pipeline.toml" "$dvcdir" "$goal" "$goal_ms"
done

ELAPSED=$((SECONDS - T0))

# --------------------------------------------------------------------------
# The report.
{
    echo "# No-op wall time: melanoflow vs DVC"
    echo
    echo "Generated by \`benches/engine_noop.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC') in ${ELAPSED} s."
    echo
    echo "- Machine: $MACHINE; at end $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the numbers)"
    echo "- melanoflow: $MF_VERSION"
    if [ -n "$DVC" ]; then
        echo "- DVC: $DVC_VERSION (pip, benches/.venv)"
    else
        echo "- DVC: **not measured**: DVC could not be installed: $DVC_WHY; reporting melanoflow alone"
    fi
    echo "- Timer: $TIMER_DESC; milliseconds of wall time per invocation, process start included"
    echo "- Each configuration is populated once, then after a ${BENCH_SETTLE_S:-3} s pause (melanoflow does not remember hashes of files written < 2 s before hashing) run once more untimed, then timed"
    echo "- melanoflow: \`melanoflow run --config P -q\` and \`melanoflow status --config P\`; DVC: \`dvc repro\` and \`dvc status\` (git + dvc project, one stage)"
    echo
    python3 - "$ROWS" <<'EOF'
import sys
def num(s):
    try:
        return float(s)
    except ValueError:
        return None
def ms(s):
    v = num(s)
    if v is None:
        return s
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
def ratio(d, m):
    d, m = num(d), num(m)
    if d is None or m is None or m == 0:
        return "n/a"
    return f"{d / m:.1f}×"
print("| configuration | files | melanoflow run | melanoflow status | dvc repro | dvc status | dvc/mf run | dvc/mf status | goal (from the issue) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
for line in open(sys.argv[1]):
    label, files, mr, ms_, dr, ds, goal, goal_ms = line.rstrip("\n").split("\t")
    if goal_ms != "-" and num(mr) is not None:
        goal += "; **met**" if num(mr) < float(goal_ms) else f"; **missed** ({ms(mr)} ms)"
    try:
        files = f"{int(files):,}"
    except ValueError:
        pass
    print(f"| {label} | {files} | {ms(mr)} | {ms(ms_)} | {ms(dr)} | {ms(ds)} | {ratio(dr, mr)} | {ratio(ds, ms_)} | {goal} |")
EOF
    echo
    echo "Start-up floor (\`--version\`, median ms): melanoflow $FLOOR_MF, DVC $FLOOR_DVC. A no-op cannot be faster than its tool's floor; the rest of each no-op is the tool's own work."
    echo
    echo "Times are medians in ms. \"files\": the files DVC's stage depends on (default pipeline: the synth output folder, which melanoflow checks too, besides its other stages; ingest: images + train.csv)."
    if [ -n "${DEFAULT_SET:-}" ]; then
        why="from BENCH_DEFAULT_SET"
        [ -z "${BENCH_DEFAULT_SET+x}" ] && why="training cut to one epoch so that populating stays short; a no-op does not depend on how long training took (BENCH_DEFAULT_SET changes this)"
        echo "¹ Every melanoflow command of this row adds \`$(printf -- '--set %s ' $DEFAULT_SET | sed 's/ $//')\`: $why."
    fi
    echo "n/a: not measured; fail: the command failed (see notes and $(basename "$LOG"))."
    echo
    echo "<details><summary>min / median / max per measurement (ms)</summary>"
    echo
    echo "| measurement | min | median | max |"
    echo "|---|---:|---:|---:|"
    awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$W/stats"
    echo
    echo "</details>"
    report_notes
} >"$REPORT"

show_report "timer and tool output"
