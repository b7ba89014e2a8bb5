#!/usr/bin/env bash
# ci/slurm/stop.sh: stop the test cluster of ci/slurm/start.sh. Safe to run twice.
#   1. cancel every job (and wait for them to leave the node),
#   2. slurmd, slurmctld, slurmdbd by their pid files,
#   3. the private mariadbd, 4. munged if start.sh started it,
#   5. /etc/slurm/slurm.conf (start.sh's) is renamed slurm.conf.stopped: with a slurm.conf naming a
#      controller that is down, every `scontrol`/`sinfo` call waits ~9 s, and the SLURM executor
#      plugin runs `scontrol show config` whenever Snakemake starts (any executor), so each
#      later `snakemake` on this machine would be ~9 s slower. start.sh writes it afresh.
# Only processes named by start.sh's pid files are signalled. State and logs stay in
# $LORACHAIN_SLURM_STATE (default /var/tmp/lorachain-slurm) for inspection; start.sh wipes them.
set -euo pipefail

STATE=${LORACHAIN_SLURM_STATE:-/var/tmp/lorachain-slurm}
export PATH=/usr/sbin:/usr/bin:$PATH

log() { printf '[slurm-stop %(%H:%M:%S)T] %s\n' -1 "$*"; }

# stop_pidfile NAME PIDFILE [SECONDS]: SIGTERM the process, SIGKILL it if still there after SECONDS.
stop_pidfile() {
    local name=$1 pidfile=$2 timeout=${3:-20} pid deadline
    [[ -s $pidfile ]] || { log "$name: no pid file"; return 0; }
    pid=$(cat "$pidfile")
    if [[ ! $pid =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null; then
        log "$name: not running"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "$name: still alive after ${timeout}s, SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -f "$pidfile"
    log "$name ($pid): stopped"
}

# 5. no stale controller address for later slurm clients
retire_config() {
    if [[ -f /etc/slurm/slurm.conf ]] && grep -q '^# Written by lorachain ci/slurm/start.sh' /etc/slurm/slurm.conf; then
        mv -f /etc/slurm/slurm.conf /etc/slurm/slurm.conf.stopped
    fi
}

if [[ ! -d $STATE ]]; then
    retire_config
    log "nothing to stop ($STATE does not exist)"
    exit 0
fi

# 1. jobs first, while slurmctld and slurmd can still clean them up
if [[ -s $STATE/run/slurmctld.pid ]] && kill -0 "$(cat "$STATE/run/slurmctld.pid")" 2>/dev/null \
    && command -v squeue >/dev/null 2>&1; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 75); do
            [[ -z $(timeout 10 squeue -h -t PD,R,CG,S -o %A 2>/dev/null || true) ]] && break
            sleep 0.2
        done
    fi
fi

# 2. slurm daemons, compute side first
stop_pidfile slurmd "$STATE/run/slurmd.pid"
stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
stop_pidfile slurmdbd "$STATE/run/slurmdbd.pid"

# 3. the accounting database
stop_pidfile mariadbd "$STATE/db/mariadbd.pid" 60

# 4. munged, only when start.sh started it
if [[ -f $STATE/started ]] && grep -qx munged "$STATE/started"; then
    stop_pidfile munged "$STATE/run/munged.pid"
    rm -f /run/munge/munged.pid
fi
rm -f "$STATE/started"
retire_config
log "stopped"
