"""Single-process tests of megatron_qwen35.runtime: one test (at least) per CPU adaptation, the
no-CUDA / CUDA switch, idempotency, and a stock megatron GPTModel forward+backward on CPU.
Multi-process layouts (TP2, PP2, EP2, dist_checkpointing) are in tests/parallel/."""

import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from megatron_qwen35 import runtime
from megatron_qwen35.runtime import no_cuda, register
from megatron_qwen35.runtime.patching import original

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-runtime tests")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cpu_runtime():
    runtime.apply_runtime_patches()
    yield


@pytest.fixture
def parallel_1():
    """Single-process megatron state; restores the default (conftest) layout afterwards."""
    runtime.initialize_parallel(seed=1234)
    yield
    runtime.initialize_parallel(seed=1234)


# ----------------------------------------------------------------------------- switch / idempotency


def _run_fresh_python(code: str, dynamo_env: bool = True) -> str:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=REPO_ROOT)
    if not dynamo_env:
        env.pop("TORCHDYNAMO_DISABLE")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_noop_when_cuda_available():
    # Fresh interpreter, so nothing was patched by earlier tests in this process.
    stdout = _run_fresh_python(
        """
        import torch
        torch.cuda.is_available = lambda: True
        orig_current_device, orig_sync = torch.cuda.current_device, torch.cuda.synchronize
        from megatron.core.tensor_parallel import random as mrandom
        from megatron.core.pipeline_parallel import schedules
        orig_fork = mrandom.CudaRNGStatesTracker.fork
        orig_stream = torch.cuda.current_stream
        from megatron.core.optimizer import clip_grads
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        from megatron.core.models.common.language_module.language_module import LanguageModule
        orig_distopt_init, orig_setup = DistributedOptimizer.__init__, LanguageModule.setup_embeddings_and_output_layer
        from megatron_qwen35.runtime import apply_runtime_patches, register
        apply_runtime_patches()
        apply_runtime_patches()
        upstream = [p.name for p in register.PATCHES if p.kind != register.NO_CUDA]
        assert register.applied_patches() == upstream, register.applied_patches()
        assert torch.cuda.current_device is orig_current_device
        assert torch.cuda.synchronize is orig_sync
        assert mrandom.CudaRNGStatesTracker.fork is orig_fork
        assert schedules.torch is torch
        assert torch.cuda.current_stream is orig_stream and clip_grads.torch is torch
        assert DistributedOptimizer.__init__ is orig_distopt_init
        assert LanguageModule.setup_embeddings_and_output_layer is orig_setup
        print("UNPATCHED")
        """
    )
    assert "UNPATCHED" in stdout


def test_apply_runtime_patches_is_idempotent(cpu_runtime):
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import mappings

    before = (
        list(register.applied_patches()),
        torch.cuda.current_device,
        mappings._gather_along_first_dim,
        tensor_parallel.model_parallel_cuda_manual_seed,
        schedules.torch,
    )
    runtime.apply_runtime_patches()
    register.apply_patches()
    after = (
        list(register.applied_patches()),
        torch.cuda.current_device,
        mappings._gather_along_first_dim,
        tensor_parallel.model_parallel_cuda_manual_seed,
        schedules.torch,
    )
    assert before == after
    assert before[0] == [p.name for p in register.PATCHES]
    # wrappers are not stacked on re-application
    assert not hasattr(mappings._gather_along_first_dim.__wrapped__, "__wrapped__")
    seed_fn = tensor_parallel.model_parallel_cuda_manual_seed
    assert not hasattr(seed_fn.__wrapped__, "__wrapped__")




# ----------------------------------------------------------------------------- devices


def test_current_device_and_compute_device_resolve_to_cpu(cpu_runtime):
    assert runtime.compute_device() == torch.device("cpu")
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


def test_global_memory_buffer_on_cpu(cpu_runtime):
    from megatron.core.utils import GlobalMemoryBuffer

    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "mpu")
    assert buf.device.type == "cpu" and buf.shape == (2, 3)


def test_rotary_embedding_buffers_on_cpu(cpu_runtime):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=False)
    assert rope.inv_freq.device.type == "cpu"
    assert rope(8).device.type == "cpu"


def test_synchronize_is_noop(cpu_runtime):
    assert torch.cuda.synchronize() is None


# ----------------------------------------------------------------------------- RNG tracker


