"""Put LoRA adapters on a built Megatron Qwen3.5 model chunk and freeze everything else.

`apply_lora(model, cfg, settings)` walks the decoder layers this chunk holds (and the MTP layer's, with
`settings.mtp`; the MoE routers, with `settings.router`; the vision tower's blocks and merger, with
`settings.vision`, where this chunk holds the tower),
adapts each linear of lora/targets.py that the target names select, and leaves every other
parameter without a gradient: megatron's DDP then gives them no gradient buffer and its optimizer (distributed or
not) no state. It runs in model_provider, on every machine, before megatron wraps the model.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_qwen35.config import Qwen35Config
from megatron_qwen35.lora.adapter import LoRAAdapter, attach_adapter, linear_tp_group, share_adapter
from megatron_qwen35.lora.targets import (
    ADAPTED_LINEARS,
    COLUMN,
    EXPERT_SHARED_LINEARS,
    EXPERTS,
    REPLICATED,
    ROUTER_LINEARS,
    ROW,
    TARGET_MODULES,
    VISION_BLOCK_LINEARS,
    VISION_BLOCK_PREFIX,
    VISION_MERGER_LINEARS,
    VISION_PREFIX,
    AdaptedLinear,
    check_target_modules,
    fused_row_parts,
    local_rows,
    part_rows,
    parts_adapted,
)

EXPERT_ADAPTERS = ("each", "shared")  # --lora-experts


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """--lora-rank, --lora-alpha, --lora-dropout, --lora-target-modules, --lora-experts, --lora-mtp, --lora-router,
    --lora-vision."""

    rank: int
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    mtp: bool = False  # the MTP layer's linears too
    vision: bool = False  # the vision tower's linears too
    router: bool = False  # the MoE routers too
    experts: str = "each"  # the routed experts' adapters: one each, or one "shared" by a layer's experts

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"--lora-rank {self.rank}: a LoRA rank is a positive number of dimensions")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout {self.dropout}: a dropout probability is in [0, 1)")
        check_target_modules(self.target_modules)
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.experts not in EXPERT_ADAPTERS:
            raise ValueError(f"--lora-experts {self.experts}: one of {', '.join(EXPERT_ADAPTERS)}")
        if self.experts == "shared" and EXPERTS not in self.target_modules:
            raise ValueError("--lora-experts shared: the routed experts are not among --lora-target-modules "
                             "(add 'experts')")

    def to_record(self) -> dict:
        """What a checkpoint records of its adapters (qwen35_config.json): what fixes their shapes and function, and
        the dropout they were trained with (which a PEFT export writes; it does not change what the adapters compute
        in evaluation, so a resume may change it)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules), "mtp": self.mtp, "vision": self.vision,
                "router": self.router, "experts": self.experts}

    @classmethod
    def from_record(cls, record: dict) -> LoRASettings:
        """The settings a checkpoint records; a field missing or of the wrong kind is a ValueError that says so."""
        try:
            return cls(rank=int(record["rank"]), alpha=float(record["alpha"]),
                       dropout=float(record.get("dropout", 0.0)),  # (records written before it was kept)
                       target_modules=tuple(record["target_modules"]), mtp=bool(record["mtp"]),
                       vision=bool(record.get("vision", False)),  # (records written before these could adapt)
                       router=bool(record.get("router", False)), experts=str(record.get("experts", "each")))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"a damaged LoRA record {str(record):.200} ({type(e).__name__}: {e})") from None

    def shape(self) -> tuple:
        """What an adapter checkpoint must agree on with a run that loads it."""
        return (self.rank, self.alpha, frozenset(self.target_modules), self.mtp, self.vision, self.router,
                self.experts)

    def describe(self) -> str:
        targets = "all" if set(self.target_modules) == set(TARGET_MODULES) else " ".join(self.target_modules)
        shared = ", one adapter shared by each layer's experts" if self.experts == "shared" else ""
        return (f"rank {self.rank}, alpha {self.alpha:g}, targets {targets}{shared}"
                f"{', MTP layer' if self.mtp else ''}{', routers' if self.router else ''}"
                f"{', vision tower' if self.vision else ''}")


