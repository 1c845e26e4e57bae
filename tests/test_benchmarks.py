"""The benchmarks users run for the LoRA and packing figures, at a tiny size: each runs to its end and prints its
ratios last, and what is not timing holds (timing itself is never asserted: these machines are noisy)."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _benchmark(script: str, *args: str) -> list[str]:
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if line.strip()]


def test_lora_benchmark_prints_the_adapters_share_and_the_step_time_ratio():
    lines = _benchmark("lora.py", "--preset", "tiny-moe", "--layers", "2", "--experts", "4", "--rank", "2",
                       "--iters", "2")
    shares = {k: float(v) for k, v in re.findall(r"([a-z/]+) ([0-9.]+)", lines[-2])}  # "optimizer state 0.05": state
    assert 0 < shares["trainable"] < 0.1 and 0 < shares["state"] < 0.1 and shares["checkpoint"] < 1, lines[-2]
    assert lines[-1].startswith("ratio "), lines[-1]


def test_packing_benchmark_trains_the_same_objective_and_prints_its_ratio():
    lines = _benchmark("packing.py", "--seq-length", "512", "--conversations", "4", "--layers", "2", "--repeats", "1",
                       "--threads", "1")
    assert any(line.startswith("loss per token:") and line.endswith("the same: True") for line in lines), lines
    assert lines[-1].startswith("ratio ") and float(lines[-1].split()[1]) > 0, lines[-1]
