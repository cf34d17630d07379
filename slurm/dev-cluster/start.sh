#!/usr/bin/env bash
# Start a private SLURM 22.05 cluster (munged, MariaDB, slurmdbd, slurmctld and
# one slurmd per node) on this machine, entirely under DIR.
#
#   start.sh [--nodes 1|2] [--dir DIR]        (default DIR: /tmp/ddp-diffusion-slurm)
#
# Then:  source DIR/env.sh   (or the printed "export SLURM_CONF=...")
# Stop:  stop.sh --dir DIR
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODES=1
DIR=/tmp/ddp-diffusion-slurm
CLUSTER=ddpdev
TIMEOUT=45   # seconds to wait for each daemon

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) NODES=${2:?--nodes needs a value}; shift 2 ;;
        --nodes=*) NODES=${1#*=}; shift ;;
        --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
        --dir=*) DIR=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "start.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

log() { echo "start.sh: $*"; }
die() { echo "start.sh: ERROR: $*" >&2; exit 1; }

[[ $NODES == 1 || $NODES == 2 ]] || die "--nodes must be 1 or 2 (got '$NODES')"
[[ $DIR == /* ]] || DIR=$(pwd)/$DIR
DIR=${DIR%/}
[[ -n $DIR && $DIR != / ]] || die "refusing to use '/' as cluster dir"

if [[ $(id -u) -ne 0 ]]; then
    echo "start.sh: must run as root (slurmd/slurmctld run as SlurmUser=root and /etc/hosts is edited)" >&2
    exit 2
fi
for b in mungekey munged mariadb-install-db mariadbd mariadb slurmdbd slurmctld slurmd sacctmgr sinfo scontrol; do
    if ! command -v "$b" >/dev/null 2>&1 && [[ ! -x /usr/sbin/$b ]]; then
        echo "start.sh: '$b' not found; run $HERE/install.sh first" >&2
        exit 2
    fi
done
export PATH=$PATH:/usr/sbin:/sbin

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --- already running? --------------------------------------------------------
if [[ -e $DIR/etc/slurm.conf ]]; then
    all=1
    for pf in "$DIR"/run/munged.pid "$DIR"/run/mariadbd.pid "$DIR"/run/slurmdbd.pid "$DIR"/run/slurmctld.pid "$DIR"/run/slurmd-*.pid; do
        pid_alive "$pf" || { all=0; break; }
    done
    if [[ $all -eq 1 ]]; then
        log "cluster already running under $DIR"
        echo "export SLURM_CONF=$DIR/etc/slurm.conf"
        exit 0
    fi
    log "found a stale or partial cluster under $DIR; stopping it first"
    "$HERE/stop.sh" --dir "$DIR"
fi
if [[ -e $DIR ]] && [[ -n $(ls -A "$DIR" 2>/dev/null) ]]; then
    die "$DIR exists and is not empty; remove it or pass another --dir"
fi

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1fs", b-a}'; }

STARTED=0
on_exit() {
    local rc=$?
    [[ $rc -ne 0 && $STARTED -eq 1 ]] || return 0
    trap - EXIT
    echo "start.sh: FAILED (exit $rc) after $(elapsed); logs are in $DIR/log" >&2
    for f in "$DIR"/log/*.log; do
        [[ -s $f ]] || continue
        echo "----- tail $f" >&2
        tail -n 15 "$f" >&2 || true
    done
    echo "start.sh: cleaning up with stop.sh --keep (logs kept in $DIR)" >&2
    "$HERE/stop.sh" --dir "$DIR" --keep >&2 || true
    exit "$rc"
}
trap on_exit EXIT

wait_for() {  # wait_for DESCRIPTION COMMAND...
    local what=$1; shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "start.sh: timed out after ${TIMEOUT}s waiting for $what" >&2
            return 1
        fi
        sleep 0.2
    done
}

port_in_use() {
    if command -v ss >/dev/null 2>&1; then
        [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]
    else
        local hex
        hex=$(printf ':%04X ' "$1")
        grep -q " [0-9A-F]*$hex" /proc/net/tcp /proc/net/tcp6 2>/dev/null
    fi
}
USED_PORTS=" "
PORT=
next_port() {  # next_port START: sets PORT to the first port >= START that is free
    local p=$1
    while port_in_use "$p" || [[ $USED_PORTS == *" $p "* ]]; do p=$((p + 1)); done
    USED_PORTS+="$p "
    PORT=$p
}

# Unix socket paths are limited to 107 bytes.
if (( ${#DIR} + 20 > 107 )); then
    echo "start.sh: --dir '$DIR' is too long for the unix sockets under it (max ~87 characters); use a shorter one" >&2
    exit 2
fi

HOST=$(hostname -s)
mkdir -p "$DIR"
STARTED=1
chmod 755 "$DIR"
mkdir -p "$DIR"/{etc,run,log,state/ctld,spool,munge,mysql/data}
chmod 700 "$DIR/munge"

# --- nodes -------------------------------------------------------------------
# slurmd -C describes this machine; split CPUs and memory between the nodes.
HW=$(slurmd -C | head -n1)
NCPU=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
[[ -n $NCPU && -n $MEM ]] || die "cannot parse 'slurmd -C' output: $HW"
CPN=$((NCPU / NODES)); ((CPN >= 1)) || CPN=1
MEMPN=$((MEM * 9 / 10 / NODES))   # leave 10% for the OS
DEFMEM=$((MEMPN / CPN))

NODE_NAMES=()
if [[ $NODES -eq 1 ]]; then
    NODE_NAMES=("$HOST")
else
    for i in $(seq 1 "$NODES"); do NODE_NAMES+=("${HOST}-node$i"); done
fi

next_port 16817; CTLD_PORT=$PORT
next_port 16819; DBD_PORT=$PORT
next_port 13306; MYSQL_PORT=$PORT
NODE_LINES=""
for n in "${NODE_NAMES[@]}"; do
    next_port 16830
    mkdir -p "$DIR/spool/$n"
    NODE_LINES+="NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$PORT CPUs=$CPN Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPN ThreadsPerCore=1 RealMemory=$MEMPN State=UNKNOWN"$'\n'
done
NODELIST=$(IFS=,; echo "${NODE_NAMES[*]}")

MUNGE_SOCK=$DIR/munge/munged.sock
CONF=$DIR/etc/slurm.conf
# Every daemon (and so every slurmstepd) carries this marker; stop.sh uses it to
# find leftover processes of this cluster.
export DDP_SLURM_DEV_DIR=$DIR
export SLURM_CONF=$CONF

# --- /etc/hosts ----------------------------------------------------------------
HOSTS_MARK="# ddp-diffusion-slurm-dev $DIR"
if [[ $NODES -gt 1 ]]; then
    {
        cat /etc/hosts
        echo "127.0.0.1 ${NODE_NAMES[*]} $HOSTS_MARK"
    } >"$DIR/run/hosts.new"
    # write in place (/etc/hosts is often a bind mount, so no rename)
    cat "$DIR/run/hosts.new" >/etc/hosts
    rm -f "$DIR/run/hosts.new"
    touch "$DIR/run/hosts.edited"
fi

# --- munge ---------------------------------------------------------------------
mungekey -c -k "$DIR/munge/munge.key" >"$DIR/log/mungekey.log" 2>&1
chmod 400 "$DIR/munge/munge.key"
munged -S "$MUNGE_SOCK" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --force \
    </dev/null >>"$DIR/log/munged.log" 2>&1
wait_for "munged" bash -c "munge -n -S '$MUNGE_SOCK' | unmunge -S '$MUNGE_SOCK'"
log "munged up ($(elapsed))"

# --- MariaDB -------------------------------------------------------------------
MYSQL_SOCK=$DIR/mysql/mysqld.sock
mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql/data" \
    --auth-root-authentication-method=socket --skip-test-db \
    >"$DIR/log/mariadb-install-db.log" 2>&1 \
    || die "mariadb-install-db failed, see $DIR/log/mariadb-install-db.log"
setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" \
    --socket="$MYSQL_SOCK" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
    --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
    --innodb-buffer-pool-size=256M --innodb-log-file-size=64M \
    --innodb-lock-wait-timeout=900 --max-allowed-packet=16M \
    --skip-name-resolve --innodb-use-native-aio=0 \
    </dev/null >>"$DIR/log/mariadbd.log" 2>&1 &
echo $! >"$DIR/run/mariadbd.pid"
wait_for "mariadbd" mariadb --no-defaults --socket="$MYSQL_SOCK" -uroot -e "SELECT 1"
DB_PASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
mariadb --no-defaults --socket="$MYSQL_SOCK" -uroot <<SQL
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
log "mariadbd up on 127.0.0.1:$MYSQL_PORT ($(elapsed))"

# --- slurmdbd ------------------------------------------------------------------
cat >"$DIR/etc/slurmdbd.conf" <<EOF
# generated by $HERE/start.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 600 "$DIR/etc/slurmdbd.conf"

cat >"$CONF" <<EOF
# generated by $HERE/start.sh -- private dev cluster under $DIR
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10

StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
ReturnToService=2
MpiDefault=none

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK

# requeue / preemption
JobRequeue=1
KillWait=30
SlurmctldParameters=preempt_send_user_signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE

${NODE_LINES}PartitionName=debug Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP GraceTime=30
EOF

setsid slurmdbd </dev/null >>"$DIR/log/slurmdbd.log" 2>&1
wait_for "slurmdbd" sacctmgr -n show cluster
log "slurmdbd up on 127.0.0.1:$DBD_PORT ($(elapsed))"
sacctmgr -i add cluster "$CLUSTER" >"$DIR/log/sacctmgr.log" 2>&1 \
    || die "sacctmgr add cluster failed, see $DIR/log/sacctmgr.log"

# --- slurmctld + slurmd ----------------------------------------------------------
setsid slurmctld -f "$CONF" -i </dev/null >>"$DIR/log/slurmctld.log" 2>&1
wait_for "slurmctld" scontrol ping
log "slurmctld up on 127.0.0.1:$CTLD_PORT ($(elapsed))"
for n in "${NODE_NAMES[@]}"; do
    setsid slurmd -f "$CONF" -N "$n" </dev/null >>"$DIR/log/slurmd-$n.log" 2>&1
done

nodes_idle() {
    local states
    states=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null) || return 1
    [[ $(grep -c ' idle$' <<<"$states") -eq $NODES ]]
}
wait_for "node(s) $NODELIST to become idle (sinfo)" nodes_idle

cat >"$DIR/env.sh" <<EOF
# source me: clients of the dev SLURM cluster under $DIR
export SLURM_CONF=$CONF
EOF
STARTED=0
log "cluster '$CLUSTER' ready: $NODES node(s) [$NODELIST], $CPN CPU(s) and ${MEMPN}M each, partition 'debug' ($(elapsed))"
log "clients need SLURM_CONF: source $DIR/env.sh"
echo "export SLURM_CONF=$CONF"