def test_rng_tracker_fork_is_deterministic_and_isolated(parallel_1, caplog):
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()

    def draws():
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        default_state = torch.get_rng_state()
        with tracker.fork():
            a = torch.randn(4)
        with tracker.fork():
            b = torch.randn(4)  # the forked stream advanced
        with tracker.fork(tensor_parallel.random.get_data_parallel_rng_tracker_name()):
            c = torch.randn(4)
        # forking leaves the default generator where it was
        assert torch.equal(torch.get_rng_state(), default_state)
        return a, b, c, torch.randn(4)

    with caplog.at_level(logging.WARNING):
        first, second = draws(), draws()
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
    a, b, c, default = first
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert "CPU RNG state changed" not in caplog.text


def test_model_parallel_seed_seeds_cpu_generator(parallel_1):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(7)
    x = torch.randn(3)
    torch.manual_seed(7)
    assert torch.equal(x, torch.randn(3))


def test_checkpointed_dropout_replays_same_mask(parallel_1):
    # tensor_parallel.checkpoint saves/restores the "CUDA" RNG state for the recompute pass.
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(11)
    x = torch.randn(64, requires_grad=True)

    def f(inp):
        return torch.nn.functional.dropout(inp, p=0.5, training=True)

    with tensor_parallel.get_cuda_rng_tracker().fork():
        out = tensor_parallel.checkpoint(f, False, x)
    out.sum().backward()
    kept = out.detach() != 0
    assert torch.equal(x.grad != 0, kept)
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 2.0))


# ----------------------------------------------------------------------------- "cuda" literals


def test_cuda_literals_allocate_on_cpu(cpu_runtime):
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.utils import get_default_causal_mask

    assert isinstance(schedules.torch, no_cuda.torch_cuda.CpuTorchProxy)
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor  # everything else is the real torch
    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask[0, 1] and not mask[1, 0]


# ----------------------------------------------------------------------------- MoE dispatcher


def test_alltoall_dispatcher_host_splits_without_streams(cpu_runtime):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    assert MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is not None  # no torch.cuda.Stream()
    fake = SimpleNamespace(
        drop_and_pad=False,
        cuda_dtoh_point="before_permutation_1",
        input_splits=torch.tensor([3, 1]),
        output_splits=torch.tensor([2, 2]),
        output_splits_tp=None,
    )
    tpe = torch.tensor([1, 2])
    out = MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize(fake, "before_permutation_1", tpe)
    assert out is tpe
    assert list(fake.input_splits) == [3, 1] and not torch.is_tensor(fake.input_splits)
    assert list(fake.output_splits) == [2, 2]


def test_uneven_collectives_pass_through_on_one_rank(cpu_runtime, parallel_1):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    group = parallel_state.get_tensor_model_parallel_group()
    x = torch.randn(3, 2)
    assert mappings._gather_along_first_dim(x, group, output_split_sizes=[3]) is x
    assert mappings._reduce_scatter_along_first_dim(x, group, input_split_sizes=[3]) is x


# ----------------------------------------------------------------------------- dynamo


def test_dynamo_disabled():
    # Fresh interpreter without TORCHDYNAMO_DISABLE (conftest sets it for this process), and a
    # function compiled *before* the patch, like megatron's import-time @jit_fuser functions.
    stdout = _run_fresh_python(
        """
        import torch
        calls = []

        @torch.compile
        def f(x):
            calls.append(1)  # a Python side effect runs on every call only when not compiled
            return x + 1

        from megatron_qwen35.runtime import apply_runtime_patches
        apply_runtime_patches()
        f(torch.ones(1)); f(torch.ones(1))
        print("CALLS", len(calls), torch._dynamo.config.disable)
        """,
        dynamo_env=False,
    )
    assert "CALLS 2 True" in stdout


# ----------------------------------------------------------------------------- initialize_parallel


