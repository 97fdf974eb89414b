#!/bin/bash
# SwAV ResNet-50 on 2 nodes x 8 GPUs with torchrun (no SLURM). Run the same command on both nodes:
#     HEAD=10.0.0.1 NODE_RANK=0 bash configs/launch/torchrun_swav_2node.sh    # on the first node
#     HEAD=10.0.0.1 NODE_RANK=1 bash configs/launch/torchrun_swav_2node.sh    # on the second
# torchrun starts 8 workers per node and exports RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
# MASTER_PORT; each fastssl worker joins with them (DISTRIBUTED.RUN_ID is not used under torchrun).
# One node, several GPUs, needs no torchrun: fastssl-train ... config.DISTRIBUTED.NUM_PROC_PER_NODE=8
set -euo pipefail
: "${HEAD:?set HEAD to the address of the first node}" "${NODE_RANK:?set NODE_RANK to 0, 1, ...}"
NUM_NODES=${NUM_NODES:-2}

torchrun --nnodes "$NUM_NODES" --node-rank "$NODE_RANK" --nproc-per-node 8 \
    --master-addr "$HEAD" --master-port 29500 \
    -m fastssl.train config=pretrain/swav/swav_8node_resnet \
        'config.DATA.TRAIN.DATA_SOURCES=[disk_folder]' \
        'config.DATA.TRAIN.DATA_PATHS=[/datasets/imagenet/train]' \
        config.DISTRIBUTED.NUM_NODES="$NUM_NODES" \
        config.DISTRIBUTED.NUM_PROC_PER_NODE=8 \
        config.CHECKPOINT.DIR=/checkpoints/swav_2node_resnet
