"""Reshaping rules between Hugging Face and Megatron tensors, each a named pair of functions kept side by side.

Every transform maps a list of Hugging Face tensors to a list of Megatron tensors and back; `to_hf(to_megatron(x))
== x` bit for bit (the round-trip tests in tests/test_convert.py). Sizes come from the model config, never from
guesses. Most transforms only move bytes; one does arithmetic, and carries its own dtype policy (`work_dtype`).
Shape legend: H hidden, ng query groups, nq query heads, d head dim, E experts, I expert width, nv vision heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_qwen35.config import Qwen35Config

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Transform:
    name: str
    to_megatron: Callable[[Tensors, Qwen35Config], Tensors]
    to_hf: Callable[[Tensors, Qwen35Config], Tensors]
    arithmetic: bool = False  # computes new values (rather than moving bytes)

    def work_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype to run this transform in for data of `dtype`: arithmetic on 16-bit data runs in fp32, because
        (w - 1) in bf16 drops the low bits of w and w would come back different."""
        if self.arithmetic and dtype in (torch.bfloat16, torch.float16):
            return torch.float32
        return dtype

    def moved_vectors(self, direction: str, shapes: Sequence[Sequence[int]], cfg: Qwen35Config
                      ) -> list[tuple[tuple[int, ...], list[tuple[int, int, int]]]] | None:
        """Where each output's bytes come from, when this transform ("to_megatron" or "to_hf", on inputs of
        `shapes`) only moves whole vectors along the last dimension (rows of a matrix, an expert's rows, a 1-D
        tensor as one vector): for each output its shape and its runs (input, first vector, count), in order.
        None when it does not (arithmetic, or a move that splits vectors).

        Found by running the transform itself on labels (no second description to keep in step): each input
        vector becomes the pair (2v, 2v + 1) of its global index v; an output whose shape is the real one's with a
        last dimension of 2, and whose every pair is still (2v, 2v + 1), moved whole vectors, in that order."""
        if self.arithmetic or not shapes or any(len(s) == 0 for s in shapes) or len({s[-1] for s in shapes}) != 1:
            return None
        fn = self.to_megatron if direction == "to_megatron" else self.to_hf
        counts = [math.prod(s[:-1]) for s in shapes]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        try:
            real = fn([torch.empty(tuple(s), device="meta") for s in shapes], cfg)
            labels = [(2 * torch.arange(b, b + c)).view(*s[:-1], 1) + torch.tensor([0, 1])
                      for b, c, s in zip(starts, counts, shapes, strict=True)]
            moved = fn(labels, cfg)
        except (RuntimeError, ValueError, IndexError, TypeError):  # a move the labels do not allow: not whole vectors
            return None
        out = []
        for r, m in zip(real, moved, strict=True):
            if r.shape[-1:] != tuple(shapes[0][-1:]) or m.shape != r.shape[:-1] + (2,):
                return None
            pairs = m.reshape(-1, 2)
            if not torch.equal(pairs[:, 1], pairs[:, 0] + 1) or bool((pairs[:, 0] % 2).any()):
                return None
            index = pairs[:, 0] // 2
            source = torch.bucketize(index, torch.tensor(starts), right=True) - 1  # the input of each vector
            breaks = (torch.nonzero((index[1:] != index[:-1] + 1) | (source[1:] != source[:-1])).flatten() + 1)
            runs = []
            for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), len(index)], strict=True):
                i = int(source[lo])
                runs.append((i, int(index[lo]) - starts[i], hi - lo))
            out.append((tuple(r.shape), runs))
        return out


IDENTITY = Transform("identity", lambda t, cfg: list(t), lambda t, cfg: list(t))


# Megatron applies (1 + w) in its norms (layernorm_zero_centered_gamma) to all of them, while HF's gated GDN norm
# stores the plain scale w + 1 (initialised at one).
def _minus_one(t: Tensors, cfg) -> Tensors:
    return [t[0] - 1]


def _plus_one(t: Tensors, cfg) -> Tensors:
    return [t[0] + 1]


PLUS_ONE = Transform("plus_one", to_megatron=_minus_one, to_hf=_plus_one, arithmetic=True)


def _concat(t: Tensors, cfg) -> Tensors:
    return [torch.cat(t, dim=0)]


def _gdn_in_proj_sizes(cfg: Qwen35Config) -> list[int]:
    qk = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    v = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    return [2 * qk + v, v, cfg.linear_num_value_heads, cfg.linear_num_value_heads]  # qkv | z | b | a


def _split_gdn_in_proj(t: Tensors, cfg) -> Tensors:
    return list(torch.split(t[0], _gdn_in_proj_sizes(cfg), dim=0))


