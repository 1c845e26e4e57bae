"""Export a megatron_qwen35 checkpoint as a Hugging Face checkpoint (sharded safetensors, index, config.json).

    python tools/convert/megatron_to_hf.py --megatron-dir ckpt/qwen35-4b --out-dir Qwen3.5-4B-trained [--overwrite]

A LoRA run's checkpoint (the adapters alone) exports merged into its base, named by --base-dir (base + scale x B A),
or with --adapter-only as a Hugging Face PEFT adapter directory (adapter_config.json, adapter_model.safetensors) that
peft.PeftModel.from_pretrained loads:

    python tools/convert/megatron_to_hf.py --megatron-dir ckpt/lora --base-dir ckpt/35b-a3b-hf --out-dir merged
    python tools/convert/megatron_to_hf.py --megatron-dir ckpt/lora --adapter-only --out-dir adapter
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
from megatron_qwen35.cli import positive_int, quiet_library_notices, run_conversion  # noqa: E402  (standard library only)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron-dir", required=True, help="checkpoint written by training or hf_to_megatron.py")
    parser.add_argument("--out-dir", required=True, help="the Hugging Face directory to create")
    parser.add_argument("--max-shard-size", default=None,
                        help="largest safetensors shard, in bytes or like '5GB' (default: the converted source's own "
                             "files, or transformers' default for a checkpoint trained from scratch)")
    parser.add_argument("--base-dir", default=None,
                        help="the checkpoint a LoRA run trained its adapters on (merged export of a LoRA run)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="a LoRA checkpoint's adapters alone, as a Hugging Face PEFT adapter directory")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="tensors converted at once (default: by CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out-dir if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    quiet_library_notices()
    from megatron_qwen35.runtime import apply_runtime_patches

    apply_runtime_patches()  # an entry point: megatron adapted to this machine before the model's keys are read
    from megatron_qwen35.convert.megatron_to_hf import qwen35_adapter_to_peft, qwen35_megatron_to_hf

    if args.adapter_only:
        if args.base_dir:
            parser.error("--adapter-only writes the adapters alone: it reads no --base-dir")
        return run_conversion(lambda: qwen35_adapter_to_peft(args.megatron_dir, args.out_dir,
                                                             overwrite=args.overwrite))
    size = int(args.max_shard_size) if (args.max_shard_size or "").isdigit() else args.max_shard_size
    lanes = {"lanes": args.threads} if args.threads else {}
    return run_conversion(lambda: qwen35_megatron_to_hf(args.megatron_dir, args.out_dir, base_dir=args.base_dir,
                                                        overwrite=args.overwrite, max_shard_size=size,
                                                        progress=not args.no_progress, **lanes))


if __name__ == "__main__":
    sys.exit(main())
