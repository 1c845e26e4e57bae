"""LoRA against Hugging Face peft on transformers' Qwen3.5, fp32 on CPU: the same adapter weights give the same
logits, loss and adapter gradients (dense and MoE; GDN, attention, MLP, shared expert and every routed expert)."""

import pytest
import torch

from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
from megatron_qwen35.convert.model_state import load_hf_state_dict
from megatron_qwen35.convert.table import MULTIMODAL_PREFIX
from megatron_qwen35.hf_reference import reference_model
from megatron_qwen35.lora import (
    LoRASettings,
    adapter_whole_shapes,
    apply_lora,
    from_peft,
    load_adapter_tensors,
    lora_parameters,
    to_peft,
)
from megatron_qwen35.lora.targets import EXPERTS, TARGET_MODULES, VISION_PEFT_TARGETS
from megatron_qwen35.provider import qwen35_gpt_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")

TOL = 1e-4  # fp32, as the base model's parity (tests/test_model_parity.py)
RANK, ALPHA = 4, 8.0


def peft_config(cfg, targets=TARGET_MODULES, rank=RANK, alpha=ALPHA, vision=False, router=False, dropout=0.0):
    """peft's LoraConfig for our target names: transformers' module names, routed experts (and the router) as
    target_parameters."""
    from peft import LoraConfig

    modules = [t for t in targets if t != EXPERTS] + (list(VISION_PEFT_TARGETS) if vision else [])
    parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if EXPERTS in targets and cfg.is_moe else []
    parameters = (parameters + (["mlp.gate.weight"] if router else [])) or None
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, target_parameters=parameters,
                      lora_dropout=dropout,
                      init_lora_weights=False)  # random A and B: an all-zero B would hide a wrong layout


def lora_pair(preset, targets=TARGET_MODULES, seed=0, vision=False, router=False, dropout=0.0):
    """(cfg, peft model on transformers, our model with the same base and adapter weights); `vision`, `router`: the
    tower's linears, the MoE routers adapted too; `dropout`: --lora-dropout (peft's lora_dropout)."""
    from peft import get_peft_model, get_peft_model_state_dict

    cfg = qwen35_preset(preset).replace(mtp_num_layers=0)
    hf = reference_model(cfg, seed)
    base = {k: v.clone() for k, v in hf.state_dict().items()}
    torch.manual_seed(seed + 1)
    peft_model = get_peft_model(hf, peft_config(cfg, targets, vision=vision, router=router, dropout=dropout)).eval()
    ours = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local").eval()
    names = dict(hf_prefix=MULTIMODAL_PREFIX, expert_layout="packed") if cfg.vision is not None else {}
    load_hf_state_dict(ours, cfg, base, include_mtp=False, **names)
    apply_lora(ours, cfg, LoRASettings(rank=RANK, alpha=ALPHA, target_modules=tuple(targets), vision=vision,
                                       router=router, dropout=dropout))
    prefix = {"hf_prefix": "model.language_model."} if cfg.vision is not None else {}
    load_adapter_tensors(ours, from_peft(get_peft_model_state_dict(peft_model), cfg, adapter_whole_shapes(ours),
                                         **prefix))
    return cfg, peft_model, ours


def _tokens(cfg, batch=2, seq=70, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)


def _ours(model, ids):
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    return model(ids, pos, None)


def _loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize(("preset", "router"), [("tiny", False), ("tiny-moe", False), ("tiny-moe", True)],
                         ids=["tiny", "tiny-moe", "tiny-moe-router"])
