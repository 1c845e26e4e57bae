"""A checkpoint written on CPU (local backend) and one the Transformer Engine model writes hold the same keys: the TE
model finds everything it asks for on load, and the local model finds everything it asks for in a TE checkpoint.

TE is not installed here, so the TE model is never built. Its keys are derived from its spec, which is data: walk
`qwen35_block_spec` / `qwen35_mtp_block_spec` built with backend "te" beside the local model, which has the same
module tree except where the TE spec puts a TE module (or nothing: an input norm fused into the next linear). There
the TE model's keys are the TE class's own state names under the slot's checkpoint prefix; everywhere else both
backends use the same megatron-core modules and ask for the same keys.
Not covered: grouped-GEMM experts (`--moe-grouped-gemm`, TEGroupedMLP); without TE the spec provider falls back to
SequentialMLP, so these presets (which leave it off) are the only expert layout derived here.
"""

import dataclasses
import functools

import pytest
import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.extensions import transformer_engine, transformer_engine_spec_provider
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_qwen35.checkpoint import iteration_dir, latest_iteration, save_checkpoint
from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron
from megatron_qwen35.convert.torch_dist import TorchDistReader
from megatron_qwen35.provider import qwen35_gpt_model
from megatron_qwen35.specs.layer_specs import qwen35_block_spec, qwen35_mtp_block_spec
from megatron_qwen35.specs.vision_specs import qwen35_vision_layer_spec, vision_backend_provider
from tests.test_convert import make_hf_checkpoint

pytestmark = pytest.mark.usefixtures("megatron_single_process")

TE_MODULES = "megatron.core.extensions.transformer_engine"  # the wrappers and the spec provider's adapters

def te_saves(cls: str, config) -> tuple[str, ...]:
    """What each TE module puts into megatron's sharded state dict (megatron-core 0.19.2
    core/extensions/transformer_engine.py; names are TE's parameters) under `config`: the text model's has no
    linear biases and RMSNorm, the vision tower's biases and LayerNorm (TE's LayerNorm has a bias, its LayerNormLinear
    a layer_norm_bias)."""
    bias = ("bias",) if config.add_bias_linear else ()
    norm_bias = config.normalization == "LayerNorm"
    return {
        # te.pytorch.RMSNorm / LayerNorm are TE ops, whose class overrides get_extra_state (TE pytorch/ops/op.py)
        "TENorm": ("weight", *(("bias",) if norm_bias else ()), "_extra_state"),
        "TELayerNormColumnParallelLinear": ("layer_norm_weight", *(("layer_norm_bias",) if norm_bias else ()),
                                            "weight", *bias, "_extra_state"),
        "TEColumnParallelLinear": ("weight", *bias, "_extra_state"),
        "TERowParallelLinear": ("weight", *bias, "_extra_state"),
        "TEDotProductAttention": (),  # its sharded_state_dict keeps only a learnable softmax's offset, no extra state
        "IdentityOp": (),  # TE builds nothing here: e.g. an input norm, fused into the next linear
    }[cls]


RENAMED = {"layer_norm": "final_layernorm"}  # submodule field -> module attribute (TransformerBlock, MTP layer)


@pytest.fixture
def te_spec_as_on_gpus(monkeypatch):
    """TESpecProvider asks TE's version (q/k norms are TENorm from TE 1.9 on); every GPU image we support has a
    newer TE, and without TE the version check says False."""
    monkeypatch.setattr(transformer_engine_spec_provider, "is_te_min_version", lambda *a, **k: True)


def _builder(spec):
    """(the class or function that builds the module, its submodules) for each form a spec slot takes."""
    if isinstance(spec, functools.partial):
        func = spec.func
        return getattr(func, "__self__", func), spec.keywords.get("submodules")  # MLP.as_mlp_submodule -> MLP
    if isinstance(spec, ModuleSpec):
        return spec.module, spec.submodules
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):  # a block's submodules
        return None, spec
    return spec, None  # a class, a function (bias-dropout-add) or None


