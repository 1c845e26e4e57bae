"""Shared set-up: fast CPU runs (no torch.compile), one single-process megatron group for in-process tests."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser compiles on first call; same numbers

import pytest
import torch


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
