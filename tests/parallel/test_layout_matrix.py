"""The layout matrix (issue 5): every supported parallel layout of the tiny hybrid MoE + MTP model equals the
single process, in loss and in every full gradient.

How each layout runs is what training runs: megatron DDP (grad_reduce_in_fp32) around each model chunk,
`get_forward_backward_func()` (1F1B for PP, interleaved for VPP, no pipelining otherwise) over 4 micro-batches of
one sequence, pretrain_qwen35's own `forward_step` (its get_batch reads on TP rank 0, broadcasts over TP, and
splits over CP: rank r holds chunks r and 2CP-1-r of every sequence; its loss function returns loss sum and token
count), and `finalize_model_grads`. The data is split over the data-parallel ranks the way a sampler would (each DP
rank takes its contiguous share of the 4 micro-batches). The reference is the same code at world size 1.
tests/parallel/test_pretrain_layouts.py runs the whole of megatron.training at these layouts; this matrix compares
every gradient tensor, which the training log cannot show.

Weights reach every layout through the checkpoint the single process saved (save/load_checkpoint reshard), and
gradients come back the same way: each rank copies its reduced `main_grad` shards into the parameters and saves a
checkpoint that the parent loads at TP1/PP1/EP1 and compares tensor by tensor.

To fit two shared CPU cores, all 2-rank layouts run one after the other inside a single `run_distributed` call
(module fixture; each layout's error is reported by its own test), and the 4-rank layouts in one more.
"""

import os
import time
import traceback
from argparse import Namespace

import pytest
import torch

from megatron_qwen35.checkpoint import load_checkpoint, read_config, save_checkpoint
from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.convert.model_state import megatron_named_tensors
from megatron_qwen35.provider import qwen35_gpt_model
from megatron_qwen35.training.steps import forward_step
from tests.parallel.harness import run_distributed

PRESET = "tiny-moe"
# 4 GDN key heads (tiny-moe has 2): CP2 x TP2 gives each rank one whole key head, as the CP rule requires
MODEL_CHANGES = dict(linear_num_key_heads=4, linear_num_value_heads=8)
REL_TOL = 1e-5  # of the largest entry of each gradient tensor (fp32)
MICRO_BATCHES, SEQ = 4, 16
LR = 1e-3
# Adam's first step is lr * g / (|g| + eps): with the default eps (1e-8) an entry whose gradient is ~1e-8 turns fp32
# reordering noise (~1e-7 absolute, 1e-6 of the largest gradient) into a different update (measured 4.8e-3 * lr),
# and a sign-like step cannot see a wrongly scaled gradient. eps = 1e-2 keeps Adam scale-sensitive and smooth.
ADAM_EPS = 1e-2

