"""Packed (THD) sequences, alone and with context parallelism, for the whole hybrid MoE + MTP model.

Three documents of 68, 20 and 12 tokens are packed into one 100-token row: 68 is not a multiple of the GDN's
64-token chunk, and under CP2 every document is cut into 4 chunks spread over both ranks (rank r holds chunks r and
3 - r of each), so every document boundary and every chunk boundary crosses ranks.
- Single process: the packed row's logits equal each document run on its own (GDN state, attention, rope positions
  and the MTP shift all restart at each boundary).
- CP2: loss and every gradient of the packed row, through megatron's schedule, DDP and finalize_model_grads, equal
  the single process's; and changing the first document's tokens leaves every logit of the two after it, on both
  ranks, equal to the bit (the GDN state and conv, attention and rope restart at a boundary that crosses ranks).
"""

from functools import partial

import torch

from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from tests.parallel.harness import run_distributed

DOC_LENGTHS = (68, 20, 12)
PRESET = "tiny-moe"
TOL = 1e-5  # fp32, relative to the largest entry (loss) / the largest gradient entry of the model


def _documents():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, qwen35_preset(PRESET).vocab_size, (n + 1,), generator=g) for n in DOC_LENGTHS]


def _packed_batch():
    """One packed row: tokens, labels (next token within the document), positions restarting per document."""
    docs = _documents()
    cu = torch.tensor([0, *torch.tensor(DOC_LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return dict(tokens=torch.cat([d[:-1] for d in docs]).unsqueeze(0),
                labels=torch.cat([d[1:] for d in docs]).unsqueeze(0),
                position_ids=torch.cat([torch.arange(n) for n in DOC_LENGTHS]).unsqueeze(0),
                loss_mask=torch.ones(1, sum(DOC_LENGTHS)), cu_seqlens=cu)


def _packed_seq_params(cu):
    from megatron_qwen35.training.steps import thd_packed_seq_params

    return thd_packed_seq_params(cu)  # what training hands the model


def _model(cp=1):
    from megatron_qwen35.provider import qwen35_gpt_model

    cfg = qwen35_preset(PRESET)
    tc = qwen35_transformer_config(cfg, params_dtype=torch.float32, context_parallel_size=cp,
                                   calculate_per_token_loss=True)  # as pretrain_qwen35.py trains
    return tc, qwen35_gpt_model(cfg, tc, backend="local")


def _forward_step(data_iterator, model):
    from megatron.core import parallel_state as ps

    from megatron_qwen35.layers.context_parallel import batch_on_this_cp_rank
    from megatron_qwen35.training.steps import loss_func

    full = next(data_iterator)
    batch = batch_on_this_cp_rank(full, ps.get_context_parallel_group())
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["loss_mask"],
                packed_seq_params=_packed_seq_params(full["cu_seqlens"]))
    return out, partial(loss_func, batch["loss_mask"])


def _train_step(rank, world, state):
    """Loss (this rank's sum and count) and every reduced gradient of one packed micro-batch at CP = world."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(context_parallel=world)
    tc, model = _model(cp=world)
    model.load_state_dict(state)
    ddp = DistributedDataParallel(tc, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    ddp.zero_grad_buffer()
    losses = get_forward_backward_func()(forward_step_func=_forward_step, data_iterator=iter([_packed_batch()]),
                                         model=[ddp], num_microbatches=1, seq_length=sum(DOC_LENGTHS),
                                         micro_batch_size=1, forward_only=False)
    finalize_model_grads([ddp])
    return losses[0]["lm loss"], {n: p.main_grad.clone() for n, p in model.named_parameters()}


def _state(model):
    torch.manual_seed(17)
    with torch.no_grad():
        for p in model.parameters():  # norms, decays and gates away from their init values
            p.add_(torch.randn_like(p) * 0.02)
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in model.state_dict().items()}


def test_packed_row_equals_documents_run_alone(megatron_single_process):
    _, model = _model()
    model.load_state_dict(_state(model))
    model.eval()
    batch = _packed_batch()
    with torch.no_grad():
        packed = model(batch["tokens"], batch["position_ids"], None,
                       packed_seq_params=_packed_seq_params(batch["cu_seqlens"]))[0]
        alone = torch.cat([model(d[:-1].unsqueeze(0), torch.arange(len(d) - 1).unsqueeze(0), None)[0]
                           for d in _documents()])
    assert packed.shape == alone.shape
    assert (packed - alone).abs().max().item() <= TOL * alone.abs().max().item()


def test_packed_context_parallel_equals_single_process(megatron_single_process):
    _, model = _model()
    state = _state(model)
    want_loss, want = _train_step(0, 1, state)
    got = run_distributed(_train_step, 2, state)
    sums = torch.stack([loss for loss, _ in got]).sum(0)
    assert int(sums[1]) == int(want_loss[1]) == sum(DOC_LENGTHS)  # the two ranks share every token once
    assert abs(sums[0] - want_loss[0]) <= TOL * abs(want_loss[0])
    largest = max(g.abs().max().item() for g in want.values())
    for name, g in want.items():
        for rank, (_, grads) in enumerate(got):  # DDP leaves the reduced gradient on every CP rank
            err = (grads[name] - g).abs().max().item()
            assert err <= TOL * largest, f"rank {rank} {name}: max abs error {err:.3g} (largest {largest:.3g})"


def _logits_before_and_after_changing_the_first_document(rank, world, state):
    """(the natural positions this CP rank holds, its logits, its logits with the first document's tokens changed)."""
    from megatron.core import parallel_state as ps

    from megatron_qwen35.layers.context_parallel import batch_on_this_cp_rank, cp_rank_positions
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(context_parallel=world)
    _, model = _model(cp=world)
    model.load_state_dict(state)
    model.eval()
    full = _packed_batch()
    changed = dict(full, tokens=full["tokens"].clone())
    first = slice(0, DOC_LENGTHS[0])
    changed["tokens"][0, first] = (changed["tokens"][0, first] + 1) % qwen35_preset(PRESET).vocab_size
    logits = []
    for batch in (full, changed):
        mine = batch_on_this_cp_rank(batch, ps.get_context_parallel_group())
        with torch.no_grad():
            logits.append(model(mine["tokens"], mine["position_ids"], None,
                                packed_seq_params=_packed_seq_params(batch["cu_seqlens"])))
    return cp_rank_positions(sum(DOC_LENGTHS), ps.get_context_parallel_group(), full["cu_seqlens"]), *logits


def test_changing_one_document_leaves_the_next_ones_logits_equal_to_the_bit_under_cp2(megatron_single_process):
    _, model = _model()
    state = _state(model)
    for rank, (positions, before, after) in enumerate(run_distributed(
            _logits_before_and_after_changing_the_first_document, 2, state)):
        first = positions < DOC_LENGTHS[0]
        assert first.any() and (~first).any(), positions  # each rank holds parts of the first and the later ones
        assert not torch.equal(before[:, first], after[:, first]), rank
        assert torch.equal(before[:, ~first], after[:, ~first]), rank
