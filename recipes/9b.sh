#!/usr/bin/env bash
# usage: DATA_PATH=/data/corpus bash recipes/9b.sh [extra Megatron flags]   (8x H100 80GB per node)
# 9.0B, TP4 (public layout): 16 GDN key / 32 value heads / 4 query groups all divide by 4; SP on; 2 TP groups
# per node -> DP = 2 x nodes. bf16 states 9B x 2 B x 2 / 4 = 9 GB per GPU plus sharded Adam.
# LoRA (LORA_RANK=16): 43.3M adapter parameters (every linear); frozen bf16 base 18 GB over TP4, Adam 0.5 GB.
PRESET=9b TP=${TP:-4} PP=${PP:-1} MICRO_BATCH=${MICRO_BATCH:-1} GLOBAL_BATCH=${GLOBAL_BATCH:-512} LR=${LR:-3e-4} \
  source "$(dirname "$0")/common.sh" "$@"
