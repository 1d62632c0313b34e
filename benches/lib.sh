# Shared by the benchmark scripts (source it; it defines functions only):
# where the peers' virtual environments live and how they are filled with
# pip, how a script names the machine it measured on, and small helpers.
# Every peer is installed on first use and reused after; when pip fails, the
# scripts report our side alone and say why (never a silent missing column).

# Where the benchmark scripts keep their Python peers.
BENCH_VENV="benches/.venv"             # DVC, Pillow
BENCH_VENV_TORCH="benches/.venv-torch" # PyTorch (about 5 GB with its CUDA wheels)

say() { printf '%s\n' "$*" >&2; }

# 1,234,567 for 1234567.
commas() { echo "$1" | sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|,\)/\1,\2\3/' -e 'ta'; }

# pip_peer VENV CHECK PACKAGE...: makes sure `VENV/bin/python -c CHECK`
# succeeds, creating VENV and pip-installing PACKAGEs if it does not (pip's
# output goes to $LOG when set, else stderr). Returns 0 when CHECK passes.
pip_peer() {
    local venv=$1 check=$2
    shift 2
    local log=${LOG:-/dev/stderr}
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
        return 0
    fi
    say "installing $* into $venv (pip) ..."
    { [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"; } >>"$log" 2>&1 || return 1
    "$venv/bin/pip" install -q "$@" >>"$log" 2>&1 || true
    "$venv/bin/python" -c "$check" >/dev/null 2>&1
}

# The last error-looking line pip left in $LOG, for the report's "why".
pip_why() {
    local fallback=$1
    local why
    why=$(grep -iE 'error|could not|no matching' "${LOG:-/dev/null}" 2>/dev/null | tail -1 | cut -c1-200 || true)
    echo "${why:-$fallback}"
}

cpu_model() {
    local cpu
    cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
    echo "${cpu:-$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)}"
}

# One line naming the machine and how busy it was: every report prints it,
# because other work on the machine skews the numbers.
machine_line() {
    echo "nproc $(nproc), CPU $(cpu_model), $(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

# The report's closing "Notes:" list, from the script's array NOTES.
report_notes() {
    if [ "${#NOTES[@]}" -gt 0 ]; then
        echo
        echo "Notes:"
        for n in "${NOTES[@]}"; do echo "- $n"; done
    fi
}

# Prints the finished report ($REPORT) and where it and the log ($LOG) are;
# $1 says what the log holds.
show_report() {
    echo
    cat "$REPORT"
    echo
    echo "(written to ${REPORT#"$ROOT"/}; $1 in ${LOG#"$ROOT"/})"
}
