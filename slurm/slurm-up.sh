#!/usr/bin/env bash
# slurm/slurm-up.sh — start a single-node Slurm cluster on this machine, for the tests.
#
#   sudo bash slurm/slurm-up.sh        (or: make slurm-up)
#
# Installs Debian's Slurm + MUNGE + MariaDB packages when missing, writes the configuration,
# and starts, as root and without systemd, on loopback only:
#   munged -> mariadbd -> slurmdbd -> slurmctld -> slurmd
# It returns 0 once `sinfo` shows the node idle and `sacct` answers.
#
# Idempotent: daemons that already run are left alone; if the configuration changed while
# they ran, they are restarted. Stop everything with slurm/slurm-down.sh.
#
# Environment:
#   ESA_SLURM_DIR      state dir (default /var/lib/esa-slurm): pids (run/), logs (log/),
#                      slurmctld state, slurmd spool, the MariaDB data dir, config copies
#   ESA_SLURM_DB_PORT  TCP port of the private MariaDB on 127.0.0.1 (default 3307, so that it
#                      never collides with a MariaDB the machine may already run on 3306)
#   ESA_SLURM_TIMEOUT  seconds to wait for each daemon (default 90)
#
# This is a throwaway test cluster: it trusts root, has no cgroup confinement and no
# fair-share; it is not a template for a production site.
set -euo pipefail

STATE="${ESA_SLURM_DIR:-/var/lib/esa-slurm}"
DB_PORT="${ESA_SLURM_DB_PORT:-3307}"
TIMEOUT="${ESA_SLURM_TIMEOUT:-90}"
CLUSTER=esa
# clients (sinfo, sbatch, sacct, submitit) look for /etc/slurm/slurm.conf without any
# environment variable, so the live config must be there; copies also go to $STATE/etc.
CONF_DIR=/etc/slurm
MARKER="# written by ESA slurm/slurm-up.sh"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

