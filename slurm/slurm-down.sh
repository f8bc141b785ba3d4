#!/usr/bin/env bash
# slurm/slurm-down.sh — stop the single-node test cluster that slurm/slurm-up.sh started.
#
#   bash slurm/slurm-down.sh            stop the daemons (jobs' state is kept for the next up)
#   bash slurm/slurm-down.sh --purge    also cancel all jobs and delete the state dir
#                                       ($ESA_SLURM_DIR, default /var/lib/esa-slurm): the
#                                       accounting DB, slurmctld state, logs
#
# Daemons are stopped by the pids recorded in $ESA_SLURM_DIR/run, in the reverse order of
# their start (slurmd, slurmctld, slurmdbd, mariadbd, munged): SIGTERM, then SIGKILL after
# a timeout. Installed packages and /etc/slurm stay. Safe to run when nothing runs.
set -euo pipefail

STATE="${ESA_SLURM_DIR:-/var/lib/esa-slurm}"
PURGE=0
for arg in "$@"; do
    case $arg in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "slurm-down: unknown argument '$arg' (use --purge or --help)" >&2; exit 2 ;;
    esac
done
say() { printf '[slurm-down] %s\n' "$*"; }

if [[ ! -d $STATE ]]; then
    say "no state dir $STATE: nothing to stop"
    exit 0
fi

# With --purge, end the jobs first (while slurmctld still runs) so that no slurmstepd or
# job process outlives the cluster; without it, slurmd finds running steps again on restart.
if (( PURGE )) && command -v squeue >/dev/null && scontrol ping >/dev/null 2>&1; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u || true)
    if [[ -n $jobs ]]; then
        say "cancelling $(wc -w <<<"$jobs") job(s)"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 60); do
            [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
fi

# stop NAME -> TERM the pid in $STATE/run/NAME.pid, wait up to 30 s, then KILL
stop() {
    local name=$1 pidfile="$STATE/run/$1.pid" pid
    if [[ ! -s $pidfile ]]; then
        say "$name: no pid file"
        return 0
    fi
    pid=$(cat "$pidfile")
    # only a live process that is still this daemon (pids are reused)
    if ! [[ $pid =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null \
        || ! grep -q "$name" "/proc/$pid/comm" 2>/dev/null; then
        say "$name: not running"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || { say "$name (pid $pid) stopped"; rm -f "$pidfile"; return 0; }
        sleep 0.5
    done
    say "$name (pid $pid) ignored SIGTERM for 30 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

for d in slurmd slurmctld slurmdbd mariadbd munged; do
    stop "$d"
done

if (( PURGE )); then
    rm -rf -- "$STATE"
    say "removed $STATE"
fi
say "done"
