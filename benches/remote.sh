#!/usr/bin/env bash
# Remote push/pull wall time: melanoflow vs DVC against the same loopback S3
# server, same files, same run, same machine.
#
# The S3 server is s3s-fs 0.14.1 (a small S3 implementation over a folder),
# started on a free 127.0.0.1 port with a temp root folder; the bucket
# `mfbench` is a subfolder of that root.
#
# Workloads (BENCH_WORKLOADS, default "small large isic"; they run in that
# order, each produced once, untimed, and deleted before the next): DVC gets a
# copy of the very same files, and both pulls are checked against them
# (sha256 of every file).
#   small  melanoflow's synth stage: BENCH_FILES JPEGs of 64 px + train.csv,
#          about 8.8 MB for 5,000 (300 patients; fewer below 300 images)
#   large  BENCH_LARGE_FILES files of BENCH_LARGE_MB MB (10^6 bytes) each of
#          pseudo-random bytes (python3's random.Random, one fixed seed per
#          file: incompressible, all distinct), 1 GB for 20 x 50. melanoflow
#          takes the folder in with an `import` stage (`melanoflow run`,
#          timed beside `dvc add data` as "add"), then pushes its output
#   isic   melanoflow's synth stage at ISIC 2020's count: BENCH_ISIC_FILES
#          JPEGs of BENCH_ISIC_SIZE px at quality BENCH_ISIC_QUALITY (about
#          100-110 KB each at 640 px / 96: about 3.5 GB for 33,126) +
#          train.csv, with ISIC 2020's 2,056 patients (fewer when there are
#          fewer images) and 1.76% malignant. Every image is drawn from its
#          own seeded stream, so no two are alike (nothing to deduplicate).
#          Rendering 33,126 takes about 13 minutes on 2 idle cores (untimed;
#          BENCH_GEN_TIMEOUT); the run needs about 25 GB of free disk at its
#          peak
#
# Start-up floors, measured once before the workloads: `melanoflow --version`
# and `dvc --version`, BENCH_FLOOR_RUNS times each (alternating), with the same
# timer as every other row; the report gives their medians and ratio. No push
# or pull can be faster than its tool's floor.
#
# Each repetition (BENCH_RUNS for small, BENCH_BIG_RUNS for large and isic)
# times every operation once, with a fresh remote prefix
# (s3://mfbench/WORKLOAD-melanoflow-repN, s3://mfbench/WORKLOAD-dvc-repN) and
# fresh clones (odd repetitions melanoflow first, even ones DVC first):
#   push         upload everything to the empty prefix
#                melanoflow: `melanoflow -c pipeline.toml push` in the project
#                that ran synth; DVC: `dvc push` in a new git + DVC repo
#                holding the files as data/ (its `dvc add data` is timed too,
#                reported alone as "add")
#   pull         into a fresh copy: melanoflow: a folder holding only the
#                pipeline file and its lock file, `melanoflow pull` (download
#                into the store, check out out/synth); DVC: `git clone` of the
#                repo plus the remote credentials, `dvc pull` (fetch + checkout)
#   push no-op   push again with everything already on the remote (the cost
#                of the existence check), in the pushing project / repo
# After melanoflow's pull, `melanoflow run` must say every stage is cached (a
# correctness check, not a timing). DVC's push and pull run with a small
# sitecustomize that turns s3s-fs's 500 on HEAD of a "folder" key into the
# 404 S3 sends (see the comment at DVCX below); without it `dvc pull` fails.
# Timings (median, min, max in ms, and the DVC/melanoflow ratio) go in the
# report (stdout and benches/out/remote.md), never in asserts.
#
# Knobs (environment): MELANOFLOW (binary, default target/release/melanoflow),
# BENCH_WORKLOADS ("small large isic": any of them, space-separated),
# BENCH_RUNS (3: repetitions of small), BENCH_BIG_RUNS (1: repetitions of large
# and isic), BENCH_FILES (5000: small's image count), BENCH_LARGE_FILES (20),
# BENCH_LARGE_MB (50), BENCH_ISIC_FILES (33126), BENCH_ISIC_SIZE (640: px),
# BENCH_ISIC_QUALITY (96: JPEG quality), BENCH_FLOOR_RUNS (5),
# BENCH_SETTLE_S (3: pause after mass deletions, see settle()), BENCH_TIMEOUT
# (600 s per timed command), BENCH_GEN_TIMEOUT (3600 s: producing a workload),
# BENCH_KEEP_TMP=1 (keep the temp folder), BENCH_NO_DVC=1 (melanoflow alone),
# BENCH_NO_MELANOFLOW=1 (DVC alone; melanoflow still generates the synth
# workloads), S3S_FS (the s3s-fs binary; else PATH, ~/.cargo/bin,
# .tools/bin, else `cargo install s3s-fs --version 0.14.1 --locked --features
# binary --root .tools`), BENCH_S3_PORT (default: a free port).
# DVC comes from a venv at benches/.venv (created with pip if missing; dvc-s3,
# DVC's S3 support, is added with pip if missing). If the binary has no
# `push`/`pull` commands yet, the melanoflow rows are skipped with a message.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
. benches/lib.sh
BIN=${MELANOFLOW:-target/release/melanoflow}
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
WORKLOADS=${BENCH_WORKLOADS:-small large isic}
RUNS=${BENCH_RUNS:-3}
BIG_RUNS=${BENCH_BIG_RUNS:-1}
NFILES=${BENCH_FILES:-5000}
LARGE_FILES=${BENCH_LARGE_FILES:-20}
LARGE_MB=${BENCH_LARGE_MB:-50}
ISIC_FILES=${BENCH_ISIC_FILES:-33126}
ISIC_SIZE=${BENCH_ISIC_SIZE:-640}
ISIC_QUALITY=${BENCH_ISIC_QUALITY:-96}
FLOOR_RUNS=${BENCH_FLOOR_RUNS:-5}
TIMEOUT=${BENCH_TIMEOUT:-600}
GEN_TIMEOUT=${BENCH_GEN_TIMEOUT:-3600}
OUTDIR="$ROOT/benches/out"
REPORT="$OUTDIR/remote.md"
LOG="$OUTDIR/remote.log"
W="$OUTDIR/tmp/remote"
VENV="$ROOT/$BENCH_VENV"
BUCKET=mfbench
S3_KEY=mfbench-access
S3_SECRET=mfbench-secret-key
S3_REGION=us-east-1
S3S_VERSION=0.14.1
export DVC_NO_ANALYTICS=1 PYTHONWARNINGS=ignore
# Loopback only: never through a proxy.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"