def test_a_local_rendezvous_port_is_free_below_the_ephemeral_range_and_not_drawn_from_seeded_state():
    """free_local_port: a port outgoing connections are never given (below the kernel's ephemeral range) that binds
    now, drawn from the OS's entropy (megatron seeds Python's random alike in every rank and test worker)."""
    import random
    import socket
    from pathlib import Path

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    draws = []
    for _ in range(2):
        random.seed(1234)
        draws.append([runtime.free_local_port() for _ in range(4)])
    assert draws[0] != draws[1]
    for port in draws[0] + draws[1]:
        assert 10000 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_initialize_parallel_single_process(parallel_1):
    from megatron.core import parallel_state

    assert torch.distributed.is_initialized()
    assert torch.distributed.get_backend() == "gloo"
    assert parallel_state.model_parallel_is_initialized()
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    group = parallel_state.get_tensor_model_parallel_group()

    runtime.initialize_parallel(seed=1234)  # same layout: no-op
    assert parallel_state.get_tensor_model_parallel_group() is group

    runtime.initialize_parallel(seed=99)  # same layout, other seed: re-seed only
    assert parallel_state.get_tensor_model_parallel_group() is group
    x = torch.randn(2)
    torch.manual_seed(99)
    assert torch.equal(x, torch.randn(2))

    runtime.initialize_parallel(context_parallel=1, expert_parallel=1, tensor_parallel=1)
    runtime.destroy_parallel()
    assert not parallel_state.model_parallel_is_initialized()
    runtime.initialize_parallel(seed=1234)
    assert parallel_state.model_parallel_is_initialized()


# ----------------------------------------------------------------------------- stock GPTModel


def _tiny_gpt(num_experts=None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe = {}
    if num_experts:
        moe = dict(
            num_moe_experts=num_experts, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
            moe_ffn_hidden_size=64, add_bias_linear=False, moe_aux_loss_coeff=0.0,
        )
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, params_dtype=torch.float32,
        use_cpu_initialization=True, perform_initialization=True, **moe,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=num_experts),
        vocab_size=128, max_sequence_length=16, position_embedding_type="rope",
    )


@pytest.mark.parametrize("num_experts", [None, 4], ids=["dense", "moe"])
def test_gpt_forward_backward_on_cpu(parallel_1, num_experts):
    model = _tiny_gpt(num_experts)
    assert all(p.device.type == "cpu" for p in model.parameters())
    tokens = torch.randint(0, 128, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    logits = model(tokens, positions, None)
    assert logits.shape == (2, 16, 128)
    loss = model(tokens, positions, None, labels=tokens).mean()  # dropout on (default 0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- DDP + optimizers


def test_current_stream_waits_are_noops(cpu_runtime):
    stream = torch.cuda.current_stream()
    assert stream.wait_event(None) is None and stream.wait_stream(stream) is None
    assert torch.cuda.current_stream() is stream


def test_optimizer_modules_allocate_on_cpu(cpu_runtime):
    from megatron.core.optimizer import clip_grads, grad_scaler
    from megatron.core.optimizer import optimizer as optimizer_module

    for module in (optimizer_module, clip_grads, grad_scaler):
        assert isinstance(module.torch, no_cuda.torch_cuda.CpuTorchProxy)
        assert module.torch.tensor([0], dtype=torch.int, device="cuda").device.type == "cpu"
    scaler = grad_scaler.DynamicGradScaler(initial_scale=2.0**8, min_scale=1.0, growth_factor=2.0,
                                           backoff_factor=0.5, growth_interval=2, hysteresis=1)
    assert scaler.scale.device.type == "cpu"


def test_grad_norm_and_zero_count_on_cpu(parallel_1):
    from megatron.core.optimizer.clip_grads import count_zeros_fp32, get_grad_norm_fp32

    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0, 12.0]])]
    assert get_grad_norm_fp32(grads) == pytest.approx(13.0)
    assert get_grad_norm_fp32(grads, norm_type=float("inf")) == pytest.approx(12.0)
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([0.0, 1.0, 0.0, 2.0])
    assert int(count_zeros_fp32([p], grad_stats_parallel_group=None)) == 2


def test_cuda_type_names_only_inside_wrapped_functions(parallel_1):
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)  # asserts a CUDA type
    torch.testing.assert_close(p.grad, torch.full((4,), 0.5), rtol=1e-5, atol=0)
    assert p.type() == "torch.FloatTensor"  # untouched outside
    assert p.type(torch.float64).dtype == torch.float64


