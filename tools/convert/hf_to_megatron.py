"""Convert a Hugging Face Qwen3.5 checkpoint into a megatron_qwen35 torch_dist checkpoint (loads at any TP/EP).

    python tools/convert/hf_to_megatron.py --hf-dir Qwen3.5-4B --out-dir ckpt/qwen35-4b [--dtype bf16|fp32]

With --adapter PEFT_DIR (a Hugging Face PEFT LoRA adapter of that model) the output is a LoRA checkpoint: the base
and the adapter, which a LoRA run with the adapter's settings trains on and load_model / tools/generate.py run.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
from megatron_qwen35.cli import positive_int, quiet_library_notices, run_conversion  # noqa: E402  (standard library only)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    parser.add_argument("--out-dir", required=True, help="the Megatron checkpoint directory to create")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="weight dtype (default: the checkpoint's own, tensor by tensor)")
    parser.add_argument("--adapter", default=None, help="a Hugging Face PEFT LoRA adapter directory of this model")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="tensors converted at once (default: by CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out-dir if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    quiet_library_notices()
    from megatron_qwen35.runtime import apply_runtime_patches

    apply_runtime_patches()  # an entry point: megatron adapted to this machine before the model's keys are read
    from megatron_qwen35.convert.hf_to_megatron import qwen35_hf_to_megatron

    lanes = {"lanes": args.threads} if args.threads else {}
    return run_conversion(lambda: qwen35_hf_to_megatron(args.hf_dir, args.out_dir, dtype=args.dtype,
                                                        overwrite=args.overwrite, progress=not args.no_progress,
                                                        adapter=args.adapter, **lanes))


if __name__ == "__main__":
    sys.exit(main())