def test_logits_loss_and_adapter_gradients_equal_peft(preset, router):
    """With --lora-router the routers' adapters too (peft's target_parameters `mlp.gate.weight`): they change which
    experts a token reaches, so the logits check the update's placement in the routing."""
    cfg, peft_model, ours = lora_pair(preset, router=router)
    routers = [n for n in lora_parameters(ours) if ".mlp.router.lora." in n]
    assert len(routers) == (2 * cfg.num_layers if router else 0)
    ids = _tokens(cfg)
    a, b = _ours(ours, ids), peft_model(input_ids=ids).logits
    assert (a - b).abs().max().item() <= TOL
    loss_a, loss_b = _loss(a, ids), _loss(b, ids)
    assert abs(loss_a.item() - loss_b.item()) <= TOL
    with torch.no_grad():  # each model's own loss: megatron's per-token loss from labels, transformers' from labels=
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        own = ours(ids[:, :-1], pos[:, :-1], None, labels=ids[:, 1:]).mean()
        assert abs(own.item() - peft_model(input_ids=ids, labels=ids).loss.item()) <= TOL
        assert abs(own.item() - loss_a.item()) <= TOL
    loss_a.backward()
    loss_b.backward()
    ours_grads = to_peft({n: p.grad for n, p in lora_parameters(ours).items()}, cfg)
    peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_grads = {k.replace(".default.weight", ".weight"): g for k, g in peft_grads.items()}
    assert set(ours_grads) == set(peft_grads)
    for name, want in peft_grads.items():
        got = ours_grads[name]
        assert got.shape == want.shape, name
        assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item()), name
    # only adapters train: the base has no gradient at all
    assert all(p.grad is None for n, p in ours.named_parameters() if n not in lora_parameters(ours))


@pytest.mark.parametrize("vision", [False, True], ids=["tower_frozen", "tower_adapted"])
def test_vl_model_with_images_equals_peft(vision):
    """The VL model (the language model adapted, experts too; the tower frozen, or adapted with --lora-vision: every
    block's qkv, proj, fc1, fc2 and the merger's fc1, fc2) on a batch with images and a video: logits, loss and every
    adapter gradient equal peft's on transformers' Qwen3_5MoeForConditionalGeneration."""
    from megatron_qwen35.layers.rotary import mrope_position_ids, token_types
    from tests.test_vl_model import vl_batch

    cfg, peft_model, ours = lora_pair("tiny-vl-moe", vision=vision)
    tower_adapters = [n for n in lora_parameters(ours) if n.startswith("vision_model.")]
    assert len(tower_adapters) == (2 * (4 * cfg.vision.depth + 2) if vision else 0)  # A and B of each linear
    batch = vl_batch(cfg)
    ids = batch["input_ids"]
    positions = mrope_position_ids(ids, cfg.vision, batch["image_grid_thw"], batch["video_grid_thw"])
    a = ours(ids, positions, None, **{k: v for k, v in batch.items() if k != "input_ids"})  # the training forward
    b = peft_model(**batch, mm_token_type_ids=token_types(ids, cfg.vision)).logits
    assert (a - b).abs().max().item() <= TOL
    _loss(a, ids).backward()
    _loss(b, ids).backward()
    ours_grads = to_peft({n: p.grad for n, p in lora_parameters(ours).items()}, cfg, hf_prefix="model.language_model.")
    peft_grads = {k.replace(".default.weight", ".weight"): p.grad for k, p in peft_model.named_parameters()
                  if p.requires_grad}
    assert set(ours_grads) == set(peft_grads)
    for name, want in peft_grads.items():
        assert (ours_grads[name] - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item()), name


def test_every_adapted_linear_changes_the_output():
    """Guard on the test: each transformers module's adapter reaches the logits (no part silently dropped)."""
    cfg, peft_model, ours = lora_pair("tiny-moe")
    ids = _tokens(cfg, batch=1, seq=20)
    with torch.no_grad():
        before = _ours(ours, ids)
        for name, p in lora_parameters(ours).items():
            if ".lora.A_" in name:
                saved = p.clone()
                p.zero_()
                assert not torch.equal(_ours(ours, ids), before), name
                p.copy_(saved)