def _qwen35_train_setup(use_distributed_optimizer, seed=1234):
    """tiny-moe wrapped in megatron DDP, its megatron optimizer and LR scheduler (the cpu_loop recipe)."""
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
    from megatron_qwen35.provider import qwen35_gpt_model

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    cfg = qwen35_preset("tiny-moe")
    tc = qwen35_transformer_config(cfg, params_dtype=torch.float32)
    model = qwen35_gpt_model(cfg, tc, backend="local")
    ddp = DistributedDataParallel(tc, DistributedDataParallelConfig(
        use_distributed_optimizer=use_distributed_optimizer, grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-3, min_lr=1e-4, weight_decay=0.01, clip_grad=1.0, bf16=False, fp16=False,
        use_distributed_optimizer=use_distributed_optimizer, log_num_zeros_in_grad=True), [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=1e-4, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_steps=10,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=10, wd_incr_style="constant")
    return cfg, ddp, optimizer, scheduler


def _qwen35_train_step(cfg, ddp, optimizer, scheduler, seed):
    from megatron.core.distributed import finalize_model_grads

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)
    positions = torch.arange(16).expand(2, 16)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = ddp(ids[:, :-1], positions, None, labels=ids[:, 1:]).mean()
    loss.backward()
    finalize_model_grads([ddp])
    result = optimizer.step()
    scheduler.step(increment=1)
    return loss.item(), result


def _train_checkpoint_state(ddp, optimizer, scheduler, is_loading=False):
    from megatron.core import parallel_state

    metadata = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                "chained_optim_avoid_prefix": True,
                "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    state = {"model": ddp.module.sharded_state_dict(metadata=metadata)}  # unwrapped: no "module." prefix
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    state["opt_param_scheduler"] = scheduler.state_dict()
    return state


@pytest.mark.parametrize("use_distributed_optimizer", [False, True], ids=["adam", "distributed-adam"])
def test_ddp_optimizer_train_step_and_resume(parallel_1, tmp_path, use_distributed_optimizer):
    """DDP -> forward/backward -> finalize_model_grads -> optimizer.step(), then a dist_checkpointing
    save of model + optimizer + scheduler, and a resume whose next step equals the uninterrupted run's."""
    from megatron.core import dist_checkpointing

    cfg, ddp, optimizer, scheduler = _qwen35_train_setup(use_distributed_optimizer)
    before = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    loss, (ok, grad_norm, num_zeros) = _qwen35_train_step(cfg, ddp, optimizer, scheduler, seed=1)
    assert ok and torch.isfinite(torch.tensor(loss)) and grad_norm > 0 and num_zeros is not None
    changed = [n for n, p in ddp.module.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # Adam moves every parameter that got a gradient

    dist_checkpointing.save(_train_checkpoint_state(ddp, optimizer, scheduler), str(tmp_path))
    want = _qwen35_train_step(cfg, ddp, optimizer, scheduler, seed=2)
    want_params = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}

    cfg, ddp2, optimizer2, scheduler2 = _qwen35_train_setup(use_distributed_optimizer, seed=99)
    loaded = dist_checkpointing.load(_train_checkpoint_state(ddp2, optimizer2, scheduler2, is_loading=True),
                                     str(tmp_path))
    ddp2.module.load_state_dict(loaded["model"])
    optimizer2.load_state_dict(loaded["optimizer"])
    scheduler2.load_state_dict(loaded["opt_param_scheduler"])
    got = _qwen35_train_step(cfg, ddp2, optimizer2, scheduler2, seed=2)
    assert got == want
    for n, p in ddp2.module.named_parameters():
        assert torch.equal(p, want_params[n]), n


def test_distributed_optimizer_state_dict_before_first_step(parallel_1):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _, _, optimizer, _ = _qwen35_train_setup(True)
    inner = optimizer.chained_optimizers[0]
    assert isinstance(inner, DistributedOptimizer)
    groups = inner.state_dict()["optimizer"]["param_groups"]  # upstream: AssertionError (no steps yet)
    assert {g["step"] for g in groups} == {0.0}


def test_pipeline_embedding_copy_skips_cuda_move(cpu_runtime):
    # PP2 itself (where the last stage syncs its embedding copy) runs in tests/parallel/test_layout_matrix.py.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    assert hasattr(LanguageModule.setup_embeddings_and_output_layer, "__wrapped__")
    x = torch.ones(2)
    with no_cuda.torch_cuda.tensor_cuda_is_identity():
        assert x.cuda() is x
    # restored on exit: the real method again, which fails without CUDA
    with pytest.raises((RuntimeError, AssertionError)):
        x.cuda()


def test_validate_args_reads_no_gpu_generation(cpu_runtime):
    """TP / CP > 1 make validate_args ask for the GPU generation; on the CPU the answer is one with no stream-ordering
    rule (so no CUDA_DEVICE_MAX_CONNECTIONS demand), and the original is kept."""
    from megatron.training import arguments

    assert arguments.get_device_arch_version() == 10
    assert original(arguments, "get_device_arch_version").__module__.startswith("megatron.training")