T0=$(date +%s)
say() { printf '[slurm-up %3ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { printf '[slurm-up] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (the test cluster runs its daemons as root)"

# One slurm-up at a time (e.g. two make targets in parallel): the second waits for the first.
# Every daemon below is started with 9>&- so that it does not inherit (and hold) this lock.
exec 9>/run/esa-slurm-up.lock
flock -w 600 9 || die "another slurm-up still holds /run/esa-slurm-up.lock after 600 s"

# ---------------------------------------------------------------------------------------
# 1. packages
# ---------------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    mkdir -p "$STATE/log"
    apt_log="$STATE/log/apt.log"
    apt-get update -qq >"$apt_log" 2>&1 || { tail -n 20 "$apt_log" >&2; die "apt-get update failed (log: $apt_log)"; }
    # Debian's policy-rc.d (exit 101 in containers) blocks service starts during install;
    # that is what we want: the daemons are started below, by hand, with our config.
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$apt_log" 2>&1 \
        || { tail -n 30 "$apt_log" >&2; die "apt-get install failed (log: $apt_log)"; }
    say "packages installed"
else
    say "packages already installed"
fi

# ---------------------------------------------------------------------------------------
# 2. configuration
# ---------------------------------------------------------------------------------------
mkdir -p "$STATE"/{run,log,etc,ctld,spool} "$CONF_DIR"
chmod 755 "$STATE"

# Size the node from the machine: Slurm drains a node whose RealMemory exceeds what slurmd
# finds, so leave ~10% headroom. DefMemPerCPU = memory / CPUs, so a 1-CPU job takes only its
# share and two 1-CPU jobs run side by side (without it each job takes the whole node).
CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
REAL_MB=$(( MEM_MB * 9 / 10 ))
DEF_MEM_PER_CPU=$(( REAL_MB / CPUS ))

# The password only protects a MariaDB that listens on 127.0.0.1; keep it stable across runs.
DB_PASS_FILE="$STATE/etc/db-password"
[[ -s $DB_PASS_FILE ]] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DB_PASS_FILE")
DB_PASS=$(cat "$DB_PASS_FILE")

new_slurm_conf=$(cat <<EOF
$MARKER — a single-node test cluster; edit the script, not this file.
ClusterName=$CLUSTER
# "localhost" everywhere (with slurmd -N localhost): no dependence on the machine's hostname.
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# A requeued job can start again only once the old job credential expired (default 120 s);
# 10 s cuts the requeue round trip from ~137 s to ~20 s.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroup plugins: they need controllers that containers/VMs often lack; linuxproc tracks
# a job's processes through their parent pids, which is enough here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$DEF_MEM_PER_CPU
# Requeue (scontrol requeue, preemption) is what the checkpoint/resume path relies on.
JobRequeue=1
# Small but realistic; tests and the job layer read it from scontrol show config.
MaxArraySize=1001
MaxJobCount=20000
# Bring the node back by itself after a restart of the daemons.
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
MinJobAge=300
# Accounting through slurmdbd: without it sacct fails, and submitit never sees a cancelled
# job (result() hangs).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
NodeName=localhost CPUs=$CPUS RealMemory=$REAL_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
)

new_dbd_conf=$(cat <<EOF
$MARKER — accounting daemon of the test cluster.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
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
)

# write_conf FILE CONTENT MODE -> returns 0 when the file changed.
write_conf() {
    local file=$1 content=$2 mode=$3
    if [[ -f $file ]] && [[ "$(cat "$file")" == "$content" ]]; then
        return 1
    fi
    # never silently overwrite a config that someone else wrote
    if [[ -f $file ]] && ! head -n1 "$file" | grep -qF "$MARKER"; then
        cp -p "$file" "$file.esa-backup.$(date +%s)"
        say "kept the previous $file as $file.esa-backup.*"
    fi
    (umask 077; printf '%s\n' "$content" >"$file.tmp")
    chmod "$mode" "$file.tmp"
    mv "$file.tmp" "$file"
    return 0
}

changed=0
write_conf "$CONF_DIR/slurm.conf" "$new_slurm_conf" 644 && changed=1
# slurmdbd refuses a slurmdbd.conf that others can read (it holds the DB password)
write_conf "$CONF_DIR/slurmdbd.conf" "$new_dbd_conf" 600 && changed=1
cp -p "$CONF_DIR/slurm.conf" "$CONF_DIR/slurmdbd.conf" "$STATE/etc/"

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
# alive NAME -> 0 when the pid in $STATE/run/NAME.pid is a live process of that program
alive() {
    local pidfile="$STATE/run/$1.pid" pid
    [[ -s $pidfile ]] || return 1
    pid=$(cat "$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    # guard against pid reuse: the process must still be that daemon
    grep -q "$1" "/proc/$pid/comm" 2>/dev/null
}

# wait_for WHAT LOG CMD... -> polls CMD every 0.5 s until it succeeds or TIMEOUT passes
wait_for() {
    local what=$1 log=$2; shift 2
    local deadline=$(( $(date +%s) + TIMEOUT ))
    until "$@" >/dev/null 2>&1; do
        if (( $(date +%s) >= deadline )); then
            echo "---- last lines of $log ----" >&2
            tail -n 30 "$log" >&2 2>/dev/null || true
            die "$what not ready after ${TIMEOUT}s (log: $log)"
        fi
        sleep 0.5
    done
}

if (( changed )) && { alive munged || alive mariadbd || alive slurmdbd || alive slurmctld || alive slurmd; }; then
    say "configuration changed while the cluster ran: restarting it"
    ESA_SLURM_DIR="$STATE" bash "$(dirname "${BASH_SOURCE[0]}")/slurm-down.sh"
fi

# ---------------------------------------------------------------------------------------
# 3. munged — authentication between all Slurm daemons and clients
# ---------------------------------------------------------------------------------------
if ! [[ -s /etc/munge/munge.key ]]; then
    # Debian's postinst normally creates the key; create it if it did not.
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge   # clients (root and users) must reach the socket

touch "$STATE/log/munged.log" && chown munge:munge "$STATE/log/munged.log"
if alive munged; then
    say "munged already running (pid $(cat "$STATE/run/munged.pid"))"
elif munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "a munged started elsewhere already answers: using it"
else
    say "starting munged"
    # munged runs as its own user (as under systemd) and daemonises; its socket stays at the
    # default /run/munge/munge.socket.2, where Slurm looks for it. It writes its pid file into
    # a directory it owns; the pid is copied into $STATE/run below.
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
        --log-file="$STATE/log/munged.log" 9>&- \
        || { tail -n 20 "$STATE/log/munged.log" >&2; die "munged did not start"; }
fi
wait_for munged "$STATE/log/munged.log" bash -c 'munge -n | unmunge'
[[ -s /run/munge/munged.pid ]] && cp /run/munge/munged.pid "$STATE/run/munged.pid"

# ---------------------------------------------------------------------------------------
# 4. mariadbd — the accounting database, private to this cluster (own data dir, 127.0.0.1)
# ---------------------------------------------------------------------------------------
DB_DIR="$STATE/mysql"
DB_RUN="$STATE/mysql-run"   # owned by mysql: mariadbd writes its socket and pid file there
DB_SOCK="$DB_RUN/mysqld.sock"
if ! [[ -d $DB_DIR/mysql ]]; then
    say "initialising the MariaDB data dir $DB_DIR"
    mkdir -p "$DB_DIR"
    chown mysql:mysql "$DB_DIR"
    mariadb-install-db --user=mysql --datadir="$DB_DIR" --auth-root-authentication-method=socket \
        --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
        || { tail -n 30 "$STATE/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
fi
mkdir -p "$DB_RUN" && chown mysql:mysql "$DB_RUN" && chmod 755 "$DB_RUN"
touch "$STATE/log/mariadbd.log" && chown mysql:mysql "$STATE/log/mariadbd.log"
if alive mariadbd; then
    say "mariadbd already running (pid $(cat "$STATE/run/mariadbd.pid"))"
else
    say "starting mariadbd on 127.0.0.1:$DB_PORT"
    # --no-defaults: ignore /etc/mysql/*.cnf, so a system MariaDB's settings do not leak in.
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" \
        --socket="$DB_SOCK" --pid-file="$DB_RUN/mariadbd.pid" \
        --bind-address=127.0.0.1 --port="$DB_PORT" \
        --log-error="$STATE/log/mariadbd.log" \
        --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 --skip-name-resolve \
        </dev/null >>"$STATE/log/mariadbd.log" 2>&1 9>&- &
fi
wait_for mariadbd "$STATE/log/mariadbd.log" mariadb --no-defaults --socket="$DB_SOCK" -u root -e 'SELECT 1'
# (idempotent) the database and user slurmdbd connects with over TCP
mariadb --no-defaults --socket="$DB_SOCK" -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
cp "$DB_RUN/mariadbd.pid" "$STATE/run/mariadbd.pid"

# ---------------------------------------------------------------------------------------
# 5. slurmdbd, then register the cluster, then slurmctld, then slurmd
# ---------------------------------------------------------------------------------------
if alive slurmdbd; then
    say "slurmdbd already running (pid $(cat "$STATE/run/slurmdbd.pid"))"
else
    say "starting slurmdbd"
    /usr/sbin/slurmdbd 9>&-   # daemonises; pid file from slurmdbd.conf
fi
wait_for slurmdbd "$STATE/log/slurmdbd.log" sacctmgr -n list cluster
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    say "registering cluster '$CLUSTER' in the accounting database"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

if alive slurmctld; then
    say "slurmctld already running (pid $(cat "$STATE/run/slurmctld.pid"))"
else
    say "starting slurmctld"
    /usr/sbin/slurmctld 9>&-   # daemonises; pid file from slurm.conf
fi
wait_for slurmctld "$STATE/log/slurmctld.log" scontrol ping

if alive slurmd; then
    say "slurmd already running (pid $(cat "$STATE/run/slurmd.pid"))"
else
    say "starting slurmd"
    # -N localhost: this node's name in slurm.conf, whatever the machine's hostname is
    /usr/sbin/slurmd -N localhost 9>&-
fi

# The node must come up idle. A node left down/drained by an earlier run (e.g. "Node
# unexpectedly rebooted" or "Low RealMemory" from an older config) is resumed once.
node_state() { sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -n1; }
node_ready() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
deadline=$(( $(date +%s) + TIMEOUT )); resumed=0
until node_ready; do
    st=$(node_state)
    if (( ! resumed )) && [[ $st =~ (down|drain|fail) ]]; then
        say "node is '$st': resuming it"
        scontrol update nodename=localhost state=resume 2>/dev/null || true
        resumed=1
    fi
    if (( $(date +%s) >= deadline )); then
        sinfo -N -l >&2 || true
        tail -n 30 "$STATE/log/slurmd.log" >&2 || true
        die "node not idle after ${TIMEOUT}s (state '${st:-?}'; logs in $STATE/log)"
    fi
    sleep 0.5
done
wait_for sacct "$STATE/log/slurmdbd.log" sacct -n -X -S now-1hours

say "cluster '$CLUSTER' is up: node localhost $(node_state), ${CPUS} CPUs, ${REAL_MB} MB, DefMemPerCPU=${DEF_MEM_PER_CPU}"
say "config: $CONF_DIR/slurm.conf, $CONF_DIR/slurmdbd.conf   pids: $STATE/run/*.pid"
say "logs:   $STATE/log/{munged,mariadbd,slurmdbd,slurmctld,slurmd}.log"
say "stop:   bash slurm/slurm-down.sh [--purge]"