# name -> parallel sizes (sp: sequence parallelism, which megatron requires for MoE training with TP > 1) and
# `run` options. Order matters: pp2 re-saves the weights, ep2 trains from (and re-saves) what pp2 wrote, tp2_sp
# and cp2 from what ep2 wrote, so their equal gradients also prove checkpoints cross layouts (PP2 -> EP2 -> TP2+SP,
# EP2 -> CP2 -> TP1).
LAYOUTS_2 = {
    "pp2": dict(pp=2, run=dict(save_weights="saved_by_pp2")),
    "ep2": dict(ep=2, run=dict(weights="saved_by_pp2", save_weights="saved_by_ep2")),
    "tp2_sp": dict(tp=2, sp=True, run=dict(weights="saved_by_ep2")),
    # megatron refuses MoE *training* at TP > 1 without SP ("...MoE and tensor parallelism are enabled without
    # also enabling sequence parallelism"): TP2 alone is checked in evaluation (loss only), from PP2's checkpoint
    "tp2": dict(tp=2, run=dict(forward_only=True, weights="saved_by_pp2")),
    "tp2_sp_etp2": dict(tp=2, sp=True, etp=2),  # EP1, experts split by expert-TP 2
    "tp2_sp_ep2": dict(tp=2, sp=True, ep=2, etp=1),  # experts spread over EP 2, dense part TP2+SP
    "pp2_vpp2": dict(pp=2, vpp=2),  # 2 stages x 2 virtual chunks of one layer (interleaved 1F1B)
    "dp2_distopt": dict(run=dict(optimizer_step=True, distributed_optimizer=True)),
    # each sequence in 4 chunks, rank r holds chunks r and 3 - r; trains from (and re-saves) EP2's files
    "cp2": dict(cp=2, run=dict(weights="saved_by_ep2", save_weights="saved_by_cp2")),
}
LAYOUTS_4 = {
    "tp2_pp2": dict(tp=2, sp=True, pp=2),
    "tp2_ep2": dict(tp=2, sp=True, ep=2, etp=2),
    "cp2_tp2": dict(cp=2, tp=2, sp=True),
    "cp2_pp2": dict(cp=2, pp=2),  # the MTP block on the last stage rolls its tokens across CP ranks
    "cp2_ep2": dict(cp=2, ep=2, etp=1),  # experts over EP 2 inside the DP2 x CP2 expert-data group
    "cp2_dp2": dict(cp=2),  # DDP averages over DP x CP
}


# ---------------------------------------------------------------------------------------------------------------
# one layout: build, load, forward/backward through megatron's schedule, reduce, save gradients
# ---------------------------------------------------------------------------------------------------------------

def _model_cfg():
    return qwen35_preset(PRESET).replace(**MODEL_CHANGES)


def _data():
    """The global batch: MICRO_BATCHES sequences, as (tokens, positions, labels) micro-batches of one."""
    cfg = _model_cfg()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (MICRO_BATCHES, SEQ + 1), generator=g)
    pos = torch.arange(SEQ).unsqueeze(0)
    return [(ids[i:i + 1, :-1].contiguous(), pos, ids[i:i + 1, 1:].contiguous()) for i in range(MICRO_BATCHES)]


def _micro_batches():
    """The global batch as the data loader yields it: MICRO_BATCHES dicts of one sequence."""
    return [dict(tokens=tokens, position_ids=positions, labels=labels,
                 loss_mask=torch.ones_like(labels, dtype=torch.float)) for tokens, positions, labels in _data()]


def _set_training_args(cfg, **data) -> None:
    """The megatron.training args forward_step / get_batch read (this process runs no megatron.training); `data`
    names the data kind (e.g. sft_data_path for packed chat sequences)."""
    from megatron.training import global_vars

    global_vars._GLOBAL_ARGS = Namespace(
        create_attention_mask_in_dataloader=False, micro_batch_size=1, seq_length=data.pop("seq_length", SEQ),
        mtp_num_layers=cfg.mtp_num_layers or None, padded_vocab_size=cfg.vocab_size, data_path=None,
        qwen35_preset=PRESET, hf_config=None, check_for_nan_in_loss_and_grad=True, check_for_spiky_loss=False,
        **data)


def _transformer_config(cfg, lay):
    return qwen35_transformer_config(
        cfg, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=lay.get("tp", 1), sequence_parallel=lay.get("sp", False),
        pipeline_model_parallel_size=lay.get("pp", 1), virtual_pipeline_model_parallel_size=lay.get("vpp"),
        expert_model_parallel_size=lay.get("ep", 1), expert_tensor_parallel_size=lay.get("etp"),
        context_parallel_size=lay.get("cp", 1), calculate_per_token_loss=True)  # as pretrain_qwen35.py trains


def _build_chunks(cfg, tc, lay):
    from megatron.core import parallel_state as ps

    vpp = lay.get("vpp")
    stages = range(vpp) if vpp else [None]
    return [qwen35_gpt_model(cfg, tc, backend="local", vp_stage=v,
                             pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
                             post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v))
            for v in stages]