def _layers(model, settings: LoRASettings):
    """(prefix, global prefix, module, its table of linears) of every layer this chunk holds: decoder layers (the
    global prefix numbers them across pipeline stages), then the MTP layers' own, then the vision tower's blocks and
    the tower itself (its merger)."""
    text = ADAPTED_LINEARS if settings.experts == "each" else (
        tuple(r for r in ADAPTED_LINEARS if not r.expert) + EXPERT_SHARED_LINEARS)
    text += ROUTER_LINEARS if settings.router else ()
    decoder = getattr(model, "decoder", None)
    for i, layer in enumerate(decoder.layers if decoder is not None else []):
        yield f"decoder.layers.{i}.", f"decoder.layers.{layer.layer_number - 1}.", layer, text
    mtp = getattr(model, "mtp", None)
    if settings.mtp and mtp is not None:
        for i, layer in enumerate(mtp.layers):
            yield (f"mtp.layers.{i}.mtp_model_layer.",) * 2 + (layer.mtp_model_layer, text)
    tower = getattr(model, "vision_model", None)
    if settings.vision and tower is not None:
        for i, block in enumerate(tower.decoder.layers):
            yield (VISION_BLOCK_PREFIX.format(i=i),) * 2 + (block, VISION_BLOCK_LINEARS)
        yield VISION_PREFIX, VISION_PREFIX, tower, VISION_MERGER_LINEARS


def _submodule(layer, path: str):
    module = layer
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _linears(layer, linear: AdaptedLinear):
    """(path, global path, module) of each Megatron linear of `layer` this table row names (each local expert's for
    experts; the global path numbers it among all experts)."""
    if not linear.expert:
        module = _submodule(layer, linear.megatron)
        return [] if module is None else [(linear.megatron, linear.megatron, module)]
    if _submodule(layer, "mlp.experts") is None:
        return []
    experts = _submodule(layer, "mlp.experts.local_experts")
    if experts is None:
        raise ValueError(f"LoRA on routed experts needs each expert as its own linear (megatron's SequentialMLP), not "
                         f"{type(layer.mlp.experts).__name__}: drop --moe-grouped-gemm, or leave 'experts' out of "
                         "--lora-target-modules")
    return [(linear.megatron.format(E=i), linear.megatron.format(E=e), _submodule(layer, linear.megatron.format(E=i)))
            for i, e in enumerate(layer.mlp.local_expert_indices)]


