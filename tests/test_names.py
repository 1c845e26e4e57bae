"""One owner of a parameter's checkpoint name (convert/names.py): the same model gives the same names bare, wrapped in
megatron's Float16Module and DistributedDataParallel, and the key schema, the conversion and the table agree on them."""

import pytest
import torch

from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.convert.megatron_keys import MegatronLayout
from megatron_qwen35.convert.names import checkpoint_names, named_parameters_by_checkpoint_name
from megatron_qwen35.convert.table import HFLayout, rules_by_megatron_name
from megatron_qwen35.provider import qwen35_gpt_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")


@pytest.mark.parametrize("preset", ["tiny", "tiny-vl-moe"])
def test_wrapped_and_bare_models_have_the_same_checkpoint_names(preset):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    cfg = qwen35_preset(preset)
    config = qwen35_transformer_config(cfg, params_dtype=torch.float32, bf16=True)
    model = qwen35_gpt_model(cfg, config)
    bare = checkpoint_names(model)
    wrapped = DistributedDataParallel(config, DistributedDataParallelConfig(), Float16Module(config, model))
    names = checkpoint_names(wrapped)
    assert {k: v for k, v in names.items() if not k.startswith("module.module.")} == bare
    for path, _ in wrapped.named_parameters():  # the wrapper's own spelling of every parameter
        assert names[path] == bare[path.removeprefix("module.module.")]
    assert named_parameters_by_checkpoint_name(wrapped).keys() == named_parameters_by_checkpoint_name(model).keys()
    # local norms carry the fused (Transformer Engine) names checkpoints use
    assert "decoder.layers.0.self_attention.in_proj.layer_norm_weight" in bare.values()
    assert not any(".input_layernorm." in v for v in bare.values())


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-vl-moe"])
def test_every_checkpoint_name_has_one_rule_of_the_table(preset):
    cfg = qwen35_preset(preset)
    rules = rules_by_megatron_name(HFLayout.saved_by_transformers(cfg).rules(cfg))
    schema = set(MegatronLayout(cfg).entries)
    assert schema == set(rules)
    model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32))
    assert set(named_parameters_by_checkpoint_name(model)) == schema