die() { say "remote: $*"; exit 1; }

[ -x "$BIN" ] || die "no melanoflow binary at $BIN (run \`make build\`, or set MELANOFLOW)"
command -v python3 >/dev/null || die "python3 is needed (free port, report)"
command -v sha256sum >/dev/null || die "sha256sum is needed (pull checks)"
# The workloads, in the order they run (the report's order too), whatever
# order BENCH_WORKLOADS names them in.
SELECTED=()
for wl in $WORKLOADS; do
    case "$wl" in small | large | isic) ;; *) die "unknown workload \`$wl\` in BENCH_WORKLOADS (small, large, isic)" ;; esac
done
for wl in small large isic; do
    case " $WORKLOADS " in *" $wl "*) SELECTED+=("$wl") ;; esac
done
[ "${#SELECTED[@]}" -gt 0 ] || die "BENCH_WORKLOADS names no workload (small, large, isic)"
for n in "$RUNS" "$BIG_RUNS" "$NFILES" "$LARGE_FILES" "$LARGE_MB" "$ISIC_FILES" "$ISIC_SIZE" "$ISIC_QUALITY" "$FLOOR_RUNS"; do
    case "$n" in '' | *[!0-9]*) die "the BENCH_* counts and sizes must be whole numbers (got \`$n\`)" ;; esac
done

mkdir -p "$OUTDIR"
rm -rf "$W"
mkdir -p "$W"
: >"$LOG"
S3_PID=""
cleanup() {
    if [ -n "$S3_PID" ]; then
        kill "$S3_PID" 2>/dev/null || true
        wait "$S3_PID" 2>/dev/null || true
        if [ -s "$W/s3s-fs.log" ]; then
            log "## s3s-fs: $(grep -c ' ERROR ' "$W/s3s-fs.log" || true) ERROR lines in its log; the last 40 lines:"
            tail -40 "$W/s3s-fs.log" >>"$LOG"
        fi
    fi
    if [ "${BENCH_KEEP_TMP:-0}" != 1 ]; then
        say "cleaning up $W ..."
        rm -rf "$W"
        rmdir "$OUTDIR/tmp" 2>/dev/null || true
    fi
    say "remote: ${SECONDS} s in all"
}
trap cleanup EXIT
log() { printf '%s\n' "$*" >>"$LOG"; }
NOTES=()

# --------------------------------------------------------------------------
# Tools: s3s-fs, DVC (+ dvc-s3), melanoflow's push/pull.
S3S=""
for c in "${S3S_FS:-}" "$(command -v s3s-fs || true)" "$HOME/.cargo/bin/s3s-fs" "$ROOT/.tools/bin/s3s-fs"; do
    if [ -n "$c" ] && [ -x "$c" ]; then S3S=$c; break; fi
done
if [ -z "$S3S" ]; then
    command -v cargo >/dev/null || die "s3s-fs not found (S3S_FS, PATH, ~/.cargo/bin, .tools/bin) and no cargo to install it"
    say "installing s3s-fs $S3S_VERSION into $ROOT/.tools (cargo install, a few minutes) ..."
    # Its own temp target folder, never the project's.
    env -u CARGO_TARGET_DIR cargo install s3s-fs --version "$S3S_VERSION" --locked --features binary \
        --root "$ROOT/.tools" >>"$LOG" 2>&1 || die "cargo install s3s-fs failed (see $LOG)"
    S3S="$ROOT/.tools/bin/s3s-fs"
fi
S3S_DESC="$("$S3S" --version 2>/dev/null || echo "s3s-fs (unknown version)")"

DVC=""
DVC_WHY=""
if [ "${BENCH_NO_DVC:-0}" = 1 ]; then
    DVC_WHY="BENCH_NO_DVC=1"