# HF in_proj_qkv, in_proj_z, in_proj_b, in_proj_a <-> Megatron's fused in_proj rows [q k v | z | b | a].
# The checkpoint is TP-agnostic: megatron's sharded_state_dict stores each section under its own name.
GDN_IN_PROJ = Transform("gdn_in_proj", to_megatron=_concat, to_hf=_split_gdn_in_proj)


def _split_halves(t: Tensors, cfg) -> Tensors:
    return list(torch.chunk(t[0], 2, dim=0))


# HF gate_proj, up_proj <-> Megatron linear_fc1 rows [gate | up] (SwiGLU: silu(gate) * up).
GATE_UP = Transform("gate_up", to_megatron=_concat, to_hf=_split_halves)


def _gated_qkv_to_megatron(t: Tensors, cfg: Qwen35Config) -> Tensors:
    q_proj, k_proj, v_proj = t
    ng, nq, d = cfg.num_query_groups, cfg.num_attention_heads, cfg.head_dim
    hidden = q_proj.shape[-1]
    q = q_proj.view(ng, nq // ng, 2, d, hidden)  # each HF head is [query | gate]
    query = q[:, :, 0].reshape(ng, -1, hidden)  # [ng, nq/ng * d, H]
    gate = q[:, :, 1].reshape(ng, -1, hidden)
    k, v = k_proj.view(ng, d, hidden), v_proj.view(ng, d, hidden)
    return [torch.cat([query, gate, k, v], dim=1).reshape(-1, hidden)]  # per group [q | gate | k | v]


def _gated_qkv_to_hf(t: Tensors, cfg: Qwen35Config) -> Tensors:
    ng, nq, d = cfg.num_query_groups, cfg.num_attention_heads, cfg.head_dim
    hidden = t[0].shape[-1]
    per_group = t[0].view(ng, -1, hidden)
    query, gate, k, v = torch.split(per_group, [nq // ng * d, nq // ng * d, d, d], dim=1)
    q_proj = torch.stack([query.reshape(ng, nq // ng, d, hidden), gate.reshape(ng, nq // ng, d, hidden)], dim=2)
    return [q_proj.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)]


# HF q_proj (per head [query | gate]), k_proj, v_proj <-> Megatron linear_qkv grouped per query group.
GATED_QKV = Transform("gated_qkv", to_megatron=_gated_qkv_to_megatron, to_hf=_gated_qkv_to_hf)


def _unstack(t: Tensors, cfg) -> Tensors:
    return list(torch.unbind(t[0], dim=0))


def _stack(t: Tensors, cfg) -> Tensors:
    return [torch.stack(t, dim=0)]


# HF packed experts [E, ...] <-> one Megatron tensor per expert. gate_up_proj[e] is already [gate | up].
PACKED_EXPERTS = Transform("packed_experts", to_megatron=_unstack, to_hf=_stack)


def _interleave_per_expert_gate_up(t: Tensors, cfg: Qwen35Config) -> Tensors:
    e = cfg.num_experts  # inputs: E gate_proj then E up_proj
    return [torch.cat([t[i], t[e + i]], dim=0) for i in range(e)]


def _split_per_expert_gate_up(t: Tensors, cfg: Qwen35Config) -> Tensors:
    halves = [torch.chunk(w, 2, dim=0) for w in t]
    return [g for g, _ in halves] + [u for _, u in halves]


# HF per-expert experts.{e}.gate_proj / up_proj <-> Megatron's per-expert linear_fc1 [gate | up].
PER_EXPERT_GATE_UP = Transform("per_expert_gate_up", to_megatron=_interleave_per_expert_gate_up,
                               to_hf=_split_per_expert_gate_up)


def _vision_qkv_to_megatron(t: Tensors, cfg: Qwen35Config) -> Tensors:
    # [3 * nv * d, ...] -> (q|k|v, nv, d, ...) -> per head (nv, q|k|v, d, ...); the trailing dims are H or none
    return [t[0].unflatten(0, (3, cfg.vision.num_heads, -1)).transpose(0, 1).flatten(0, 2)]


def _vision_qkv_to_hf(t: Tensors, cfg: Qwen35Config) -> Tensors:
    return [t[0].unflatten(0, (cfg.vision.num_heads, 3, -1)).transpose(0, 1).flatten(0, 2)]


# HF's vision attn.qkv rows (weight and bias) [q | k | v], each all heads <-> Megatron's linear_qkv rows grouped per
# head [q_i k_i v_i] (megatron splits each query group's rows into q, k, v; here every head is its own group).
VISION_QKV = Transform("vision_qkv", to_megatron=_vision_qkv_to_megatron, to_hf=_vision_qkv_to_hf)
