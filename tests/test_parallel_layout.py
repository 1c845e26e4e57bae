"""check_parallel_layout: each divisibility rule names the field, its value and the parallel size; qwen35_gpt_model
refuses a layout that does not fit before building anything."""

import pytest
import torch

from megatron_qwen35.config import PRESETS, qwen35_preset, qwen35_transformer_config
from megatron_qwen35.parallel_layout import check_parallel_layout, check_transformer_config_layout


@pytest.mark.parametrize("preset,layout", [
    ("tiny-moe", dict(tensor_parallel=2, expert_parallel=2, expert_tensor_parallel=2, pipeline_parallel=2,
                      virtual_pipeline_parallel=2, batch_p2p_comm=False)),
    ("tiny", dict(tensor_parallel=2, pipeline_parallel=4)),
    ("397b-a17b", dict(tensor_parallel=4, expert_parallel=16, expert_tensor_parallel=1, pipeline_parallel=4)),
    ("27b", dict(tensor_parallel=8, pipeline_parallel=4, virtual_pipeline_parallel=2)),  # 4 query groups, TP 8
    ("9b", dict(tensor_parallel=4, pipeline_parallel=2)),
    ("tiny-moe", dict(context_parallel=2, seq_length=16)),
    ("27b", dict(tensor_parallel=4, context_parallel=4, seq_length=262144)),  # 16 key heads: 4 per TP rank
])
def test_layouts_that_fit(preset, layout):
    check_parallel_layout(PRESETS[preset], **layout)


@pytest.mark.parametrize("preset,layout,message", [
    ("tiny-moe", dict(tensor_parallel=4), "linear_num_key_heads=2 is not divisible by tensor_parallel=4"),
    ("tiny-moe", dict(tensor_parallel=3), "linear_num_value_heads=4 is not divisible by tensor_parallel=3"),
    ("tiny-moe", dict(tensor_parallel=3), "num_attention_heads=4 is not divisible by tensor_parallel=3"),
    ("27b", dict(tensor_parallel=3), "num_query_groups=4 neither divides nor is divisible by tensor_parallel=3"),
    ("tiny-moe", dict(tensor_parallel=3), "vocab_size=512 is not divisible by tensor_parallel=3"),
    ("tiny-moe", dict(expert_parallel=3), "num_experts=4 is not divisible by expert_parallel=3"),
    ("tiny-moe", dict(expert_tensor_parallel=3), "moe_ffn_hidden_size=32 is not divisible by expert_tensor_parallel=3"),
    ("35b-a3b", dict(tensor_parallel=2, expert_tensor_parallel=1, pipeline_parallel=3),
     "num_layers=40 is not divisible by pipeline_parallel x virtual_pipeline_parallel=3 x 1"),
    ("tiny-moe", dict(pipeline_parallel=2, virtual_pipeline_parallel=4),
     "num_layers=4 is not divisible by pipeline_parallel x virtual_pipeline_parallel=2 x 4"),
    ("tiny-moe", dict(virtual_pipeline_parallel=2), "virtual_pipeline_parallel=2 needs pipeline_parallel > 1"),
    ("tiny-moe", dict(pipeline_parallel=2, virtual_pipeline_parallel=2, batch_p2p_comm=True),
     "needs batch_p2p_comm=False"),
    ("tiny", dict(expert_parallel=2), "needs a mixture-of-experts model"),
    ("tiny-moe", dict(tensor_parallel=2, context_parallel=2),
     "linear_num_key_heads=2 split over tensor_parallel=2 leaves 1 per rank, not divisible by context_parallel=2"),
    ("tiny", dict(context_parallel=2, seq_length=102),
     "seq_length=102 is not divisible by 2 x context_parallel=4"),
    ("tiny", dict(tensor_parallel=0), "tensor_parallel must be a positive integer"),
])
def test_layouts_that_do_not_fit_name_the_field(preset, layout, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_parallel_layout(PRESETS[preset], **layout)


def test_every_broken_rule_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        check_parallel_layout(qwen35_preset("tiny-moe"), pipeline_parallel=3, expert_tensor_parallel=3)
    assert "num_layers=4" in str(info.value) and "moe_ffn_hidden_size=32" in str(info.value)


def test_transformer_config_sizes_are_read():
    cfg = qwen35_preset("tiny-moe")
    tc = qwen35_transformer_config(cfg, params_dtype=torch.float32, pipeline_model_parallel_size=2,
                                   virtual_pipeline_model_parallel_size=2)
    assert tc.batch_p2p_comm is False and tc.overlap_p2p_comm is True  # the PP2 + VPP default that works
    check_transformer_config_layout(cfg, tc)
    bad = qwen35_transformer_config(cfg, params_dtype=torch.float32, pipeline_model_parallel_size=2,
                                    virtual_pipeline_model_parallel_size=2, batch_p2p_comm=True,
                                    overlap_p2p_comm=False)
    with pytest.raises(ValueError, match="batch_p2p_comm=False"):
        check_transformer_config_layout(cfg, bad)
    uneven = qwen35_transformer_config(cfg.replace(num_layers=5), params_dtype=torch.float32,
                                       pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=2,
                                       num_layers_in_last_pipeline_stage=3)
    check_transformer_config_layout(cfg.replace(num_layers=5), uneven)  # megatron's own split: its rules


def test_model_builder_refuses_a_layout_that_does_not_fit(megatron_single_process):
    from megatron_qwen35.provider import qwen35_gpt_model

    cfg = qwen35_preset("tiny-moe")
    tc = qwen35_transformer_config(cfg, params_dtype=torch.float32, pipeline_model_parallel_size=3)
    with pytest.raises(ValueError, match=r"num_layers=4 is not divisible by pipeline_parallel"):
        qwen35_gpt_model(cfg, tc, backend="local")