else
    if pip_peer "$VENV" "import dvc, dvc_s3" dvc dvc-s3 && "$VENV/bin/dvc" --version >/dev/null 2>&1; then
        DVC="$VENV/bin/dvc"
    else
        DVC_WHY=$(pip_why "pip install dvc dvc-s3 into $VENV failed (see $LOG)")
    fi
fi
if [ -n "$DVC" ] && ! command -v git >/dev/null; then
    DVC_WHY="git is not installed"; DVC=""
fi
[ -z "$DVC" ] && [ "${BENCH_NO_DVC:-0}" != 1 ] && say "DVC with S3 support could not be installed: $DVC_WHY; skipping the DVC rows"

MF=1
MF_WHY=""
if [ "${BENCH_NO_MELANOFLOW:-0}" = 1 ]; then
    MF=0; MF_WHY="BENCH_NO_MELANOFLOW=1"
elif ! "$BIN" push --help >/dev/null 2>&1 || ! "$BIN" pull --help >/dev/null 2>&1; then
    MF=0; MF_WHY="this binary has no \`push\`/\`pull\` commands (\`$BIN push --help\` fails)"
    say "melanoflow: $MF_WHY; skipping the melanoflow rows"
fi
[ "$MF" = 0 ] && [ -z "$DVC" ] && die "nothing to measure: melanoflow ($MF_WHY) and DVC ($DVC_WHY) are both skipped"

MF_VERSION=$("$BIN" --version 2>/dev/null || echo "melanoflow (unknown version)")
DVC_VERSION=""
DVC_JOBS=""
DVC_LIBS=""
if [ -n "$DVC" ]; then
    DVC_VERSION=$("$DVC" --version 2>/dev/null)
    DVC_JOBS=$("$VENV/bin/python" -c 'from dvc_objects.fs.base import FileSystem; print(FileSystem._JOBS)' 2>/dev/null || echo "4 × CPUs")
    DVC_LIBS=$("$VENV/bin/python" - <<'EOF' 2>/dev/null || true
from importlib.metadata import version
out = []
for p in ("dvc-s3", "s3fs", "aiobotocore", "botocore"):
    try:
        out.append(f"{p} {version(p)}")
    except Exception:
        pass
print(", ".join(out))
EOF
)
fi
MACHINE="$(machine_line) at start"

say "machine:    $MACHINE"
say "melanoflow: $MF_VERSION ($BIN)${MF_WHY:+; rows skipped: $MF_WHY}"
say "dvc:        ${DVC_VERSION:-not available${DVC_WHY:+: $DVC_WHY}}${DVC_JOBS:+ (jobs $DVC_JOBS; $DVC_LIBS)}"
say "s3:         $S3S_DESC ($S3S)"

# --------------------------------------------------------------------------
# The S3 server.
PORT=${BENCH_S3_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
ENDPOINT="http://127.0.0.1:$PORT"
S3ROOT="$W/s3"
mkdir -p "$S3ROOT/$BUCKET" # s3s-fs: a bucket is a folder of its root
"$S3S" --host 127.0.0.1 --port "$PORT" --access-key "$S3_KEY" --secret-key "$S3_SECRET" "$S3ROOT" >"$W/s3s-fs.log" 2>&1 &
S3_PID=$!
up=0
for _ in $(seq 1 100); do
    if ! kill -0 "$S3_PID" 2>/dev/null; then break; fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then up=1; break; fi
    sleep 0.1
done
if [ "$up" != 1 ]; then
    cat "$W/s3s-fs.log" >>"$LOG"
    die "s3s-fs did not answer on $ENDPOINT (see $LOG)"
fi
say "s3s-fs listening on $ENDPOINT (root $S3ROOT, bucket $BUCKET)"

# melanoflow reads the credentials from the environment; DVC from its
# (--local) remote config, so they are not exported to it.
MFX=(env AWS_ACCESS_KEY_ID="$S3_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET" AWS_REGION="$S3_REGION" AWS_DEFAULT_REGION="$S3_REGION" "$BIN")

# --------------------------------------------------------------------------
# Helpers.
TIMES="$W/times.tsv" # workload, op, tool, rep, us
: >"$TIMES"
WL=""     # the workload being measured ("floor" for the start-up floors)
WD=""     # its folder, $W/$WL
FILES=0   # its file count and bytes (set by its producer)
BYTES=0
declare -A WL_GEN_S WL_MF_WHY MF_PUSH_LINE MF_PULL_LINE MF_NOOP_LINE

# Records a failed command: a note with the exact command and the tail of its
# output ($W/once.out). $4: the timeout it ran under, and the knob that sets it.
failed() {
    local what=$1 cwd=$2 rc=$3 limit=$4
    shift 4
    [ "$rc" = 124 ] && rc="124: timed out after $limit"
    NOTES+=("$what failed (exit $rc): \`(cd $cwd && $*)\`: $(tail -3 "$W/once.out" | tr '\n' ' ' | cut -c1-400)")
    say "FAILED: $what: (cd $cwd && $*)"
    tail -5 "$W/once.out" >&2
}

# Runs a command once (untimed), logging its output; under $TIMEOUT, or
# $ONCE_TIMEOUT s when set (producing a workload: BENCH_GEN_TIMEOUT).
once() {
    local what=$1 cwd=$2
    shift 2
    local rc=0 limit=${ONCE_TIMEOUT:-$TIMEOUT}
    log "## $what (cwd $cwd): $*"
    (cd "$cwd" && timeout "$limit" "$@") >"$W/once.out" 2>&1 || rc=$?
    cat "$W/once.out" >>"$LOG"
    [ "$rc" = 0 ] && return 0
    if [ -n "${ONCE_TIMEOUT:-}" ]; then
        failed "$what" "$cwd" "$rc" "$limit s; set BENCH_GEN_TIMEOUT" "$@"
    else
        failed "$what" "$cwd" "$rc" "$limit s; set BENCH_TIMEOUT" "$@"
    fi
    return 1
}

# timed OP TOOL REP CWD CMD...: runs CMD once, appends its wall time (us) to
# $TIMES under workload $WL; the output stays in $W/once.out for the caller.
# QUIET=1: no line on stderr (the start-up floors).
timed() {
    local op=$1 tool=$2 rep=$3 cwd=$4
    shift 4
    local t0 t1 rc=0
    log "## $WL rep $rep: $tool $op (cwd $cwd): $*"
    t0=$(date +%s%N)
    (cd "$cwd" && timeout "$TIMEOUT" "$@") >"$W/once.out" 2>&1 || rc=$?
    t1=$(date +%s%N)
    cat "$W/once.out" >>"$LOG"
    if [ "$rc" != 0 ]; then
        failed "$WL rep $rep: $tool $op" "$cwd" "$rc" "$TIMEOUT s; set BENCH_TIMEOUT" "$@"
        return 1
    fi
    log "## -> $(((t1 - t0) / 1000)) us"
    printf '%s\t%s\t%s\t%s\t%s\n' "$WL" "$op" "$tool" "$rep" "$(((t1 - t0) / 1000))" >>"$TIMES"
    [ "${QUIET:-0}" = 1 ] || say "  $tool $op: $(((t1 - t0) / 1000000)) ms"
}

# The last non-empty line of the last command's output.
last_line() { grep -v '^[[:space:]]*$' "$W/once.out" | tail -1 || true; }

# One line per file: sha256 and path, sorted by path.
listing() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }

