#!/usr/bin/env bash
# End-to-end check of cluster.sh against a real Slurm: start, dependencies,
# failure + kill-on-invalid-dep, job array, GPU gres, scancel, a 5-job chain,
# crash recovery, stop. Leaves the cluster STOPPED. Usage: selftest.sh [DIR]
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CL=$HERE/cluster.sh
DIR=${1:-/tmp/mf-slurm-selftest}
FAILS=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }

t0=$(now)
out=$("$CL" start "$DIR") || { echo "start failed"; exit 1; }
eval "$out"
echo "start took $(secs "$t0" "$(now)") s"
[[ $SLURM_CONF == "$DIR/slurm.conf" ]] && pass "export line" || fail "export line: $SLURM_CONF"

W=$DIR/work
rm -rf "$W"
mkdir -p "$W"
cd "$W" || exit 1

sb() { timeout 10 sbatch --parsable "$@"; }
job_line() { timeout 5 scontrol show job -o "$1" 2>/dev/null | head -1; }
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" $1"; }
# wait_state ID REGEX [SECS]: wait until JobState matches REGEX; echo final line
wait_state() {
    local id=$1 re=$2 secs=${3:-20} l st deadline=$((SECONDS + ${3:-20}))
    while :; do
        l=$(job_line "$id")
        st=$(field "$l" JobState)
        [[ $st =~ ^($re)$ ]] && { echo "$l"; return 0; }
        ((SECONDS >= deadline)) && { echo "$l"; return 1; }
        sleep 0.1
    done
}

# 1. trivial job latency
t=$(now)
j=$(sb --wrap 'echo hello')
l=$(wait_state "$j" COMPLETED) && pass "trivial job COMPLETED in $(secs "$t" "$(now)") s (sbatch -> COMPLETED)" || fail "trivial job: $l"
[[ $(cat "slurm-$j.out") == hello ]] && pass "default output file slurm-$j.out in submit dir" || fail "output file"

# 2. afterok chain of two
a=$(sb --wrap 'sleep 1; echo A > a.txt')
b=$(sb --dependency=afterok:"$a" --kill-on-invalid-dep=yes --wrap 'cat a.txt > b.txt')
lb=$(job_line "$b")
[[ $(field "$lb" JobState) == PENDING && $(field "$lb" Reason) == Dependency ]] && pass "dependent PENDING Reason=Dependency" || fail "dependent pending: $lb"
l=$(wait_state "$b" COMPLETED) && [[ $(cat b.txt) == A ]] && pass "afterok: second job ran after first" || fail "afterok: $l"

# 3. failing job + dependent that must be cancelled
f=$(sb --wrap 'exit 3')
g=$(sb --dependency=afterok:"$f" --kill-on-invalid-dep=yes --wrap 'touch g_ran')
l=$(wait_state "$f" FAILED) && [[ $(field "$l" ExitCode) == 3:0 ]] && pass "exit 3 -> FAILED ExitCode=3:0" || fail "failing job: $l"
l=$(wait_state "$g" CANCELLED) && [[ $(field "$l" Reason) == DependencyNeverSatisfied ]] && pass "dependent of failed job CANCELLED Reason=DependencyNeverSatisfied" || fail "kill-on-invalid-dep: $l"
[[ ! -e g_ran ]] && pass "cancelled dependent never ran" || fail "cancelled dependent ran"

# 4. job array
arr=$(sb --array=0-3 --wrap 'echo $SLURM_ARRAY_TASK_ID > task_$SLURM_ARRAY_TASK_ID.txt')
deadline=$((SECONDS + 20))
while :; do
    states=$(timeout 5 scontrol show job -o "$arr" | sed -n 's/.* JobState=\([^ ]*\).*/\1/p' | sort | uniq -c | tr -s ' ')
    [[ $states == " 4 COMPLETED" ]] && break
    ((SECONDS >= deadline)) && break
    sleep 0.1
