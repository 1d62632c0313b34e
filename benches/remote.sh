#!/usr/bin/env bash
# Remote push/pull wall time: melanoflow vs DVC against the same loopback S3
# server, same files, same run, same machine.
#
# The S3 server is s3s-fs 0.14.1 (a small S3 implementation over a folder),
# started on a free 127.0.0.1 port with a temp root folder; the bucket
# `mfbench` is a subfolder of that root. The workload is melanoflow's own
# synth stage (BENCH_FILES JPEGs of 64 px + train.csv, about 8.8 MB for
# 5,000), produced once; DVC gets a copy of the very same files, and both
# pulls are checked against them (sha256 of every file).
#
# Each repetition (BENCH_RUNS, default 3) times every operation once, with a
# fresh remote prefix (s3://mfbench/melanoflow-repN, s3://mfbench/dvc-repN)
# and fresh clones (odd repetitions melanoflow first, even ones DVC first):
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
# BENCH_RUNS (3), BENCH_FILES (5000: synth's image count), BENCH_SETTLE_S (3:
# pause after mass deletions, see settle()), BENCH_TIMEOUT (600 s
# per timed command), BENCH_KEEP_TMP=1 (keep the temp folder), BENCH_NO_DVC=1
# (melanoflow alone), BENCH_NO_MELANOFLOW=1 (DVC alone; melanoflow still
# generates the files), S3S_FS (the s3s-fs binary; else PATH, ~/.cargo/bin,
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
RUNS=${BENCH_RUNS:-3}
NFILES=${BENCH_FILES:-5000}
TIMEOUT=${BENCH_TIMEOUT:-600}
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
TIMES="$W/times.tsv" # op, tool, rep, ms
: >"$TIMES"

# Records a failed command: a note with the exact command and the tail of its
# output ($W/once.out).
failed() {
    local what=$1 cwd=$2 rc=$3
    shift 3
    [ "$rc" = 124 ] && rc="124: timed out after $TIMEOUT s; set BENCH_TIMEOUT"
    NOTES+=("$what failed (exit $rc): \`(cd $cwd && $*)\`: $(tail -3 "$W/once.out" | tr '\n' ' ' | cut -c1-400)")
    say "FAILED: $what: (cd $cwd && $*)"
    tail -5 "$W/once.out" >&2
}

# Runs a command once (untimed), logging its output.
once() {
    local what=$1 cwd=$2
    shift 2
    local rc=0
    log "## $what (cwd $cwd): $*"
    (cd "$cwd" && timeout "$TIMEOUT" "$@") >"$W/once.out" 2>&1 || rc=$?
    cat "$W/once.out" >>"$LOG"
    [ "$rc" = 0 ] && return 0
    failed "$what" "$cwd" "$rc" "$@"
    return 1
}

# timed OP TOOL REP CWD CMD...: runs CMD once, appends its wall time (us) to
# $TIMES; the output stays in $W/once.out for the caller.
timed() {
    local op=$1 tool=$2 rep=$3 cwd=$4
    shift 4
    local t0 t1 rc=0
    log "## rep $rep: $tool $op (cwd $cwd): $*"
    t0=$(date +%s%N)
    (cd "$cwd" && timeout "$TIMEOUT" "$@") >"$W/once.out" 2>&1 || rc=$?
    t1=$(date +%s%N)
    cat "$W/once.out" >>"$LOG"
    if [ "$rc" != 0 ]; then
        failed "rep $rep: $tool $op" "$cwd" "$rc" "$@"
        return 1
    fi
    log "## -> $(((t1 - t0) / 1000)) us"
    printf '%s\t%s\t%s\t%s\n' "$op" "$tool" "$rep" "$(((t1 - t0) / 1000))" >>"$TIMES"
    say "  $tool $op: $(((t1 - t0) / 1000000)) ms"
}

# The last non-empty line of the last command's output.
last_line() { grep -v '^[[:space:]]*$' "$W/once.out" | tail -1 || true; }

# One line per file: sha256 and path, sorted by path.
listing() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }

same_files() {
    local what=$1 dir=$2
    if [ ! -d "$dir" ]; then
        NOTES+=("$what: $dir does not exist")
        return 1
    fi
    listing "$dir" >"$W/check.sha"
    if cmp -s "$W/check.sha" "$W/reference.sha"; then
        log "## $what: the same $FILES files as the synth output (sha256)"
        return 0
    fi
    NOTES+=("$what: the files differ from the synth output ($(diff "$W/reference.sha" "$W/check.sha" | grep -c '^[<>]' || true) differing lines in the sha256 listings)")
    say "FAILED: $what: the files differ from the synth output"
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

# --------------------------------------------------------------------------
# The workload: melanoflow's synth stage. The remote keys of [store] are
# added only after it ran, so that a binary without push/pull (which rejects
# them) still produces the files.
say ""
say "== workload: synth, $NFILES images at 64 px =="
P="$W/mf" # melanoflow's project: pipeline file, lock file, store, out/
mkdir -p "$P"
pipeline() { # pipeline [REMOTE_PREFIX]
    echo "[store]"
    echo "url = \"store\""
    if [ -n "${1:-}" ]; then
        echo "remote = \"s3://$BUCKET/$1\""
        echo "endpoint = \"$ENDPOINT\""
        echo "region = \"$S3_REGION\""
    fi
    cat <<EOF

[stages.synth]
kind = "synth"
count = $NFILES
malignant_fraction = 0.018
image_size = 64
patients = 300
seed = 1
EOF
}
pipeline >"$P/pipeline.toml"
once "workload: melanoflow run (synth)" "$P" "$BIN" -c pipeline.toml run || die "could not produce the workload (see $LOG)"
[ -f "$P/pipeline.lock" ] || die "no lock file $P/pipeline.lock after the run"
SRC="$P/out/synth"
[ -d "$SRC" ] || die "no synth output folder $SRC after the run"
listing "$SRC" >"$W/reference.sha"
FILES=$(wc -l <"$W/reference.sha")
BYTES=$(find "$SRC" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
say "  $FILES files, $BYTES bytes"

if [ -n "$DVC" ]; then
    GIT=(git -c user.name=bench -c user.email=bench@localhost -c init.defaultBranch=main -c advice.detachedHead=false)
    # s3s-fs answers HEAD on a key that is a "folder" (a prefix of other keys,
    # a folder of its root on disk) with 500 InternalError, where S3 answers
    # 404; botocore then retries with back-off and `dvc pull` gives up
    # ("failed to connect to s3 (mfbench/dvc-repN/files/md5)": its
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

# --------------------------------------------------------------------------
# The repetitions.
MF_PUSH_LINE=""
MF_PULL_LINE=""
MF_NOOP_LINE=""
# One repetition of each tool; the order alternates between repetitions
# (odd: melanoflow first) so that drifting load on the machine hits both.
mf_rep() {
    local rep=$1 F
    pipeline "melanoflow-rep$rep" >"$P/pipeline.toml"
    if timed push melanoflow "$rep" "$P" "${MFX[@]}" -c pipeline.toml push; then
        MF_PUSH_LINE=$(summary)
        F="$W/mf-pull$rep"
        mkdir -p "$F"
        cp "$P/pipeline.toml" "$P/pipeline.lock" "$F/"
        if timed pull melanoflow "$rep" "$F" "${MFX[@]}" -c pipeline.toml pull; then
            MF_PULL_LINE=$(summary)
            same_files "rep $rep: melanoflow pull" "$F/out/synth" || true
            if once "rep $rep: melanoflow run after pull" "$F" "${MFX[@]}" -c pipeline.toml run \
                && ! grep -qE '^[0-9]+ stage\(s\): [0-9]+ cached in ' "$W/once.out"; then
                NOTES+=("rep $rep: after \`melanoflow pull\`, \`melanoflow run\` was not all cached: $(tr '\n' ' ' <"$W/once.out" | cut -c1-300)")
                say "FAILED: rep $rep: melanoflow run after pull was not all cached"
            fi
        fi
        rm -rf "$F"
        settle
        if timed "push no-op" melanoflow "$rep" "$P" "${MFX[@]}" -c pipeline.toml push; then
            MF_NOOP_LINE=$(summary)
        fi
    fi
    clear_bucket "rep $rep: melanoflow"
}

dvc_rep() {
    local rep=$1 D R C dvc_ok
    D="$W/dvc$rep"
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
            && "$DVC" remote add -d s3 "s3://$BUCKET/dvc-rep$rep" \
            && "$DVC" remote modify s3 endpointurl "$ENDPOINT" \
            && "$DVC" remote modify s3 region "$S3_REGION" \
            && "$DVC" remote modify --local s3 access_key_id "$S3_KEY" \
            && "$DVC" remote modify --local s3 secret_access_key "$S3_SECRET" \
            && "${GIT[@]}" add -A \
            && "${GIT[@]}" commit -q -m data
    ) >>"$LOG" 2>&1; then
        dvc_ok=1
    else
        NOTES+=("rep $rep: setting up the DVC repo failed (see $(basename "$LOG"))")
        say "FAILED: rep $rep: DVC repo setup (see $LOG)"
    fi
    if [ "$dvc_ok" = 1 ] && timed push dvc "$rep" "$R" "${DVCX[@]}" push; then
        if (
            "${GIT[@]}" clone -q "$R" "$C" \
                && cd "$C" \
                && "$DVC" remote modify --local s3 access_key_id "$S3_KEY" \
                && "$DVC" remote modify --local s3 secret_access_key "$S3_SECRET"
        ) >>"$LOG" 2>&1; then
            if timed pull dvc "$rep" "$C" "${DVCX[@]}" pull; then
                same_files "rep $rep: dvc pull" "$C/data" || true
            fi
        else
            NOTES+=("rep $rep: cloning the DVC repo failed (see $(basename "$LOG"))")
        fi
        timed "push no-op" dvc "$rep" "$R" "${DVCX[@]}" push || true
    fi
    rm -rf "$D"
    clear_bucket "rep $rep: dvc"
}

for rep in $(seq 1 "$RUNS"); do
    say ""
    say "== repetition $rep of $RUNS =="
    if [ $((rep % 2)) = 1 ]; then order="mf dvc"; else order="dvc mf"; fi
    for tool in $order; do
        if [ "$tool" = mf ] && [ "$MF" = 1 ]; then mf_rep "$rep"; fi
        if [ "$tool" = dvc ] && [ -n "$DVC" ]; then dvc_rep "$rep"; fi
    done
done

ELAPSED=$SECONDS

# --------------------------------------------------------------------------
# The report.
{
    echo "# Remote push/pull wall time: melanoflow vs DVC (S3)"
    echo
    echo "Generated by \`benches/remote.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC') in ${ELAPSED} s."
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
    echo "- Workload: melanoflow's synth stage, $(commas "$FILES") files (${NFILES} JPEGs of 64 px + train.csv), $(commas "$BYTES") bytes; the same files for both tools, both pulls checked file by file (sha256)"
    echo "- $RUNS repetitions, each operation once per repetition with a fresh remote prefix and fresh clones; wall time in ms, process start included"
    echo "- melanoflow: \`push\` / \`pull\` / \`push\` again, with \`-c pipeline.toml\` (remote in \`[store]\`, credentials from AWS_* environment variables); pull into a folder holding only the pipeline file and its lock file"
    echo "- DVC: \`dvc push\` in a git + DVC repo after \`dvc add data\`; \`dvc pull\` (fetch + checkout) in a \`git clone\` of it; \`dvc push\` again in the repo; remote config \`endpointurl\`, \`region\`, credentials in \`--local\` config. Push and pull run with a sitecustomize that turns s3s-fs's 500 on HEAD of a prefix key (\`dvc-repN/files/md5\`, DVC's connectivity check) into the 404 S3 sends, without retry; without it \`dvc pull\` fails"
    echo "- Order: odd repetitions melanoflow first, even ones DVC first"
    echo
    python3 - "$TIMES" <<'EOF'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    op, tool, rep, us = line.rstrip("\n").split("\t")
    t.setdefault((op, tool), []).append(int(us) / 1000)
def cell(v):
    if not v:
        return "n/a"
    f = lambda x: f"{x:.0f}" if x >= 100 else f"{x:.1f}"
    return f"{f(statistics.median(v))} ({f(min(v))}–{f(max(v))})"
def ratio(d, m):
    if not d or not m:
        return "n/a"
    return f"{statistics.median(d) / statistics.median(m):.1f}×"
print("| operation | melanoflow | DVC | DVC/melanoflow |")
print("|---|---:|---:|---:|")
for op, label in (("push", "push (empty prefix)"), ("pull", "pull (fresh copy: download + checkout)"), ("push no-op", "push no-op (all on the remote)")):
    m, d = t.get((op, "melanoflow")), t.get((op, "dvc"))
    print(f"| {label} | {cell(m)} | {cell(d)} | {ratio(d, m)} |")
if t.get(("add", "dvc")):
    print(f"| `dvc add data` (DVC only, before its push; melanoflow's files are in its store after `run`) | — | {cell(t[('add', 'dvc')])} | — |")
EOF
    echo
    echo "Median (min–max) in ms over the repetitions that succeeded. n/a: not measured or failed (see notes and $(basename "$LOG"))."
    echo
    if [ -n "$MF_PUSH_LINE$MF_PULL_LINE$MF_NOOP_LINE" ]; then
        echo "melanoflow's summaries (last repetition):"
        echo
        echo '```'
        [ -n "$MF_PUSH_LINE" ] && echo "push:         $MF_PUSH_LINE"
        [ -n "$MF_PULL_LINE" ] && echo "pull:         $MF_PULL_LINE"
        [ -n "$MF_NOOP_LINE" ] && echo "push (no-op): $MF_NOOP_LINE"
        echo '```'
        echo
    fi
    echo "Objects on the remote after each repetition (the bucket is emptied after each tool's repetition: s3s-fs walks the whole bucket on every list request, whatever the prefix): $(IFS=';'; echo "${OBJECT_COUNTS[*]:-none}" | sed 's/;/; /g')."
    echo
    echo "<details><summary>every measurement (ms)</summary>"
    echo
    echo "| operation | tool | repetition | ms |"
    echo "|---|---|---:|---:|"
    awk -F'\t' '{printf "| %s | %s | %s | %.1f |\n", $1, $2, $3, $4 / 1000}' "$TIMES"
    echo
    echo "</details>"
    report_notes
} >"$REPORT"

show_report "tool output"
