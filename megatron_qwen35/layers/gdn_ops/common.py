"""What the PyTorch paths of the gated delta rule share: input preparation and checks (float32, l2norm, scale),
document lengths, grouped value heads, initial states, the conv's activation."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64


def _l2norm(x: torch.Tensor, scale: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """scale * l2norm(x), with transformers' / FLA's formula x * rsqrt(sum(x * x) + eps).

    The scale multiplies the small [..., 1] factor, saving a full pass over x.
    """
    return x * (torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1) + eps) * scale)


def _doc_lengths(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> list[int]:
    """Validate cu_seqlens against a [1, t, ...] input and return the document lengths."""
    if batch != 1:
        raise ValueError(f"cu_seqlens requires batch size 1, got {batch}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != seq_len or any(a > b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must rise from 0 to t={seq_len}, got {bounds}")
    return [b - a for a, b in itertools.pairwise(bounds)]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (lets tests run an exact-arithmetic gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _value_heads_per_key_head(q: torch.Tensor, v: torch.Tensor) -> int:
    """h // hk for q [b, t, hk, dk] and v [b, t, h, dv]; hk must divide h."""
    hk, h = q.shape[2], v.shape[2]
    if h % hk:
        raise ValueError(f"the value heads ({h}) must be a multiple of the key heads ({hk})")
    return h // hk


def _prepare_inputs(q, k, v, g, beta, scale, use_qk_l2norm):
    """Cast up to float32, optionally l2-normalise q/k, and fold the scale into q (at hk heads)."""
    dtype = _compute_dtype(v)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if use_qk_l2norm:
        return _l2norm(q, scale), _l2norm(k), v, g, beta
    return q * scale, k, v, g, beta


def _initial_state_rows(initial_state, n: int, h: int, dk: int, dv: int, like: torch.Tensor):
    """The initial state [n, h, dk, dv] in the compute dtype of `like`, zeros when not given."""
    if initial_state is None:
        return like.new_zeros(n, h, dk, dv)
    if initial_state.shape != (n, h, dk, dv):
        raise ValueError(f"initial_state must be {(n, h, dk, dv)}, got {tuple(initial_state.shape)}")
    return initial_state.to(like.dtype)


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"unsupported activation {activation!r}")