def _run_layout(lay, weights_dir, out_dir, *, optimizer_step=False, distributed_optimizer=False, save_weights=None,
                forward_only=False, batches=None, data=None, lora=None):
    """Run `lay` on this rank; write reduced gradients (or, with optimizer_step, the updated parameters) as a
    checkpoint in out_dir. Returns the mean loss over this rank's micro-batches (None off the last stage).
    forward_only: evaluation mode, loss only, nothing written. batches / data: other micro-batches (e.g. packed chat
    sequences) and the args naming their kind (_set_training_args). lora: LoRASettings to adapt the model with (the
    weights then hold the adapters too; only they get gradients, the base's weights are saved unchanged)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(tensor_parallel=lay.get("tp", 1), pipeline_parallel=lay.get("pp", 1),
                        virtual_pipeline_parallel=lay.get("vpp"), expert_parallel=lay.get("ep", 1),
                        expert_tensor_parallel=lay.get("etp"), context_parallel=lay.get("cp", 1))
    cfg, _ = read_config(weights_dir)  # the model the weights are for (the matrix's, or a converted checkpoint's)
    tc = _transformer_config(cfg, lay)
    chunks = _build_chunks(cfg, tc, lay)
    if lora is not None:
        from megatron_qwen35.lora import apply_lora

        for chunk in chunks:
            apply_lora(chunk, cfg, lora)
    load_checkpoint(chunks if len(chunks) > 1 else chunks[0], weights_dir)
    if save_weights:  # the same weights, re-saved from this layout (for the cross-layout checks)
        save_checkpoint(chunks if len(chunks) > 1 else chunks[0], cfg, save_weights)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=distributed_optimizer)
    model = [DistributedDataParallel(tc, ddp_config, c, disable_bucketing=i > 0) for i, c in enumerate(chunks)]

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches = _micro_batches() if batches is None else batches
    per_rank = len(batches) // dp
    mine = batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    _set_training_args(cfg, **(data or {}))
    iterators = [iter(list(mine)) for _ in model]
    for m in model:
        m.zero_grad_buffer()
        m.train(not forward_only)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model, num_microbatches=per_rank, seq_length=mine[0]["tokens"].shape[-1], micro_batch_size=1,
        forward_only=forward_only)
    loss = None
    if losses:  # each micro-batch reports [loss sum, tokens]: this rank's mean over its tokens
        total = torch.stack([d["lm loss"] for d in losses]).sum(0)
        loss = (total[0] / total[1]).item()
    if forward_only:
        return loss
    finalize_model_grads(model)

    with torch.no_grad():
        if optimizer_step:
            optimizer = get_megatron_optimizer(OptimizerConfig(
                optimizer="adam", lr=LR, adam_eps=ADAM_EPS, clip_grad=1.0, bf16=False, fp16=False,
                use_distributed_optimizer=distributed_optimizer), model)
            ok, grad_norm, _ = optimizer.step()
            assert ok, "optimizer step skipped"
        else:
            for m in model:
                for p in m.module.parameters():
                    if p.requires_grad:  # (LoRA: the frozen base has no gradient)
                        p.copy_(p.main_grad)
    save_checkpoint(chunks if len(chunks) > 1 else chunks[0], cfg, out_dir)
    return loss


def _matrix_worker(rank, world, layouts, weights_dir, out_root, batches=None, data=None):
    """All `layouts` one after another in these processes; {name: (loss, seconds) or error text}."""
    out = {}
    for name, lay in layouts.items():
        start = time.monotonic()
        try:
            kwargs = dict(lay.get("run", {}), batches=batches, data=data)
            weights = os.path.join(out_root, kwargs.pop("weights")) if "weights" in kwargs else weights_dir
            if "save_weights" in kwargs:
                kwargs["save_weights"] = os.path.join(out_root, kwargs["save_weights"])
            loss = _run_layout(lay, weights, os.path.join(out_root, name), **kwargs)
            out[name] = (loss, time.monotonic() - start)
        except Exception:  # noqa: BLE001 - report per layout; the others still run
            out[name] = f"[rank {rank}] {traceback.format_exc()}"
            try:
                torch.distributed.barrier()  # the peer may be stuck in a collective of this layout
            except Exception:
                pass
    from megatron_qwen35.runtime import destroy_parallel
    destroy_parallel()
    return out


# ---------------------------------------------------------------------------------------------------------------
# the parent: reference, one run per world size, per-layout checks
# ---------------------------------------------------------------------------------------------------------------

def _single_model():
    cfg = _model_cfg()
    return cfg, qwen35_gpt_model(cfg, _transformer_config(cfg, {}), backend="local")


def _load_named(ckpt_dir):
    _, model = _single_model()
    load_checkpoint(model, ckpt_dir)
    return {k: v.detach().clone() for k, v in megatron_named_tensors(model).items()}


def _run_matrix(root, layouts, world, batches=None, data=None):
    weights = str(root / "weights")
    start = time.monotonic()
    per_rank = run_distributed(_matrix_worker, world, layouts, weights, str(root), batches, data, timeout=900)
    results = {name: [r[name] for r in per_rank] for name in layouts}
    print(f"{world} ranks: {time.monotonic() - start:.0f}s; per layout (rank 0): "
          + ", ".join(f"{n} {r[0][1]:.0f}s" for n, r in results.items() if not isinstance(r[0], str)))
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory, megatron_single_process):
    """Random (perturbed) weights saved by the single process, its loss, gradients and one Adam step."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    root = tmp_path_factory.mktemp("layout_matrix")
    torch.manual_seed(11)  # the same weights whatever ran before in this process (the tolerances assume them)
    model_parallel_cuda_manual_seed(11)
    cfg, model = _single_model()
    with torch.no_grad():
        for p in model.parameters():  # norms, decays and gates away from their init values
            p.add_(torch.randn_like(p) * 0.02)
    save_checkpoint(model, cfg, root / "weights")
    loss = _run_layout({}, str(root / "weights"), str(root / "ref_grads"))
    _run_layout({}, str(root / "weights"), str(root / "ref_step"), optimizer_step=True, distributed_optimizer=False)
    return dict(root=root, loss=loss, grads=_load_named(root / "ref_grads"))


