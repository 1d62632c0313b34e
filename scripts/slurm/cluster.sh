#!/usr/bin/env bash
# A real two-node Slurm 22.05 cluster on one machine, for integration tests.
#
#   cluster.sh install          apt-get install slurm-wlm munge (only if slurmctld is missing)
#   cluster.sh start  DIR       fresh cluster under DIR; prints `export SLURM_CONF=DIR/slurm.conf`
#   cluster.sh stop   DIR [--munge]   stop the daemons (and leftover job steps) started from DIR
#   cluster.sh status DIR       daemon pids + sinfo + squeue (all with timeouts)
#
# Must run as root. Jobs run as root (SlurmUser=root, SlurmdUser=root).
# `start` always gives a FRESH cluster: it stops whatever DIR was running, wipes
# slurmctld state (job ids restart at 1) and moves the old logs to DIR/log.prev.
# start/stop on the same DIR are serialized with flock(DIR/.lock).
# Progress goes to stderr; stdout of `start` is only the export line, so
#   eval "$(scripts/slurm/cluster.sh start /tmp/mfslurm)"
# works. See README.md next to this file.
#
# Tunables (environment):
#   MF_SLURM_CTLD_PORT  (16817)  slurmctld port
#   MF_SLURM_N1_PORT    (17001)  slurmd port of n1
#   MF_SLURM_N2_PORT    (17002)  slurmd port of n2
#   MF_SLURM_CPUS       (max(2, nproc))  CPUs declared per node (may exceed the host's)
#   MF_SLURM_MEM        (4000)   RealMemory (MB) declared per node
#   MF_SLURM_CLUSTER    (mfslurm) ClusterName
#   MF_SLURM_WAIT       (30)     seconds `start` waits for both nodes to be idle
#   MF_SLURM_SCHED_PARAMS        SchedulerParameters (default tuned for fast job turnover)
set -uo pipefail

CTLD_PORT=${MF_SLURM_CTLD_PORT:-16817}
N1_PORT=${MF_SLURM_N1_PORT:-17001}
N2_PORT=${MF_SLURM_N2_PORT:-17002}
MEM=${MF_SLURM_MEM:-4000}
CLUSTER=${MF_SLURM_CLUSTER:-mfslurm}
WAIT=${MF_SLURM_WAIT:-30}
SCHED_PARAMS=${MF_SLURM_SCHED_PARAMS:-batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1}
if [[ -n ${MF_SLURM_CPUS:-} ]]; then
    CPUS=$MF_SLURM_CPUS
else
    CPUS=$(nproc 2>/dev/null || echo 2)
    ((CPUS < 2)) && CPUS=2
fi
# Environment marker put on the daemons so that `stop` finds exactly the
# processes this DIR started (see ours()).
MARK=MF_SLURM_CLUSTER_DIR

log() { echo "cluster.sh: $*" >&2; }
STARTING=0
die() {
    log "ERROR: $*"
    # A failed start must not leave half a cluster behind.
    ((STARTING)) && { STARTING=0; cmd_stop_inner; }
    exit 1
}

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root"; }

# Serialize start/stop on one DIR (parallel test threads may race).
lock_dir() {
    exec 9>"$DIR/.lock" || die "cannot create $DIR/.lock"
    flock -w 120 9 || die "timed out waiting for $DIR/.lock"
}

# Resolve DIR to an absolute path (creating it).
resolve_dir() {
    [[ -n ${1:-} ]] || die "missing DIR argument"
    mkdir -p -- "$1" || die "cannot create $1"
    DIR=$(cd -- "$1" && pwd -P) || die "cannot enter $1"
    [[ $DIR =~ [[:space:]] ]] && die "DIR must not contain whitespace: $DIR"
    CONF=$DIR/slurm.conf
}

# ---------------------------------------------------------------- processes

