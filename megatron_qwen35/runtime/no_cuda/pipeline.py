"""Pipeline parallelism without CUDA: the last stage's copy of the word embeddings.

`LanguageModule.setup_embeddings_and_output_layer` moves it with ``weight.data.cuda()`` before the all-reduce that syncs
it with the first stage; here ``.cuda()`` is the identity within that call.
"""

from __future__ import annotations

from megatron_qwen35.runtime.no_cuda.torch_cuda import tensor_cuda_is_identity
from megatron_qwen35.runtime.patching import replace as _replace


def patch_pipeline_embedding_copy() -> None:
    # With PP > 1 the last stage holds a copy of the word embeddings (tied output layer, or the
    # MTP block's embedding); LanguageModule.setup_embeddings_and_output_layer moves it with
    # `weight.data.cuda()` before the all-reduce that syncs it with the first stage.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer
    if not hasattr(setup, "__wrapped__"):
        def setup_embeddings_and_output_layer(self):
            with tensor_cuda_is_identity():
                return setup(self)

        setup_embeddings_and_output_layer.__wrapped__ = setup
        _replace(LanguageModule, "setup_embeddings_and_output_layer", setup_embeddings_and_output_layer)
