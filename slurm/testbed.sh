#!/usr/bin/env bash
# A real SLURM cluster on one Linux machine, for tests and demos.
#
#   slurm/testbed.sh up [--nodes N]   install (apt) if needed, start munge, slurmctld and N slurmd
#   slurm/testbed.sh down             stop what `up` started (by recorded pid), remove its network
#   slurm/testbed.sh status           sinfo, or exit 3 when the bed is down
#   slurm/testbed.sh nodes            one line per node: "<name> <address> <netns>" (exit 3 if down)
#
# Layout. slurmctld runs in the host's network namespace and listens on a bridge address
# (10.77.0.1 by default). Each node gets its own network namespace, joined to the bridge by a veth
# pair whose inner end is renamed eth0 and holds the node's address (10.77.0.11, .12, ...). Its slurmd
# is started inside with `nsenter --net=...` (not `ip netns exec`, which remounts /sys and leaves
# slurmd without its cgroup mounts), so every job step on nodeN lives in nodeN's namespace and a
# 2-node job really crosses a network. The namespaces share the host's hostname, /etc/hosts and
# file systems: node names do not resolve there (take NodeAddr from `scontrol show node`).
#
# Everything `up` creates is recorded under the state dir ($PTB_STATE_DIR, default
# /var/lib/pipeline-testbed): daemon pids (with their start times, so a reused pid is never killed),
# the generated slurm.conf, a private munge key and socket, logs, and the list of network objects.
# `down` removes exactly those. /etc/slurm/slurm.conf is linked to the generated file only when it does
# not exist yet; otherwise clients need `export SLURM_CONF=<state dir>/slurm.conf`.
#
# Environment knobs: PTB_STATE_DIR, PTB_SUBNET (first three octets, default 10.77.0),
# PTB_BRIDGE (default ptb0), PTB_UP_TIMEOUT (seconds to wait for idle nodes, default 90),
# PTB_CPUS (CPUs per node, default: all of the machine's), PTB_NO_INSTALL=1 (never call apt-get).
set -euo pipefail

STATE_DIR=${PTB_STATE_DIR:-/var/lib/pipeline-testbed}
SUBNET=${PTB_SUBNET:-10.77.0}
BRIDGE=${PTB_BRIDGE:-ptb0}
BRIDGE_ADDR="${SUBNET}.1"
UP_TIMEOUT=${PTB_UP_TIMEOUT:-90}
CLUSTER=pipeline-testbed
PARTITION=debug
NS_PREFIX=ptb-node      # netns names: ptb-node1, ptb-node2, ...
VETH_PREFIX=ptb-v       # host ends of the veth pairs: ptb-v1, ptb-v2, ...
CONF="$STATE_DIR/slurm.conf"
MUNGE_DIR="$STATE_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
ETC_CONF=/etc/slurm/slurm.conf

log() { printf 'testbed: %s\n' "$*" >&2; }
die() { printf 'testbed: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

node_addr() { echo "${SUBNET}.$((10 + $1))"; }

# --- pids -------------------------------------------------------------------------------------
# A pid file holds "<pid> <start time in clock ticks>" so that `down` never signals a process that
# merely inherited a recorded pid after ours exited.

proc_starttime() {
    # Field 22 of /proc/<pid>/stat; the comm field (2) may hold spaces, so cut after its ')'.
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    # A zombie counts as gone: our daemons' parent is init, which may reap them late.
    [[ $1 != Z && $1 != X ]] || return 1
    echo "${20}"
}

record_pid() {  # record_pid <name> <pid>
    local start
    start=$(proc_starttime "$2") || die "$1 (pid $2) exited right after start; see $STATE_DIR/log/"
    echo "$2 $start" > "$STATE_DIR/pids/$1"
}

recorded_alive() {  # recorded_alive <name>: true if the recorded process still runs
    local f="$STATE_DIR/pids/$1" pid start now
    [[ -f $f ]] || return 1
    read -r pid start < "$f"
    now=$(proc_starttime "$pid") || return 1
    [[ $now == "$start" ]]
}

stop_recorded() {  # stop_recorded <name>...: TERM them all, wait up to 10 s, then KILL
    local name pid i alive
    for name in "$@"; do
        if recorded_alive "$name"; then
            read -r pid _ < "$STATE_DIR/pids/$name"
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < 100; i++)); do
        alive=0
        for name in "$@"; do recorded_alive "$name" && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for name in "$@"; do
        if recorded_alive "$name"; then
            read -r pid _ < "$STATE_DIR/pids/$name"
            log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$STATE_DIR/pids/$name"
    done
}