def _te_name(builder) -> str | None:
    """The name of a TE module class, else None. Without TE most of megatron's TE classes are mocks (their TE
    base class is one), so they are found by identity in megatron's TE module."""
    if isinstance(builder, type):  # a real class: TE's only if defined there (that module imports others)
        return builder.__name__ if builder.__module__.startswith(TE_MODULES) else None
    return next((n for n, o in vars(transformer_engine).items() if o is builder and o is not None), None)


def _te_slots(spec, module, path):
    """(path, TE class name or "IdentityOp") of every slot under `spec` that the TE model fills with a TE module
    or with nothing. `module` is what the local model built in the same place; elsewhere it must be the spec's class."""
    builder, submodules = _builder(spec)
    if _te_name(builder) is not None:
        yield path, _te_name(builder)
        return
    if isinstance(builder, type) and issubclass(builder, IdentityOp):  # and IdentityFuncOp
        yield path, "IdentityOp"
        return
    if isinstance(builder, type):
        assert isinstance(module, builder), f"{path}: the local model has {type(module).__name__}, TE {builder}"
    if submodules is None:
        return
    if isinstance(module, SequentialMLP):  # every local expert is an MLP built from the same submodules
        for i, expert in enumerate(module.local_experts):
            yield from _te_field_slots(submodules, expert, f"{path}.local_experts.{i}")
    else:
        yield from _te_field_slots(submodules, module, path)


def _te_field_slots(submodules, module, path):
    for field in dataclasses.fields(submodules):
        spec = getattr(submodules, field.name)
        if field.name == "layer_specs":
            assert len(spec) == len(module.layers), path
            for i, (layer_spec, layer) in enumerate(zip(spec, module.layers, strict=True)):
                yield from _te_slots(layer_spec, layer, f"{path}.layers.{i}")
            continue
        name = RENAMED.get(field.name, field.name)
        child = getattr(module, name, None)
        if isinstance(child, torch.nn.Module):
            yield from _te_slots(spec, child, f"{path}.{name}")
        elif _te_name(_builder(spec)[0]) is not None:
            # Not a module here, and a TE one there: only TE's activation op, which MLP builds only on request.
            assert field.name == "activation_func" and not module.config.use_te_activation_func, f"{path}.{name}"


def _checkpoint_keys(entry) -> set[str]:
    """The keys under which a sharded-state-dict entry is stored (sharded objects by their unique key)."""
    if isinstance(entry, ShardedObject):
        return {entry.unique_key}
    if isinstance(entry, ShardedTensorFactory):
        return {sh.key for sh in nested_values(entry.build())}
    return {entry.key}


def _first_tensor(entry) -> ShardedTensor:
    return next(iter(nested_values(entry.build()))) if isinstance(entry, ShardedTensorFactory) else entry


def _tower_te_slots(model):
    """The vision tower's TE slots: its blocks by their spec, the merger's modules by the provider that builds them."""
    tower = model.vision_model
    block = TransformerBlockSubmodules(layer_specs=[qwen35_vision_layer_spec(backend="te")] * len(tower.decoder.layers))
    yield from _te_slots(block, tower.decoder, "vision_model.decoder")
    te = vision_backend_provider("te")
    for name, builder in (("patch_norm", te.layer_norm(rms_norm=False, for_qk=False)),
                          ("linear_fc1", te.column_parallel_linear()), ("linear_fc2", te.row_parallel_linear())):
        assert _te_name(builder) is not None, name
        yield f"vision_model.merger.{name}", _te_name(builder)