@pytest.fixture(scope="module")
def matrix2(reference):
    return _run_matrix(reference["root"], LAYOUTS_2, 2)


@pytest.fixture(scope="module")
def matrix4(reference):
    return _run_matrix(reference["root"], LAYOUTS_4, 4)


def _losses(results, name):
    per_rank = results[name]
    errors = [r for r in per_rank if isinstance(r, str)]
    if errors:
        pytest.fail(f"layout {name} failed:\n{errors[0]}", pytrace=False)
    return [loss for loss, _ in per_rank]


def _check_loss(losses, lay, want, world):
    """Last-stage ranks report the mean loss of their data-parallel share; shares are equal in size."""
    pp = lay.get("pp", 1)
    got = [x for x in losses if x is not None]
    assert len(got) == world // pp
    mean = sum(got) / len(got)
    assert abs(mean - want) <= 1e-5 * abs(want), (got, want)


def _check_grads(ckpt_dir, want, load=_load_named):
    """Every gradient tensor equals the single process's: max abs error <= REL_TOL x the largest gradient entry
    of the model, and <= 1e-4 x the tensor's own scale, its largest entry but no less than 1% of the model's largest.
    That floor is fp32's: the GDN decays' gradients (dt_bias, A_log) sum every token of every sequence with heavy
    cancellation, so a deep layer's can be 1e-3 of the largest gradient while its terms carry ordinary reordering
    noise (measured 3.3e-4 of such a tensor's own largest entry under CP2 x EP2, 3e-9 absolute). A wrong term or
    scale in any tensor is still an error of order one. `load`: the checkpoint's named tensors to compare."""
    got = load(ckpt_dir)
    assert set(got) == set(want)
    largest = max(w.abs().max().item() for w in want.values())
    for name, w in want.items():
        err = (got[name] - w).abs().max().item()
        assert err <= REL_TOL * largest, f"{name}: max abs error {err:.3g} (largest gradient {largest:.3g})"
        scale = max(w.abs().max().item(), 1e-2 * largest)
        assert err <= 1e-4 * scale, f"{name}: max abs error {err:.3g} of {w.abs().max().item():.3g}"