start_daemon() {  # start_daemon <name> <command...>: detached, output to log/<name>.out
    local name=$1
    shift
    # setsid: own session, so a Ctrl-C in the caller's terminal does not reach the daemons.
    # No fork happens between `&` and the daemon (setsid and nsenter exec), so $! is the daemon.
    # 9>&-: the daemons must not inherit (and so hold) the lock on $STATE_DIR/lock.
    setsid "$@" < /dev/null > "$STATE_DIR/log/$name.out" 2>&1 9>&- &
    local pid=$!
    sleep 0.2
    record_pid "$name" "$pid"
}

# --- queries ----------------------------------------------------------------------------------

recorded_nodes() { cat "$STATE_DIR/nnodes" 2>/dev/null || echo 0; }

bed_is_up() {  # every daemon we recorded is alive
    local n i
    n=$(recorded_nodes)
    ((n > 0)) || return 1
    recorded_alive munged && recorded_alive slurmctld || return 1
    for ((i = 1; i <= n; i++)); do
        recorded_alive "slurmd-node$i" || return 1
    done
}

client_env() { export SLURM_CONF="$CONF"; }

wait_idle() {  # wait until sinfo reports every node idle
    local n=$1 deadline states
    deadline=$((SECONDS + UP_TIMEOUT))
    client_env
    while ((SECONDS < deadline)); do
        states=$(sinfo -h -N -p "$PARTITION" -o '%t' 2>/dev/null | sort | uniq -c | tr -s ' ' || true)
        if [[ $states == " $n idle" ]]; then
            return 0
        fi
        sleep 0.5
    done
    {
        echo "testbed: nodes not idle after ${UP_TIMEOUT}s (PTB_UP_TIMEOUT); sinfo says:"
        sinfo -N -o '%N %t %E' 2>&1 || true
        local f
        # slurmd/slurmctld write the same lines to their .log and to stderr (.out); show the .out
        # only where a daemon died before opening its log. The pmix lines are harmless noise
        # (the PMIx library is not installed; nothing here uses --mpi=pmix).
        for f in "$STATE_DIR"/log/munged.out "$STATE_DIR"/log/slurm*.log "$STATE_DIR"/log/slurm*.out; do
            [[ -s $f ]] || continue
            [[ $f == *slurm*.out && -s ${f%.out}.log ]] && continue
            echo "----- $f (last lines)"
            grep -v -e pmix -e 'MPI: Cannot create context' "$f" | tail -n 8
        done
    } >&2
    die "the bed did not come up (state dir $STATE_DIR)"
}

print_summary() {
    local n i
    n=$(recorded_nodes)
    log "up: $n node(s), partition $PARTITION, slurmctld at $BRIDGE_ADDR, conf $CONF"
    for ((i = 1; i <= n; i++)); do
        log "  node$i $(node_addr "$i") netns $NS_PREFIX$i"
    done
    if [[ $(readlink "$ETC_CONF" 2>/dev/null || true) != "$CONF" ]]; then
        log "  $ETC_CONF is not ours: export SLURM_CONF=$CONF"
    fi
}

# --- up ---------------------------------------------------------------------------------------