# Is PID alive (and not a zombie)? Builtins only: this runs for every process.
alive() {
    local line st
    read -r line 2>/dev/null <"/proc/$1/stat" || return 1
    st=${line##*) }
    st=${st%% *}
    [[ -n $st && $st != Z && $st != X ]]
}

# Does PID belong to this DIR? It must be a Slurm daemon (slurmctld, slurmd, or
# their helpers slurmstepd/slurmscriptd) whose environment holds our marker or
# SLURM_CONF=DIR/slurm.conf (slurmstepd overwrites most of its environment with
# its process title, but SLURM_CONF survives).
ours() {
    local pid=$1 comm e
    local -a envv
    read -r comm 2>/dev/null <"/proc/$pid/comm" || return 1
    case $comm in
    slurmctld | slurmd | slurmstepd | slurmscriptd) ;;
    *) return 1 ;;
    esac
    alive "$pid" || return 1
    mapfile -d '' -t envv 2>/dev/null <"/proc/$pid/environ" || return 1
    for e in "${envv[@]}"; do
        [[ $e == "$MARK=$DIR" || $e == "SLURM_CONF=$CONF" ]] && return 0
    done
    return 1
}

# All live processes of this DIR.
our_pids() {
    local p
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        ours "$p" && echo "$p"
    done
}

# Descendants of PID (children first walk, by ppid).
descendants() {
    local parent=$1 p
    for p in $(ps -o pid= --ppid "$parent" 2>/dev/null); do
        echo "$p"
        descendants "$p"
    done
}

# Send SIG to PIDS, wait up to SECS for them to go, return 0 if all gone.
signal_wait() {
    local sig=$1 secs=$2; shift 2
    local p left
    for p in "$@"; do kill -s "$sig" "$p" 2>/dev/null; done
    local deadline=$((SECONDS + secs))
    while :; do
        left=0
        for p in "$@"; do alive "$p" && left=1; done
        ((left == 0)) && return 0
        ((SECONDS >= deadline)) && return 1
        sleep 0.1
    done
}

