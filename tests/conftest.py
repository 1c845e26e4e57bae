"""Shared set-up: fast CPU runs (no torch.compile), one single-process megatron group for in-process tests."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser compiles on first call; same numbers

import pytest
import torch

from megatron_qwen35.runtime import apply_runtime_patches

apply_runtime_patches()  # the tests are an entry point: nothing in the package applies the register on its own


@pytest.fixture(scope="session")
def megatron_single_process():
    """torch.distributed (gloo) + megatron parallel state with every parallel size 1."""
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(seed=1234)
    yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_auxiliary_loss_scales():
    """megatron's schedules leave class-level MTP / MoE aux-loss backward scales (1 / num_microbatches) behind;
    a test that backpropagates outside a schedule must start from 1, as a fresh process does."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # re-created as 1.0 on first use
    MTPLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)
    yield
