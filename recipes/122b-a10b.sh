#!/usr/bin/env bash
# usage: DATA_PATH=/data/corpus NNODES=16 bash recipes/122b-a10b.sh [extra Megatron flags]   (8x H100 80GB per node)
# 122B total / 9.8B active, TP2 x PP8 x EP8: 48 layers / 8 stages = 6; 256 experts / EP 8 = 32 per GPU; TP2 = the
# 2 query groups; expert TP 1. A replica is TP2 x PP8 = 16 GPUs; EP spans the data-parallel ranks.
# LoRA (LORA_RANK=16): 1854.1M adapter parameters with every target (1811.9M of them the experts' own, so grouped GEMM
# is dropped), 49.2M with one adapter per layer's experts (LORA_EXPERTS=shared), 42.1M without `experts` (LORA_TARGETS);
# frozen bf16 base 244 GB over TP2 x PP8 x EP8, the adapters' fp32 Adam state 22.2 GB (12 B each) sharded over the
# data-parallel ranks, their fp32 gradients 7.4 GB over TP x PP x EP.
PRESET=122b-a10b TP=${TP:-2} PP=${PP:-8} EP=${EP:-8} MICRO_BATCH=${MICRO_BATCH:-1} GLOBAL_BATCH=${GLOBAL_BATCH:-1024} \
  LR=${LR:-2e-4} EXTRA_PARALLEL=${EXTRA_PARALLEL:---moe-grouped-gemm} \
  RECOMPUTE=${RECOMPUTE:---recompute-granularity selective --recompute-modules core_attn gdn_norm_out moe_act} \
  source "$(dirname "$0")/common.sh" "$@"