install_packages() {
    local missing=() cmd
    for cmd in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge \
        ip:iproute2 nsenter:util-linux ping:iputils-ping; do
        command -v "${cmd%%:*}" > /dev/null || missing+=("${cmd#*:}")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ ${PTB_NO_INSTALL:-0} == 1 ]] && die "missing ${missing[*]} and PTB_NO_INSTALL=1"
    command -v apt-get > /dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing slurm-wlm munge iproute2 (missing: ${missing[*]})"
    # slurm-wlm pulls slurmctld, slurmd and the client commands. Services are not started by the
    # packages where policy-rc.d forbids it (containers); we start our own instances regardless.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge iproute2 util-linux iputils-ping procps > /dev/null
}

make_munge_key() {
    # The socket's directory must be searchable by everyone or munged warns that only root can
    # authenticate; the key itself stays 0400.
    install -d -m 0755 "$MUNGE_DIR"
    [[ -s $MUNGE_DIR/munge.key ]] && return 0
    if command -v mungekey > /dev/null; then
        mungekey --create --keyfile="$MUNGE_DIR/munge.key" --force
    else
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$MUNGE_DIR/munge.key"
}

write_conf() {
    local n=$1 cpus mem_mb i
    cpus=${PTB_CPUS:-$(nproc)}
    # slurmd drains a node whose configured memory exceeds what it finds; every slurmd sees the
    # whole machine, so give each node an equal share.
    mem_mb=$(awk -v n="$n" '/^MemTotal:/ { printf "%d", $2 / 1024 / n }' /proc/meminfo)
    {
        echo "# Generated by slurm/testbed.sh on $(date -Is); regenerated by every 'up'."
        echo "ClusterName=$CLUSTER"
        echo "SlurmctldHost=$(hostname -s)($BRIDGE_ADDR)"
        cat << EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again: 120 s by default,
# 20 s here so requeue tests stay short (\`scontrol update JobId=<id> StartTime=now\` skips it).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=20
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups needed: process tracking by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Cores are the consumable: two 1-CPU tasks of different jobs can share a node.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A node that was down comes back as soon as its slurmd registers.
ReturnToService=2
JobRequeue=1
# Seconds between SIGTERM and SIGKILL when a job is cancelled, preempted or requeued.
KillWait=10
# Finished jobs stay visible to scontrol/squeue this long (there is no sacct here).
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
EOF
        for ((i = 1; i <= n; i++)); do
            echo "NodeName=node$i NodeAddr=$(node_addr "$i") CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
        done
        echo "PartitionName=$PARTITION Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
}

setup_network() {
    local n=$1 i ns veth peer
    # Record the objects before creating them, so a failure half-way is still cleaned up by `down`.
    if ! ip link show "$BRIDGE" > /dev/null 2>&1; then
        echo "bridge $BRIDGE" >> "$STATE_DIR/net"
        ip link add "$BRIDGE" type bridge
    fi
    ip addr replace "$BRIDGE_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for ((i = 1; i <= n; i++)); do
        ns="$NS_PREFIX$i"
        veth="$VETH_PREFIX$i"
        peer="ptb-p$i"
        if ! ip netns list | grep -qw "$ns"; then
            echo "netns $ns" >> "$STATE_DIR/net"
            ip netns add "$ns"
        fi
        if ! ip link show "$veth" > /dev/null 2>&1; then
            echo "veth $veth" >> "$STATE_DIR/net"
            ip link add "$veth" type veth peer name "$peer"
            ip link set "$peer" netns "$ns"
            ip -n "$ns" link set "$peer" name eth0
        fi
        ip link set "$veth" master "$BRIDGE"
        ip link set "$veth" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr replace "$(node_addr "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
        # Deliberately no default route: the bed's subnet is all a node can reach, so a lookup of a
        # name that /etc/hosts lacks fails at once instead of waiting ~20 s for an unreachable DNS
        # server (with a default route and no NAT, `getent hosts node1` took 20 s per call).
    done
}

check_network() {
    local n=$1 i j
    for ((i = 1; i <= n; i++)); do
        ping -q -c 1 -W 2 "$(node_addr "$i")" > /dev/null \
            || die "host cannot reach node$i at $(node_addr "$i") (bridge $BRIDGE)"
        for ((j = 1; j <= n; j++)); do
            ((i == j)) && continue
            nsenter --net="/var/run/netns/$NS_PREFIX$i" ping -q -c 1 -W 2 "$(node_addr "$j")" > /dev/null \
                || die "node$i cannot reach node$j at $(node_addr "$j")"
        done
    done
}

cmd_up() {
    local n=$1 i
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "--nodes wants a positive integer, got '$n'"
    ((n <= 200)) || die "--nodes: at most 200"
    [[ $(id -u) == 0 ]] || die "must run as root (network namespaces, slurmd)"
    mkdir -p "$STATE_DIR"
    exec 9> "$STATE_DIR/lock"
    flock -w 300 9 || die "another testbed.sh holds $STATE_DIR/lock"

    if bed_is_up; then
        local have
        have=$(recorded_nodes)
        ((have == n)) || die "the bed is up with $have node(s); run 'down' first to change it to $n"
        wait_idle "$n"
        print_summary
        return 0
    fi
    if [[ -n $(ls -A "$STATE_DIR/pids" 2>/dev/null) || -s $STATE_DIR/net ]]; then
        log "a previous bed is half up; taking it down first"
        do_down
    fi

    local t0=$SECONDS
    install_packages
    command -v nsenter > /dev/null || die "nsenter (util-linux) not found"
    ip netns list > /dev/null 2>&1 || die "'ip netns' does not work here (no network namespaces?)"
    # Logs of the previous bed are kept once, as log.prev.
    rm -rf "$STATE_DIR/log.prev"
    [[ -d $STATE_DIR/log ]] && mv "$STATE_DIR/log" "$STATE_DIR/log.prev"
    mkdir -p "$STATE_DIR"/{pids,log,run,ctld,spool}
    for ((i = 1; i <= n; i++)); do mkdir -p "$STATE_DIR/spool/node$i"; done
    echo "$n" > "$STATE_DIR/nnodes"

    setup_network "$n"
    check_network "$n"
    make_munge_key
    write_conf "$n"

    start_daemon munged munged --foreground --force \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --seed-file="$MUNGE_DIR/munged.seed"
    for ((i = 0; i < 50; i++)); do [[ -S $MUNGE_SOCKET ]] && break; sleep 0.1; done
    [[ -S $MUNGE_SOCKET ]] || { tail "$STATE_DIR"/log/munged.*; die "munged did not start"; }

    # -c: start from an empty job state; the bed holds nothing worth keeping across `up`s.
    start_daemon slurmctld slurmctld -D -c -f "$CONF"
    for ((i = 1; i <= n; i++)); do
        start_daemon "slurmd-node$i" nsenter --net="/var/run/netns/$NS_PREFIX$i" \
            slurmd -D -N "node$i" -f "$CONF"
    done

    if [[ ! -e $ETC_CONF && ! -L $ETC_CONF ]]; then
        mkdir -p "$(dirname "$ETC_CONF")"
        ln -s "$CONF" "$ETC_CONF"
        echo "$ETC_CONF" > "$STATE_DIR/etc_link"
    fi

    wait_idle "$n"
    print_summary
    log "up took $((SECONDS - t0)) s"
}

# --- down -------------------------------------------------------------------------------------

do_down() {
    local n i kind name ns pids
    n=$(recorded_nodes)
    # Jobs still running would keep their processes (slurmstepd and tasks) alive in the node
    # namespaces after slurmd exits: cancel them while slurmctld can still do it.
    if recorded_alive slurmctld; then
        client_env
        if [[ -n $(squeue -h -o %i 2>/dev/null || true) ]]; then
            log "cancelling the jobs still in the queue"
            # shellcheck disable=SC2046
            scancel $(squeue -h -o %i) 2>/dev/null || true
            for ((i = 0; i < 30; i++)); do
                [[ -z $(squeue -h -t R,CG -o %i 2>/dev/null || true) ]] && break
                sleep 0.5
            done
        fi
    fi
    # All daemons at once: each takes a second or two to shut down, and none needs the others
    # for it once the jobs are gone.
    local daemons=(munged slurmctld)
    for ((i = 1; i <= n; i++)); do daemons+=("slurmd-node$i"); done
    stop_recorded "${daemons[@]}"
    # Whatever is left in a node's namespace was started by that node's slurmd (a step that outlived
    # the cancel): `ip netns pids` names exactly those processes.
    if [[ -f $STATE_DIR/net ]]; then
        while read -r kind name; do
            [[ $kind == netns ]] || continue
            pids=$(ip netns pids "$name" 2>/dev/null || true)
            if [[ -n $pids ]]; then
                log "killing leftover processes in $name: ${pids//$'\n'/ }"
                # shellcheck disable=SC2086
                kill -KILL $pids 2>/dev/null || true
            fi
        done < "$STATE_DIR/net"
        # Remove in reverse creation order: veths, then namespaces, then the bridge.
        tac "$STATE_DIR/net" | while read -r kind name; do
            case $kind in
                veth) ip link del "$name" 2>/dev/null || true ;;
                netns) ip netns del "$name" 2>/dev/null || true ;;
                bridge) ip link del "$name" 2>/dev/null || true ;;
            esac
        done
        rm -f "$STATE_DIR/net"
    fi
    if [[ -f $STATE_DIR/etc_link ]]; then
        # Only remove the link if it still points at our file.
        if [[ $(readlink "$ETC_CONF" 2>/dev/null || true) == "$CONF" ]]; then rm -f "$ETC_CONF"; fi
        rm -f "$STATE_DIR/etc_link"
    fi
    rm -f "$STATE_DIR/nnodes" "$STATE_DIR/run/"*.pid
    rm -rf "$STATE_DIR/pids"
}

