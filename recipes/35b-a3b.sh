#!/usr/bin/env bash
# usage: DATA_PATH=/data/corpus NNODES=2 bash recipes/35b-a3b.sh [extra Megatron flags]   (8x H100 80GB per node)
# 34.7B total / 3.5B active, PP2 x EP8 (public layout): 40 layers / 2 stages = 20; 256 experts / EP 8 = 32 experts
# per GPU; TP1 (2 query groups). Grouped GEMM for the experts on Transformer Engine.
# LoRA (LORA_RANK=16): 943.9M adapter parameters with every target (922.7M of them the 256 experts' own, so grouped GEMM
# is dropped), 24.8M with one adapter per layer's experts (LORA_EXPERTS=shared), 21.2M without `experts` (LORA_TARGETS);
# the frozen bf16 base is 69 GB over PP2 x EP8, the adapters' fp32 Adam state 11.3 GB (12 B each) sharded over the
# data-parallel ranks, their fp32 gradients 3.8 GB over PP x EP.
# LOAD= is the base; each checkpoint in SAVE holds the adapters and their Adam state (13.2 GB), not the base.
PRESET=35b-a3b TP=${TP:-1} PP=${PP:-2} EP=${EP:-8} MICRO_BATCH=${MICRO_BATCH:-1} GLOBAL_BATCH=${GLOBAL_BATCH:-512} \
  LR=${LR:-3e-4} EXTRA_PARALLEL=${EXTRA_PARALLEL:---moe-grouped-gemm} source "$(dirname "$0")/common.sh" "$@"
