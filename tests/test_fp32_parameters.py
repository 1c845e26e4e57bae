"""Qwen3.5's fp32 parameters under 16-bit training: the GDN's A_log and output-norm weight stay fp32 in the model
megatron wraps (Float16Module), in training through pretrain_qwen35.py --bf16, in its checkpoints and in the export
(released checkpoints store them fp32; serving engines assert an fp32 A_log)."""

import pytest
import torch
from megatron.core.transformer.module import Float16Module

from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.layers.gated_delta_net import FP32_PARAMETERS
from megatron_qwen35.provider import qwen35_gpt_model
from tests.pretrain_runs import pretrain

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def _is_fp32_parameter(name: str) -> bool:
    return any(name.endswith("self_attention." + p) for p in FP32_PARAMETERS)


def test_float16_module_keeps_a_log_and_the_output_norm_in_fp32():
    """megatron.training wraps the model in Float16Module (module.bfloat16()): these two keep every fp32 bit of the
    reference; everything else is bf16; a later device move still applies to them."""
    cfg = qwen35_preset("tiny-moe")
    ref = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if _is_fp32_parameter(name):
                p.add_(torch.randn_like(p) * 1e-3)  # values no bf16 can hold
    model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.bfloat16, bf16=True),
                             backend="local")
    model.load_state_dict(ref.state_dict(), strict=False)
    wrapped = Float16Module(model.config, model).to("cpu")
    reference = dict(ref.named_parameters())
    kept = 0
    for name, p in wrapped.module.named_parameters():
        if _is_fp32_parameter(name):
            assert p.dtype == torch.float32 and torch.equal(p, reference[name]), name
            kept += 1
        else:
            assert p.dtype == torch.bfloat16, name
    assert kept == 2 * sum(t == "linear_attention" for t in cfg.layer_types)


def _bf16_model_and_optimizer(distributed: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = qwen35_preset("tiny-moe")
    config = qwen35_transformer_config(cfg, params_dtype=torch.bfloat16, bf16=True)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed),
        Float16Module(config, qwen35_gpt_model(cfg, config, backend="local")))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True,
                                                       params_dtype=torch.bfloat16,
                                                       use_distributed_optimizer=distributed), [model])
    return model, optimizer


@pytest.mark.parametrize("distributed", [False, True], ids=["bf16_optimizer", "distributed_optimizer"])
def test_megatron_optimizers_checkpoint_a_bf16_model_with_fp32_parameters(distributed):
    """megatron 0.19.2's optimizers index their checkpoint state over a param order that fp32 params break (upstream
    fixes in runtime/upstream_fixes.py): every optimizer state entry must map to a model param of its own shape."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    model, optimizer = _bf16_model_and_optimizer(distributed)
    model_state = model.module.module.sharded_state_dict(prefix="")
    state = optimizer.sharded_state_dict(model_state, is_loading=True,  # with Adam state, as a resume asks
                                         metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    tensors = [t for t in nested_values(state) if isinstance(t, ShardedTensor)]
    assert tensors  # every one was checked against its model param's shape while the state was built
    if distributed:  # the index each checkpoint entry is written and read by
        inner = optimizer.chained_optimizers[0] if hasattr(optimizer, "chained_optimizers") else optimizer
        for param, (group, order) in inner.model_param_group_index_map.items():
            main = inner.optimizer.param_groups[group]["params"][order]
            assert main.numel() == param.numel() and main.dtype == torch.float32


def test_bf16_training_keeps_them_fp32_resumes_exactly_and_exports_them(tmp_path):
    """pretrain_qwen35.py --bf16 with the recipes' distributed optimizer: a stop and resume gives the uninterrupted
    losses; the saved A_log / GDN norm weights are fp32 (the rest bf16); the Hugging Face export writes them fp32 as
    the releases do."""
    from megatron_qwen35.checkpoint import iteration_dir, latest_iteration
    from megatron_qwen35.convert.safetensors_files import SafetensorsCheckpoint
    from megatron_qwen35.convert.torch_dist import TorchDistReader
    from tests.test_convert import assert_export_copies_equal_memory

    ckpt = tmp_path / "ckpt"
    flags = ("--bf16", "--use-distributed-optimizer", "--train-iters", "4")
    saving = ("--save", str(ckpt), "--save-interval", "2")
    straight = pretrain(tmp_path, *flags, run_name="straight")
    pretrain(tmp_path, *flags, *saving, "--exit-interval", "2", run_name="first")
    resumed = pretrain(tmp_path, *flags, *saving, "--load", str(ckpt), run_name="resumed")
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == straight.losses[step] and resumed.grad_norms[step] == straight.grad_norms[step]

    reader = TorchDistReader(iteration_dir(ckpt, latest_iteration(ckpt)))
    dtypes = {key: md.properties.dtype for key, md in reader.tensors.items() if key.startswith("decoder.layers.")}
    reader.close()
    fp32 = {k for k in dtypes if _is_fp32_parameter(k)}
    assert fp32 and all(dtypes[k] == torch.float32 for k in fp32)
    assert all(dtypes[k] == torch.bfloat16 for k in dtypes if k not in fp32 and "_extra_state" not in k)

    assert assert_export_copies_equal_memory(ckpt, tmp_path) > 0  # records of megatron's save, copied
    hf = SafetensorsCheckpoint(tmp_path / "exported")
    for name in hf:
        want = torch.float32 if name.endswith(("linear_attn.A_log", "linear_attn.norm.weight")) else torch.bfloat16
        assert hf.entries[name].dtype == want, name
