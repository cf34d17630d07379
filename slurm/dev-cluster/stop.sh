#!/usr/bin/env bash
# Stop the private SLURM cluster that start.sh started under DIR.
#
#   stop.sh [--dir DIR] [--keep]      (default DIR: /tmp/ddp-diffusion-slurm)
#
# Stops slurmd, slurmctld, slurmdbd, mariadbd and munged by PID (SIGTERM, then
# SIGKILL after a timeout), kills leftover job processes of this cluster,
# removes the /etc/hosts lines start.sh added, and removes DIR unless --keep.
set -euo pipefail

DIR=/tmp/ddp-diffusion-slurm
KEEP=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
        --dir=*) DIR=${1#*=}; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "stop.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
[[ $DIR == /* ]] || DIR=$(pwd)/$DIR
DIR=${DIR%/}
[[ -n $DIR && $DIR != / ]] || { echo "stop.sh: refusing to use '/'" >&2; exit 2; }

log() { echo "stop.sh: $*"; }
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1fs", b-a}'; }

# Never signal ourselves or our callers.
PROTECT=" "
p=$$
while [[ -n $p && $p -gt 1 ]]; do
    PROTECT+="$p "
    p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null || true)
done

alive() { kill -0 "$1" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }

SIGNALED=()
# stop_pids TIMEOUT PID... : SIGTERM, wait up to TIMEOUT s, then SIGKILL.
stop_pids() {
    local timeout=$1; shift
    local pids=() p
    for p in "$@"; do
        [[ -n $p && $PROTECT != *" $p "* ]] && alive "$p" && pids+=("$p")
    done
    [[ ${#pids[@]} -gt 0 ]] || return 0
    SIGNALED+=("${pids[@]}")
    kill -CONT "${pids[@]}" 2>/dev/null || true
    kill -TERM "${pids[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + timeout)) left
    while :; do
        left=()
        for p in "${pids[@]}"; do alive "$p" && left+=("$p"); done
        [[ ${#left[@]} -gt 0 ]] || return 0
        if ((SECONDS >= deadline)); then
            log "SIGKILL ${left[*]} (did not exit within ${timeout}s)"
            kill -KILL "${left[@]}" 2>/dev/null || true
            sleep 0.2
            return 0
        fi
        sleep 0.1
    done
}

pidfile_pids() {
    local f
    for f in "$@"; do
        [[ -s $f ]] && cat "$f"
    done
    return 0
}

# Processes of this cluster: every daemon start.sh launched has
# DDP_SLURM_DEV_DIR=DIR in its environment; job processes have
# SLURM_CONF=DIR/etc/slurm.conf together with SLURM_JOB_ID; slurmstepd rewrites
# its environment (process title), so it is found by its name and its working
# folder or open files under DIR, and its descendants are taken with it.
under_dir() {  # under_dir PID: cwd or an open file of PID is inside DIR
    local l
    for l in "/proc/$1/cwd" /proc/"$1"/fd/*; do
        [[ $(readlink "$l" 2>/dev/null) == "$DIR"/* ]] && return 0
    done
    return 1
}
ppid_of() {  # field 4 of /proc/PID/stat (after the "(comm)" field), bash builtins only
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    stat=${stat#* }
    echo "${stat%% *}"
}
cluster_pids() {
    local d p comm stepds=() envs=() v has_conf has_job
    for d in /proc/[0-9]*; do
        p=${d#/proc/}
        [[ $PROTECT == *" $p "* ]] && continue
        read -r comm 2>/dev/null <"$d/comm" || continue
        if [[ $comm == slurmstepd ]]; then
            if under_dir "$p"; then echo "$p"; stepds+=("$p"); fi
            continue
        fi
        envs=()
        mapfile -d "" envs 2>/dev/null <"$d/environ" || continue
        has_conf=0 has_job=0
        for v in "${envs[@]}"; do
            case $v in
                "DDP_SLURM_DEV_DIR=$DIR") echo "$p"; continue 2 ;;
                "SLURM_CONF=$DIR/etc/slurm.conf") has_conf=1 ;;
                SLURM_JOB_ID=*) has_job=1 ;;
            esac
        done
        [[ $has_conf -eq 1 && $has_job -eq 1 ]] && echo "$p"
    done
    # descendants of our slurmstepd processes
    if [[ ${#stepds[@]} -gt 0 ]]; then
        local parents=" ${stepds[*]} " changed=1 pp
        while [[ $changed -eq 1 ]]; do
            changed=0
            for d in /proc/[0-9]*; do
                p=${d#/proc/}
                [[ $parents == *" $p "* || $PROTECT == *" $p "* ]] && continue
                pp=$(ppid_of "$p") || continue
                if [[ $parents == *" $pp "* ]]; then
                    parents+="$p "; echo "$p"; changed=1
                fi
            done
        done
    fi
    return 0
}

if [[ -d $DIR/run ]]; then
    # 1. slurmd + slurmctld, then every leftover job process / slurmstepd.
    # shellcheck disable=SC2046
    stop_pids 10 $(pidfile_pids "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid")
    leftovers=$(cluster_pids | sort -un | grep -vxF -f <(pidfile_pids "$DIR"/run/{slurmdbd,mariadbd,munged}.pid) || true)
    if [[ -n $leftovers ]]; then
        # shellcheck disable=SC2086
        log "killing leftover job processes:"
        # shellcheck disable=SC2086
        ps -o pid=,args= -p "$(echo $leftovers | tr ' ' ,)" | sed 's/^/    /' || true
        # shellcheck disable=SC2086
        stop_pids 1 $leftovers
    fi
    # 2. accounting, 3. database, 4. munge (last: the others use it).
    # shellcheck disable=SC2046
    stop_pids 10 $(pidfile_pids "$DIR/run/slurmdbd.pid")
    # shellcheck disable=SC2046
    stop_pids 20 $(pidfile_pids "$DIR/run/mariadbd.pid")
    # shellcheck disable=SC2046
    stop_pids 5 $(pidfile_pids "$DIR/run/munged.pid")
    # Anything still carrying our marker (e.g. a daemon whose pid file was lost).
    rest=$(cluster_pids | sort -un)
    if [[ -n $rest ]]; then
        # shellcheck disable=SC2086
        log "killing remaining processes of $DIR:"
        # shellcheck disable=SC2086
        ps -o pid=,args= -p "$(echo $rest | tr ' ' ,)" | sed 's/^/    /' || true
        # shellcheck disable=SC2086
        stop_pids 3 $rest
    fi
    # give init a moment to reap the dead daemons, so they leave no <defunct> entries
    for _ in $(seq 30); do
        zombie=0
        for p in "${SIGNALED[@]}"; do [[ -e /proc/$p ]] && { zombie=1; break; }; done
        [[ $zombie -eq 1 ]] || break
        sleep 0.1
    done
    log "daemons stopped ($(elapsed))"
else
    log "no cluster under $DIR (nothing to stop)"
fi

# /etc/hosts: drop exactly the lines start.sh added for this DIR.
HOSTS_MARK="# ddp-diffusion-slurm-dev $DIR"
if grep -qF -- "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    tmp=$(mktemp)
    awk -v m="$HOSTS_MARK" 'substr($0, length($0) - length(m) + 1) != m' /etc/hosts >"$tmp"
    cat "$tmp" >/etc/hosts   # in place: /etc/hosts may be a bind mount
    rm -f "$tmp"
    log "removed the cluster's node names from /etc/hosts"
fi

if [[ $KEEP -eq 0 && -d $DIR ]]; then
    if [[ -e $DIR/etc/slurm.conf || -d $DIR/run ]] || [[ -z $(ls -A "$DIR") ]]; then
        rm -rf -- "$DIR"
        log "removed $DIR"
    else
        log "not removing $DIR: it does not look like a dev-cluster folder"
    fi
fi
log "done ($(elapsed))"
