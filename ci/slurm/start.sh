#!/usr/bin/env bash
# ci/slurm/start.sh: a real one-node SLURM cluster on this machine, for tests/test_slurm.py.
#
#   Run as root on a Debian 12 machine or container without systemd (CI); loopback traffic only.
#   ci/slurm/start.sh    install (if missing) and start: munged, a private mariadbd, slurmdbd,
#                        slurmctld, slurmd; ends with node "$(hostname -s)" idle in partition
#                        `ci` with 2 fake GPUs and accounting account `ci` for root.
#   ci/slurm/stop.sh     cancel every job, stop all of it, rename slurm.conf to slurm.conf.stopped
#                        (a conf naming a dead controller makes every scontrol/sinfo, and so
#                        every snakemake start, wait ~9 s); safe to run twice.
#
# What it does (the comments in the generated slurm.conf say why each setting is there):
#   * apt-get installs munge slurmctld slurmd slurm-client slurmdbd mariadb-server when a binary
#     is missing, with /usr/sbin/policy-rc.d exiting 101 so no package starts a daemon (an
#     existing policy-rc.d is put back afterwards). Debian 12: slurm-wlm 22.05, munge 0.5.15,
#     mariadb 10.11.
#   * writes /etc/slurm/{slurm.conf,gres.conf,slurmdbd.conf} (slurmdbd.conf 0600, owner slurm);
#     the jobstep plugin strips SLURM_CONF, so the files must be at the default place.
#   * state, logs, pid files, the mariadb datadir/socket and the fake GPU device files live under
#     $LORACHAIN_SLURM_STATE (default /var/tmp/lorachain-slurm); a fresh start wipes it (a
#     drained node state would survive restarts otherwise).
#   * mariadbd listens on 127.0.0.1:$LORACHAIN_SLURM_DB_PORT (default 3307) and its own socket;
#     slurmctld/slurmd/slurmdbd listen on their default ports (6817/6818/6819, all interfaces:
#     22.05 cannot bind them to loopback; all traffic is addressed to 127.0.0.1).
#   * idempotent: when every daemon of a previous start is alive and the node answers, it only
#     prints the state; otherwise it stops what is left (stop.sh) and starts afresh.
#
# Logs: $LORACHAIN_SLURM_STATE/log/*.log. Takes ~10 s when installed, +20-60 s for apt.
set -euo pipefail

STATE=${LORACHAIN_SLURM_STATE:-/var/tmp/lorachain-slurm}
DB_PORT=${LORACHAIN_SLURM_DB_PORT:-3307}
CLUSTER=lorachain
PARTITION=ci
ACCOUNT=ci
NODE=$(hostname -s)
HERE=$(cd "$(dirname "$0")" && pwd)
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