def test_an_expert_linear_as_the_transformer_engine_wrapper_leaves_it_is_adapted_alike():
    """Under expert parallelism megatron's TE wrapper builds an expert linear with TE's own `tp_group` None (megatron
    does the expert communication) and megatron's group in `_tp_group` (lora/adapter.py: linear_tp_group). A stand-in
    (TE does not run here): the local model's expert linears with their groups moved so get the same adapters, the
    same checkpoint entries and the same logits."""
    from megatron_qwen35.lora.adapter import linear_tp_group

    cfg = qwen35_preset("tiny-moe").replace(mtp_num_layers=0)

    base = {}

    def build(te_like: bool):
        model = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local")
        base.update(base or model.state_dict())
        model.load_state_dict(base)  # the same base weights (the experts' RNG tracker moved on between builds)
        moved = 0
        for name, m in model.named_modules():
            if te_like and ".local_experts." in name and name.endswith(("linear_fc1", "linear_fc2")):
                m._tp_group, m.tp_group = m.tp_group, None
                assert linear_tp_group(m) is m._tp_group
                moved += 1
        assert moved == (2 * cfg.num_experts * cfg.num_layers if te_like else 0)
        apply_lora(model, cfg, LoRASettings(rank=RANK, alpha=ALPHA))
        g = torch.Generator().manual_seed(3)
        load_adapter_tensors(model, {n: torch.randn(s, generator=g) * 0.2
                                     for n, s in sorted(adapter_whole_shapes(model).items())})
        return model.eval()

    want, got = build(False), build(True)
    entries = [{k: (tuple(v.global_shape), v.global_offset, v.replica_id) for k, v in m.sharded_state_dict().items()
                if ".lora." in k} for m in (want, got)]
    assert entries[0] == entries[1] and any(".local_experts." in k for k in entries[0])
    ids = _tokens(cfg, batch=1, seq=20)
    with torch.no_grad():
        assert torch.equal(_ours(got, ids), _ours(want, ids))


def test_a_subset_of_targets_adapts_only_those_parts():
    """`in_proj_b` alone: the GDN input projection's b rows get an adapter, its q k v z a rows stay the base's."""
    cfg, peft_model, ours = lora_pair("tiny", targets=("in_proj_b", "o_proj"))
    ids = _tokens(cfg)
    assert (_ours(ours, ids) - peft_model(input_ids=ids).logits).abs().max().item() <= TOL
    names = set(lora_parameters(ours))
    assert names and all(".lora.A_in_proj_b" in n or "linear_proj" in n or ".lora.B_" in n for n in names)


def test_lora_dropout_acts_on_the_adapters_input_while_training_only():
    """--lora-dropout 0.5: evaluation gives peft's logits (dropout off); training draws a new mask each forward, on
    the adapters' input only (with every B zero, as peft starts, two training forwards give the same logits). (The
    dense model: peft takes no dropout on target_parameters, its routed experts' form.)"""
    cfg, peft_model, ours = lora_pair("tiny", dropout=0.5)
    ids = _tokens(cfg, batch=1, seq=20)
    with torch.no_grad():
        assert (_ours(ours, ids) - peft_model(input_ids=ids).logits).abs().max().item() <= TOL
        ours.train()
        assert not torch.equal(_ours(ours, ids), _ours(ours, ids))
        for name, p in lora_parameters(ours).items():
            if ".lora.B_" in name:
                p.zero_()
        assert torch.equal(_ours(ours, ids), _ours(ours, ids))
    with pytest.raises(ValueError, match=r"--lora-dropout 1.0: a dropout probability is in \[0, 1\)"):
        LoRASettings(rank=4, dropout=1.0)


def test_an_unknown_target_module_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"--lora-target-modules qkv_proj: not a linear .* in_proj_qkv in_proj_z"):
        LoRASettings(rank=4, target_modules=("qkv_proj", "o_proj"))
    with pytest.raises(ValueError, match="--lora-target-modules lm_head: LoRA on the output layer is not built"):
        LoRASettings(rank=4, target_modules=("lm_head",))
    with pytest.raises(ValueError, match="--lora-rank 0"):
        LoRASettings(rank=0)


def test_an_adapter_of_another_rank_is_named():
    cfg, peft_model, ours = lora_pair("tiny")
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    like = {n: torch.Size([p.shape[0], 2 * p.shape[1]]) if ".lora.B_" in n else p.shape
            for n, p in lora_parameters(ours).items()}
    with pytest.raises(ValueError, match="another LoRA rank"):
        from_peft(state, cfg, like)


