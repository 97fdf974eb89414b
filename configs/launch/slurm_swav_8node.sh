#!/bin/bash
# SwAV ResNet-50 on 8 nodes x 8 GPUs (the seed recipe, global batch 4,096), one SLURM task per GPU:
#     sbatch configs/launch/slurm_swav_8node.sh
# Each task joins the run as one rank: fastssl reads SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and
# meets the others at the first host of the node list, port 10000 + job id mod 20000 (or at
# config.DISTRIBUTED.RUN_ID=host:port). Edit the data and checkpoint paths below.
#SBATCH --job-name=swav_8node
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12            # 5 DataLoader workers per GPU, the trainer, headroom
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue                     # a preempted job goes back to the queue; AUTO_RESUME continues it
#SBATCH --signal=B:USR1@180           # 3 minutes before the time limit: checkpoint, stop, requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# Preemption: SLURM sends SIGTERM to every task; the ranks agree on a step, rank 0 writes a checkpoint,
# all exit 0 and the requeued job resumes from it. Time limit: the batch shell gets USR1, passes it to
# the tasks (same clean stop) and requeues the job itself.
requeue() {
    echo "$(date): time limit near: checkpointing, then requeueing job $SLURM_JOB_ID"
    kill -USR1 "$SRUN_PID"
    wait "$SRUN_PID"
    scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

# --kill-on-bad-exit: one failed rank ends the step at once instead of leaving the others waiting
# in a collective (they would also give up after the collective timeout).
srun --kill-on-bad-exit=1 --cpu-bind=none \
    fastssl-train config=pretrain/swav/swav_8node_resnet \
        'config.DATA.TRAIN.DATA_SOURCES=[disk_folder]' \
        'config.DATA.TRAIN.DATA_PATHS=[/datasets/imagenet/train]' \
        config.DISTRIBUTED.NUM_NODES="$SLURM_JOB_NUM_NODES" \
        config.DISTRIBUTED.NUM_PROC_PER_NODE=8 \
        config.CHECKPOINT.DIR=/checkpoints/swav_8node_resnet &
SRUN_PID=$!
wait "$SRUN_PID"
