"""THE mapping between Hugging Face and Megatron names: one list of rules, read in both directions, and every
choice a Hugging Face checkpoint makes about its names (`HFLayout`).

Megatron names are the checkpoint names of megatron-core's `sharded_state_dict` (Transformer Engine spelling, which
the local backend maps onto). `{mg}` / `{hf}` stand for a layer's prefix on each side, `{E}` expands over experts.
MoE rows extend the dense rows through the MLP choice; MTP reuses the attention-layer rows under its own prefixes.

What varies between Hugging Face checkpoints of one model, and is decided here only:
- the prefix: `model.` (text-only Qwen3_5ForCausalLM) or `model.language_model.` (the released VL wrapper, whose
  vision tower `model.visual.*` becomes the VL model's `vision_model.*`: `vision_rules`);
- the expert storage, separately for decoder and MTP layers: packed 3-D (`mlp.experts.gate_up_proj`, what the
  transformers module holds and the Qwen3.5 MoE releases store in the decoder) or per expert 2-D (what
  `save_pretrained` writes, and the Qwen3.5 releases' MTP layer);
- a head stored although config.json ties it (a copy of the embedding; a different head unties the model, as
  transformers then runs it).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import torch

from megatron_qwen35.config import FULL_ATTENTION, MULTIMODAL_MODEL_TYPES, Qwen35Config
from megatron_qwen35.convert.transforms import (
    GATE_UP,
    GATED_QKV,
    GDN_IN_PROJ,
    IDENTITY,
    PACKED_EXPERTS,
    PER_EXPERT_GATE_UP,
    PLUS_ONE,
    VISION_QKV,
    Transform,
)

TEXT_ONLY_PREFIX = "model."  # Qwen3_5ForCausalLM checkpoints
MULTIMODAL_PREFIX = "model.language_model."  # Qwen3_5ForConditionalGeneration checkpoints
VISION_PREFIX = "model.visual."  # the VL wrapper's vision tower (Qwen3_5VisionModel)
MG_VISION_PREFIX = "vision_model."  # the VL model's attribute holding the tower (Qwen35VisionModel)
LM_HEAD = "lm_head.weight"
EXPERT_LAYOUTS = ("packed", "per_expert")  # transformers' module holds packed; save_pretrained writes per expert


@dataclass(frozen=True)
class Rule:
    megatron: tuple[str, ...]
    hf: tuple[str, ...]
    transform: Transform = IDENTITY


def _r(megatron, hf, transform=IDENTITY) -> Rule:
    as_tuple = lambda x: (x,) if isinstance(x, str) else tuple(x)  # noqa: E731
    return Rule(as_tuple(megatron), as_tuple(hf), transform)


GDN_RULES = [
    _r("{mg}self_attention.in_proj.layer_norm_weight", "{hf}input_layernorm.weight"),
    _r("{mg}self_attention.in_proj.weight", [f"{{hf}}linear_attn.in_proj_{p}.weight" for p in ("qkv", "z", "b", "a")],
       GDN_IN_PROJ),
    _r("{mg}self_attention.conv1d.weight", "{hf}linear_attn.conv1d.weight"),
    _r("{mg}self_attention.A_log", "{hf}linear_attn.A_log"),
    _r("{mg}self_attention.dt_bias", "{hf}linear_attn.dt_bias"),
    _r("{mg}self_attention.out_norm.weight", "{hf}linear_attn.norm.weight", PLUS_ONE),  # HF's gated norm is plain
    _r("{mg}self_attention.out_proj.weight", "{hf}linear_attn.out_proj.weight"),
]

ATTENTION_RULES = [
    _r("{mg}self_attention.linear_qkv.layer_norm_weight", "{hf}input_layernorm.weight"),
    _r("{mg}self_attention.linear_qkv.weight", [f"{{hf}}self_attn.{p}_proj.weight" for p in "qkv"], GATED_QKV),
    _r("{mg}self_attention.q_layernorm.weight", "{hf}self_attn.q_norm.weight"),
    _r("{mg}self_attention.k_layernorm.weight", "{hf}self_attn.k_norm.weight"),
    _r("{mg}self_attention.linear_proj.weight", "{hf}self_attn.o_proj.weight"),
]

DENSE_MLP_RULES = [
    _r("{mg}mlp.linear_fc1.layer_norm_weight", "{hf}post_attention_layernorm.weight"),
    _r("{mg}mlp.linear_fc1.weight", ["{hf}mlp.gate_proj.weight", "{hf}mlp.up_proj.weight"], GATE_UP),
    _r("{mg}mlp.linear_fc2.weight", "{hf}mlp.down_proj.weight"),
]

MOE_RULES = [
    _r("{mg}pre_mlp_layernorm.weight", "{hf}post_attention_layernorm.weight"),
    _r("{mg}mlp.router.weight", "{hf}mlp.gate.weight"),
    _r("{mg}mlp.shared_experts.linear_fc1.weight",
       ["{hf}mlp.shared_expert.gate_proj.weight", "{hf}mlp.shared_expert.up_proj.weight"], GATE_UP),
    _r("{mg}mlp.shared_experts.linear_fc2.weight", "{hf}mlp.shared_expert.down_proj.weight"),
    _r("{mg}mlp.shared_experts.gate_weight", "{hf}mlp.shared_expert_gate.weight"),
]

_MG_FC1 = "{mg}mlp.experts.local_experts.{E}.linear_fc1.weight"
_MG_FC2 = "{mg}mlp.experts.local_experts.{E}.linear_fc2.weight"
EXPERT_RULES = {
    "packed": [
        _r(_MG_FC1, "{hf}mlp.experts.gate_up_proj", PACKED_EXPERTS),
        _r(_MG_FC2, "{hf}mlp.experts.down_proj", PACKED_EXPERTS),
    ],
    "per_expert": [
        _r(_MG_FC1, ["{hf}mlp.experts.{E}.gate_proj.weight", "{hf}mlp.experts.{E}.up_proj.weight"],
           PER_EXPERT_GATE_UP),
        _r(_MG_FC2, "{hf}mlp.experts.{E}.down_proj.weight"),
    ],
}

MTP_RULES = [  # around the MTP's inner (full attention) layer; HF: Qwen3-Next style mtp.* names
    _r("{mg}enorm.weight", "{hf}pre_fc_norm_embedding.weight"),
    _r("{mg}hnorm.weight", "{hf}pre_fc_norm_hidden.weight"),
    _r("{mg}eh_proj.weight", "{hf}fc.weight"),  # input is [norm(embedding) | norm(hidden)] on both sides
    _r("{mg}final_layernorm.weight", "{hf}norm.weight"),
]


# The vision tower (layers/vision): {mg} / {hf} are the tower's prefixes, then one block's. Megatron's blocks are
# TransformerLayers, so a block's norms carry TE's fused names, as the text layers' do.
VISION_EMBEDDING_RULES = [
    _r("{mg}patch_embed.proj.weight", "{hf}patch_embed.proj.weight"),  # a Conv3d on both sides
    _r("{mg}patch_embed.proj.bias", "{hf}patch_embed.proj.bias"),
    _r("{mg}pos_embed.weight", "{hf}pos_embed.weight"),
]

VISION_BLOCK_RULES = [
    _r("{mg}self_attention.linear_qkv.layer_norm_weight", "{hf}norm1.weight"),
    _r("{mg}self_attention.linear_qkv.layer_norm_bias", "{hf}norm1.bias"),
    _r("{mg}self_attention.linear_qkv.weight", "{hf}attn.qkv.weight", VISION_QKV),
    _r("{mg}self_attention.linear_qkv.bias", "{hf}attn.qkv.bias", VISION_QKV),
    _r("{mg}self_attention.linear_proj.weight", "{hf}attn.proj.weight"),
    _r("{mg}self_attention.linear_proj.bias", "{hf}attn.proj.bias"),
    _r("{mg}mlp.linear_fc1.layer_norm_weight", "{hf}norm2.weight"),
    _r("{mg}mlp.linear_fc1.layer_norm_bias", "{hf}norm2.bias"),
    _r("{mg}mlp.linear_fc1.weight", "{hf}mlp.linear_fc1.weight"),
    _r("{mg}mlp.linear_fc1.bias", "{hf}mlp.linear_fc1.bias"),
    _r("{mg}mlp.linear_fc2.weight", "{hf}mlp.linear_fc2.weight"),
    _r("{mg}mlp.linear_fc2.bias", "{hf}mlp.linear_fc2.bias"),
]

VISION_MERGER_RULES = [
    _r("{mg}merger.patch_norm.weight", "{hf}merger.norm.weight"),  # a standalone LayerNorm: not fused into fc1
    _r("{mg}merger.patch_norm.bias", "{hf}merger.norm.bias"),
    _r("{mg}merger.linear_fc1.weight", "{hf}merger.linear_fc1.weight"),
    _r("{mg}merger.linear_fc1.bias", "{hf}merger.linear_fc1.bias"),
    _r("{mg}merger.linear_fc2.weight", "{hf}merger.linear_fc2.weight"),
    _r("{mg}merger.linear_fc2.bias", "{hf}merger.linear_fc2.bias"),
]


@dataclass(frozen=True)
class NamedRule:
    """A rule with every name spelled out for one model."""

    megatron: tuple[str, ...]
    hf: tuple[str, ...]
    transform: Transform


def _names(patterns: tuple[str, ...], mg: str, hf: str, num_experts: int | None) -> tuple[str, ...]:
    """Patterns with the layer prefixes filled in; a `{E}` pattern becomes one name per expert, in order."""
    out: list[str] = []
    for p in patterns:
        p = p.replace("{mg}", mg).replace("{hf}", hf)
        out += [p.replace("{E}", str(e)) for e in range(num_experts)] if "{E}" in p else [p]
    return tuple(out)


def _expand_rules(rules: list[Rule], mg: str, hf: str, num_experts: int | None) -> list[NamedRule]:
    out = []
    for rule in rules:
        if rule.transform is IDENTITY and any("{E}" in p for p in rule.megatron):  # one tensor per expert each side
            for e in range(num_experts):
                mg_e, hf_e = (tuple(p.replace("{E}", str(e)) for p in ps) for ps in (rule.megatron, rule.hf))
                out.append(NamedRule(_names(mg_e, mg, hf, None), _names(hf_e, mg, hf, None), IDENTITY))
        else:
            out.append(NamedRule(_names(rule.megatron, mg, hf, num_experts), _names(rule.hf, mg, hf, num_experts),
                                 rule.transform))
    return out


def _layer_rules(cfg: Qwen35Config, layer_type: str, expert_layout: str) -> list[Rule]:
    mixer = ATTENTION_RULES if layer_type == FULL_ATTENTION else GDN_RULES
    if not cfg.is_moe:
        return mixer + DENSE_MLP_RULES
    return mixer + MOE_RULES + EXPERT_RULES[expert_layout]


def qwen35_rules(cfg: Qwen35Config, *, hf_prefix: str = TEXT_ONLY_PREFIX, expert_layout: str = "packed",
                 include_mtp: bool = True) -> list[NamedRule]:
    """Every tensor of `cfg`'s model, named on both sides, in model order."""
    if hf_prefix not in (TEXT_ONLY_PREFIX, MULTIMODAL_PREFIX):
        raise ValueError(f"unknown Hugging Face prefix '{hf_prefix}'")
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"unknown expert layout '{expert_layout}'; choose one of {EXPERT_LAYOUTS}")
    top = [_r("embedding.word_embeddings.weight", f"{hf_prefix}embed_tokens.weight")]
    rules = _expand_rules(top, "", "", cfg.num_experts)
    for i, layer_type in enumerate(cfg.layer_types):
        rules += _expand_rules(_layer_rules(cfg, layer_type, expert_layout), f"decoder.layers.{i}.",
                               f"{hf_prefix}layers.{i}.", cfg.num_experts)
    rules += _expand_rules([_r("decoder.final_layernorm.weight", f"{hf_prefix}norm.weight")], "", "", None)
    if not cfg.tie_word_embeddings:
        rules += _expand_rules([_r("output_layer.weight", "lm_head.weight")], "", "", None)
    if include_mtp:
        for j in range(cfg.mtp_num_layers):
            mg, hf = f"mtp.layers.{j}.", "mtp."
            rules += _expand_rules(MTP_RULES, mg, hf, cfg.num_experts)
            rules += _expand_rules(_layer_rules(cfg, FULL_ATTENTION, expert_layout), f"{mg}mtp_model_layer.",
                                   f"{hf}layers.{j}.", cfg.num_experts)
    if cfg.vision is not None and hf_prefix == MULTIMODAL_PREFIX:  # only the VL wrapper's names hold a tower
        rules += vision_rules(cfg)
    return rules


