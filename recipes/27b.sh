#!/usr/bin/env bash
# usage: DATA_PATH=/data/corpus NNODES=4 bash recipes/27b.sh [extra Megatron flags]   (8x H100 80GB per node)
# 26.9B, TP4 x PP4 (public layout) = 16 GPUs per replica: 64 layers / 4 stages = 16 layers each; 24 heads,
# 4 groups, 48 GDN value heads divide by 4. VPP 4 layers per virtual stage shrinks the pipeline bubble.
# LoRA (LORA_RANK=16): 116.7M adapter parameters (every linear); frozen bf16 base 54 GB over TP4 x PP4, Adam 1.4 GB
# sharded over the data-parallel ranks.
PRESET=27b TP=${TP:-4} PP=${PP:-4} VPP=${VPP:-4} MICRO_BATCH=${MICRO_BATCH:-1} GLOBAL_BATCH=${GLOBAL_BATCH:-512} \
  LR=${LR:-2e-4} RECOMPUTE=${RECOMPUTE:---recompute-granularity selective --recompute-modules core_attn gdn_norm_out} \
  source "$(dirname "$0")/common.sh" "$@"
