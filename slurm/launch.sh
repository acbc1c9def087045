# shellcheck shell=bash
# The launcher that slurm/multinode.sbatch and slurm/encode.sbatch share (train.sbatch and sweep.sbatch
# run multinode.sbatch). A batch script sources it from the submit folder and ends with
#
#     launch pipeline/train.py "${args[@]}"          # or: launch -m pipeline.sample RUN encode ...
#
# which runs one `accelerate launch … PROGRAM ARGS` per node and returns its exit status. On USR1 (the
# warning before the time limit: #SBATCH --signal=B:USR1@<seconds>) the program saves and exits 75,
# and this job, or this task of an array, is requeued. On TERM (preemption, scancel, the limit itself;
# Slurm kills KillWait seconds later, 30 by default) the program saves and exits 75 the same way, and
# Slurm decides whether the job comes back: a preemption in PreemptMode=REQUEUE requeues it, scancel
# does not.
#
# Environment (set before sbatch; the job inherits it, also under `sbatch --export=NONE`):
#   PROCS_PER_NODE     default: the GPUs Slurm gave each node (all nodes must have the same number),
#                      or 1 on a node without GPUs (then ACCELERATE_USE_CPU=1, gloo)
#   OMP_NUM_THREADS    default: --cpus-per-task / PROCS_PER_NODE
#   MAIN_PROCESS_PORT  rendezvous port on the head node; default 10000 + jobid % 20000, moved on
#                      while taken on the head node (below 32768: the kernel's ephemeral ports)
#   GLOO_SOCKET_IFNAME interface for gloo (the stop flag's group on GPU runs, everything on CPU runs);
#                      default: NCCL_SOCKET_IFNAME when it names interfaces, else each node's
#                      route to the head node (its default route where that is loopback)
#   NCCL_DEBUG         default WARN (one line per NCCL error); INFO to see rings, interfaces, IB
#   VAE_SIGNAL_MARGIN_SECONDS  default: the batch script's own `#SBATCH --signal=…@<seconds>`

# Per node: `[node] GPUs` for every group of nodes with the same allocation, from the job's
# detailed record ("Nodes=a,b CPU_IDs=… GRES=gpu:8(IDX:0-7)"; no GRES: 0).
job_gpus_per_node() {
    scontrol show job -d "$SLURM_JOB_ID" | awk '/^ +Nodes=/ {
        n = 0
        if (match($0, /GRES=[^ ]*gpu:([^:( ,]+:)?[0-9]+/)) { g = substr($0, RSTART, RLENGTH); sub(/.*:/, "", g); n = g }
        sub(/^ +Nodes=/, ""); sub(/ .*/, ""); print $0, n }'
}

# The first port from $1 on that this node can bind (as the rendezvous server will), or nothing.
first_free_port() {
    python - "$1" <<'EOF'
import socket, sys
for port in range(int(sys.argv[1]), int(sys.argv[1]) + 100):
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
    print(port)
    break
EOF
}

