"""How far a bf16 forward is from the fp32 reference, with Qwen3.5's fp32 parameters (GDN A_log and output-norm
weight) kept fp32, as this project does, and with everything cast to bf16, as megatron's Float16Module would.

    python benchmarks/bf16_fp32_parameters.py [--preset tiny-moe] [--lengths 128 1024 4096]

Same weights (A_log drawn as Qwen3.5 initialises it, norms perturbed), same tokens; megatron's Float16Module around
the model; CPU, local backend. Prints max |delta logit| relative to the largest logit, KL(fp32 || bf16) per token and
top-1 agreement for each sequence length. An accuracy figure, not a timing: nothing here is a ratio of speeds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


@contextlib.contextmanager
def _every_parameter_bf16():
    """Build the GDN layers without the fp32 exception (what megatron would do with this model)."""
    from megatron_qwen35.layers import gated_delta_net

    saved = gated_delta_net.FP32_PARAMETERS
    gated_delta_net.FP32_PARAMETERS = ()
    try:
        yield
    finally:
        gated_delta_net.FP32_PARAMETERS = saved


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny-moe")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 1024, 4096])
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    from megatron.core.transformer.module import Float16Module

    from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config
    from megatron_qwen35.provider import qwen35_gpt_model
    from megatron_qwen35.runtime import initialize_parallel

    initialize_parallel(seed=1)
    cfg = qwen35_preset(a.preset)
    torch.manual_seed(0)
    ref = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local").eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.endswith("A_log"):  # transformers' init: log(U(0, 16))
                param.copy_(torch.empty_like(param).uniform_(0.01, 16).log())
            elif param.dim() == 1 and "norm" in name:
                param.normal_(0.0, 0.05)

    def bf16_model():
        config = qwen35_transformer_config(cfg, params_dtype=torch.bfloat16, bf16=True)
        model = qwen35_gpt_model(cfg, config, backend="local")
        model.load_state_dict(ref.state_dict(), strict=False)
        return Float16Module(config, model).eval()

    kept = bf16_model()
    with _every_parameter_bf16():
        cast = bf16_model()
    print(f"{cfg.name}: bf16 forward against the fp32 reference (same weights, {torch.get_num_threads()} threads)")
    print(f"{'tokens':>7} {'variant':<26} {'max|dlogit|/max|logit|':>23} {'KL per token':>13} {'top-1':>7}")
    for length in a.lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        pos = torch.arange(length).unsqueeze(0)
        with torch.no_grad():
            want = ref(ids, pos, None).float()
            for variant, model in (("A_log, GDN norm in fp32", kept), ("all parameters bf16", cast)):
                got = model(ids, pos, None).float()
                rel = ((got - want).abs().max() / want.abs().max()).item()
                kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                                reduction="none").sum(-1).mean().item()
                top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
                print(f"{length:>7} {variant:<26} {rel:>23.2e} {kl:>13.2e} {top1:>7.4f}")


if __name__ == "__main__":
    main()
