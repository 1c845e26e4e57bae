"""Per-layer ModuleSpecs for Qwen3.5: (Gated DeltaNet | gated attention) x (dense MLP | MoE + gated shared expert).

One function serves both backends through megatron-core's BackendSpecProvider: Transformer Engine (fused
norm+linear, the GPU default) or the local PyTorch modules with our RMSNorm and our core attention (megatron's
local one has neither packed sequences nor context parallelism). The local layers map their separate
input norm onto the fused name in `sharded_state_dict`, so both backends read and write the same checkpoint.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec_for_backend, get_mlp_module_spec_for_backend
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_qwen35.config.megatron import BACKENDS
from megatron_qwen35.layers.core_attention import Qwen35CoreAttention
from megatron_qwen35.layers.gated_delta_net import Qwen35GatedDeltaNet
from megatron_qwen35.layers.norms import Qwen35FusedInputRMSNorm, Qwen35RMSNorm

GDN, ATTENTION = "gdn", "attention"


class Qwen35LocalSpecProvider(LocalSpecProvider):
    """megatron-core's local modules, with an RMSNorm that has zero-centred gamma and sequence parallelism, and a
    core attention that runs packed sequences and context parallelism."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return Qwen35RMSNorm

    def core_attention(self):
        return Qwen35CoreAttention


def backend_provider(backend: str) -> BackendSpecProvider:
    """megatron's provider of the modules of `backend` (specs are data: building them needs no TE; building a model
    on "te" checks that it imports, provider.resolve_backend)."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    if backend == "local":
        return Qwen35LocalSpecProvider()
    raise ValueError(f"unknown backend '{backend}'; choose one of {BACKENDS}")


def layer_pattern(config: TransformerConfig) -> list[tuple[str, bool]]:
    """(mixer, is_moe) for every decoder layer, from the config's linear-attention pattern and experts."""
    freq = config.linear_attention_freq
    if not isinstance(freq, list) or len(freq) != config.num_layers:
        raise ValueError(f"linear_attention_freq must list one 0/1 per layer ({config.num_layers}), got {freq!r}")
    is_moe = config.num_moe_experts is not None
    return [(GDN if f == 1 else ATTENTION, is_moe) for f in freq]


def _mixer_spec(mixer: str, provider: BackendSpecProvider, *, gdn_kernels: str) -> ModuleSpec:
    fused = provider.fuse_layernorm_and_linear()
    in_linear = provider.column_parallel_layer_norm_linear() if fused else provider.column_parallel_linear()
    if mixer == GDN:
        submodules = GatedDeltaNetSubmodules(in_proj=in_linear,
                                             out_norm=provider.layer_norm(rms_norm=True, for_qk=False),
                                             out_proj=provider.row_parallel_linear())
        return ModuleSpec(module=Qwen35GatedDeltaNet, params={"kernels": gdn_kernels}, submodules=submodules)
    qk_norm = provider.layer_norm(rms_norm=True, for_qk=True)
    return ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                      submodules=SelfAttentionSubmodules(
                          linear_qkv=in_linear, core_attention=provider.core_attention(),
                          linear_proj=provider.row_parallel_linear(), q_layernorm=qk_norm, k_layernorm=qk_norm))


def qwen35_layer_spec(mixer: str, is_moe: bool, config: TransformerConfig, *, backend: str,
                      gdn_kernels: str = "fla") -> ModuleSpec:
    """One TransformerLayer: a token mixer and an MLP, each behind a (1 + w) RMSNorm and a residual. `gdn_kernels`:
    the Gated DeltaNet's kernels ("fla" or "torch", layers/gdn_ops/fla.py)."""
    provider = backend_provider(backend)
    fused = provider.fuse_layernorm_and_linear()
    norm = provider.layer_norm(rms_norm=True, for_qk=False)
    if is_moe:
        mlp = get_moe_module_spec_for_backend(backend=provider, num_experts=config.num_moe_experts,
                                              moe_grouped_gemm=config.moe_grouped_gemm,
                                              use_te_activation_func=config.use_te_activation_func)
    else:
        mlp = get_mlp_module_spec_for_backend(backend=provider, num_experts=None)
    in_name = "in_proj" if mixer == GDN else "linear_qkv"
    # Local layers store these norms separately; checkpoints use the fused (Transformer Engine) names.
    keys_map = {} if fused else {"input_layernorm.": f"self_attention.{in_name}.layer_norm_"}
    if not fused and not is_moe:
        keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    # The fused TE module's one _extra_state is its linear's, so these norms save none (see the class).
    fused_norm = IdentityOp if fused else Qwen35FusedInputRMSNorm
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=fused_norm,
        self_attention=_mixer_spec(mixer, provider, gdn_kernels=gdn_kernels),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=norm if is_moe else fused_norm,  # MoE routes the normed input: its norm stays separate
        mlp=mlp,
        mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map=keys_map))


def qwen35_layer_specs(config: TransformerConfig, *, backend: str, gdn_kernels: str = "fla") -> list[ModuleSpec]:
    """The specs of all decoder layers, in order."""
    return [qwen35_layer_spec(mixer, is_moe, config, backend=backend, gdn_kernels=gdn_kernels)
            for mixer, is_moe in layer_pattern(config)]


def qwen35_block_spec(config: TransformerConfig, *, backend: str, vp_stage: int | None = None,
                      pp_rank: int | None = None, gdn_kernels: str = "fla") -> TransformerBlockSubmodules:
    """The decoder layers this pipeline (and virtual pipeline) stage builds, and the final norm."""
    specs = qwen35_layer_specs(config, backend=backend, gdn_kernels=gdn_kernels)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    provider = backend_provider(backend)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + count],
                                      layer_norm=provider.layer_norm(rms_norm=True, for_qk=False))


def qwen35_mtp_block_spec(config: TransformerConfig, *, backend: str, vp_stage: int | None = None,
                          pp_rank: int | None = None):
    """Megatron's MTP block whose inner layer is a full-attention Qwen3.5 layer (as in the released mtp.* weights)."""
    if not config.mtp_num_layers:
        return None
    attention_layer = qwen35_layer_spec(ATTENTION, config.num_moe_experts is not None, config, backend=backend)
    return get_gpt_mtp_block_spec_for_backend(config=config, spec=attention_layer, backend=backend_provider(backend),
                                              vp_stage=vp_stage, pp_rank=pp_rank)
