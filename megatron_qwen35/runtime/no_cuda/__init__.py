"""megatron-core 0.19.2 on a machine without CUDA: the adaptations of its CUDA assumptions, one module per subsystem
(megatron.training's are in ../training_patches.py; the table of all of them, with their kinds and fingerprints, is
../register.py, which applies them only where CUDA is absent).

megatron-core allocates on ``torch.cuda.current_device()``, keeps its RNG streams on the CUDA generator, writes
``device="cuda"`` literals, and uses CUDA streams/events. None of that exists on a CPU-only host, where each of those
calls raises. The modules below redirect exactly those spots to the CPU; each patch is idempotent and replaces
attributes through `patching.replace` (site-packages is never edited).

    torch_cuda   torch.cuda.current_device / synchronize / current_stream answered for the CPU; the shared tools
                 `CpuTorchProxy` (a module's ``torch`` whose 'cuda' factories allocate on the CPU) and
                 `tensor_cuda_is_identity`
    rng          the model-parallel RNG tracker (init, dropout) on the CPU generator
    literals     device='cuda' literals in the schedules, transformer masks, dist-checkpointing, optimizers,
                 clip_grads and grad scaler; the no-TE/no-apex grad-norm fallback; megatron.training's device-arch read
    collectives  uneven first-dim gather / reduce-scatter (MoE with TP) under gloo
    moe          the MoE alltoall token dispatcher without its CUDA side stream
    optimizer    the optimizers' type() == 'torch.cuda.FloatTensor' checks; the distributed optimizer's torch Adam step
    pipeline     PP: the last stage's embedding copy, moved with .cuda()
    rope         CP: this rank's slice of the rotary table, without a pinned index tensor
    dynamo       torch.compile (megatron's jit_fuser) off
"""

from megatron_qwen35.runtime.no_cuda import (
    collectives,
    dynamo,
    literals,
    moe,
    optimizer,
    pipeline,
    rng,
    rope,
    torch_cuda,
)

__all__ = ["collectives", "dynamo", "literals", "moe", "optimizer", "pipeline", "rng", "rope", "torch_cuda"]