cmd_down() {
    [[ $(id -u) == 0 ]] || die "must run as root"
    [[ -d $STATE_DIR ]] || { log "nothing to do (no $STATE_DIR)"; return 0; }
    exec 9> "$STATE_DIR/lock"
    flock -w 300 9 || die "another testbed.sh holds $STATE_DIR/lock"
    do_down
    log "down"
}

# --- status -----------------------------------------------------------------------------------

cmd_status() {
    if ! bed_is_up; then
        if [[ -n $(ls -A "$STATE_DIR/pids" 2>/dev/null) ]]; then
            echo "testbed: partly up (a daemon died); run 'down', or 'up' to restart it"
        else
            echo "testbed: down"
        fi
        return 3
    fi
    client_env
    sinfo -N -l
}

cmd_nodes() {
    bed_is_up || return 3
    local n i
    n=$(recorded_nodes)
    for ((i = 1; i <= n; i++)); do echo "node$i $(node_addr "$i") $NS_PREFIX$i"; done
}

main() {
    local cmd=${1:-} nodes=2
    [[ -n $cmd ]] || usage
    shift
    while (($#)); do
        case $1 in
            --nodes) nodes=${2:-}; shift 2 || die "--nodes wants a value" ;;
            --nodes=*) nodes=${1#*=}; shift ;;
            -h | --help) usage ;;
            *) die "unknown argument '$1'" ;;
        esac
    done
    case $cmd in
        up) cmd_up "$nodes" ;;
        down) cmd_down ;;
        status) cmd_status ;;
        nodes) cmd_nodes ;;
        -h | --help | help) usage ;;
        *) die "unknown command '$cmd' (up, down, status, nodes)" ;;
    esac
}

main "$@"
