"""Run pretrain_qwen35.py as a user does (python, or torchrun for a parallel layout) and read what it logged.

The per-step values come from megatron.training's own TensorBoard scalars (written on the last rank), not from its
text log: megatron's text log averages every value since the previous line, and after the first line of a process it
does not reset, so with `--log-interval 1` the second line of every process is a two-step mean.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_qwen35.demo import tensorboard_scalars as scalars
from megatron_qwen35.runtime import free_local_port

REPO = Path(__file__).resolve().parents[1]

# A few steps of tiny-moe (GDN, gated attention, MoE with shared expert, MTP) on megatron's mock data.
TINY_RUN = ("--qwen35-preset", "tiny-moe", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--seq-length", "32", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
            "--lr-warmup-iters", "1", "--lr-decay-iters", "4", "--mock-data", "--tokenizer-type", "NullTokenizer",
            "--seed", "7", "--log-interval", "1", "--eval-iters", "0")


@dataclass
class Run:
    losses: dict[int, float]  # iteration -> lm loss
    grad_norms: dict[int, float]
    stdout: str
    stderr: str
    returncode: int


def _run(command: list[str], workdir: Path, tensorboard: Path, env: dict, check: bool, timeout: int) -> Run:
    # PYTHONFAULTHANDLER: a rank that dies of a signal prints its Python stack into the stderr a failure shows
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONFAULTHANDLER": "1", **env}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):  # this test process's own, if any
        env.pop(key, None)
    done = subprocess.run(command, capture_output=True, text=True, cwd=workdir, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command[:3])} ... failed ({done.returncode}):\n{done.stderr[-6000:]}")
    losses = scalars(tensorboard, "lm loss") if tensorboard.is_dir() else {}
    grad_norms = scalars(tensorboard, "grad-norm") if tensorboard.is_dir() else {}
    return Run(losses, grad_norms, done.stdout, done.stderr, done.returncode)


def pretrain(workdir: Path, *flags: str, nproc: int = 1, run_name: str = "run", base: tuple = TINY_RUN,
             check: bool = True, timeout: int = 900) -> Run:
    """pretrain_qwen35.py with `base` and `flags` in `workdir` (python, or torchrun with `nproc` ranks)."""
    tensorboard = workdir / f"tb-{run_name}"
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
        str(free_local_port())]
    command = [*launcher, str(REPO / "pretrain_qwen35.py"), *base, "--tensorboard-dir", str(tensorboard),
               "--tensorboard-log-interval", "1", *flags]
    return _run(command, workdir, tensorboard, {"MASTER_PORT": str(free_local_port())}, check, timeout)


# A recipe's settings for tiny-moe on CPU ranks: mock data, fp32 (PRECISION empty) so layouts compare to the bit of
# float32 reordering, no evaluation, a log line per step.
TINY_RECIPE = dict(PRESET="tiny-moe", MOCK_DATA="1", GLOBAL_BATCH="4", MICRO_BATCH="2", SEQ_LEN="32", TRAIN_ITERS="3",
                   PRECISION="", EVAL_ITERS="0", LOG_INTERVAL="1", WARMUP="1", LR="1e-3", MIN_LR="1e-4")


def recipe(workdir: Path, *flags: str, nproc: int = 1, run_name: str = "run", check: bool = True,
           timeout: int = 900, **settings: str) -> Run:
    """recipes/common.sh (torchrun with `nproc` ranks, as a user launches a recipe) with TINY_RECIPE and `settings`
    as its environment, `flags` as extra Megatron flags."""
    tensorboard = workdir / f"tb-{run_name}"
    env = {**TINY_RECIPE, "GPUS_PER_NODE": str(nproc), "MASTER_PORT": str(free_local_port()),
           "SAVE": str(workdir / f"ckpt-{run_name}"), "PYTHON": sys.executable, **settings}
    command = ["bash", str(REPO / "recipes" / "common.sh"), "--tensorboard-dir", str(tensorboard),
               "--tensorboard-log-interval", "1", *flags]
    return _run(command, workdir, tensorboard, env, check, timeout)


__all__ = ["REPO", "TINY_RUN", "TINY_RECIPE", "Run", "pretrain", "recipe", "scalars"]
