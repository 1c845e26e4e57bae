#!/usr/bin/env bash
# usage: DATA_PATH=/data/corpus NNODES=16 bash recipes/122b-a10b.sh [extra Megatron flags]   (8x H100 80GB per node)
# 122B total / 9.8B active, TP2 x PP8 x EP8: 48 layers / 8 stages = 6; 256 experts / EP 8 = 32 per GPU; TP2 = the
# 2 query groups; expert TP 1. A replica is TP2 x PP8 = 16 GPUs; EP spans the data-parallel ranks.
PRESET=122b-a10b TP=${TP:-2} PP=${PP:-8} EP=${EP:-8} MICRO_BATCH=${MICRO_BATCH:-1} GLOBAL_BATCH=${GLOBAL_BATCH:-1024} \
  LR=${LR:-2e-4} EXTRA_PARALLEL=${EXTRA_PARALLEL:---moe-grouped-gemm} \
  RECOMPUTE=${RECOMPUTE:---recompute-granularity selective --recompute-modules core_attn gdn_norm_out moe_act} \
  source "$(dirname "$0")/common.sh" "$@"