# same_files WHAT DIR: DIR holds exactly the workload's files ($WD/reference.sha).
same_files() {
    local what=$1 dir=$2
    if [ ! -d "$dir" ]; then
        NOTES+=("$what: $dir does not exist")
        return 1
    fi
    listing "$dir" >"$WD/check.sha"
    if cmp -s "$WD/check.sha" "$WD/reference.sha"; then
        log "## $what: the same $FILES files as the workload's (sha256)"
        return 0
    fi
    NOTES+=("$what: the files differ from the workload's ($(diff "$WD/reference.sha" "$WD/check.sha" | grep -c '^[<>]' || true) differing lines in the sha256 listings)")
    say "FAILED: $what: the files differ from the workload's"
    return 1
}

# s3s-fs walks the whole bucket folder on every ListObjectsV2 request (every
# page), whatever the prefix, so a listing costs O(objects in the bucket).
# After each tool's repetition its objects are deleted (files of the server's
# root folder; s3s-fs keeps no state in memory), so that every repetition of
# either tool starts from an empty bucket and lists only its own objects.
clear_bucket() {
    local what=$1 n
    n=$(find "$S3ROOT/$BUCKET" -type f | wc -l)
    log "## $what: $n objects in the bucket; deleting them"
    OBJECT_COUNTS+=("$what: $n")
    find "$S3ROOT/$BUCKET" -mindepth 1 -delete
    find "$S3ROOT" -maxdepth 1 -type f -name '.bucket-*' -delete # per-object metadata
    settle
}

# Deleting tens of thousands of files (the bucket, a pulled copy) leaves the
# filesystem journal and writeback busy for seconds; s3s-fs writes three
# files per object, so a push timed right after ran 5x slower than one on a
# quiet disk. Flush and wait before the next timed command.
settle() {
    sync
    sleep "${BENCH_SETTLE_S:-3}"
}
OBJECT_COUNTS=()

# The summary lines of the last command's output (melanoflow's push/pull).
summary() {
    local lines
    lines=$(grep -iE 'pushed|pulled|fetched|download|checked out|objects' "$W/once.out" | tr '\n' ';' | sed 's/;$//; s/;/; /g' || true)
    [ -n "$lines" ] || lines=$(last_line)
    printf '%s' "$lines"
}

if [ -n "$DVC" ]; then
    GIT=(git -c user.name=bench -c user.email=bench@localhost -c init.defaultBranch=main -c advice.detachedHead=false)
    # s3s-fs answers HEAD on a key that is a "folder" (a prefix of other keys,
    # a folder of its root on disk) with 500 InternalError, where S3 answers
    # 404; botocore then retries with back-off and `dvc pull` gives up
    # ("failed to connect to s3 (mfbench/WORKLOAD-dvc-repN/files/md5)": its
    # connectivity check is fs.exists() on that prefix, i.e. HEAD, then LIST on
    # 404). This sitecustomize, on PYTHONPATH for DVC's push and pull only,
    # turns exactly that answer (HeadObject, 500) into the 404 S3 would send,
    # without a retry; every other request is DVC's own.
    mkdir -p "$W/dvc-shim"
    cat >"$W/dvc-shim/sitecustomize.py" <<'EOF'