def _adapter(module, linear: AdaptedLinear, parts: tuple[str, ...], cfg: Qwen35Config,
             settings: LoRASettings) -> LoRAAdapter:
    tp_group = linear_tp_group(module)
    tp, tp_rank = tp_group.size(), tp_group.rank()
    if linear.expert and tp > 1:
        raise ValueError(f"LoRA on routed experts with expert tensor parallelism {tp}: not supported; use "
                         "--expert-tensor-parallel-size 1 (experts split over EP), or leave 'experts' out of "
                         "--lora-target-modules")
    weight = module.weight
    out_local, in_local = weight.shape
    if linear.parallel == COLUMN:
        total = out_local * tp
        row_part = fused_row_parts(linear, cfg, part_rows(linear, cfg, total))
        rows = local_rows(linear, cfg, total, tp, tp_rank)
        sections = [n // tp for n in linear.sections(cfg)] if linear.sections is not None else [out_local]
        if sum(sections) != out_local:
            raise ValueError(f"{linear.megatron}: sections {sections} do not add up to its {out_local} local rows")
        row_part = row_part[rows]
    else:
        row_part, sections = torch.zeros(out_local, dtype=torch.long), [out_local]
    sequence_parallel = getattr(module if linear.parallel != REPLICATED else weight, "sequence_parallel", False)
    index = {p: linear.parts.index(p) for p in parts}
    return LoRAAdapter(parallel=linear.parallel, parts=index, row_part=row_part, sections=sections,
                       in_features=in_local, rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
                       tp_group=tp_group, sequence_parallel=bool(sequence_parallel),
                       expert=linear.expert, dtype=weight.dtype,
                       device=weight.device)


def apply_lora(model: torch.nn.Module, cfg: Qwen35Config, settings: LoRASettings, seed: int = 0) -> list[str]:
    """Adapt `model`'s linears in place, initialised from `seed` alike in every parallel layout; freeze the rest.
    Returns the adapted modules' paths."""
    targets = check_target_modules(settings.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for prefix, global_prefix, layer, table in _layers(model, settings):
        for linear in table:
            parts = parts_adapted(linear, targets) if linear in ADAPTED_LINEARS else linear.parts  # opt-in: all
            if not parts:
                continue
            if linear.shared_by_experts is not None:
                if _share_over_experts(layer, linear, global_prefix + linear.megatron, cfg, settings, seed):
                    adapted.append(prefix + linear.megatron)
                continue
            for path, global_path, module in _linears(layer, linear):
                adapter = _adapter(module, linear, parts, cfg, settings)
                adapter.global_name = global_prefix + global_path
                adapter.initialise(adapter.global_name, seed, adapter.tp_group.rank(), adapter.tp_group.size())
                attach_adapter(module, adapter)
                adapted.append(prefix + path)
    model.train(model.training)  # the new adapters (their dropout) in the model's mode, as if built with it
    return adapted


def _share_over_experts(layer, linear: AdaptedLinear, global_name: str, cfg: Qwen35Config, settings: LoRASettings,
                        seed: int) -> bool:
    """One adapter for `linear.shared_by_experts` of every routed expert of `layer` (none: a dense layer)."""
    per_expert = next(r for r in ADAPTED_LINEARS if r.expert and r.megatron.endswith("." + linear.shared_by_experts))
    linears = [module for _, _, module in _linears(layer, per_expert)]
    if not linears:
        return False
    adapter = _adapter(linears[0], linear, linear.parts, cfg, settings)
    adapter.global_name = global_name
    adapter.initialise(global_name, seed, 0, 1)
    share_adapter(layer.mlp.experts, linear.megatron.rsplit(".", 1)[1], adapter, linears, tp_group=layer.mlp.tp_group,
                  sequence_parallel=layer.config.sequence_parallel)
    return True


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapters' parameters by name (what trains)."""
    return {n: p for n, p in model.named_parameters() if ".lora." in f".{n}"}


def _adapters(model: torch.nn.Module) -> list[LoRAAdapter]:
    return [m for m in model.modules() if isinstance(m, LoRAAdapter)]


def _whole(adapter: LoRAAdapter, key: str, local: torch.Tensor) -> tuple[tuple[int, ...], int | None]:
    """(the whole tensor's shape, the dimension split over TP or None) of an adapter's tensor `key`."""
    tp = adapter.tp_group.size() if not adapter.expert else 1
    dim = 0 if adapter.parallel == COLUMN and key.startswith("B_") else (
        1 if adapter.parallel == ROW and key.startswith("A_") else None)
    shape = list(local.shape)
    if dim is not None:
        shape[dim] *= tp
    return tuple(shape), dim


def adapter_whole_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{global name: whole shape} of every adapter tensor this rank holds (the names of a one-process model, and of
    the checkpoint: `decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.lora.B_0` names global expert 5)."""
    return {f"{a.global_name}.lora.{k}": _whole(a, k, t)[0] for a in _adapters(model)
            for k, t in a.state_dict().items()}


@torch.no_grad()
def load_adapter_tensors(model: torch.nn.Module, whole: dict[str, torch.Tensor]) -> None:
    """Copy whole adapter tensors (by global name, as `adapter_whole_shapes`) into this rank's slices."""
    for a in _adapters(model):
        tp_rank = a.tp_group.rank() if not a.expert else 0
        for key, local in a.state_dict(keep_vars=True).items():
            name = f"{a.global_name}.lora.{key}"
            shape, dim = _whole(a, key, local)
            tensor = whole[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"adapter tensor {name}: shape {tuple(tensor.shape)}, the model's {shape}")
            if dim is not None:
                n = local.shape[dim]
                tensor = tensor.narrow(dim, tp_rank * n, n)
            local.copy_(tensor)


__all__ = ["EXPERT_ADAPTERS", "LoRASettings", "apply_lora", "lora_parameters", "adapter_whole_shapes",
           "load_adapter_tensors"]
