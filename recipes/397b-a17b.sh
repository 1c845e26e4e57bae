#!/usr/bin/env bash
# usage: DATA_PATH=/data/corpus NNODES=64 bash recipes/397b-a17b.sh [extra Megatron flags]   (8x H100 80GB per node)
# 396B total / 17.4B active, TP4 x PP16 x EP16 (public layout). 60 layers do not split evenly into 16 stages:
# first and last stage take 2 layers (embedding / output+MTP work), the 14 middle stages 4: 2 + 14 x 4 + 2 = 60.
# 512 experts / EP 16 = 32 per GPU. TP4 > 2 query groups: megatron replicates each KV group on 2 ranks.
# LoRA (LORA_RANK=16): 5596.8M adapter parameters with every target (5536.5M of them the 512 experts' own, so grouped
# GEMM is dropped), 71.1M with one adapter per layer's experts (LORA_EXPERTS=shared), 60.3M without `experts`
# (LORA_TARGETS; either is the lean choice here); frozen bf16 base 793 GB over TP4 x PP16 x EP16, the adapters' fp32
# Adam state 67 GB (12 B each) sharded over the data-parallel ranks.
# LOAD= is the base; each checkpoint in SAVE holds the adapters and their Adam state (78 GB; 0.84 GB without
# `experts`), not the 793 GB base.
PRESET=397b-a17b TP=${TP:-4} PP=${PP:-16} EP=${EP:-16} MICRO_BATCH=${MICRO_BATCH:-1} GLOBAL_BATCH=${GLOBAL_BATCH:-2048} \
  LR=${LR:-1.5e-4} EXTRA_PARALLEL=${EXTRA_PARALLEL:---moe-grouped-gemm --decoder-first-pipeline-num-layers 2 --decoder-last-pipeline-num-layers 2} \
  RECOMPUTE=${RECOMPUTE:---recompute-granularity selective --recompute-modules core_attn gdn_norm_out moe_act} \
  source "$(dirname "$0")/common.sh" "$@"
