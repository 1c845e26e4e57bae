"""CPU decode speed: megatron_qwen35's `generate` against transformers' `generate`, same model, same prompts.

The model is a 4-layer slice of the 2b preset (hidden 2048: 3 Gated DeltaNet layers and 1 gated attention layer at
the real head sizes, dense MLP 6144) with a 32768-token vocabulary, so that the layers, not the output layer or
per-call overhead, carry the cost; fp32, random weights, loaded into both. Both generate greedily for a batch of
left-padded prompts with their attention mask (first checked to give the same tokens). Decode speed is new tokens
per second over the decode steps only: the time of generating N tokens minus that of generating 1 (the prompt and
its first token). Interleaved, best of a few repeats (background load would otherwise favour one side).
The last line is `ratio <ours/transformers>` of decode tokens per second; the goal is >= 1.0.

Run: python benchmarks/generate.py [--batch 4] [--prompt-len 64] [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser would compile on the CPU: same numbers

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_qwen35.config import qwen35_preset, qwen35_transformer_config  # noqa: E402
from megatron_qwen35.convert.model_state import load_hf_state_dict  # noqa: E402
from megatron_qwen35.hf_reference import reference_model  # noqa: E402
from megatron_qwen35.inference import Qwen35CausalLM, generate, left_padded  # noqa: E402
from megatron_qwen35.provider import qwen35_gpt_model  # noqa: E402
from megatron_qwen35.runtime import initialize_parallel  # noqa: E402


def build_models(layers: int, vocab: int):
    """(transformers' model, ours) with the same random weights."""
    cfg = qwen35_preset("2b").replace(num_layers=layers, vocab_size=vocab, mtp_num_layers=0, name=f"2b-{layers}l")
    hf = reference_model(cfg, seed=0)
    gpt = qwen35_gpt_model(cfg, qwen35_transformer_config(cfg, params_dtype=torch.float32), backend="local").eval()
    load_hf_state_dict(gpt, cfg, hf.state_dict(), include_mtp=False)
    return cfg, hf, Qwen35CausalLM(gpt, cfg).eval()


def prompts(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    """Prompts of prompt_len, prompt_len - 8, ... tokens: the batch is left-padded, as generation batches are."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (max(prompt_len - 8 * i, 1),), generator=g).tolist() for i in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    initialize_parallel()
    cfg, hf, ours = build_models(args.layers, args.vocab)
    input_ids, attention_mask = left_padded(prompts(args.batch, args.prompt_len, args.vocab))
    runners = {
        "ours": lambda n: generate(ours, input_ids, n, attention_mask=attention_mask),
        "transformers": lambda n: hf.generate(input_ids, attention_mask=attention_mask, max_new_tokens=n,
                                              min_new_tokens=n, do_sample=False, pad_token_id=0),
    }
    with torch.no_grad():
        same = torch.equal(runners["ours"](args.new_tokens), runners["transformers"](args.new_tokens))
        print(f"model {cfg.name}: hidden {cfg.hidden_size}, layers {cfg.layer_types}, vocab {cfg.vocab_size}, fp32, "
              f"threads={torch.get_num_threads()}; batch {args.batch}, prompts <= {args.prompt_len} tokens "
              f"(left-padded), {args.new_tokens} new tokens; same tokens as transformers: {same}")
        best = {name: {1: float("inf"), args.new_tokens: float("inf")} for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                for n in best[name]:
                    start = time.perf_counter()
                    run(n)
                    best[name][n] = min(best[name][n], time.perf_counter() - start)
    speed = {}
    for name, times in best.items():
        decode = times[args.new_tokens] - times[1]
        speed[name] = (args.new_tokens - 1) * args.batch / decode
        print(f"{name:>12}: prompt + 1 token {times[1]:.3f} s, decode {decode:.3f} s, "
              f"{speed[name]:.1f} tokens/s")
    print(f"ratio {speed['ours'] / speed['transformers']:.2f}")


if __name__ == "__main__":
    main()