log() { printf '[slurm-start %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() {
    log "ERROR: $*"
    for f in "$STATE"/log/*.log "$STATE"/log/*.out "$STATE"/db/*.err; do
        [[ -f $f ]] && { echo "--- tail of $f"; tail -n 30 "$f"; }
    done
    exit 1
}
# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.2 s until it succeeds.
wait_for() {
    local timeout=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what"
        sleep 0.2
    done
    log "$what: ok"
}
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

[[ $(id -u) -eq 0 ]] || { echo "start.sh must run as root" >&2; exit 1; }
if [[ -f /etc/slurm/slurm.conf ]] && ! grep -q '^# Written by lorachain ci/slurm/start.sh' /etc/slurm/slurm.conf; then
    echo "start.sh: /etc/slurm/slurm.conf was not written by this script; refusing to replace a real SLURM setup" >&2
    exit 1
fi

# ------------------------------------------------------------------------------ install
missing=()
for bin in munged slurmctld slurmd sbatch sacct slurmdbd mariadbd; do
    command -v "$bin" >/dev/null 2>&1 || [[ -x /usr/sbin/$bin ]] || missing+=("$bin")
done
if ((${#missing[@]})); then
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    policy_backup=""
    if [[ -e /usr/sbin/policy-rc.d ]]; then
        policy_backup=$(mktemp /usr/sbin/policy-rc.d.lorachain.XXXXXX)
        cp -p /usr/sbin/policy-rc.d "$policy_backup"
    fi
    restore_policy() {
        if [[ -n $policy_backup ]]; then mv -f "$policy_backup" /usr/sbin/policy-rc.d; else rm -f /usr/sbin/policy-rc.d; fi
    }
    trap restore_policy EXIT
    printf '#!/bin/sh\n# written by lorachain ci/slurm/start.sh during apt-get install\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PACKAGES[@]}"
    }
    if ! apt_install; then
        log "apt-get install failed; updating the package lists and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        apt_install
    fi
    restore_policy
    trap - EXIT
fi
export PATH=/usr/sbin:/usr/bin:$PATH

# ------------------------------------------------------------------------ already up?
if [[ -f $STATE/started ]] && alive "$STATE/db/mariadbd.pid" && alive "$STATE/run/slurmdbd.pid" \
    && alive "$STATE/run/slurmctld.pid" && alive "$STATE/run/slurmd.pid" \
    && munge -n 2>/dev/null | unmunge >/dev/null 2>&1 \
    && [[ $(sinfo -h -n "$NODE" -o %T 2>/dev/null) =~ ^(idle|mixed|allocated) ]]; then
    log "already running (state in $STATE); nothing to do"
    sinfo
    exit 0
fi
if [[ -d $STATE ]]; then
    log "stopping what is left of a previous start"
    "$HERE/stop.sh"
fi

# ------------------------------------------------------------------------ fresh state
rm -rf "$STATE"
mkdir -p "$STATE"/{run,log,dev,slurmctld,slurmd,db/data}
chown slurm:slurm "$STATE/slurmctld" "$STATE/run" "$STATE/log"
chmod 0755 "$STATE"
for i in 0 1; do mknod "$STATE/dev/fakegpu$i" c 1 3; done # /dev/null's numbers: never opened
: >"$STATE/started"

# ------------------------------------------------------------------------------- munge
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running (not started by this script)"
else
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid </dev/null >>"$STATE/log/munged.out" 2>&1
    cp /run/munge/munged.pid "$STATE/run/munged.pid" 2>/dev/null || true
    echo munged >>"$STATE/started"
fi
wait_for 15 "munge (munge -n | unmunge)" bash -c 'munge -n | unmunge'

# ----------------------------------------------------------------------------- mariadb
DB_SOCKET=$STATE/db/mysqld.sock
DB_PASS=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
chown -R mysql:mysql "$STATE/db"
mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/db/data" --skip-test-db \
    --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 \
    || die "mariadb-install-db failed"
setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$STATE/db/data" \
    --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --pid-file="$STATE/db/mariadbd.pid" --log-error="$STATE/db/mariadbd.err" \
    --innodb-buffer-pool-size=64M --skip-log-bin </dev/null >>"$STATE/log/mariadbd.out" 2>&1 &
wait_for 60 "mariadbd on 127.0.0.1:$DB_PORT" mariadb-admin --no-defaults --socket="$DB_SOCKET" ping
mariadb --no-defaults --socket="$DB_SOCKET" -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# ------------------------------------------------------------------------- slurm config
# RealMemory at 90 % of what slurmd -C reports (more makes the node INVAL).
read -r CPUS SOCKETS CORES THREADS MEMORY < <(slurmd -C | awk '/^NodeName/ {
    for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    print v["CPUs"], v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"] }')
REAL_MEMORY=$((MEMORY * 9 / 10))
mkdir -p /etc/slurm
cat >/etc/slurm/slurm.conf <<EOF
# Written by lorachain ci/slurm/start.sh: a one-node test cluster on 127.0.0.1. Not for production.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups here: linuxproc tracking, affinity binding (task/none logs a warning per job)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, a job without --mem takes the whole node
DefMemPerCPU=500
GresTypes=gpu
# finished jobs stay visible to squeue longer than the plugin's status interval
MinJobAge=600
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
Waittime=0
MpiDefault=none
# accounting through slurmdbd: the plugin queries job states with sacct
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$REAL_MEMORY Gres=gpu:2 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
cat >/etc/slurm/gres.conf <<EOF
# Written by lorachain ci/slurm/start.sh: two fake GPUs (22.05 drops a GPU GRES without File=).
NodeName=$NODE Name=gpu File=$STATE/dev/fakegpu[0-1]
EOF
cat >/etc/slurm/slurmdbd.conf <<EOF
# Written by lorachain ci/slurm/start.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 0644 /etc/slurm/slurm.conf /etc/slurm/gres.conf
chown slurm:slurm /etc/slurm/slurmdbd.conf
chmod 0600 /etc/slurm/slurmdbd.conf

# ------------------------------------------------------------------------- slurm daemons
/usr/sbin/slurmdbd </dev/null >>"$STATE/log/slurmdbd.out" 2>&1 || die "slurmdbd did not start"
wait_for 60 "slurmdbd (sacctmgr list cluster)" sacctmgr -n list cluster
/usr/sbin/slurmctld </dev/null >>"$STATE/log/slurmctld.out" 2>&1 || die "slurmctld did not start"
wait_for 60 "slurmctld (scontrol ping)" bash -c 'scontrol ping | grep -q UP'
wait_for 60 "cluster $CLUSTER registered in slurmdbd" bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="lorachain CI" Organization=lorachain >/dev/null
sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" DefaultAccount="$ACCOUNT" >/dev/null
wait_for 30 "association root/$ACCOUNT" bash -c "sacctmgr -n -P list assoc user=root format=account | grep -qx $ACCOUNT"
/usr/sbin/slurmd </dev/null >>"$STATE/log/slurmd.out" 2>&1 || die "slurmd did not start"
wait_for 60 "node $NODE idle" bash -c "sinfo -h -n $NODE -o %T | grep -qx idle"
scontrol show node "$NODE" | grep -q 'Gres=gpu:2' || die "node $NODE has no gpu:2 GRES"

log "cluster $CLUSTER up: partition $PARTITION, account $ACCOUNT, state in $STATE"
sinfo
scontrol show node "$NODE" | grep -E 'NodeName|CPUTot|RealMemory|Gres|State'
