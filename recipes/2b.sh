#!/usr/bin/env bash
# usage: DATA_PATH=/data/corpus bash recipes/2b.sh [extra Megatron flags]   (8x H100 80GB per node)
# 1.9B: data parallel; ~30 GB of states with the distributed optimizer sharding Adam; micro-batch 2 x 4096.
# LoRA (LORA_RANK=16): 16.8M adapter parameters (every linear); frozen bf16 base 3.8 GB, Adam 0.2 GB.
PRESET=2b TP=${TP:-1} PP=${PP:-1} MICRO_BATCH=${MICRO_BATCH:-2} GLOBAL_BATCH=${GLOBAL_BATCH:-512} LR=${LR:-4e-4} \
  source "$(dirname "$0")/common.sh" "$@"
