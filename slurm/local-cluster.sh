#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (slurmctld + slurmd + munged, no systemd, no cgroups), for
# the tests and for trying the sbatch scripts. Needs root; installs Debian's packages when missing.
#
#   slurm/local-cluster.sh start     install if needed, write the config, start the daemons, wait for the node
#   slurm/local-cluster.sh stop      cancel jobs and stop the daemons this script started
#   slurm/local-cluster.sh status    sinfo + squeue (exit 1 when not running)
#   slurm/local-cluster.sh env       print the `export SLURM_CONF=...` line for the client commands
#
# Settings (environment): CHEXDIST_SLURM_STATE (state folder, default /tmp/chexdist-slurm),
# CHEXDIST_SLURM_PORT (slurmctld port; slurmd uses the next one; default: two free ports).
set -euo pipefail

STATE=${CHEXDIST_SLURM_STATE:-/tmp/chexdist-slurm}
CONF=$STATE/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local-cluster: $*" >&2; exit 1; }

running() {  # running NAME: the daemon whose pid file is in $STATE/run is alive
    local pid
    pid=$(cat "$STATE/run/$1.pid" 2>/dev/null) || return 1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

install_missing() {
    local missing=0 tool
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || die "slurmctld/slurmd/sbatch/munged missing and no apt-get to install ${PACKAGES[*]}"
    echo "local-cluster: installing ${PACKAGES[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null ||
        die "apt-get update failed; install ${PACKAGES[*]} by hand"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null ||
        die "apt-get install ${PACKAGES[*]} failed"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

write_conf() {
    local host node ctld_port slurmd_port
    host=$(hostname -s)
    # The node's real CPUs, sockets and memory as slurmd sees them; slurmd refuses a node line that claims more.
    node=$(slurmd -C | head -n 1)
    [[ $node == NodeName=* ]] || die "slurmd -C printed no node line: $node"
    if [[ -n ${CHEXDIST_SLURM_PORT:-} ]]; then
        ctld_port=$CHEXDIST_SLURM_PORT
        slurmd_port=$((CHEXDIST_SLURM_PORT + 1))
    else
        ctld_port=$(free_port)
        slurmd_port=$(free_port)
    fi
    cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh: one node, no cgroups, no accounting.
ClusterName=chexdist
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5 (not the default 120) lets a requeued job restart after about 6 s; values below 5
# are rejected and silently fall back to 120.
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=5
SchedulerParameters=bf_interval=1,sched_interval=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
KillWait=30
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    mkdir -p "$STATE/munge"
    chmod 700 "$STATE/munge"
    if [[ ! -s $STATE/munge/munge.key ]]; then
        dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$STATE/munge/munge.key"
    fi
    munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed" ||
        die "munged did not start; see $STATE/log/munged.log"
}

wait_for_node() {
    local state="" i
    for ((i = 0; i < 150; i++)); do
        state=$(SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null | head -n 1) || true
        [[ $state == idle* || $state == mixed* || $state == allocated* ]] && return 0
        sleep 0.2
    done
    tail -n 5 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 2>/dev/null || true
    die "the node did not come up within 30 s (state '${state:-none}'); logs in $STATE/log"
}

cmd_start() {
    [[ $(id -u) == 0 ]] || die "needs root (slurmd runs jobs as any user; SlurmUser=root)"
    if running slurmctld && running slurmd; then
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    install_missing
    cmd_stop >/dev/null 2>&1 || true
    mkdir -p "$STATE"/{ctld,slurmd,run,log}
    start_munge
    write_conf
    SLURM_CONF=$CONF slurmctld -c -i -f "$CONF" || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    SLURM_CONF=$CONF slurmd -c -f "$CONF" || die "slurmd did not start; see $STATE/log/slurmd.log"
    wait_for_node
    echo "export SLURM_CONF=$CONF"
}

stop_daemon() {
    local name=$1 pid i
    pid=$(cat "$STATE/run/$name.pid" 2>/dev/null) || return 0
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$STATE/run/$name.pid"
}

cmd_stop() {
    if running slurmctld; then
        SLURM_CONF=$CONF scancel --full --quiet --state=RUNNING --user=root 2>/dev/null || true
        SLURM_CONF=$CONF scancel --quiet --user=root 2>/dev/null || true
        sleep 1
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    echo "local-cluster: stopped"
}

cmd_status() {
    running slurmctld || die "not running (state folder $STATE)"
    SLURM_CONF=$CONF sinfo
    SLURM_CONF=$CONF squeue
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: $0 start|stop|status|env" ;;
esac