try:
    import aiobotocore.session as _session

    def _head_500_is_404(response_dict, **_):
        if response_dict.get("status_code") == 500:
            response_dict["status_code"] = 404

    def _no_retry_on_404(response=None, **_):
        if response is not None and response[1].get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        return None

    _create_client = _session.AioSession.create_client

    def create_client(self, *args, **kwargs):
        if not getattr(self, "_mfbench_s3s_fs", False):
            self._mfbench_s3s_fs = True
            emitter = self.get_component("event_emitter")
            emitter.register("before-parse.s3.HeadObject", _head_500_is_404)
            emitter.register_first("needs-retry.s3.HeadObject", _no_retry_on_404)
        return _create_client(self, *args, **kwargs)

    _session.AioSession.create_client = create_client
except ImportError:
    pass
EOF
    DVCX=(env PYTHONPATH="$W/dvc-shim${PYTHONPATH:+:$PYTHONPATH}" "$DVC")
    "$DVC" version >"$W/dvc-version.txt" 2>&1 || true
    cat "$W/dvc-version.txt" >>"$LOG"
fi

# The median of the recorded times of WORKLOAD OP TOOL, in ms ("n/a": none).
median_ms() {
    python3 -c '
import statistics, sys
v = [int(l.split("\t")[4]) / 1000 for l in open(sys.argv[1]) if l.split("\t")[:3] == sys.argv[2:5]]
print(f"{statistics.median(v):.1f}" if v else "n/a")' "$TIMES" "$@"
}

# --------------------------------------------------------------------------
# Start-up floors: each tool's `--version`, the same timer as every row,
# alternating (odd runs melanoflow first).
WL=floor
say ""
say "== start-up floors: --version, $FLOOR_RUNS runs each =="
for i in $(seq 1 "$FLOOR_RUNS"); do
    if [ $((i % 2)) = 1 ]; then order="mf dvc"; else order="dvc mf"; fi
    for tool in $order; do
        if [ "$tool" = mf ]; then QUIET=1 timed "start-up floor" melanoflow "$i" "$W" "$BIN" --version || true; fi
        if [ "$tool" = dvc ] && [ -n "$DVC" ]; then QUIET=1 timed "start-up floor" dvc "$i" "$W" "$DVC" --version || true; fi
    done
done
say "  medians: melanoflow $(median_ms floor "start-up floor" melanoflow) ms, dvc $(median_ms floor "start-up floor" dvc) ms"

# --------------------------------------------------------------------------
# The workloads' producers. Each sets SRC, the folder of files both tools
# get, and returns non-zero (with a note) when it could not.

# The pipeline file of a synth workload (SYN_* set by run_workload), with the
# remote keys of [store] when given a remote prefix: they are added only after
# synth ran, so that a binary without push/pull (which rejects them) still
# produces the files.
pipeline() { # pipeline [REMOTE_PREFIX]
    echo "[store]"
    echo "url = \"store\""
    if [ -n "${1:-}" ]; then
        echo "remote = \"s3://$BUCKET/$1\""
        echo "endpoint = \"$ENDPOINT\""
        echo "region = \"$S3_REGION\""
    fi
    if [ "$WL" = large ]; then
        printf '\n[stages.%s]\nkind = "import"\npath = "%s"\n' "$MF_STAGE" "$SRC"
        return
    fi
    cat <<EOF

[stages.synth]
kind = "synth"
count = $SYN_COUNT
malignant_fraction = $SYN_MALIGNANT
image_size = $SYN_SIZE
patients = $SYN_PATIENTS
seed = 1
EOF
    if [ -n "$SYN_QUALITY" ]; then echo "jpeg_quality = $SYN_QUALITY"; fi
}

# small, isic: melanoflow's synth stage, run in the workload's melanoflow
# project $P (pipeline file, lock file, store, out/); the files are out/synth.
produce_synth() {
    P="$WD/mf"
    mkdir -p "$P"
    pipeline >"$P/pipeline.toml"
    ONCE_TIMEOUT=$GEN_TIMEOUT once "$WL: melanoflow run (synth)" "$P" "$BIN" -c pipeline.toml run || return 1
    SRC="$P/out/$MF_STAGE"
    if [ ! -f "$P/pipeline.lock" ] || [ ! -d "$SRC" ]; then
        NOTES+=("$WL: no lock file or no output folder out/$MF_STAGE after \`melanoflow run\` in $P")
        return 1
    fi
}

