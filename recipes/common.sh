#!/usr/bin/env bash
# Shared launcher for every Qwen3.5 recipe: sourced by recipes/<size>.sh after it sets its defaults.
# Every setting is ${VAR:-default}: override any of them from the environment. Extra arguments to the recipe are
# passed to pretrain_qwen35.py last, so any Megatron flag can be added or overridden.
# Launch modes: one node (torchrun, default), several nodes (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT),
# or under SLURM (srun sets SLURM_*; we derive the torchrun rendezvous from it).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python

: "${PRESET:?the recipe must set PRESET}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [ -n "${SLURM_JOB_ID:-}" ]; then  # srun: one task per node, torchrun spawns the GPUs
  NNODES=${NNODES:-${SLURM_NNODES:-1}}
  NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

# VPP is layers per virtual pipeline stage (megatron's --num-layers-per-virtual-pipeline-stage), not the number of
# chunks: PP=2 VPP=1 on 4 layers gives each stage 2 chunks of one layer. ETP=1 here (bare megatron: ETP = TP).
TP=${TP:-1}; PP=${PP:-1}; VPP=${VPP:-}; EP=${EP:-1}; ETP=${ETP:-1}; CP=${CP:-1}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
SEQ_LEN=${SEQ_LEN:-4096}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
LR=${LR:-3e-4}; MIN_LR=${MIN_LR:-3e-5}; WARMUP=${WARMUP:-2000}
PRECISION=${PRECISION---bf16}  # unset: bf16; PRECISION= (empty): fp32 (Megatron's default)
RECOMPUTE=${RECOMPUTE:-}
SAVE=${SAVE:-$REPO/checkpoints/$PRESET}
LOAD=${LOAD:-$SAVE}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
EXTRA_PARALLEL=${EXTRA_PARALLEL:-}

# The training data: each source given becomes its flag (pretrain_qwen35.py refuses none, or two, by name)
DATA_ARGS=()
[ "${MOCK_DATA:-0}" = 1 ] && DATA_ARGS+=(--mock-data)
if [ -n "${SFT_DATA_PATH:-}" ]; then  # chat conversations (tools/data/preprocess_sft.py): fine-tuning, packed
  MICRO_BATCH=1  # one packed sequence per micro-batch (it holds several conversations)
  DATA_ARGS+=(--sft-data-path "$SFT_DATA_PATH")
  [ "${SFT_PACKING:-1}" = 0 ] && DATA_ARGS+=(--no-sft-packing)  # one conversation per sequence
fi
# images / videos with text (tools/data/preprocess_vl.py): trains the ViT too
[ -n "${VL_DATA_PATH:-}" ] && DATA_ARGS+=(--vl-data-path "$VL_DATA_PATH")
# unquoted: megatron's "WEIGHT PREFIX WEIGHT PREFIX" blends
[ -n "${DATA_PATH:-}" ] && DATA_ARGS+=(--data-path $DATA_PATH)
[ "${MOCK_DATA:-0}" = 1 ] || DATA_ARGS+=(--split 99,1,0)
DATA_ARGS+=(--tokenizer-type NullTokenizer --null-tokenizer-eod-id 248044)  # data is pre-tokenized (Qwen3.5 vocab)

MODEL_ARGS=(--qwen35-preset "$PRESET")  # fills every architecture flag (python -m megatron_qwen35.training.flags)
# MTP=0: train without the multi-token-prediction layer (the model itself is unchanged; a checkpoint without MTP
# weights, e.g. transformers' save_pretrained output, otherwise starts the layer from its initialisation)
[ "${MTP:-}" = 0 ] && MODEL_ARGS+=(--mtp-num-layers 0)
# LoRA (LORA_RANK=16): adapters on every linear of the language model (LORA_TARGETS: transformers' module names, e.g.
# "q_proj k_proj v_proj o_proj"; "experts" for every routed expert's; LORA_EXPERTS=shared: one adapter for all of a
# layer's experts instead of one each), the base frozen; LORA_ALPHA, LORA_DROPOUT,
# LORA_MTP=1 for the MTP layer's linears, LORA_ROUTER=1 for the MoE routers, LORA_VISION=1 for the vision tower's.
# LoRA on the experts runs each expert as its own linear: no grouped GEMM.
# The settings go to pretrain_qwen35.py whenever given: without a rank it refuses them (the run would silently train
# the whole model).
LORA_ARGS=()
[ "${LORA_RANK:-0}" != 0 ] && LORA_ARGS+=(--lora-rank "$LORA_RANK")
[ -n "${LORA_ALPHA:-}" ] && LORA_ARGS+=(--lora-alpha "$LORA_ALPHA")
[ -n "${LORA_DROPOUT:-}" ] && LORA_ARGS+=(--lora-dropout "$LORA_DROPOUT")
[ -n "${LORA_TARGETS:-}" ] && read -r -a targets <<< "$LORA_TARGETS" \
  && LORA_ARGS+=(--lora-target-modules "${targets[@]}")
