#!/bin/bash
# sbatch template for submitting a pipeline run by hand, for sites that want a plain script.
# The usual route is the submitit launcher; this script does the same on its own terms.
#
#   sbatch slurm/sbatch_template.sh RUN_DIR        (RUN_DIR holds the resolved config.yaml)
#
# Copy it and edit the #SBATCH lines (sbatch reads them only up to the first command). Every
# option can also be given on the command line, which wins: `sbatch --nodes=4 ... RUN_DIR`.
#
# --- where and how big ------------------------------------------------------------------------
#SBATCH --job-name=pretrain
#SBATCH --partition=debug
# Site: your account, or delete the line where the cluster has none.
#SBATCH --account=CHANGE_ME
#SBATCH --nodes=2
# One task per accelerator (one per node on CPU). Each task is one rank: `python -m
# pipeline.stages` takes its rank from SLURM_PROCID, the world size from SLURM_NTASKS and its
# local rank from SLURM_LOCALID (RANK, WORLD_SIZE, LOCAL_RANK win where set).
#SBATCH --ntasks-per-node=1
# Data-loader workers + 1 for the training process itself.
#SBATCH --cpus-per-task=8
# On GPU partitions, one per task:
##SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#
# --- preemption, time limit, cancel ----------------------------------------------------------
# 120 s before the time limit SLURM sends SIGUSR1 to every task of every step (every rank), not
# to this batch shell (that would be `B:USR1@120`). USR1 is the signal the trainer takes as the
# time-limit warning: every rank notes it, the ranks agree at the next step, save a checkpoint
# together, and rank 0 requeues the job (`scontrol requeue $SLURM_JOB_ID`). Keep the delay above
# the time one save takes, plus up to 60 s (SLURM may send the warning that much early).
# SIGTERM (`scancel`, or preemption, where SLURM requeues the job itself) also stops the ranks
# with a save while there is time (KillWait), but nothing requeues the job: a cancel is final.
#SBATCH --signal=USR1@120
# Allow the job to be requeued (after preemption, node failure or by itself). It comes back
# with the same job id and SLURM_RESTART_COUNT=1, 2, ... and resumes from the run dir.
#SBATCH --requeue
# A requeued job truncates its output file unless it is opened for appending.
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail

RUN_DIR=${1:?usage: sbatch slurm/sbatch_template.sh RUN_DIR}
[[ -f $RUN_DIR/config.yaml ]] || { echo "no $RUN_DIR/config.yaml" >&2; exit 2; }

# Rendezvous on the first node of the allocation. Take its address from SLURM (NodeAddr) rather
# than its name: names need not resolve on the compute nodes (they do not on the test bed).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node -o "$first_node" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
# One port per job, so two jobs that share a node do not collide.
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

# Where the hostname resolves to 127.0.0.1 (the test bed does; some clusters do), gloo and NCCL
# would advertise loopback and ranks on other nodes could not connect: each rank names the
# interface that routes to MASTER_ADDR. To choose another one (ib0 or similar on clusters):
# export GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0

echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS tasks on" \
    "$SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

# --kill-on-bad-exit: one rank failing (an exception, which it logs with the last committed
# checkpoint before exiting; the OOM killer) ends every task of the step within seconds instead
# of leaving the others in a collective until its timeout; the job ends FAILED and a new
# submission resumes from that checkpoint. exec: this shell has nothing left to do.
exec srun --kill-on-bad-exit=1 python -m pipeline.stages "$RUN_DIR/config.yaml"