def vision_rules(cfg: Qwen35Config, *, hf_prefix: str = VISION_PREFIX,
                 megatron_prefix: str = MG_VISION_PREFIX) -> list[NamedRule]:
    """Every tensor of `cfg`'s vision tower, in model order: transformers' `model.visual.*` <-> the VL model's
    `vision_model.*` by default; other prefixes name a standalone tower (e.g. "" and "" for Qwen3_5VisionModel's
    own state dict against Qwen35VisionModel's)."""
    if cfg.vision is None:
        raise ValueError(f"model '{cfg.name}' has no vision tower")
    rules = _expand_rules(VISION_EMBEDDING_RULES, megatron_prefix, hf_prefix, None)
    for i in range(cfg.vision.depth):
        rules += _expand_rules(VISION_BLOCK_RULES, f"{megatron_prefix}decoder.layers.{i}.", f"{hf_prefix}blocks.{i}.",
                               None)
    return rules + _expand_rules(VISION_MERGER_RULES, megatron_prefix, hf_prefix, None)


@dataclass(frozen=True)
class HFLayout:
    """How one Hugging Face checkpoint names the model's tensors. The default is what transformers'
    `save_pretrained` writes for Qwen3_5(Moe)ForCausalLM: text-only names, experts per expert, no tied head."""

    prefix: str = TEXT_ONLY_PREFIX
    decoder_experts: str = "per_expert"
    mtp_experts: str = "per_expert"
    stored_tied_head: bool = False  # lm_head.weight stored beside a tied embedding (a copy of it)

    def rules(self, cfg: Qwen35Config) -> list[NamedRule]:
        """The table's rules for this model under these names; decoder and MTP may store experts differently."""
        rules = qwen35_rules(cfg, hf_prefix=self.prefix, expert_layout=self.decoder_experts, include_mtp=False)
        if cfg.mtp_num_layers:
            rules += [r for r in qwen35_rules(cfg, hf_prefix=self.prefix, expert_layout=self.mtp_experts)
                      if r.megatron[0].startswith("mtp.")]
        return rules

    @property
    def embedding(self) -> str:
        return f"{self.prefix}embed_tokens.weight"

    @classmethod
    def saved_by_transformers(cls, cfg: Qwen35Config) -> HFLayout:
        """What `save_pretrained` writes for `cfg`'s transformers class: the VL wrapper's names for a model with a
        vision tower (Qwen3_5(Moe)ForConditionalGeneration), else text-only; experts per expert; no tied head."""
        return cls(MULTIMODAL_PREFIX if cfg.vision is not None else TEXT_ONLY_PREFIX)

    @classmethod
    def of(cls, hf_config: Mapping, names: Collection[str], *, stored_tied_head: bool = False) -> HFLayout:
        """The layout of a checkpoint with this config.json and these tensor names. A missing tensor is not
        decided here: the name check that follows names it."""
        prefix = MULTIMODAL_PREFIX if hf_config.get("model_type") in MULTIMODAL_MODEL_TYPES else TEXT_ONLY_PREFIX

        def experts(layer_prefix: str) -> str:
            return "packed" if f"{layer_prefix}mlp.experts.gate_up_proj" in names else "per_expert"

        return cls(prefix, experts(f"{prefix}layers.0."), experts("mtp.layers.0."), stored_tied_head)


