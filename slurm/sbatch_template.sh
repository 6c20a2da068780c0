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
# One task per accelerator (one per node on CPU). Each task is one rank: SLURM_PROCID is its
# rank, SLURM_NTASKS the world size, SLURM_LOCALID its local rank on the node.
#SBATCH --ntasks-per-node=1
# Data-loader workers + 1 for the training process itself.
#SBATCH --cpus-per-task=8
# On GPU partitions, one per task:
##SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#
# --- preemption and time limit ----------------------------------------------------------------
# 120 s before the time limit SLURM sends SIGUSR1 to every task of every step (every rank), not
# to this batch shell (that would be `B:USR1@120`). The trainer notes it, agrees on it across
# ranks at the next step, saves a checkpoint collectively and requeues the job
# (`scontrol requeue $SLURM_JOB_ID`). Keep 120 s above the time one checkpoint save takes.
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
# advertise loopback and ranks on other nodes cannot connect: name the interface that carries
# NodeAddr (eth0 on the test bed; ib0 or similar on clusters).
# export GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0

echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS tasks on" \
    "$SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

# --kill-on-bad-exit: one rank failing ends the step instead of leaving the others in a
# collective until the time limit. exec: this shell has nothing left to do.
exec srun --kill-on-bad-exit=1 python -m pipeline.stages "$RUN_DIR/config.yaml"
