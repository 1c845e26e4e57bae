"""Context parallelism for the Gated DeltaNet layer: two CP ranks (megatron's load-balanced halves of the sequence)
give the single process's outputs, input gradients, and parameter gradients summed over CP (as DDP sums them)."""

import torch

from tests.parallel.harness import run_distributed
from tests.test_gated_delta_net import _gdn

SEQ, CP = 80, 2  # 80 tokens: the head-parallel kernel sees more than one 64-token chunk
TOL = 1e-5  # fp32; the all-to-alls move values, only the in_proj/out_proj sums are split


def _load_balanced(t: torch.Tensor, rank: int) -> torch.Tensor:
    """Megatron's CP split: 2 x CP chunks of the sequence, rank r holds chunks r and 2CP-1-r."""
    chunks = t.chunk(2 * CP, dim=0)
    return torch.cat([chunks[rank], chunks[2 * CP - 1 - rank]], dim=0)


def _inputs(hidden):
    g = torch.Generator().manual_seed(5)
    return torch.randn(SEQ, 2, hidden, generator=g), torch.randn(SEQ, 2, hidden, generator=g)


def _cp_rank(rank, world, state):
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(context_parallel=CP)
    cfg, layer = _gdn(context_parallel_size=CP)
    layer.load_state_dict(state)
    x, w = _inputs(cfg.hidden_size)
    mine = _load_balanced(x, rank).requires_grad_()
    y, _ = layer(mine, None)
    (y * _load_balanced(w, rank)).sum().backward()
    return y.detach(), mine.grad, {n: p.grad for n, p in layer.named_parameters()}


def test_context_parallel_gdn_equals_single_process(megatron_single_process):
    cfg, layer = _gdn()
    x, w = _inputs(cfg.hidden_size)
    x.requires_grad_()
    y, _ = layer(x, None)
    (y * w).sum().backward()
    state = {k: (v.clone() if v is not None else None) for k, v in layer.state_dict().items()}  # None: _extra_state
    results = run_distributed(_cp_rank, CP, state)
    for rank, (y_r, x_grad_r, _) in enumerate(results):
        assert (y_r - _load_balanced(y.detach(), rank)).abs().max().item() <= TOL
        assert (x_grad_r - _load_balanced(x.grad, rank)).abs().max().item() <= TOL
    for name, p in layer.named_parameters():
        summed = sum(r[2][name] for r in results)
        assert (summed - p.grad).abs().max().item() <= TOL * max(1.0, p.grad.abs().max().item()), name