kill_pids() { # TERM, then KILL; bounded
    (($# == 0)) && return 0
    signal_wait TERM 5 "$@" || signal_wait KILL 3 "$@" || log "WARNING: could not kill: $*"
}

port_in_use() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# ---------------------------------------------------------------- munge

munge_ok() { timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; }

ensure_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --force --keyfile=/etc/munge/munge.key >/dev/null 2>&1 ||
                dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        chown -R munge:munge /etc/munge
        chmod 700 /etc/munge
        chmod 400 /etc/munge/munge.key
    fi
    munge_ok && return 0
    log "starting munged"
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    # stale pid/socket from a crashed munged
    local mp
    mp=$(cat /run/munge/munged.pid 2>/dev/null)
    if [[ -z $mp ]] || ! alive "$mp"; then
        rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    fi
    runuser -u munge -- /usr/sbin/munged --force </dev/null >/dev/null 2>&1 9>&- ||
        log "munged returned non-zero (checking anyway)"
    local i
    for i in $(seq 50); do munge_ok && return 0; sleep 0.1; done
    die "munged is not working (see /var/log/munge/munged.log)"
}

stop_munge() {
    local mp
    mp=$(cat /run/munge/munged.pid 2>/dev/null)
    if [[ -n $mp ]] && alive "$mp" && grep -q munged "/proc/$mp/comm" 2>/dev/null; then
        log "stopping munged ($mp)"
        kill_pids "$mp"
    fi
}

# ---------------------------------------------------------------- config

write_config() {
    local gres_line
    mkdir -p "$DIR"/{state,spool/n1,spool/n2,run,log,dev}
    # Fake GPU for n2.
    rm -f "$DIR/dev/nvidia0"
    if mknod "$DIR/dev/nvidia0" c 195 0 2>/dev/null; then
        gres_line="NodeName=n2 Name=gpu File=$DIR/dev/nvidia0"
    else
        log "mknod failed; GPU gres without a device file"
        gres_line="NodeName=n2 Name=gpu Count=1"
    fi

    cat >"$CONF" <<EOF
# Generated by scripts/slurm/cluster.sh -- do not edit, regenerated on every start.
ClusterName=$CLUSTER
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=100
GresTypes=gpu
# Declared CPUs/memory may exceed the host's; do not drain the node for that.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=0
# Scheduling: react to every event immediately (defaults add 3+ s per job).
SchedulerType=sched/backfill
SchedulerParameters=$SCHED_PARAMS
MinJobAge=300
KillWait=2
InactiveLimit=0
MailProg=/bin/true
SlurmdTimeout=30
SlurmctldTimeout=30
MessageTimeout=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=n1 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$N1_PORT CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$N2_PORT CPUs=$CPUS RealMemory=$MEM Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
    echo "$gres_line" >"$DIR/gres.conf"
    # No cgroup plugins are used (proctrack/linuxproc, task/none), so no cgroup.conf.
    rm -f "$DIR/cgroup.conf"
}

# ---------------------------------------------------------------- daemons

# launch NAME CMD...: run in background in its own session, record $! in DIR/run/NAME.bgpid
launch() {
    local name=$1; shift
    # cwd = DIR, so daemons and job steps never pin the caller's directory.
    # fd 9 (the DIR lock) must not leak into the daemons.
    (cd "$DIR" && exec setsid env "$MARK=$DIR" SLURM_CONF="$CONF" "$@" \
        </dev/null >>"$DIR/log/$name.stdout" 2>&1 9>&-) &
    echo $! >"$DIR/run/$name.bgpid"
}

# NAME: is the process we launched still there (also while it is still exec'ing)?
launched_alive() { local p; p=$(cat "$DIR/run/$1.bgpid" 2>/dev/null) && alive "$p"; }

daemon_pid() { # NAME -> live pid or nothing
    local name=$1 f p
    for f in "$DIR/run/$name.bgpid" "$DIR/run/$name.pid"; do
        p=$(cat "$f" 2>/dev/null) || continue
        [[ $p =~ ^[0-9]+$ ]] && ours "$p" && { echo "$p"; return 0; }
    done
    return 1
}

cmd_start() {
    need_root
    resolve_dir "${1:-}"
    lock_dir
    command -v slurmctld >/dev/null || die "slurm not installed (run: $0 install)"
    ((${#DIR} > 70)) && log "WARNING: long DIR ($DIR); slurmstepd socket paths may exceed 108 chars"
    local t0=$SECONDS

    # Whatever ran from DIR before (running or crashed) goes first.
    cmd_stop_inner

    local port
    for port in "$CTLD_PORT" "$N1_PORT" "$N2_PORT"; do
        port_in_use "$port" && die "port $port is in use (another cluster? set MF_SLURM_*_PORT)"
    done

    ensure_munge
    STARTING=1
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/run"
    # Previous run's logs (incl. jobcomp.txt) are kept in log.prev/ for post-mortems.
    if [[ -d $DIR/log ]]; then rm -rf "$DIR/log.prev" && mv "$DIR/log" "$DIR/log.prev"; fi
    write_config

    launch slurmctld slurmctld -D -c -i -f "$CONF"
    local i
    for i in $(seq 100); do
        port_in_use "$CTLD_PORT" && break
        launched_alive slurmctld || { tail -n 20 "$DIR/log/slurmctld.stdout" >&2; die "slurmctld died"; }
        sleep 0.1
    done
    launch slurmd-n1 slurmd -D -N n1 -f "$CONF"
    launch slurmd-n2 slurmd -D -N n2 -f "$CONF"

    local deadline=$((SECONDS + WAIT)) out name
    while :; do
        for name in slurmctld slurmd-n1 slurmd-n2; do
            if ! launched_alive "$name"; then
                tail -n 20 "$DIR/log/$name".{log,stdout} 2>/dev/null >&2
                die "$name died during start (logs in $DIR/log)"
            fi
        done
        out=$(SLURM_CONF=$CONF timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')
        [[ $out == "n1 idle n2 idle " ]] && break
        if ((SECONDS >= deadline)); then
            log "nodes not idle after ${WAIT}s: '$out'"
            tail -n 5 "$DIR"/log/*.log >&2
            die "start failed"
        fi
        sleep 0.2
    done
    STARTING=0
    echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
    log "cluster '$CLUSTER' up in $((SECONDS - t0))s: slurmctld $(daemon_pid slurmctld), n1 $(daemon_pid slurmd-n1), n2 $(daemon_pid slurmd-n2); logs in $DIR/log"
    echo "export SLURM_CONF=$CONF"
}

# Stop everything started from DIR (no argument parsing; DIR/CONF set).
cmd_stop_inner() {
    local name pids=() p all
    for name in slurmctld slurmd-n1 slurmd-n2; do
        p=$(daemon_pid "$name") && pids+=("$p")
    done
    # Anything else carrying our marker / config path (e.g. pid files lost).
    all=$(our_pids)
    for p in $all; do
        [[ " ${pids[*]} " == *" $p "* ]] || pids+=("$p")
    done
    if ((${#pids[@]})); then
        # Job processes are children of slurmstepd (not marked); collect them first.
        local victims=()
        for p in "${pids[@]}"; do
            if grep -q '^slurmstepd' "/proc/$p/comm" 2>/dev/null; then
                victims+=($(descendants "$p"))
            fi
        done
        log "stopping pids ${pids[*]} ${victims[*]:-}"
        # Daemons first (slurmctld, slurmd), then steps and their job processes.
        local daemons=() steps=()
        for p in "${pids[@]}"; do
            if grep -q '^slurmstepd' "/proc/$p/comm" 2>/dev/null; then steps+=("$p"); else daemons+=("$p"); fi
        done
        kill_pids "${daemons[@]}"
        # Job steps get no grace period: SIGKILL the step daemons and job processes.
        ((${#steps[@]} + ${#victims[@]})) && { signal_wait KILL 3 "${steps[@]}" "${victims[@]}" || log "WARNING: could not kill steps"; }
    fi
    rm -f "$DIR"/run/*.pid "$DIR"/run/*.bgpid 2>/dev/null
    # Verify.
    all=$(our_pids)
    [[ -z $all ]] || log "WARNING: still alive after stop: $all"
    return 0
}

cmd_stop() {
    need_root
    resolve_dir "${1:-}"
    lock_dir
    cmd_stop_inner
    if [[ ${2:-} == --munge ]]; then stop_munge; fi
    log "stopped"
}

cmd_status() {
    resolve_dir "${1:-}"
    local name p rc=0
    for name in slurmctld slurmd-n1 slurmd-n2; do
        if p=$(daemon_pid "$name"); then echo "$name: running (pid $p)"; else echo "$name: not running"; rc=1; fi
    done
    munge_ok && echo "munged: ok" || { echo "munged: not working"; rc=1; }
    if [[ -f $CONF ]]; then
        SLURM_CONF=$CONF timeout 5 sinfo -N -o '%N %P %t %c %m %G' || { echo "sinfo failed/timed out"; rc=1; }
        SLURM_CONF=$CONF timeout 5 squeue || true
    fi
    return $rc
}

cmd_install() {
    need_root
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        log "slurm-wlm and munge already installed"
        return 0
    fi
    log "installing slurm-wlm munge"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq slurm-wlm munge >/tmp/mf-slurm-apt.log 2>&1; then
        apt-get update -qq >>/tmp/mf-slurm-apt.log 2>&1
        apt-get install -y -qq slurm-wlm munge >>/tmp/mf-slurm-apt.log 2>&1 ||
            { tail -20 /tmp/mf-slurm-apt.log >&2; die "apt-get install failed"; }
    fi
    command -v slurmctld >/dev/null || die "slurmctld still missing after install"
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start "${2:-}" ;;
stop) cmd_stop "${2:-}" "${3:-}" ;;
status) cmd_status "${2:-}" ;;
*)
    echo "usage: $0 install | start DIR | stop DIR [--munge] | status DIR" >&2
    exit 2
    ;;
esac