done
ok=1
for i in 0 1 2 3; do [[ $(cat "task_$i.txt" 2>/dev/null) == "$i" ]] || ok=0; done
[[ $states == " 4 COMPLETED" && $ok == 1 ]] && pass "array 0-3: 4 tasks COMPLETED, files task_0..3" || fail "array: $states ok=$ok"

# 5. GPU job lands on n2
gj=$(sb --gres=gpu:1 --wrap 'echo "$SLURMD_NODENAME $CUDA_VISIBLE_DEVICES"')
l=$(wait_state "$gj" COMPLETED) && [[ $(field "$l" NodeList) == n2 ]] && pass "gres gpu job ran on n2 (output: $(cat "slurm-$gj.out"))" || fail "gpu: $l"

# 6. two 1-cpu jobs per node at once (4 concurrently on 2 nodes)
ids=()
for i in 1 2 3 4; do ids+=("$(sb --wrap 'sleep 3')"); done
sleep 2
running=$(timeout 5 squeue -h -t R -o %i | wc -l)
((running == 4)) && pass "4 one-cpu jobs running at once" || fail "concurrency: $running running"
timeout 5 scancel "${ids[@]}"

# 7. scancel of a running job
s=$(sb --wrap 'sleep 300')
wait_state "$s" RUNNING >/dev/null
timeout 5 scancel "$s"
l=$(wait_state "$s" CANCELLED) && pass "scancel: RUNNING -> CANCELLED ExitCode=$(field "$l" ExitCode)" || fail "scancel: $l"

# 8. chain of 5 dependent trivial jobs
t=$(now)
prev=$(sb --wrap true)
for i in 2 3 4 5; do prev=$(sb --dependency=afterok:"$prev" --kill-on-invalid-dep=yes --wrap true); done
l=$(wait_state "$prev" COMPLETED 60) && pass "chain of 5 dependent jobs finished in $(secs "$t" "$(now)") s" || fail "chain: $l"

# 9. jobcomp file
JC=$DIR/log/jobcomp.txt
sleep 0.5
grep -q "^JobId=$f .*JobState=FAILED.*ExitCode=3:0" "$JC" && pass "jobcomp has FAILED line for $f" || fail "jobcomp FAILED"
grep -q "^JobId=$g .*JobState=CANCELLED" "$JC" && pass "jobcomp has CANCELLED line for $g" || fail "jobcomp CANCELLED"
n_arr=$(grep -c "ArrayJobId=$arr " "$JC")
((n_arr == 4)) && pass "jobcomp has 4 array task lines" || fail "jobcomp array lines: $n_arr"

# 10. crash recovery: kill -9 the daemons with a job running, then start again
sb --wrap 'sleep 300' >/dev/null
sleep 2
for p in "$DIR"/run/*.bgpid; do kill -9 "$(cat "$p")" 2>/dev/null; done
sleep 0.5
t=$(now)
out=$("$CL" start "$DIR") && eval "$out" && pass "restart after crash (stale pids, orphaned slurmstepd) in $(secs "$t" "$(now)") s" || fail "restart after crash"
j=$(sb --wrap true)
l=$(wait_state "$j" COMPLETED) && [[ $j == 1 ]] && pass "fresh state after restart (first job id 1)" || fail "after restart: id=$j $l"

# 11. stop
t=$(now)
"$CL" stop "$DIR"
st=$(secs "$t" "$(now)")
"$CL" status "$DIR" >/dev/null 2>&1 && fail "status after stop says running" || pass "stop in $st s; status reports not running"
left=$(ps -eo comm=,args= | awk '$1 ~ /^slurm(ctld|d|stepd|scriptd)$/' | wc -l)
((left == 0)) && pass "no slurm processes left" || fail "$left slurm processes left"
t=$(now)
timeout 20 sinfo >/dev/null 2>&1
rc=$?
echo "(sinfo with cluster down returned after $(secs "$t" "$(now)") s, rc=$rc)"

echo "FAILURES: $FAILS"
exit $((FAILS > 0))
