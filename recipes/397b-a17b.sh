#!/usr/bin/env bash
# usage: DATA_PATH=/data/corpus NNODES=64 bash recipes/397b-a17b.sh [extra Megatron flags]   (8x H100 80GB per node)
# 396B total / 17.4B active, TP4 x PP16 x EP16 (public layout). 60 layers do not split evenly into 16 stages:
# first and last stage take 2 layers (embedding / output+MTP work), the 14 middle stages 4: 2 + 14 x 4 + 2 = 60.
# 512 experts / EP 16 = 32 per GPU. TP4 > 2 query groups: megatron replicates each KV group on 2 ranks.
PRESET=397b-a17b TP=${TP:-4} PP=${PP:-16} EP=${EP:-16} MICRO_BATCH=${MICRO_BATCH:-1} GLOBAL_BATCH=${GLOBAL_BATCH:-2048} \
  LR=${LR:-1.5e-4} EXTRA_PARALLEL=${EXTRA_PARALLEL:---moe-grouped-gemm --decoder-first-pipeline-num-layers 2 --decoder-last-pipeline-num-layers 2} \
  RECOMPUTE=${RECOMPUTE:---recompute-granularity selective --recompute-modules core_attn gdn_norm_out moe_act} \
  source "$(dirname "$0")/common.sh" "$@"