# large: LARGE_FILES files of LARGE_MB x 10^6 pseudo-random bytes, one fixed
# seed per file (python3's random.Random, seeded by a string: the same bytes
# on every run and machine), written 1 MiB at a time.
produce_large() {
    SRC="$WD/files"
    mkdir -p "$SRC"
    cat >"$WD/gen_large.py" <<'EOF'
import os, random, sys

folder, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    r = random.Random(f"melanoflow-bench-large-{i}")
    with open(os.path.join(folder, f"large_{i:03d}.bin"), "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(r.randbytes(n))
            left -= n
EOF
    ONCE_TIMEOUT=$GEN_TIMEOUT once "$WL: writing $LARGE_FILES files of $LARGE_MB MB" "$WD" \
        python3 "$WD/gen_large.py" "$SRC" "$LARGE_FILES" "$((LARGE_MB * 1000000))" || return 1
    # melanoflow's project: one `import` stage over the folder. Its first run
    # copies the files into the store, as `dvc add` does for DVC: both are
    # timed as "add", once per repetition (each repetition starts afresh).
    P="$WD/mf"
    mkdir -p "$P"
}

# large, each melanoflow repetition: a fresh store, then `melanoflow run`
# (the import) timed as "add".
mf_add() {
    rm -rf "$P/store" "$P/out" "$P/pipeline.lock" "$P/.melanoflow"
    pipeline >"$P/pipeline.toml"
    timed add melanoflow "$1" "$P" "${MFX[@]}" -c pipeline.toml run
}

# --------------------------------------------------------------------------
# The repetitions.
# One repetition of each tool; the order alternates between repetitions
# (odd: melanoflow first) so that drifting load on the machine hits both.
mf_rep() {
    local rep=$1 F
    if [ "$WL" = large ] && ! mf_add "$rep"; then
        return 0
    fi
    pipeline "$WL-melanoflow-rep$rep" >"$P/pipeline.toml"
    if timed push melanoflow "$rep" "$P" "${MFX[@]}" -c pipeline.toml push; then
        MF_PUSH_LINE[$WL]=$(summary)
        F="$WD/mf-pull$rep"
        mkdir -p "$F"
        cp "$P/pipeline.toml" "$P/pipeline.lock" "$F/"
        if timed pull melanoflow "$rep" "$F" "${MFX[@]}" -c pipeline.toml pull; then
            MF_PULL_LINE[$WL]=$(summary)
            same_files "$WL rep $rep: melanoflow pull" "$F/out/$MF_STAGE" || true
            if once "$WL rep $rep: melanoflow run after pull" "$F" "${MFX[@]}" -c pipeline.toml run \
                && ! grep -qE '^[0-9]+ stage\(s\): [0-9]+ cached in ' "$W/once.out"; then
                NOTES+=("$WL rep $rep: after \`melanoflow pull\`, \`melanoflow run\` was not all cached: $(tr '\n' ' ' <"$W/once.out" | cut -c1-300)")
                say "FAILED: $WL rep $rep: melanoflow run after pull was not all cached"
            fi
        fi
        rm -rf "$F"
        settle
        if timed "push no-op" melanoflow "$rep" "$P" "${MFX[@]}" -c pipeline.toml push; then
            MF_NOOP_LINE[$WL]=$(summary)
        fi
    fi
    clear_bucket "$WL rep $rep: melanoflow"
}

dvc_rep() {
    local rep=$1 D R C dvc_ok
    D="$WD/dvc$rep"
    R="$D/repo"
    C="$D/clone"
    mkdir -p "$R"
    dvc_ok=0
    # (&& chains: set -e does not apply inside an if condition.)
    if (
        cd "$R" \
            && "${GIT[@]}" init -q . \
            && "$DVC" init -q \
            && "$DVC" config core.analytics false \
            && "$DVC" config core.check_update false \
            && "$DVC" config core.site_cache_dir "$D/site-cache" \
            && cp -r "$SRC" data
    ) >>"$LOG" 2>&1 && timed add dvc "$rep" "$R" "$DVC" add data && (
        cd "$R" \
            && "$DVC" remote add -d s3 "s3://$BUCKET/$WL-dvc-rep$rep" \
            && "$DVC" remote modify s3 endpointurl "$ENDPOINT" \
            && "$DVC" remote modify s3 region "$S3_REGION" \
            && "$DVC" remote modify --local s3 access_key_id "$S3_KEY" \
            && "$DVC" remote modify --local s3 secret_access_key "$S3_SECRET" \
            && "${GIT[@]}" add -A \
            && "${GIT[@]}" commit -q -m data
    ) >>"$LOG" 2>&1; then
        dvc_ok=1
    else
        NOTES+=("$WL rep $rep: setting up the DVC repo failed (see $(basename "$LOG"))")
        say "FAILED: $WL rep $rep: DVC repo setup (see $LOG)"
    fi
    if [ "$dvc_ok" = 1 ] && timed push dvc "$rep" "$R" "${DVCX[@]}" push; then
        if (
            "${GIT[@]}" clone -q "$R" "$C" \
                && cd "$C" \
                && "$DVC" remote modify --local s3 access_key_id "$S3_KEY" \
                && "$DVC" remote modify --local s3 secret_access_key "$S3_SECRET"
        ) >>"$LOG" 2>&1; then
            if timed pull dvc "$rep" "$C" "${DVCX[@]}" pull; then
                same_files "$WL rep $rep: dvc pull" "$C/data" || true
            fi
        else
            NOTES+=("$WL rep $rep: cloning the DVC repo failed (see $(basename "$LOG"))")
        fi
        timed "push no-op" dvc "$rep" "$R" "${DVCX[@]}" push || true
    fi
    rm -rf "$D"
    clear_bucket "$WL rep $rep: dvc"
}

# run_workload NAME: produces the workload's files in $W/NAME, runs its
# repetitions, then deletes the folder (the big ones hold gigabytes).
declare -A WL_DESC
run_workload() {
    WL=$1
    WD="$W/$WL"
    mkdir -p "$WD"
    local runs=$BIG_RUNS mf=$MF t0 rep order tool producer=produce_synth
    MF_STAGE=synth
    case "$WL" in
        small)
            runs=$RUNS
            SYN_COUNT=$NFILES SYN_MALIGNANT=0.018 SYN_SIZE=64 SYN_QUALITY=""
            SYN_PATIENTS=$((NFILES < 300 ? NFILES : 300)) # synth: at least one image per patient
            say ""
            say "== workload small: synth, $NFILES images at 64 px =="
            ;;
        isic)
            SYN_COUNT=$ISIC_FILES SYN_MALIGNANT=0.0176 SYN_SIZE=$ISIC_SIZE SYN_QUALITY=$ISIC_QUALITY
            SYN_PATIENTS=$((ISIC_FILES < 2056 ? ISIC_FILES : 2056))
            say ""
            say "== workload isic: synth, $ISIC_FILES images at $ISIC_SIZE px, JPEG quality $ISIC_QUALITY (untimed: about 13 minutes for 33,126 on 2 cores) =="
            ;;
        large)
            producer=produce_large
            MF_STAGE=data
            say ""
            say "== workload large: $LARGE_FILES files of $LARGE_MB MB of pseudo-random bytes =="
            ;;
    esac
    t0=$SECONDS
    if ! "$producer"; then
        NOTES+=("$WL: could not produce the workload (see $(basename "$LOG")); not measured")
        say "FAILED: $WL: could not produce the workload (see $LOG)"
        rm -rf "$WD"
        return 0
    fi
    listing "$SRC" >"$WD/reference.sha"
    FILES=$(wc -l <"$WD/reference.sha")
    BYTES=$(find "$SRC" -type f -printf '%s\n' | awk '{s += $1} END {printf "%.0f\n", s}')
    WL_GEN_S[$WL]=$((SECONDS - t0))
    say "  $FILES files, $BYTES bytes (produced and listed in ${WL_GEN_S[$WL]} s)"
    case "$WL" in
        small) WL_DESC[$WL]="melanoflow's synth stage, $(commas "$FILES") files (${NFILES} JPEGs of 64 px + train.csv), $(commas "$BYTES") bytes" ;;
        isic) WL_DESC[$WL]="melanoflow's synth stage at ISIC 2020's count, $(commas "$FILES") files ($(commas "$ISIC_FILES") JPEGs of $ISIC_SIZE px at quality $ISIC_QUALITY, $((BYTES / FILES / 1000)) KB on average, + train.csv), $(commas "$BYTES") bytes; $SYN_PATIENTS patients, 1.76% malignant; every image drawn from its own seeded stream" ;;
        large) WL_DESC[$WL]="$(commas "$FILES") files of $LARGE_MB MB of pseudo-random bytes (python3's \`random.Random\`, a fixed seed per file), $(commas "$BYTES") bytes; melanoflow takes the folder in with an \`import\` stage" ;;
    esac
    if [ "$mf" = 0 ] && [ -z "$DVC" ]; then
        NOTES+=("$WL: neither tool measured (melanoflow: ${WL_MF_WHY[$WL]:-$MF_WHY}; DVC: ${DVC_WHY:-not available})")
    else
        for rep in $(seq 1 "$runs"); do
            say ""
            say "== $WL: repetition $rep of $runs =="
            if [ $((rep % 2)) = 1 ]; then order="mf dvc"; else order="dvc mf"; fi
            for tool in $order; do
                if [ "$tool" = mf ] && [ "$mf" = 1 ]; then mf_rep "$rep"; fi
                if [ "$tool" = dvc ] && [ -n "$DVC" ]; then dvc_rep "$rep"; fi
            done
        done
    fi
    say "deleting $WD ..."
    rm -rf "$WD"
    settle
}

