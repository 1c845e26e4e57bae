"""The ModuleSpec of a vision tower block: megatron's TransformerLayer as a pre-norm ViT block, TE or local backend.

transformers' `Qwen3_5VisionBlock`: x + attn(norm1(x)), then + mlp(norm2(x)); LayerNorm with bias, attention with a
qkv bias and no q/k norm, MLP fc1 -> activation -> fc2 with biases. Attention is bidirectional inside one frame and
blind across frames (the tower hands over a THD batch, one sequence per frame): `no_mask`, which Transformer Engine
turns into its padding mask for THD and our local core attention reads as "same packed sequence".
The seam is the text layers' (`layer_specs.backend_provider`); only the local norm differs (LayerNorm, not RMSNorm),
and the local layers map their separate norms onto TE's fused names, as the text layers do.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_qwen35.layers.vision.norms import Qwen35VisionFusedInputLayerNorm, Qwen35VisionLayerNorm
from megatron_qwen35.specs.layer_specs import Qwen35LocalSpecProvider, backend_provider


class Qwen35VisionLocalSpecProvider(Qwen35LocalSpecProvider):
    """The text layers' local modules (our core attention: packed sequences), with LayerNorm for the tower's norms."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        if rms_norm:
            raise ValueError("the vision tower has LayerNorms only")
        return Qwen35VisionLayerNorm


def vision_backend_provider(backend: str) -> BackendSpecProvider:
    """The text model's provider for `backend`, with the local one's norm swapped for LayerNorm."""
    return Qwen35VisionLocalSpecProvider() if backend == "local" else backend_provider(backend)


def qwen35_vision_layer_spec(*, backend: str) -> ModuleSpec:
    """One block of the vision tower."""
    provider = vision_backend_provider(backend)
    fused = provider.fuse_layernorm_and_linear()
    attention = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.no_mask},
                           submodules=SelfAttentionSubmodules(
                               linear_qkv=provider.column_parallel_layer_norm_linear() if fused
                               else provider.column_parallel_linear(),
                               core_attention=provider.core_attention(),
                               linear_proj=provider.row_parallel_linear()))
    # Local layers store these norms separately; checkpoints use the fused (Transformer Engine) names.
    keys_map = {} if fused else {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                                 "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    fused_norm = IdentityOp if fused else Qwen35VisionFusedInputLayerNorm
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=fused_norm,
        self_attention=attention,
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=fused_norm,
        mlp=get_mlp_module_spec_for_backend(backend=provider, num_experts=None),
        mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map=keys_map))
