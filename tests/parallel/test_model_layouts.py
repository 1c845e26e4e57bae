"""Tensor/sequence and expert parallel runs of the hybrid model equal the single process (gloo, 2 ranks).

Each rank loads the same weights from a checkpoint saved by the single process, runs forward and backward on
the same batch, and reduces gradients the way megatron's finalize_model_grads and DDP would. The per-rank
gradient shards are then written as a checkpoint (megatron's resharding reassembles them) and compared with the
single-process gradients in the parent, tensor by tensor.
"""

import pytest
import torch

from megatron_qwen35.checkpoint import load_checkpoint, save_checkpoint
from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.convert.model_state import load_hf_state_dict, megatron_named_tensors
from megatron_qwen35.provider import qwen35_gpt_model
from tests.parallel.harness import run_distributed

REL_TOL = 5e-5  # fp32: parallel runs split and reorder sums; seen up to 1.1e-5 of the largest gradient
LAYOUTS = {
    "tp2_sp": dict(tensor_parallel=2, sequence_parallel=True),
    "ep2": dict(expert_parallel=2),
}


def _build(preset, *, tensor_parallel=1, expert_parallel=1, sequence_parallel=False):
    cfg = qwen35_preset(preset)
    tc = qwen35_transformer_config(cfg, params_dtype=torch.float32, tensor_model_parallel_size=tensor_parallel,
                                   expert_model_parallel_size=expert_parallel, sequence_parallel=sequence_parallel)
    return cfg, qwen35_gpt_model(cfg, tc, backend="local")


def _batch(cfg, batch=2, seq=24):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    return ids[:, :-1].contiguous(), pos, ids[:, 1:].contiguous()


def _loss(model, cfg):
    ids, pos, labels = _batch(cfg)
    per_token = model(ids, pos, None, labels=labels)  # [b, s]; MTP and MoE aux losses ride on the graph
    return per_token.float().mean()


def _reduce_like_megatron(model, tc):
    """What finalize_model_grads + DDP do for replicated parameters (both ranks saw the same batch)."""
    from megatron.core import parallel_state as ps

    tp, dp = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if tp.size() > 1 and getattr(p, "average_gradients_across_tp_domain", False):
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG, group=tp)  # shared by TP ranks
        elif tp.size() > 1 and ((tc.sequence_parallel and getattr(p, "sequence_parallel", False))
                                or "q_layernorm" in name or "k_layernorm" in name):
            torch.distributed.all_reduce(p.grad, group=tp)  # each TP rank saw part of the sequence / heads
        if getattr(p, "allreduce", True):
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG, group=dp)
        else:  # expert params: every EP rank routed the duplicated batch; DDP scales them by edp / dp
            p.grad.mul_(ps.get_expert_data_parallel_world_size() / dp.size())


def _rank(rank, world, preset, layout, weights_dir, grads_dir):
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(tensor_parallel=layout.get("tensor_parallel", 1),
                        expert_parallel=layout.get("expert_parallel", 1))
    cfg, model = _build(preset, **layout)
    load_checkpoint(model, weights_dir)
    loss = _loss(model, cfg)
    loss.backward()
    _reduce_like_megatron(model, model.config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    save_checkpoint(model, cfg, grads_dir)
    return loss.item()


@pytest.mark.parametrize("preset,layout", [("tiny", "tp2_sp"), ("tiny-moe", "tp2_sp"), ("tiny-moe", "ep2")])
def test_parallel_loss_and_gradients_equal_single_process(preset, layout, tmp_path, megatron_single_process):
    """Loss and every full gradient of TP2+SP / EP2 equal the single process (relative to the largest entry)."""
    from megatron_qwen35.hf_reference import reference_model

    cfg, single = _build(preset)
    load_hf_state_dict(single, cfg, reference_model(cfg.replace(mtp_num_layers=0)).state_dict(), include_mtp=False)
    save_checkpoint(single, cfg, tmp_path / "weights")
    loss = _loss(single, cfg)
    loss.backward()
    want = {n: t.grad.clone() for n, t in megatron_named_tensors(single).items()}

    losses = run_distributed(_rank, 2, preset, LAYOUTS[layout], str(tmp_path / "weights"), str(tmp_path / "grads"))
    for got in losses:
        assert abs(got - loss.item()) <= REL_TOL * abs(loss.item())
    _, gathered = _build(preset)
    load_checkpoint(gathered, tmp_path / "grads")
    got = megatron_named_tensors(gathered)
    assert set(got) == set(want)
    for name, w in want.items():
        err = (got[name] - w).abs().max().item()
        assert err <= REL_TOL * max(w.abs().max().item(), 1e-6), f"{name}: max abs {err}"


def _save_at_tp2(rank, world, preset, weights_dir, out_dir):
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(tensor_parallel=2)
    cfg, model = _build(preset, tensor_parallel=2)
    load_checkpoint(model, weights_dir)
    save_checkpoint(model, cfg, out_dir)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_checkpoint_saved_at_tp2_loads_at_tp1(preset, tmp_path, megatron_single_process):
    """Weights that went through a TP=2 save reload at TP=1 with identical logits."""
    from megatron_qwen35.inference import load_model

    cfg, single = _build(preset)
    with torch.no_grad():
        for p in single.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms and decays away from their init
    save_checkpoint(single, cfg, tmp_path / "tp1")
    run_distributed(_save_at_tp2, 2, preset, str(tmp_path / "tp1"), str(tmp_path / "tp2"))
    ids = _batch(cfg)[0]
    want = load_model(tmp_path / "tp1")(ids)
    got = load_model(tmp_path / "tp2")(ids)
    assert torch.equal(got, want)