for wl in "${SELECTED[@]}"; do
    run_workload "$wl"
done

ELAPSED=$SECONDS

# --------------------------------------------------------------------------
# The report.
{
    echo "# Remote push/pull wall time: melanoflow vs DVC (S3)"
    echo
    echo "Generated by \`benches/remote.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC') in ${ELAPSED} s (workloads: ${SELECTED[*]})."
    echo
    echo "- Machine: $MACHINE; at end $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the numbers)"
    if [ "$MF" = 1 ]; then
        echo "- melanoflow: $MF_VERSION"
    else
        echo "- melanoflow: **not measured**: $MF_WHY"
    fi
    if [ -n "$DVC" ]; then
        echo "- DVC: $DVC_VERSION (pip, benches/.venv; $DVC_LIBS); default \`jobs\` (not set: $DVC_JOBS on this machine, 4 × CPUs)"
    else
        echo "- DVC: **not measured**: ${DVC_WHY:-not available}"
    fi
    echo "- S3: $S3S_DESC on $ENDPOINT (loopback, a temp folder on the local disk), bucket \`$BUCKET\`, path-style, region $S3_REGION, SigV4 with a static key"
    echo "- Workloads (the same files for both tools, both pulls checked file by file (sha256); produced once each, untimed):"
    for wl in "${SELECTED[@]}"; do
        if [ -n "${WL_DESC[$wl]:-}" ]; then
            echo "  - $wl: ${WL_DESC[$wl]}; produced in ${WL_GEN_S[$wl]} s"
        else
            echo "  - $wl: could not be produced (see notes)"
        fi
    done
    reps=()
    for wl in "${SELECTED[@]}"; do
        if [ "$wl" = small ]; then reps+=("small $RUNS (BENCH_RUNS)"); else reps+=("$wl $BIG_RUNS (BENCH_BIG_RUNS)"); fi
    done
    echo "- Repetitions: $(IFS=';'; r="${reps[*]}"; echo "${r//;/, }"); each operation once per repetition with a fresh remote prefix and fresh clones; wall time in ms, process start included"
    echo "- Start-up floor: \`melanoflow --version\` and \`dvc --version\`, $FLOOR_RUNS runs each, alternating, with the same timer as the other rows; no push or pull can be faster than its tool's floor"
    echo "- melanoflow: \`push\` / \`pull\` / \`push\` again, with \`-c pipeline.toml\` (remote in \`[store]\`, credentials from AWS_* environment variables); pull into a folder holding only the pipeline file and its lock file"
    echo "- DVC: \`dvc push\` in a git + DVC repo after \`dvc add data\`; \`dvc pull\` (fetch + checkout) in a \`git clone\` of it; \`dvc push\` again in the repo; remote config \`endpointurl\`, \`region\`, credentials in \`--local\` config. Push and pull run with a sitecustomize that turns s3s-fs's 500 on HEAD of a prefix key (\`WORKLOAD-dvc-repN/files/md5\`, DVC's connectivity check) into the 404 S3 sends, without retry; without it \`dvc pull\` fails"
    echo "- Order: odd repetitions melanoflow first, even ones DVC first"
    echo
    python3 - "$TIMES" "$FLOOR_RUNS" "${SELECTED[@]}" <<'EOF'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    wl, op, tool, rep, us = line.rstrip("\n").split("\t")
    t.setdefault((wl, op, tool), []).append(int(us) / 1000)
def cell(v):
    if not v:
        return "n/a"
    f = lambda x: f"{x:.0f}" if x >= 100 else f"{x:.1f}"
    return f"{f(statistics.median(v))} ({f(min(v))}–{f(max(v))})"
def ratio(d, m):
    if not d or not m:
        return "n/a"
    return f"{statistics.median(d) / statistics.median(m):.1f}×"
print("| workload | operation | melanoflow | DVC | DVC/melanoflow |")
print("|---|---|---:|---:|---:|")
m, d = t.get(("floor", "start-up floor", "melanoflow")), t.get(("floor", "start-up floor", "dvc"))
print(f"| — | start-up floor (`--version`, {sys.argv[2]} runs) | {cell(m)} | {cell(d)} | {ratio(d, m)} |")
for wl in sys.argv[3:]:
    for op, label in (("push", "push (empty prefix)"), ("pull", "pull (fresh copy: download + checkout)"), ("push no-op", "push no-op (all on the remote)")):
        m, d = t.get((wl, op, "melanoflow")), t.get((wl, op, "dvc"))
        print(f"| {wl} | {label} | {cell(m)} | {cell(d)} | {ratio(d, m)} |")
    if wl == "large":
        m, d = t.get((wl, "add", "melanoflow")), t.get((wl, "add", "dvc"))
        print(f"| {wl} | add (`melanoflow run` of the `import` stage; `dvc add data`) | {cell(m)} | {cell(d)} | {ratio(d, m)} |")
    elif t.get((wl, "add", "dvc")):
        print(f"| {wl} | `dvc add data` (DVC only, before its push; melanoflow's files are in its store after `run`) | — | {cell(t[(wl, 'add', 'dvc')])} | — |")
EOF
    echo
    echo "Median (min–max) in ms over the repetitions that succeeded. n/a: not measured or failed (see notes and $(basename "$LOG"))."
    echo
    summaries=""
    for wl in "${SELECTED[@]}"; do
        if [ -n "${MF_PUSH_LINE[$wl]:-}" ]; then summaries+="$wl push:         ${MF_PUSH_LINE[$wl]}"$'\n'; fi
        if [ -n "${MF_PULL_LINE[$wl]:-}" ]; then summaries+="$wl pull:         ${MF_PULL_LINE[$wl]}"$'\n'; fi
        if [ -n "${MF_NOOP_LINE[$wl]:-}" ]; then summaries+="$wl push (no-op): ${MF_NOOP_LINE[$wl]}"$'\n'; fi
    done
    if [ -n "$summaries" ]; then
        echo "melanoflow's summaries (last repetition of each workload):"
        echo
        echo '```'
        printf '%s' "$summaries"
        echo '```'
        echo
    fi
    echo "Objects on the remote after each repetition (the bucket is emptied after each tool's repetition: s3s-fs walks the whole bucket on every list request, whatever the prefix): $(IFS=';'; c="${OBJECT_COUNTS[*]:-none}"; echo "${c//;/; }")."
    echo
    echo "<details><summary>every measurement (ms)</summary>"
    echo
    echo "| workload | operation | tool | repetition | ms |"
    echo "|---|---|---|---:|---:|"
    awk -F'\t' '{printf "| %s | %s | %s | %s | %.1f |\n", $1, $2, $3, $4, $5 / 1000}' "$TIMES"
    echo
    echo "</details>"
    report_notes
} >"$REPORT"

show_report "tool output"