def hf_shapes(rules: list[NamedRule], megatron_shape: Callable[[str], tuple[int, ...]],
              cfg: Qwen35Config) -> dict[str, tuple[int, ...]]:
    """The Hugging Face shape of every tensor: each rule's to_hf run on meta tensors of the Megatron shapes."""
    out = {}
    for rule in rules:
        metas = [torch.empty(megatron_shape(n), device="meta") for n in rule.megatron]
        out.update({n: tuple(t.shape) for n, t in zip(rule.hf, rule.transform.to_hf(metas, cfg), strict=True)})
    return out


def hf_to_megatron(hf: Mapping[str, torch.Tensor], cfg: Qwen35Config,
                   **rule_options) -> Iterator[tuple[str, torch.Tensor]]:
    """(Megatron name, tensor) for every rule, reading HF tensors by name (a lazy mapping streams)."""
    for rule in qwen35_rules(cfg, **rule_options):
        missing = [n for n in rule.hf if n not in hf]
        if missing:
            raise KeyError(f"Hugging Face checkpoint lacks tensor '{missing[0]}'")
        out = rule.transform.to_megatron([hf[n] for n in rule.hf], cfg)
        yield from zip(rule.megatron, out, strict=True)


def megatron_to_hf(mg: Mapping[str, torch.Tensor], cfg: Qwen35Config,
                   **rule_options) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every rule, reading Megatron tensors by name."""
    for rule in qwen35_rules(cfg, **rule_options):
        missing = [n for n in rule.megatron if n not in mg]
        if missing:
            raise KeyError(f"Megatron checkpoint lacks tensor '{missing[0]}'")
        out = rule.transform.to_hf([mg[n] for n in rule.megatron], cfg)
        yield from zip(rule.hf, out, strict=True)


def rules_by_megatron_name(rules: list[NamedRule]) -> dict[str, NamedRule]:
    """Which rule owns each Megatron name (a tensor's transform and Hugging Face names come from its rule)."""
    return {name: rule for rule in rules for name in rule.megatron}


def check_names(available: set[str], expected: set[str], *, side: str) -> None:
    """Every tensor present must be mapped and every mapped one present: a clear error names the first stray."""
    unexpected, missing = sorted(available - expected), sorted(expected - available)
    if unexpected:
        raise KeyError(f"{side} checkpoint has unexpected tensor '{unexpected[0]}' "
                       f"({len(unexpected)} unmapped in all)")
    if missing:
        raise KeyError(f"{side} checkpoint lacks tensor '{missing[0]}' ({len(missing)} missing in all)")