# Runs on every node (srun exports it): gloo's interface, then the node's `accelerate launch`.
node_launch() {
    # accelerate launch (a torchrun agent, which USR1 would kill) ignores USR1, and so does every
    # process it starts until it installs a handler of its own.
    trap '' USR1
    if [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then
        local ifname head_ip
        # NCCL's list ("ib0,eth0") is gloo's syntax too; its prefix forms ("^lo", "=eth0", "eth") are not.
        if [[ "${NCCL_SOCKET_IFNAME:-}" =~ ^[A-Za-z0-9._,-]+$ ]] && ip link show "${NCCL_SOCKET_IFNAME%%,*}" &>/dev/null; then
            ifname=$NCCL_SOCKET_IFNAME
        else
            # Gloo otherwise binds to what the hostname resolves to: loopback on some nodes (a
            # 127.0.1.1 line in /etc/hosts), where the other nodes never reach it.
            head_ip=$(getent ahostsv4 "$MAIN_PROCESS_IP" | awk 'NR == 1 { print $1 }')
            ifname=$(ip -o route get "${head_ip:-0.0.0.0}" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
            if [ -z "$ifname" ] || [ "$ifname" = lo ]; then  # the default route's (a lookup: nothing is sent)
                ifname=$(ip -o route get 1.1.1.1 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
            fi
        fi
        [ -n "$ifname" ] && export GLOO_SOCKET_IFNAME=$ifname
    fi
    echo "$(date -Is) node $SLURM_NODEID ($(hostname)): GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-unset}"
    # $MULTI_GPU unquoted: empty or one flag.
    # shellcheck disable=SC2086
    exec accelerate launch $MULTI_GPU \
        --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
        --num_processes "$NUM_PROCESSES" --mixed_precision no --dynamo_backend no "$@"
}

# USR1 or TERM: pass USR1 on to the step (srun forwards it to every process of the step) and again
# every 30 s until the step ends: a USR1 that lands while the program is still starting, before its
# handler exists, is ignored (see `trap '' USR1` above), not fatal. USR1 and not TERM: TERM would end
# the torchrun agents, which end their workers 30 s later, saved or not.
on_stop_signal() {
    local earlier=$stop_signal
    # A TERM after a USR1 wins: Slurm is ending the job, and a cancelled job must stay cancelled.
    [ "$earlier" = TERM ] || stop_signal=$1
    if [ "$1" = USR1 ]; then
        echo "$(date -Is) USR1: the program saves and stops; then this job is requeued"
    else
        echo "$(date -Is) TERM: the program saves and stops before Slurm's KillWait runs out; no requeue"
    fi
    if [ -z "$earlier" ]; then
        ( while kill -USR1 "$step_pid" 2>/dev/null; do sleep 30; done ) &
    fi
}

launch() {
    local -a per_node
    mapfile -t per_node < <(job_gpus_per_node)
    local first=${per_node[0]:-"? 0"}
    local gpus=${first##* }
    if [ "$(printf '%s\n' "${per_node[@]##* }" | sort -u | wc -l)" -gt 1 ]; then
        echo "error: Slurm gave the nodes of job $SLURM_JOB_ID different numbers of GPUs" \
             "($(printf '%s GPUs; ' "${per_node[@]}" | sed 's/; $//')) and every node runs the same number" \
             "of processes: submit with --gpus-per-node=N instead of --gpus" >&2
        return 2
    fi
    if [ "${gpus:-0}" -eq 0 ]; then
        # A site that gives whole nodes without GPUs in Slurm's records: count them here.
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    fi
    if [ "$gpus" -eq 0 ]; then
        # The pinned torch is a CUDA build: without this, processes on a GPU-less node never form
        # one process group (each trains alone at world size 1).
        export ACCELERATE_USE_CPU=1
    fi
    export PROCS_PER_NODE=${PROCS_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
    export NUM_PROCESSES=$(( SLURM_NNODES * PROCS_PER_NODE ))
    MULTI_GPU=$([ "$NUM_PROCESSES" -gt 1 ] && echo --multi_gpu); export MULTI_GPU
    local threads=$(( ${SLURM_CPUS_PER_TASK:-1} / PROCS_PER_NODE ))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
    MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1); export MAIN_PROCESS_IP
    if [ -z "${MAIN_PROCESS_PORT:-}" ]; then
        MAIN_PROCESS_PORT=$(( 10000 + SLURM_JOB_ID % 20000 ))
        # The batch script runs on the first node of the job, the head node.
        if [ "${SLURMD_NODENAME:-}" = "$MAIN_PROCESS_IP" ]; then
            MAIN_PROCESS_PORT=$(first_free_port "$MAIN_PROCESS_PORT")
            [ -n "$MAIN_PROCESS_PORT" ] || { echo "error: no free port from $(( 10000 + SLURM_JOB_ID % 20000 )) on for 100 ports on $MAIN_PROCESS_IP; set MAIN_PROCESS_PORT" >&2; return 2; }
        fi
    fi
    export MAIN_PROCESS_PORT
    # Slurm does not tell a job its --signal margin; the trainer warns when a checkpoint takes more than
    # half of it. Read from the batch script's own header (set VAE_SIGNAL_MARGIN_SECONDS when you pass
    # --signal on the sbatch line instead).
    VAE_SIGNAL_MARGIN_SECONDS=${VAE_SIGNAL_MARGIN_SECONDS:-$(sed -n 's/^#SBATCH --signal=[^@]*@\([0-9]*\).*/\1/p' "$0" | head -n1)}
    export VAE_SIGNAL_MARGIN_SECONDS
    # What a hung or crashed job leaves in its log: NCCL's errors, and every thread's Python stack on a
    # fatal signal. A collective that never completes fails after torch's NCCL timeout (10 minutes).
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN} PYTHONFAULTHANDLER=1
    # The site's margin after a TERM: Slurm's KillWait, the seconds before it kills what is left.
    local kill_wait
    kill_wait=$(scontrol show config | sed -n 's/^KillWait *= *\([0-9]*\).*/\1/p')
    echo "$(date -Is) job $SLURM_JOB_ID SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NODELIST" \
         "processes=$NUM_PROCESSES ($PROCS_PER_NODE per node, $gpus GPUs) head=$MAIN_PROCESS_IP:$MAIN_PROCESS_PORT" \
         "signal_margin=${VAE_SIGNAL_MARGIN_SECONDS:-unknown}s term_margin=${kill_wait:-unknown}s"

    stop_signal="" step_pid=""
    trap 'on_stop_signal USR1' USR1
    trap 'on_stop_signal TERM' TERM
    export -f node_launch
    # One task per node; node_launch reads $SLURM_NODEID there, not here (accelerate#2816: expanded
    # here, every node is machine rank 0). --export=ALL: at sites that submit with --export=NONE the
    # step would otherwise inherit SLURM_EXPORT_ENV=NONE and start without PATH. --kill-on-bad-exit=1:
    # when one node's task fails (a crash, a dead node, the head's port in use), srun ends the others
    # at once instead of leaving them waiting for a rendezvous or collective timeout.
    # --cpus-per-task again on srun: since Slurm 22.05 a step does not inherit it.
    srun --export=ALL --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 \
        bash -c 'node_launch "$@"' node_launch "$@" &
    step_pid=$!

    local rc
    wait "$step_pid"; rc=$?
    # `wait` returns early (128 + the signal) when a trap runs; keep waiting for the save and the exit.
    while [ -n "$stop_signal" ] && [ "$rc" -gt 128 ] && kill -0 "$step_pid" 2>/dev/null; do
        wait "$step_pid"; rc=$?
    done
    [ -z "$stop_signal" ] || echo "$(date -Is) stopped after $stop_signal (exit $rc)"
    if [ "$stop_signal" = USR1 ] && [ "$rc" -ne 0 ]; then
        # In an array, SLURM_JOB_ID of one task is the array's own id, and requeueing it requeues
        # every task: name this task as <array id>_<index>.
        local me=$SLURM_JOB_ID
        [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && me=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
        echo "$(date -Is) requeueing $me"
        scontrol requeue "$me"
    fi
    return "$rc"
}