@pytest.mark.parametrize("name", [n for n, lay in LAYOUTS_2.items() if not lay.get("run", {}).get("forward_only")
                                  and not lay.get("run", {}).get("optimizer_step")])
def test_two_rank_layout_equals_single_process(name, reference, matrix2):
    """Loss and every full gradient of TP2+SP, EP2, TP2+SP+ETP2, TP2+SP+EP2, PP2 (1F1B), PP2+VPP2 (interleaved),
    CP2."""
    lay = LAYOUTS_2[name]
    _check_loss(_losses(matrix2, name), lay, reference["loss"], 2)
    _check_grads(reference["root"] / name, reference["grads"])


def test_tp2_without_sequence_parallelism(reference, matrix2):
    """TP2 alone: evaluation loss equals the single process; training is megatron's refusal (MoE needs SP)."""
    _check_loss(_losses(matrix2, "tp2"), LAYOUTS_2["tp2"], reference["loss"], 2)


def test_dp2_distributed_optimizer_step_equals_single_process_adam(reference, matrix2):
    """DP2, megatron DDP + distributed optimizer, one Adam step on half the batch each == single-process Adam on the
    whole batch: every parameter within REL_TOL of its tensor's largest entry (measured: 1 fp32 ulp, 3e-8)."""
    _check_loss(_losses(matrix2, "dp2_distopt"), {}, reference["loss"], 2)
    _check_step(reference["root"], "dp2_distopt")


def _check_step(root, name):
    """The parameters layout `name` wrote after its Adam step equal the single process's (`ref_step`), each within
    REL_TOL of its tensor's largest entry, and the step moved them."""
    before, want, got = _load_named(root / "weights"), _load_named(root / "ref_step"), _load_named(root / name)
    moved = max((want[n] - before[n]).abs().max().item() for n in want)
    assert 0.5 * LR < moved <= 1.01 * LR  # the step really happened (Adam moves by at most ~lr)
    for n, w in want.items():
        err = (got[n] - w).abs().max().item()
        assert err <= REL_TOL * w.abs().max().item(), f"{n}: max abs error {err:.3g}"


def test_checkpoints_cross_layouts_with_equal_logits(reference, matrix2):
    """Weights re-saved at PP2, then at EP2 (from PP2's files), then at CP2 (from EP2's) load at TP1 with identical
    logits; TP2+SP trained from EP2's files and TP2 evaluated from PP2's above match the single process too."""
    from megatron_qwen35.inference import load_model

    _losses(matrix2, "pp2"), _losses(matrix2, "ep2"), _losses(matrix2, "cp2")
    root = reference["root"]
    ids = _data()[0][0].repeat(2, 1)
    want = load_model(root / "weights")(ids)
    for saved in ("saved_by_pp2", "saved_by_ep2", "saved_by_cp2"):
        assert torch.equal(load_model(root / saved)(ids), want), saved


@pytest.mark.parametrize("name", list(LAYOUTS_4))
def test_four_rank_layout_equals_single_process(name, reference, matrix4):
    """TP2 x PP2 (with SP), TP2 x EP2 (with SP and expert-TP 2), CP2 x TP2 (with SP), CP2 x PP2, CP2 x EP2 and
    CP2 x DP2 on 4 processes."""
    _check_loss(_losses(matrix4, name), LAYOUTS_4[name], reference["loss"], 4)
    _check_grads(reference["root"] / name, reference["grads"])