@pytest.mark.parametrize("norm", ["RMSNorm", "LayerNorm"])
def test_the_adapter_reads_the_fused_norm_s_output_as_the_local_norm_gives_it(norm):
    """Transformer Engine fuses the norm before a layer's first linear into it (LayerNormLinear: RMSNorm in the
    language model, zero-centred; LayerNorm with a bias in the vision tower), so the adapter normalises its input
    itself (adapter_input): equal to the local backend's separate norm module, to fp32 rounding. A stand-in with TE's
    attribute names (no GPU here: TE does not run)."""
    from types import SimpleNamespace

    from megatron_qwen35.layers.norms import Qwen35RMSNorm
    from megatron_qwen35.layers.vision.norms import Qwen35VisionLayerNorm
    from megatron_qwen35.lora.adapter import adapter_input

    cfg = qwen35_preset("tiny-vl")
    config = qwen35_transformer_config(cfg, params_dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 64, generator=g) * 3 + 1
    if norm == "RMSNorm":
        local = Qwen35RMSNorm(config, 64, eps=1e-6)
        fused = SimpleNamespace(layer_norm_weight=torch.randn(64, generator=g), normalization="RMSNorm",
                                zero_centered_gamma=True, eps=1e-6)
        local.weight.data.copy_(fused.layer_norm_weight)
    else:
        local = Qwen35VisionLayerNorm(config, 64, eps=1e-6)
        fused = SimpleNamespace(layer_norm_weight=torch.randn(64, generator=g),
                                layer_norm_bias=torch.randn(64, generator=g), normalization="LayerNorm",
                                zero_centered_gamma=False, eps=1e-6)
        local.weight.data.copy_(fused.layer_norm_weight)
        local.bias.data.copy_(fused.layer_norm_bias)
    with torch.no_grad():
        want = local(x)
    assert (adapter_input(fused, x) - want).abs().max().item() <= 1e-5
    assert (x - want).abs().max().item() > 0.1  # the norm did something


def test_one_adapter_shared_by_a_layer_s_experts_is_peft_s_with_every_expert_holding_it():
    """--lora-experts shared: one adapter for all of a layer's routed experts (the rest as by default). In peft's
    form every expert holds a copy of it: peft with those copies gives our logits and loss, the sum of its experts'
    gradients is the shared adapter's gradient, and every other adapter's gradient is equal."""
    from peft import get_peft_model, set_peft_model_state_dict

    cfg = qwen35_preset("tiny-moe").replace(mtp_num_layers=0)
    hf = reference_model(cfg, 0)
    base = {k: v.clone() for k, v in hf.state_dict().items()}
    peft_model = get_peft_model(hf, peft_config(cfg)).eval()
    ours = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local").eval()
    load_hf_state_dict(ours, cfg, base, include_mtp=False)
    apply_lora(ours, cfg, LoRASettings(rank=RANK, alpha=ALPHA, experts="shared"))
    g = torch.Generator().manual_seed(3)
    load_adapter_tensors(ours, {n: torch.randn(s, generator=g) * 0.2
                                for n, s in sorted(adapter_whole_shapes(ours).items())})
    adapters = lora_parameters(ours)
    assert not any(".local_experts." in n for n in adapters)
    assert sum(".lora_shared_fc" in n for n in adapters) == cfg.num_layers * 5  # fc1: A, B's gate and up; fc2: A, B
    set_peft_model_state_dict(peft_model, to_peft({n: p.detach() for n, p in adapters.items()}, cfg))
    ids = _tokens(cfg)
    a, b = _ours(ours, ids), peft_model(input_ids=ids).logits
    assert (a - b).abs().max().item() <= TOL
    _loss(a, ids).backward()
    _loss(b, ids).backward()
    ours_grads = to_peft({n: p.grad for n, p in adapters.items()}, cfg)  # the shared gradient in every expert's slot
    peft_grads = {k.replace(".default.weight", ".weight"): p.grad for k, p in peft_model.named_parameters()
                  if p.requires_grad}
    assert set(ours_grads) == set(peft_grads)
    experts = cfg.num_experts
    for name, want in peft_grads.items():
        got = ours_grads[name]
        if ".mlp.experts." in name:  # [E x r, in] / [out, r x E]: the sum over experts vs one expert's slot
            if "lora_A" in name:
                want, got = want.view(experts, RANK, -1).sum(0), got.view(experts, RANK, -1)[0]
            else:
                want = want.view(want.shape[0], RANK, experts).sum(-1)
                got = got.view(got.shape[0], RANK, experts)[..., 0]
        assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item()), name