def te_model_keys(model, config, cfg) -> tuple[set[str], dict[str, str]]:
    """The checkpoint keys the TE model of `model`'s architecture asks for on load (= writes), and its TE slots."""
    assert not config.add_bias_linear and config.softmax_type == "vanilla", "the text model's TE saves assume neither"
    assert not config.moe_grouped_gemm, "without TE the TE spec has no grouped-GEMM experts to derive keys from"
    slots = dict(_te_slots(qwen35_block_spec(config, backend="te"), model.decoder, "decoder"))
    if cfg.mtp_num_layers:
        slots.update(_te_slots(qwen35_mtp_block_spec(config, backend="te"), model.mtp, "mtp"))
    if cfg.vision is not None:
        slots.update(_tower_te_slots(model))
    entries = model.sharded_state_dict()  # {module path.name: entry}
    keys = {k for name, entry in entries.items() if not any(name.startswith(p + ".") for p in slots)
            for k in _checkpoint_keys(entry)}
    for path, cls in slots.items():
        slot_config = model.vision_model.decoder.config if path.startswith("vision_model.") else config
        assert slot_config.softmax_type == "vanilla", path
        saves = te_saves(cls, slot_config)
        if not saves:
            continue
        # The local module in this slot has the same weight, and the same parents give it its key and offsets (and
        # split it: GDN stores in_proj.weight as query/key/value/z/beta/alpha sections).
        weight = entries[f"{path}.weight"]
        prefix = weight.key.removesuffix("weight")
        first = _first_tensor(weight)
        axes = first.prepend_axis_num  # e.g. the expert axis; a module's extra state is sharded along these only
        offset, shape = tuple(first.global_offset[:axes]) or (0,), tuple(first.global_shape[:axes]) or (1,)
        for name in saves:
            if name == "weight":
                keys |= _checkpoint_keys(weight)
            elif name == "_extra_state":
                keys.add(ShardedObject(prefix + name, None, shape, offset).unique_key)
            else:
                keys.add(prefix + name)
    return keys, slots


def stored_keys(ckpt_dir) -> set[str]:
    """The keys of the newest checkpoint in `ckpt_dir` (tensors by key, sharded objects by unique key)."""
    return set(TorchDistReader(iteration_dir(ckpt_dir, latest_iteration(ckpt_dir))).metadata.state_dict_metadata)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-vl-moe"])
def test_cpu_checkpoints_hold_every_key_the_te_model_loads(preset, tmp_path, te_spec_as_on_gpus):
    """save_checkpoint of the local model and the HF converter both write every key (weights and `_extra_state`
    objects) the TE model requests on load; and every key the local model requests is one the TE model writes.
    With a vision tower: its blocks' fused LayerNorm linears (with biases) and the merger's TE norm and linears."""
    cfg = qwen35_preset(preset)
    assert cfg.mtp_num_layers, "the MTP layer's norms are part of what this test covers"
    config = qwen35_transformer_config(cfg, params_dtype=torch.float32)
    model = qwen35_gpt_model(cfg, config, backend="local")
    te_keys, slots = te_model_keys(model, config, cfg)

    # The standalone norms TE builds (and whose _extra_state the local norms must stand in for), by slot name.
    norms = {path.rsplit(".", 1)[1] for path, cls in slots.items() if cls == "TENorm"}
    want = {"out_norm", "q_layernorm", "k_layernorm", "final_layernorm", "enorm", "hnorm"}
    assert norms == want | ({"pre_mlp_layernorm"} if cfg.is_moe else set()) | ({"patch_norm"} if cfg.vision else set())
    assert {"TELayerNormColumnParallelLinear", "TEColumnParallelLinear", "TERowParallelLinear"} <= set(slots.values())
    if cfg.vision is not None:  # every block's qkv and fc1 fuse their LayerNorm; the merger's norm stands alone
        tower = {path.removeprefix("vision_model."): cls for path, cls in slots.items() if path.startswith("vision")}
        assert sum(cls == "TELayerNormColumnParallelLinear" for cls in tower.values()) == 2 * cfg.vision.depth
        assert tower["merger.patch_norm"] == "TENorm" and tower["merger.linear_fc2"] == "TERowParallelLinear"

    local_keys = {k for entry in model.sharded_state_dict().values() for k in _checkpoint_keys(entry)}
    unreadable = sorted(local_keys - te_keys)
    assert not unreadable, f"the local model asks for keys a TE checkpoint lacks: {unreadable[:5]}"

    save_checkpoint(model, cfg, tmp_path / "trained")
    src = make_hf_checkpoint(tmp_path / "hf", preset, how="packed", mtp_layout="packed")
    qwen35_hf_to_megatron(src, tmp_path / "converted", progress=False)
    for written_by in ("trained", "converted"):
        missing = sorted(te_keys - stored_keys(tmp_path / written_by))
        assert not missing, f"the TE model cannot load the {written_by} checkpoint: missing {missing[:5]}"