[ -n "${LORA_EXPERTS:-}" ] && LORA_ARGS+=(--lora-experts "$LORA_EXPERTS")
[ "${LORA_MTP:-0}" = 1 ] && LORA_ARGS+=(--lora-mtp)
[ "${LORA_ROUTER:-0}" = 1 ] && LORA_ARGS+=(--lora-router)
[ "${LORA_VISION:-0}" = 1 ] && LORA_ARGS+=(--lora-vision)
if [ "${LORA_RANK:-0}" != 0 ]; then
  # the adapters' optimizer state is small: saved in megatron's fully reshardable format (gathered on each model-
  # parallel group's first data-parallel rank), a LoRA checkpoint resumes at any TP / PP / EP / DP
  LORA_ARGS+=(--dist-ckpt-optim-fully-reshardable --distrib-optim-fully-reshardable-mem-efficient)
  if [ -z "${LORA_TARGETS:-}" ] || [[ " $LORA_TARGETS " == *" experts "* ]]; then
    EXTRA_PARALLEL=${EXTRA_PARALLEL//--moe-grouped-gemm/}
  fi
fi
MODEL_ARGS+=("${LORA_ARGS[@]}")
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --expert-model-parallel-size "$EP" --expert-tensor-parallel-size "$ETP" --context-parallel-size "$CP"
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
[ "$TP" -gt 1 ] && PARALLEL_ARGS+=(--sequence-parallel)
[ -n "$VPP" ] && PARALLEL_ARGS+=(--num-layers-per-virtual-pipeline-stage "$VPP")
[ -n "$EXTRA_PARALLEL" ] && read -r -a extra <<< "$EXTRA_PARALLEL" && PARALLEL_ARGS+=("${extra[@]}")
TRAIN_ARGS=(--micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --seq-length "$SEQ_LEN"
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$WARMUP"
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.02 $PRECISION)
[ -n "$RECOMPUTE" ] && read -r -a rc <<< "$RECOMPUTE" && TRAIN_ARGS+=("${rc[@]}")
LOAD_ARGS=(--load "$LOAD")
# LOAD other than SAVE (a converted release to fine-tune; LoRA's frozen base) is megatron's --pretrained-checkpoint,
# read weights-only while SAVE holds no checkpoint: the same command run again (a requeued job) resumes from SAVE
# instead of starting over from LOAD and saving over SAVE's iterations. LoRA reads the base on every resume (SAVE's
# checkpoints hold the adapters alone: megatron_qwen35/lora/base.py). The same folder however spelt (./ckpt, ckpt/,
# through a link) is SAVE itself: compared resolved, existing or not (as spelt where realpath lacks GNU's -m).
same_folder() {
  local a b
  { a=$(realpath -m -- "$1" 2>/dev/null) && b=$(realpath -m -- "$2" 2>/dev/null) && [ "$a" = "$b" ]; } || [ "$1" = "$2" ]
}
same_folder "$LOAD" "$SAVE" || LOAD_ARGS=(--load "$SAVE" --pretrained-checkpoint "$LOAD")
CKPT_ARGS=(--save "$SAVE" "${LOAD_ARGS[@]}" --save-interval "$SAVE_INTERVAL" --ckpt-format torch_dist)
LOG_ARGS=(--log-interval "${LOG_INTERVAL:-10}" --eval-interval "${EVAL_INTERVAL:-1000}" --eval-iters "${EVAL_ITERS:-10}")

ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${CKPT_ARGS[@]}" "${LOG_ARGS[@]}" "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then  # print the pretrain_qwen35.py arguments, one per line (tests parse these)
  printf '%s\n' "${ARGS[@]}"
  exit 0
fi
# Checked in one process before torchrun starts a rank: the flags, the layout against the model, the data, the --load
# checkpoint (training/preflight.py). A refusal is one error line and exit code 2; nothing is written.
WORLD_SIZE=$((GPUS_PER_NODE * NNODES)) RANK=0 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
  "$PYTHON" -m megatron_qwen35.training.preflight "${ARGS[@]}"
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # needed for TP/SP communication overlap
exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" \
  --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  "$REPO/pretrain_qwen35.py" "${ARGS[@]}"
